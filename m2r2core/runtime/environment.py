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
    }


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
