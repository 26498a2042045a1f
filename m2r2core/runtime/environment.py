"""What a measurement ran on: versions, threads, the CPU and its batched precision, recorded in
every trace, bundle and benchmark report.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import transformers

from m2r2core.config import batched_dtype


def environment() -> dict:
    """Versions and threads, for reproducibility bundles and benchmark reports."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model(),
        "batched_dtype": batched_dtype(),
        "cpu_kind": cpu_kind(),
    }


CPU_KINDS = ("avx2", "avx512_bf16", "amx")
"""The machine kinds whose speed figures differ in kind, not degree: without native bf16 (torch
emulates it; a two-row product in fp32 leaves the BLAS's one-row path), with AVX-512 BF16, and
with AMX tiles as well (where two rows cost about one in fp32)."""


def cpu_kind() -> str:
    """This CPU's kind among CPU_KINDS (a CPU with none of these features counts as avx2)."""
    cpu = getattr(torch, "cpu", None)

    def has(feature: str) -> bool:
        return bool(getattr(cpu, f"_is_{feature}_supported", lambda: False)())

    if has("amx_tile"):
        return "amx"
    return "avx512_bf16" if has("avx512_bf16") else "avx2"


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
