"""The block math of the accelerated stream: one decoder block over a set of rows, the last of
which are fast rows with adapters on, sharing the slow stream's KV cache (a fast query sees the
slow keys/values of earlier positions plus its own; it never writes the slow cache). Used by
training (differentiable LowRank adapters) and by decoding (FusedAdapters, in place).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from m2r2core.runtime import hf_compat
from m2r2core.runtime.hf_compat import BlockParts

GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
"""Projections that read the same input, so their adapters run as one low-rank pair."""



class FusedAdapters:
    """Inference form of one block's adapters: per input group, the A matrices stacked and the
    scaled B matrices block-diagonal, kept in float32. Two small matmuls per group instead of two
    per projection (on CPU, op overhead dominates these tiny products). float32 because at a few
    rows torch's CPU bf16 matmuls of this size cost 2-4x float32's (session 40, AMX Xeon); the
    deltas are cast to the model's dtype when added.
    """

    def __init__(self, adapters: nn.ModuleDict) -> None:
        """Fuse a block's LowRank adapters."""
        self.groups: dict[str, tuple[tuple[str, ...], torch.Tensor, torch.Tensor,
                                     torch.Tensor | None, list[int]]] = {}
        with torch.no_grad():
            for group, names in GROUPS.items():
                present = tuple(n for n in names if n in adapters)
                if not present:
                    continue
                a = torch.cat([adapters[n].A for n in present]).float()
                b = torch.block_diag(*[adapters[n].B * adapters[n].scale for n in present])
                sizes = [adapters[n].B.shape[0] for n in present]
                bias = None
                if any(adapters[n].bias is not None for n in present):
                    bias = torch.cat([torch.zeros(size, device=a.device) if adapters[n].bias is None
                                      else adapters[n].bias.float()
                                      for n, size in zip(present, sizes, strict=True)])
                self.groups[group] = (present, a, b.float(), bias, sizes)

    def deltas(self, group: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{projection: delta} for the (B, R, in) inputs of one group."""
        if group not in self.groups:
            return {}
        names, a, b, bias, sizes = self.groups[group]
        # 2-D and contiguous: a strided (B, R, in) view (the last rows of a block's input) sends
        # F.linear to a batched matmul that copies the weight per batch entry.
        flat = x.reshape(-1, x.shape[-1]).float()
        out = F.linear(F.linear(flat, a), b, bias).to(x.dtype).view(*x.shape[:-1], -1)
        return dict(zip(names, out.split(sizes, dim=-1), strict=True))

    def project(self, group: str, linears: tuple[nn.Linear, ...], x: torch.Tensor,
                n_fast: int) -> list[torch.Tensor]:
        """The group's projections of x (B, R, in), the deltas added in place on the last
        n_fast rows.
        """
        outs = [linear(x) for linear in linears]
        deltas = self.deltas(group, x[:, -n_fast:])
        for name, out in zip(GROUPS[group], outs, strict=True):
            if name in deltas:
                out[:, -n_fast:] += deltas[name]
        return outs


class FoldedAdapters(FusedAdapters):
    """FusedAdapters with each group's stacked A folded into the block's own projections: one
    product [W_1; ...; W_n; A] over every row gives the base outputs of all rows and the fast
    rows' low-rank codes, then each projection's B (float32, no block-diagonal zeros) maps the
    codes to its delta. A block call with a fast row then reads the A matrices once in the
    model's dtype inside the base product, instead of running two more float32 products over a
    block-diagonal B (session 41: the adapters' float32 bytes were most of the fast row's cost).
    The codes come out in the model's dtype, so in bf16 the fast row rounds a little differently
    from FusedAdapters' float32 codes.

    The slow rows stay the plain model's only if this CPU's product of the concatenated weight
    gives the base rows the bits of the separate products. That is checked once per group when
    built, for one to eight rows; a group that fails keeps the unfolded path.
    Memory: the folded groups hold a copy of the block's base weights.
    """

    def __init__(self, adapters: nn.ModuleDict, bp: BlockParts) -> None:
        """Fuse `adapters` and fold each group's A into `bp`'s projections where bitwise safe."""
        super().__init__(adapters)
        self.folded: dict[str, tuple[torch.Tensor, torch.Tensor | None, list[int],
                                     list[torch.Tensor], list[torch.Tensor | None], int]] = {}
        linears = {"qkv": (bp.q_proj, bp.k_proj, bp.v_proj), "o": (bp.o_proj,)}
        if bp.mlp_proj is not None:
            gate, up, down = bp.mlp_proj
            linears |= {"gate_up": (gate, up), "down": (down,)}
        with torch.no_grad():
            for group, (names, a, _, _, sizes) in self.groups.items():
                bases = linears.get(group)
                if (bases is None or len(bases) != len(names) or len(names) != len(GROUPS[group])
                        or not all(type(b) is nn.Linear for b in bases)):
                    continue
                dtype = bases[0].weight.dtype
                weight = torch.cat([b.weight for b in bases] + [a.to(dtype)]).contiguous()
                bias = None
                if any(b.bias is not None for b in bases):
                    bias = torch.cat([torch.zeros(b.out_features, dtype=dtype, device=a.device)
                                      if b.bias is None else b.bias for b in bases]
                                     + [torch.zeros(a.shape[0], dtype=dtype, device=a.device)])
                rank = a.shape[0] // len(names)
                # (rank, out): codes @ B^T by mm is about twice as fast as F.linear(codes, B)
                # at one row in float32 on CPU (session 41)
                bs = [(adapters[n].B * adapters[n].scale).float().t().contiguous() for n in names]
                biases = [None if adapters[n].bias is None else adapters[n].bias.float()
                          for n in names]
                if _same_bits(bases, weight, bias, sum(sizes)):
                    self.folded[group] = (weight, bias, sizes, bs, biases, rank)

    def project(self, group: str, linears: tuple[nn.Linear, ...], x: torch.Tensor,
                n_fast: int) -> list[torch.Tensor]:
        """As FusedAdapters.project, by one product with the folded weight where the group is
        folded.
        """
        if group not in self.folded:
            return super().project(group, linears, x, n_fast)
        weight, bias, sizes, bs, biases, rank = self.folded[group]
        out = F.linear(x, weight, bias)
        base = sum(sizes)
        codes = out[:, -n_fast:, base:].reshape(-1, out.shape[-1] - base).float()
        start = 0
        for i, (size, b_t, extra) in enumerate(zip(sizes, bs, biases, strict=True)):
            delta = torch.mm(codes[:, i * rank:(i + 1) * rank], b_t)
            if extra is not None:
                delta += extra
            out[:, -n_fast:, start:start + size] += delta.to(out.dtype).view(
                out.shape[0], n_fast, size)
            start += size
        return list(out[..., :base].split(sizes, dim=-1))


def _same_bits(bases: tuple[nn.Linear, ...], weight: torch.Tensor, bias: torch.Tensor | None,
               width: int) -> bool:
    """Whether the product with the folded weight gives every row the separate products' bits."""
    gen = torch.Generator().manual_seed(0)
    for rows in range(1, 9):
        x = torch.randn(1, rows, weight.shape[1], generator=gen).to(weight)
        separate = torch.cat([b(x) for b in bases], dim=-1)
        if not torch.equal(F.linear(x, weight, bias)[..., :width], separate):
            return False
    return True


PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
"""Adapter name -> BlockParts attribute, for the attention projections (the MLP's: mlp_proj)."""


def merged_block(bp: BlockParts, adapters: nn.ModuleDict) -> BlockParts:
    """`bp` with every adapted projection folded into one linear layer: weight W + scale·B·A,
    bias its own plus the adapter's, in the model's dtype. For rows that are all fast rows
    (drafting), one matmul per projection instead of the base one plus two low-rank ones; it
    rounds differently from adding the deltas, which verification makes harmless.
    """
    def fold(name: str, linear: nn.Linear) -> nn.Linear:
        if name not in adapters:
            return linear
        lora = adapters[name]
        with torch.no_grad():
            weight = linear.weight.float() + lora.scale * (lora.B.float() @ lora.A.float())
            bias = torch.zeros(weight.shape[0]) if linear.bias is None else linear.bias.float()
            if lora.bias is not None:
                bias = bias + lora.bias.float()
            merged = nn.Linear(weight.shape[1], weight.shape[0], bias=True,
                               device=linear.weight.device, dtype=linear.weight.dtype)
            merged.weight.copy_(weight)
            merged.bias.copy_(bias)
        return merged.requires_grad_(False)

    changes = {attr: fold(name, getattr(bp, attr)) for name, attr in PROJECTIONS.items()}
    if bp.mlp_proj is not None:
        changes["mlp_proj"] = tuple(fold(name, linear) for name, linear
                                    in zip(("gate", "up", "down"), bp.mlp_proj, strict=True))
    return dataclasses.replace(bp, **changes)


def _projections(group: str, linears: tuple[nn.Linear, ...], x: torch.Tensor,
                 adapters: nn.ModuleDict | FusedAdapters | None, n_fast: int
                 ) -> list[torch.Tensor]:
    """The group's projections of x (B, R, in), adapters added on the last n_fast rows."""
    if isinstance(adapters, FusedAdapters) and n_fast:  # decoding: no autograd, in place
        return adapters.project(group, linears, x, n_fast)
    outs = [linear(x) for linear in linears]
    if adapters is None or n_fast == 0:
        return outs
    result = []
    for name, out in zip(GROUPS[group], outs, strict=True):  # training: differentiable
        if name in adapters:
            delta = adapters[name](x[:, -n_fast:])
            out = out + delta if n_fast == x.shape[1] else torch.cat(
                [out[:, :-n_fast], out[:, -n_fast:] + delta], dim=1)
        result.append(out)
    return result


def block_rows(bp: BlockParts, adapters: nn.ModuleDict | FusedAdapters | None,
               hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               past_keys: torch.Tensor | None, past_values: torch.Tensor | None,
               mask: torch.Tensor | None, n_fast: int, exact: bool = True,
               own_keys: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder block over a set of rows, the last n_fast of which are fast rows.

    Args:
        adapters: the block's LowRank modules (training) or FusedAdapters (decoding), or None.
        hidden: (B, R, H) input residuals of the rows.
        cos, sin: (B, R, D) rotary tables at each row's position.
        past_keys, past_values: (B, kv, P, D) keys/values already cached, or None (P = 0).
        mask: (R, P + R) bool, True where row q may attend to key k; keys are the P past ones
            followed by the rows' own keys. None: every key is visible.
        n_fast: how many trailing rows get the adapters.
        exact: attention by torch's fused kernel (matches transformers' blocks). False: plain
            matmuls in the model's dtype, about 4x cheaper for a few rows on CPU (drafting,
            where verification makes small rounding differences harmless).
        own_keys: every row sees the past keys and its own key only (a token's slow row beside
            its fast row; `mask` and `exact` are then ignored). Attention runs row by row with
            the fused kernel and no mask, so each row's is bitwise the one-row product a plain
            decoder computes: the kernel with a mask that hides a key rounds differently from
            the kernel without that key (in bf16, 1 ulp in about one block in 30), which flips
            near-tied greedy tokens.

    Returns:
        The (B, R, H) outputs, and the rows' own (B, kv, R, D) rotated keys and values (for the
        caller to cache the slow rows').
    """
    batch, rows, _ = hidden.shape
    x = bp.input_norm(hidden)
    shape = (batch, rows, -1, bp.head_dim)
    q, k, v = (t.view(shape).transpose(1, 2) for t in _projections(
        "qkv", (bp.q_proj, bp.k_proj, bp.v_proj), x, adapters, n_fast))
    q, k = hf_compat.rotate(q, cos, sin), hf_compat.rotate(k, cos, sin)
    gqa = bp.n_heads != bp.n_kv_heads
    if own_keys:  # always the fused kernel: the point is to be the one-row call
        attn = torch.cat([F.scaled_dot_product_attention(
            q[:, :, r:r + 1], _with_past(past_keys, k[:, :, r:r + 1]),
            _with_past(past_values, v[:, :, r:r + 1]), scale=bp.scaling, enable_gqa=gqa)
            for r in range(rows)], dim=2)
    elif exact:
        attn = F.scaled_dot_product_attention(q, _with_past(past_keys, k),
                                              _with_past(past_values, v), attn_mask=mask,
                                              scale=bp.scaling, enable_gqa=gqa)
    else:
        attn = _matmul_attention(q, _with_past(past_keys, k), _with_past(past_values, v), mask,
                                 bp.scaling)
    attn = attn.transpose(1, 2).reshape(batch, rows, -1)
    hidden = hidden + _projections("o", (bp.o_proj,), attn, adapters, n_fast)[0]
    x = bp.post_norm(hidden)
    if bp.mlp_proj is None:
        return hidden + bp.mlp(x), k, v
    gate, up, down = bp.mlp_proj
    g, u = _projections("gate_up", (gate, up), x, adapters, n_fast)
    inner = bp.act_fn(g) * u
    return hidden + _projections("down", (down,), inner, adapters, n_fast)[0], k, v


def _with_past(past: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """The new (B, kv, R, D) keys or values after the cached ones."""
    return new if past is None else torch.cat([past, new], dim=2)


def _matmul_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Grouped-query attention of (B, heads, R, D) queries by plain matmuls; (B, heads, R, D)."""
    batch, heads, rows, dim = q.shape
    kv = keys.shape[1]
    grouped = q.reshape(batch, kv, (heads // kv) * rows, dim)  # query heads i*g..i*g+g-1 share kv i
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.repeat(heads // kv, 1), float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(values.dtype)
    return torch.matmul(weights, values).reshape(batch, heads, rows, dim)


def keys_values(bp: BlockParts, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotated (B, kv, T, D) keys and the values block `bp` makes from (B, T, H) residuals,
    without adapters: what the slow stream caches for those positions.
    """
    x = bp.input_norm(hidden)
    shape = (x.shape[0], x.shape[1], -1, bp.head_dim)
    keys = hf_compat.rotate(bp.k_proj(x).view(shape).transpose(1, 2), cos, sin)
    return keys, bp.v_proj(x).view(shape).transpose(1, 2)


def visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None,
            strict: bool = False) -> torch.Tensor:
    """(Q, K) bool: key positions at or before (strictly before) each query, within a window."""
    diff = query_pos[:, None] - key_pos[None, :]
    ok = diff > 0 if strict else diff >= 0
    if window is not None:
        ok &= diff < window
    return ok
