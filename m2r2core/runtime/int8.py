"""Weight-only int8 linear layers, for the parts of decoding whose output only has to be close:
the draft stream's blocks and its LM head (verification, in the model's own weights, keeps the
output exact).

At batch 1 on a CPU, decoding is bound by reading weights from memory; int8 weights halve the
bytes of bf16 ones and quarter fp32's. Each output channel gets its own scale (symmetric,
max-abs / 127). On CPU the product runs in torch's int8 weight-only kernel
(`aten._weight_int8pack_mm`, the one gpt-fast and torchao use); elsewhere the weight is
dequantised per call, which is exact to the same rounding but saves nothing.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from m2r2core.runtime.hf_compat import BlockParts


class Int8Linear(nn.Module):
    """y = x·(q·s)ᵀ + b, with q the int8 weight and s one scale per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Quantise an (out, in) weight; the bias, when given, stays in the weight's dtype."""
        super().__init__()
        with torch.no_grad():
            w = weight.detach().float()
            scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            self.register_buffer("qweight", torch.round(w / scale[:, None])
                                 .clamp_(-127, 127).to(torch.int8))
            self.register_buffer("scale", scale.to(weight.dtype))
            self.register_buffer("bias", None if bias is None
                                 else bias.detach().to(weight.dtype).clone())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def of(cls, linear: nn.Linear) -> Int8Linear:
        """The int8 form of a linear layer, made once per layer (a decoder builds its draft
        blocks per run; quantising every time would cost as much as several drafts).
        """
        made = _MADE.get(linear)
        if made is None:
            made = _MADE[linear] = cls(linear.weight, linear.bias)
        return made

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out) in x's dtype."""
        flat = x.reshape(-1, self.in_features)
        scale = self.scale if self.scale.dtype == x.dtype else self.scale.to(x.dtype)
        if x.device.type == "cpu":
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.qweight, scale)
        else:
            out = F.linear(flat, self.qweight.to(x.dtype) * scale[:, None])
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The (out, in) weight this layer multiplies by, in the scale's dtype."""
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]


_MADE: weakref.WeakKeyDictionary[nn.Module, Int8Linear] = weakref.WeakKeyDictionary()
"""Int8Linear.of's results, dropped with the layer they quantise."""


def int8_head(head: nn.Module, rows: torch.Tensor | None) -> Int8Linear:
    """An LM head's weight (or the given rows of it: a sub-vocabulary) in int8, made once per
    head and row set.
    """
    made = _HEADS.setdefault(head, {})
    key = None if rows is None else tuple(rows.tolist())
    if key not in made:
        made[key] = Int8Linear(head.weight if rows is None else head.weight[rows])
    return made[key]


_HEADS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def int8_block(bp: BlockParts) -> BlockParts:
    """`bp` with its attention and (dense) MLP projections in int8. A sparse MoE block keeps its
    MLP as it is (its experts are not plain projections).
    """
    changes = {attr: Int8Linear.of(getattr(bp, attr))
               for attr in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if bp.mlp_proj is not None:
        changes["mlp_proj"] = tuple(Int8Linear.of(linear) for linear in bp.mlp_proj)
    return dataclasses.replace(bp, **changes)
