"""The accelerated (fast) residual stream: low-rank accelerator adapters on the first blocks, and
the block math that runs fast rows beside slow rows while sharing the slow stream's KV cache.

Fast depth d (1-based) has applied blocks b..d-1 with adapters on, starting from the slow state
h^s_b at the branch layer b. It is trained so that h^f_d ~ h^s_tau(d), tau(d) = min(N, b +
ceil(r (d - b))). A fast query at block i sees the slow keys/values of block i for earlier
positions plus its own key/value for the current position; it never writes the slow cache.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from m2r2core import artifacts
from m2r2core.errors import AdapterError, ConfigError, require
from m2r2core.runtime import hf_compat
from m2r2core.runtime.hf_compat import BlockParts, DecoderParts

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
TARGETS = ("rate", "final")
BLOCK_CHOICES = ("same", "rate")
KV_CHOICES = ("shared", "own")
CARD_NAME = "card.json"
WEIGHTS_NAME = "adapters.safetensors"
TRAIN_ADAPTERS = "python -m m2r2core.train adapters"


@dataclass(frozen=True)
class AccelConfig:
    """Shape of the accelerated stream. Every field is a choice our reading of the method made."""

    rate: float = 2.0
    """r: fast depth d should look like slow depth r*d."""
    rank: int = 16
    alpha: float = 32.0
    margin: int = 2
    """Adapted blocks beyond ceil((N-b)/r), where the fast stream already targets h^s_N."""
    branch_layer: int = 0
    """b: the fast stream starts from the slow state after b blocks (0 = the embedding)."""
    target: str = "rate"
    """'rate': h^f_d ~ h^s_tau(d); 'final': every fast depth targets h^s_N."""
    projections: tuple[str, ...] = PROJECTIONS
    bias: bool = False
    """Also learn a bias on each adapted block's MLP output (the fast residual's update): a
    constant shift the fast stream can make without spending adapter rank (why it helps on
    SmolLM2 is in the README)."""
    blocks: str = "same"
    """Which base block fast depth d runs. 'same': block d (the method note's reading).
    'rate': block tau(d), reading that block's slow cache, so the fast stream runs every r-th
    block of the model with adapters (a training-study variant; decoding supports 'same')."""
    kv: str = "shared"
    """'shared': fast queries read the slow stream's keys/values of earlier positions (the
    method's shared cache). 'own': the fast stream attends to its own keys/values of every
    position (a separate cache; a training-study variant; decoding supports 'shared')."""

    def validate(self, n_layers: int) -> None:
        """Raise ConfigError unless this shape makes sense for a model of n_layers blocks."""
        require(self.target in TARGETS, "target", self.target, f"one of {TARGETS}")
        require(self.blocks in BLOCK_CHOICES, "blocks", self.blocks, f"one of {BLOCK_CHOICES}")
        require(self.kv in KV_CHOICES, "kv", self.kv, f"one of {KV_CHOICES}")
        require(0 <= self.branch_layer < n_layers, "branch_layer", self.branch_layer,
                f"0..{n_layers - 1} for a {n_layers}-layer model")
        span = n_layers - self.branch_layer
        require(1.0 < self.rate <= span / 2, "rate", self.rate,
                f"above 1 and at most {span / 2:g}, so that at least two adapted blocks reach "
                f"the final state of a {n_layers}-layer model branching at layer "
                f"{self.branch_layer}")
        require(1 <= self.rank <= 256, "rank", self.rank, "1..256")
        require(self.margin >= 0, "margin", self.margin, "0 or more")
        unknown = set(self.projections) - set(PROJECTIONS)
        require(not unknown and bool(self.projections), "projections", self.projections,
                f"a non-empty subset of {PROJECTIONS}")

    def fast_layers(self, n_layers: int) -> int:
        """How many blocks the fast stream runs (and carries adapters): ceil((N-b)/r)+margin."""
        span = n_layers - self.branch_layer
        return min(span, math.ceil(span / self.rate) + self.margin)

    @property
    def decodable(self) -> bool:
        """Whether the decoding paths (exits, drafting, tracing) implement this shape."""
        return self.blocks == "same" and self.kv == "shared"

    def base_block(self, depth: int, n_layers: int) -> int:
        """The index of the base block that fast depth `depth` (1-based) runs."""
        return depth - 1 if self.blocks == "same" else self.target_depth(depth, n_layers) - 1

    def target_depth(self, depth: int, n_layers: int) -> int:
        """tau(d): the slow depth fast depth d is trained to match."""
        if self.target == "final":
            return n_layers
        b = self.branch_layer
        return min(n_layers, b + math.ceil(self.rate * (depth - b) - 1e-9))


class LowRank(nn.Module):
    """delta(x) = (alpha / rank) * B A x (+ bias); B and the bias start at zero (LoRA)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None, bias: bool = False) -> None:
        """A fresh adapter whose delta is exactly zero."""
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        a = torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The delta for (..., in) inputs, computed in the input's dtype."""
        out = F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale
        return out if self.bias is None else out + self.bias.to(x.dtype)


