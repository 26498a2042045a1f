"""M2R2 engine: a plain transformer runtime with an accelerated residual stream beside it, and the
three things that stream is for: early exit, self-speculative decoding, and ahead-of-time expert
loading. Never imports streamlit or plotly.

The packages, by concept (imports point one way, checked by tests/test_boundaries.py):

    runtime/   a plain transformer: model loading, prompts, sampling, logit lens, the decode loop
    stream/    the accelerated residual stream (adapters) and the tuned lens
    exits/     exit rules (routers) and early-exit decoding; the fast-stream tracer
    spec/      speculative decoding: draft proposers and verification; Medusa heads
    moe/       MoEfication, the expert store and cache, route predictors, offloaded decoding
    train/     `python -m m2r2core.train …`: data and training; nothing at inference imports it

    runtime <- stream <- exits <- spec <- engine;   runtime, stream, engine <- moe;   all <- train

The public API is below; `from m2r2core import Engine` loads only what it names.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "Engine": "m2r2core.engine", "Generation": "m2r2core.engine",
    "Speculation": "m2r2core.engine", "RunResult": "m2r2core.engine",
    "EngineConfig": "m2r2core.config", "DecodeConfig": "m2r2core.config",
    "SamplingConfig": "m2r2core.config", "ExitConfig": "m2r2core.exits.early_exit",
    "SpecConfig": "m2r2core.spec.speculative", "OffloadConfig": "m2r2core.moe.offload",
    "AccelConfig": "m2r2core.stream.accel",
    "TokenStep": "m2r2core.trace", "RunTrace": "m2r2core.trace",
    "ResidualCapture": "m2r2core.trace", "SpecRound": "m2r2core.spec.speculative",
    "OffloadToken": "m2r2core.moe.offload",
    "OffloadEngine": "m2r2core.moe.offload", "load_moe": "m2r2core.moe.offload",
    "M2R2Error": "m2r2core.errors", "ConfigError": "m2r2core.errors",
    "PromptError": "m2r2core.errors", "PromptTooLong": "m2r2core.errors",
    "AssetMissing": "m2r2core.errors", "ArtifactError": "m2r2core.errors",
    "ModelNotFound": "m2r2core.errors", "UnsupportedModel": "m2r2core.errors",
    "ARTIFACTS_DIR": "m2r2core.artifacts",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> object:
    """Import a public name's module on first use (importing m2r2core itself loads no torch)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'm2r2core' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
