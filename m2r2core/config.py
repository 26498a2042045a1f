"""Frozen configuration dataclasses of the engine; each validates itself once, on creation."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from m2r2core.errors import require

DTYPES = ("bfloat16", "float32")
MAX_NEW_TOKENS_LIMIT = 2048
DEFAULT_MODEL = "smollm2-135m-instruct"


@functools.cache
def batched_dtype() -> str:
    """The faster precision for matrix products of many rows (training batches, long prompts):
    bfloat16 on CUDA or on a CPU with native bf16 instructions (AVX-512 BF16, AMX), float32
    elsewhere, where torch emulates bf16 and batched work is several times slower. A one-row
    decoding step is bound by reading the weights, so bfloat16 can still pay there; the figures
    are in BENCHMARKS.md ("Precision on this CPU").
    """
    import torch

    native_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    return "bfloat16" if torch.cuda.is_available() or native_bf16() else "float32"


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. Temperature 0 means greedy (the default)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        """Validate the ranges."""
        require(0.0 <= self.temperature <= 5.0, "temperature", self.temperature, "0 (greedy) to 5")
        require(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "greater than 0 and at most 1")
        require(0 <= self.top_k <= 1000, "top_k", self.top_k, "0 (off) to 1000")
        require(0 <= self.seed < 2**63, "seed", self.seed, "0 to 2^63-1")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax."""
        return self.temperature == 0.0


@dataclass(frozen=True)
class DecodeConfig:
    """One generation request: budget, sampling and how much to record."""

    max_new_tokens: int = 64
    sampling: SamplingConfig = SamplingConfig()
    trace: bool = True
    """Record per-layer residual statistics and the logit lens for every generated token."""
    fast_stream: bool = True
    """With trace on and adapters loaded, also trace the accelerated stream and every exit
    rule's scores along both streams."""
    capture_residuals: bool = True
    """Keep the hidden states themselves (for projections); only used when trace is on."""
    lens_top_k: int = 5
    system_prompt: str | None = None
    """None keeps the chat template's own default system message."""
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        """Validate the ranges."""
        require(
            isinstance(self.max_new_tokens, int)
            and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT,
            "max_new_tokens", self.max_new_tokens, f"1 to {MAX_NEW_TOKENS_LIMIT}",
        )
        require(1 <= self.lens_top_k <= 20, "lens_top_k", self.lens_top_k, "1 to 20")

    @classmethod
    def from_dict(cls, data: dict) -> DecodeConfig:
        """Rebuild from `dataclasses.asdict` output (the sampling settings nested)."""
        data = dict(data)
        if isinstance(data.get("sampling"), dict):
            data["sampling"] = SamplingConfig(**data["sampling"])
        return cls(**data)

    def replace(self, **changes: object) -> DecodeConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class EngineConfig:
    """Which model to load and how to run it."""

    model: str = DEFAULT_MODEL
    """The packaged default, a local HF folder, or a hub name (when the hub is reachable)."""
    dtype: str = "bfloat16"
    device: str = "auto"
    """'auto' picks CUDA when present, else CPU."""
    threads: int = 0
    """CPU threads for torch; 0 leaves torch's choice."""

    def __post_init__(self) -> None:
        """Validate the ranges."""
        require(bool(self.model.strip()), "model", self.model, "a model name or folder")
        require(self.dtype in DTYPES, "dtype", self.dtype, " or ".join(DTYPES))
        require(self.device in ("auto", "cpu", "cuda"), "device", self.device, "auto, cpu or cuda")
        require(0 <= self.threads <= 256, "threads", self.threads, "0 (torch default) to 256")