@dataclass
class AdapterCard:
    """What the JSON card beside the adapters says: shape, model, training data and metrics."""

    config: dict
    model_name: str
    model_fingerprint: str
    n_layers: int
    hidden_size: int
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


class Accelerator(nn.Module):
    """The accelerator adapters of one model: a LowRank per adapted block and projection."""

    def __init__(self, parts: DecoderParts, config: AccelConfig, seed: int = 0) -> None:
        """Fresh (zero-delta) adapters sized for the model behind `parts`."""
        super().__init__()
        config.validate(parts.n_layers)
        self.config = config
        self.n_layers = parts.n_layers
        self.n_fast = config.fast_layers(parts.n_layers)
        self.first = config.branch_layer
        gen = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList()
        for depth in self.depths:
            bp = hf_compat.block_parts(parts, config.base_block(depth, self.n_layers))
            linears = {"q": bp.q_proj, "k": bp.k_proj, "v": bp.v_proj, "o": bp.o_proj}
            if bp.mlp_proj is not None:
                linears |= dict(zip(("gate", "up", "down"), bp.mlp_proj, strict=True))
            self.blocks.append(nn.ModuleDict({
                name: LowRank(lin.in_features, lin.out_features, config.rank, config.alpha, gen,
                              bias=config.bias and name == "down")
                for name, lin in linears.items() if name in config.projections
            }))

    def block(self, index: int) -> nn.ModuleDict | None:
        """The adapters of decoder block `index`, or None where the fast stream does not run."""
        offset = index - self.first
        return self.blocks[offset] if 0 <= offset < self.n_fast else None

    def inference_block(self, index: int) -> FusedAdapters | None:
        """The fused, model-dtype adapters of block `index` for decoding (built once)."""
        offset = index - self.first
        if not 0 <= offset < self.n_fast:
            return None
        cache = self.__dict__.setdefault("_fused", {})
        dtype = next(iter(self.blocks[offset].values())).A.dtype
        if offset not in cache or cache[offset][0] != dtype:
            cache[offset] = (dtype, FusedAdapters(self.blocks[offset], dtype))
        return cache[offset][1]

    @property
    def depths(self) -> range:
        """Fast depths d = b+1 .. b+n_fast, in the slow stream's layer numbering."""
        return range(self.first + 1, self.first + self.n_fast + 1)

    @property
    def max_depth(self) -> int:
        """The deepest fast depth, b + n_fast: how far the fast stream reaches."""
        return self.first + self.n_fast

    def save(self, folder: Path, card: AdapterCard) -> None:
        """Write adapters.safetensors and card.json into folder, atomically (temp, then rename)."""
        artifacts.save(folder, WEIGHTS_NAME,
                       {k: v.to(torch.bfloat16) for k, v in self.state_dict().items()},
                       CARD_NAME, asdict(card))


GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
"""Projections that read the same input, so their adapters run as one low-rank pair."""


