"""Products of a few rows (verifying 1–7 drafts) computed as `weight @ rows.T`.

`torch.nn.functional.linear` computes `rows @ weight.T`. For one row the BLAS takes its
matrix-vector path, which streams every weight once; from two rows on it takes the general
matrix-matrix path, which on an AVX2 CPU in float32 makes a forward of the 135M model over two
rows cost 1.6 one-row forwards. Written the other way round, `weight @ rows.T`, the weight stays
the streamed operand and two rows cost 1.2 (BENCHMARKS, session 34: `python -m
analysis.dtype_bench --rows 1 2 3 4 5 6 7 8 9 --dtypes float32 --narrow`). The values are the
same sums in another order: equal to float32 rounding, not bit for bit. So only passes that
already differ from a one-row step by rounding use it: verification (on by default for fp32 on
CPU) and, as a switch off by default because it measured no faster there, the exit decoder's
block calls. Plain decoding keeps transformers' own kernels, and tests prove greedy output stays
identical to `generate` with it on.
"""

from __future__ import annotations

import contextlib
import types
import weakref

import torch
import torch.nn.functional as F

from m2r2core.errors import require

MAX_ROWS = 8
"""From 5 rows on the two forms trade places by row count (within ±10%, BENCHMARKS session 34);
above 8 (prompts) the general path is kept."""

MODES = ("auto", "on", "off")
"""auto: on for float32 on CPU (where it was measured faster), off elsewhere."""


def _narrow_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows < 2 or rows > MAX_ROWS:
        return F.linear(x, self.weight, self.bias)
    flat = x.reshape(rows, x.shape[-1])
    out = torch.mm(self.weight, flat.t()).t()
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.weight.shape[0])


def wanted(mode: str, weight: torch.Tensor) -> bool:
    """Whether `mode` turns narrow products on for a model whose weights look like `weight`."""
    require(mode in MODES, "narrow_verify", mode, f"one of {MODES}")
    if mode == "auto":
        return weight.device.type == "cpu" and weight.dtype == torch.float32
    return mode == "on"


_LINEARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""module -> (linear, its narrow forward) for every plain nn.Linear under it, found once."""


def _linears(modules) -> list[tuple[torch.nn.Linear, types.MethodType]]:
    found = []
    for module in modules:
        if module not in _LINEARS:
            _LINEARS[module] = [(m, types.MethodType(_narrow_forward, m))
                                for m in module.modules() if type(m) is torch.nn.Linear]
        found += _LINEARS[module]
    return found


@contextlib.contextmanager
def narrow_products(modules, enabled: bool = True):
    """Within the block, every plain `nn.Linear` under `modules` computes 2..MAX_ROWS rows as
    `weight @ rows.T`; on leaving, they are transformers' own again (also after an error).

    Callers hold the engine's lock, so no other decoding sees the swap.
    """
    linears = _linears(modules) if enabled else []
    for linear, narrow in linears:  # plain attributes: nn.Module's setattr is slower
        object.__setattr__(linear, "forward", narrow)
    try:
        yield
    finally:
        for linear, _ in linears:
            object.__delattr__(linear, "forward")


def verified_modules(parts) -> tuple[torch.nn.Module, ...]:
    """What a verification pass runs its rows through: every block and the LM head."""
    return (*parts.layers, parts.lm_head)
