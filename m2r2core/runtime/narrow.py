"""Products of a few rows (verifying 1–7 drafts) computed as `weight @ rows.T`.

`torch.nn.functional.linear` computes `rows @ weight.T`. For one row the BLAS takes its
matrix-vector path, which streams every weight once; from two rows on it takes the general
matrix-matrix path, which on an AVX2 CPU in float32 makes a forward of the 135M model over two
rows cost 1.6 one-row forwards. Written the other way round, `weight @ rows.T`, the weight stays
the streamed operand and two rows cost 1.2 (BENCHMARKS, session 34: `python -m
analysis.dtype_bench --rows 1 2 3 4 5 6 7 8 9 --dtypes float32 --narrow`). The values are the
same sums in another order: equal to float32 rounding, not bit for bit. So only passes that
already differ from a one-row step by rounding use it: verification (by default where it measures
faster on this machine, see `wanted`) and, as a switch off by default because it measured no
faster there, the exit decoder's block calls.

Which form is faster depends on the CPU's BLAS, not on the model: on an Intel Xeon with AVX-512
and AMX (session 35) the general path handles two rows as fast as one in float32 (32 against
30 ms a forward) and the narrow form costs twice as much (68 ms). So 'auto' times both forms over
the pass's own weights once per process and keeps the faster (in bfloat16 on that Xeon the narrow
form is the faster: 0.76). Plain decoding keeps transformers' own kernels, and tests prove greedy
output stays identical to `generate` with it on.
"""

from __future__ import annotations

import contextlib
import time
import types
import weakref

import torch
import torch.nn.functional as F

from m2r2core.errors import require

MAX_ROWS = 8
"""From 5 rows on the two forms trade places by row count (within ±10%, BENCHMARKS session 34);
above 8 (prompts) the general path is kept."""

MODES = ("auto", "on", "off")
"""auto: on where timing both forms on this machine finds the narrow one faster (CPU only)."""

AUTO_MARGIN = 0.9
"""auto takes the narrow form only when it times at most this share of the usual one: a form
that is not clearly faster is not worth leaving transformers' kernels for."""


def _narrow_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows < 2 or rows > MAX_ROWS:
        return F.linear(x, self.weight, self.bias)
    flat = x.reshape(rows, x.shape[-1])
    out = torch.mm(self.weight, flat.t()).t()
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.weight.shape[0])


def wanted(mode: str, modules) -> bool:
    """Whether `mode` turns narrow products on for a pass through `modules` (for 'auto': on a
    CPU, when `measure` finds them faster there; off on an accelerator).
    """
    require(mode in MODES, "narrow_verify", mode, f"one of {MODES}")
    if mode != "auto":
        return mode == "on"
    if _linears(modules)[0][0].weight.device.type != "cpu":
        return False
    return measure(modules)["narrow_over_plain"] <= AUTO_MARGIN


_MEASURED: dict[tuple, dict] = {}
"""(weight shapes, dtype, threads, rows) -> what `measure` found, once per process."""


def measure(modules, rows: int = 2, repeats: int = 5) -> dict:
    """Time a pass of `rows` rows through every plain nn.Linear under `modules`, the usual way
    and the narrow way, interleaved; the fastest of `repeats` rounds of each in ms (the least
    disturbed by other work on a shared machine) and their ratio. Cached per process for the
    same weights' shapes, dtype, thread count and rows (about 0.4 s the first time).
    """
    linears = [linear for linear, _ in _linears(modules)]
    weight = linears[0].weight
    key = (tuple(tuple(m.weight.shape) for m in linears), weight.dtype, torch.get_num_threads(),
           rows)
    if key not in _MEASURED:
        inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=weight.dtype)
                  for m in linears}
        times: dict[str, list[float]] = {"plain": [], "narrow": []}
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first round warms both up
                for name, forward in (("plain", lambda m, x: F.linear(x, m.weight, m.bias)),
                                      ("narrow", _narrow_forward)):
                    started = time.perf_counter()
                    for m in linears:
                        forward(m, inputs[m.in_features])
                    times[name].append(time.perf_counter() - started)
        plain = min(times["plain"][1:]) * 1e3
        narrow = min(times["narrow"][1:]) * 1e3
        _MEASURED[key] = {"rows": rows, "plain_ms": plain, "narrow_ms": narrow,
                          "narrow_over_plain": narrow / plain}
    return _MEASURED[key]


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