class FusedAdapters:
    """Inference form of one block's adapters: per input group, the A matrices stacked and the
    scaled B matrices block-diagonal, in the model's dtype. Two small matmuls per group instead
    of two per projection plus casts (on CPU, op overhead dominates these tiny products).
    """

    def __init__(self, adapters: nn.ModuleDict, dtype: torch.dtype) -> None:
        """Fuse a block's LowRank adapters."""
        self.groups: dict[str, tuple[tuple[str, ...], torch.Tensor, torch.Tensor,
                                     torch.Tensor | None, list[int]]] = {}
        with torch.no_grad():
            for group, names in GROUPS.items():
                present = tuple(n for n in names if n in adapters)
                if not present:
                    continue
                a = torch.cat([adapters[n].A for n in present]).to(dtype)
                b = torch.block_diag(*[adapters[n].B * adapters[n].scale for n in present])
                sizes = [adapters[n].B.shape[0] for n in present]
                bias = None
                if any(adapters[n].bias is not None for n in present):
                    bias = torch.cat([torch.zeros(size) if adapters[n].bias is None
                                      else adapters[n].bias.float()
                                      for n, size in zip(present, sizes, strict=True)]).to(dtype)
                self.groups[group] = (present, a, b.to(dtype), bias, sizes)

    def deltas(self, group: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{projection: delta} for the (B, R, in) inputs of one group."""
        if group not in self.groups:
            return {}
        names, a, b, bias, sizes = self.groups[group]
        out = F.linear(F.linear(x, a), b, bias)
        return dict(zip(names, out.split(sizes, dim=-1), strict=True))


def find_trained(model_fingerprint: str, root: Path | None = None) -> Path | None:
    """The folder whose adapters were trained for this model, if any: under $M2R2_TRAINED_DIR
    when set, else the committed artifacts/ folder (m2r2core/artifacts.py).
    """
    root = root or artifacts.artifacts_dir()
    for card_path in sorted(Path(root).glob(f"*/{CARD_NAME}")):
        try:
            if json.loads(card_path.read_text()).get("model_fingerprint") == model_fingerprint:
                return card_path.parent
        except (json.JSONDecodeError, OSError):
            continue
    return None


def read_card(folder: Path) -> AdapterCard:
    """The card of an adapter folder, or AdapterError naming what is wrong."""
    return artifacts.read_record(folder, CARD_NAME, AdapterCard, "adapter", TRAIN_ADAPTERS)[0]


def load_accelerator(folder: Path, parts: DecoderParts, model_name: str,
                     model_fingerprint: str) -> tuple[Accelerator, AdapterCard]:
    """Load adapters trained for this model, refusing those of another model or a corrupt file."""
    folder = Path(folder)
    card = read_card(folder)
    artifacts.check_model(asdict(card), folder, "adapters", model_name, model_fingerprint,
                          layers=(card.n_layers, parts.n_layers))
    try:
        config = AccelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in card.config.items()})
    except (TypeError, ConfigError) as err:
        raise AdapterError(f"The adapter card in {folder} is corrupt ({err}); rerun "
                           f"`{TRAIN_ADAPTERS}` or restore it.") from err
    tensors = artifacts.load_tensors(folder, WEIGHTS_NAME, "adapter", TRAIN_ADAPTERS)
    return artifacts.fill(Accelerator(parts, config), tensors, folder, "adapter",
                          TRAIN_ADAPTERS), card


def _projections(group: str, linears: tuple[nn.Linear, ...], x: torch.Tensor,
                 adapters: nn.ModuleDict | FusedAdapters | None, n_fast: int
                 ) -> list[torch.Tensor]:
    """The group's projections of x (B, R, in), adapters added on the last n_fast rows."""
    outs = [linear(x) for linear in linears]
    if adapters is None or n_fast == 0:
        return outs
    names = GROUPS[group]
    if isinstance(adapters, FusedAdapters):  # decoding: no autograd, add in place
        deltas = adapters.deltas(group, x[:, -n_fast:])
        for name, out in zip(names, outs, strict=True):
            if name in deltas:
                out[:, -n_fast:] += deltas[name]
        return outs
    result = []
    for name, out in zip(names, outs, strict=True):  # training: differentiable, no in-place
        if name in adapters:
            delta = adapters[name](x[:, -n_fast:])
            out = out + delta if n_fast == x.shape[1] else torch.cat(
                [out[:, :-n_fast], out[:, -n_fast:] + delta], dim=1)
        result.append(out)
    return result


def block_rows(bp: BlockParts, adapters: nn.ModuleDict | FusedAdapters | None,
               hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               past_keys: torch.Tensor | None, past_values: torch.Tensor | None,
               mask: torch.Tensor | None, n_fast: int, exact: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    keys = k if past_keys is None else torch.cat([past_keys, k], dim=2)
    values = v if past_values is None else torch.cat([past_values, v], dim=2)
    if exact:
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=bp.scaling,
                                              enable_gqa=bp.n_heads != bp.n_kv_heads)
    else:
        attn = _matmul_attention(q, keys, values, mask, bp.scaling)
    attn = attn.transpose(1, 2).reshape(batch, rows, -1)
    hidden = hidden + _projections("o", (bp.o_proj,), attn, adapters, n_fast)[0]
    x = bp.post_norm(hidden)
    if bp.mlp_proj is None:
        return hidden + bp.mlp(x), k, v
    gate, up, down = bp.mlp_proj
    g, u = _projections("gate_up", (gate, up), x, adapters, n_fast)
    inner = bp.act_fn(g) * u
    return hidden + _projections("down", (down,), inner, adapters, n_fast)[0], k, v


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


def train_fast_states(parts: DecoderParts, accel: Accelerator, slow: list[torch.Tensor],
                      rotary: tuple[torch.Tensor, torch.Tensor], local: bool = False
                      ) -> list[torch.Tensor]:
    """Fast states of every position in parallel, with the inference attention pattern.

    Args:
        slow: h^s_0..h^s_N, each (B, T, H), computed without gradients.
        rotary: (cos, sin), each (B, T, D), for positions 0..T-1.
        local: feed each fast block the slow state its input depth targets (h^s_tau(d-1))
            instead of the previous fast state: block-by-block training, no chain.

    Returns:
        h^f at depths b+1..b+n_fast, each (B, T, H), differentiable w.r.t. the adapters.
    """
    cos, sin = rotary
    steps = slow[0].shape[1]
    pos = torch.arange(steps, device=slow[0].device)
    config, n = accel.config, accel.n_layers
    # Fast query t: slow keys of positions < t and its own key (the diagonal of the rows), or,
    # with its own cache, the fast keys of every position up to t (rows attend to rows).
    own = config.kv == "own"
    states, hidden = [], slow[accel.first]
    for offset, depth in enumerate(accel.depths):
        index = config.base_block(depth, n)
        bp = hf_compat.block_parts(parts, index)
        if local and offset:
            hidden = slow[config.target_depth(depth - 1, n)]
        if own:
            past_k = past_v = None
            mask = visible(pos, pos, bp.sliding_window)
        else:
            with torch.no_grad():
                past_k, past_v = keys_values(bp, slow[index], cos, sin)
            mask = torch.cat([visible(pos, pos, bp.sliding_window, strict=True),
                              torch.eye(steps, dtype=torch.bool, device=pos.device)], dim=1)
        hidden, _, _ = block_rows(bp, accel.blocks[offset], hidden, cos, sin, past_k, past_v,
                                  mask, n_fast=steps)
        states.append(hidden)
    return states


def fast_trajectory(parts: DecoderParts, accel: Accelerator, start: torch.Tensor, cache,
                    position: int) -> list[torch.Tensor]:
    """The fast stream of one position over the slow cache of the positions before it.

    Args:
        start: (1, 1, H) the slow state h^s_b of this position at the branch layer.
        cache: the slow KV cache; entries at `position` or later are ignored, so it may already
            hold this position. (A sliding-window layer that already holds it has evicted the
            oldest key the fast query would see: the one approximation of this function.)
        position: the absolute position of this token.

    Returns:
        h^f at depths b+1..b+n_fast, each (1, 1, H).
    """
    positions = torch.tensor([[position]], device=start.device)
    cos, sin = parts.rotary_emb(start, positions)
    hidden, states = start, []
    for index in range(accel.first, accel.first + accel.n_fast):
        bp = hf_compat.block_parts(parts, index)
        keys, values = hf_compat.cached_keys_values(cache, index)
        stored = 0 if keys is None else keys.shape[2]
        total = hf_compat.cached_length(cache, index)
        # A sliding-window layer keeps only its newest entries.
        key_pos = torch.arange(total - stored, total, device=start.device)
        mask = torch.cat([visible(positions[0], key_pos, bp.sliding_window, strict=True),
                          torch.ones(1, 1, dtype=torch.bool, device=start.device)], dim=1)
        hidden, _, _ = block_rows(bp, accel.inference_block(index), hidden, cos, sin, keys,
                                  values, mask, n_fast=1)
        states.append(hidden)
    return states
