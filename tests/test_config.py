"""Bad configuration values raise ConfigError naming the field, the value and the range."""

import pytest

from m2r2core.config import DecodeConfig, EngineConfig, SamplingConfig
from m2r2core.errors import ConfigError, M2R2Error


@pytest.mark.parametrize(
    ("factory", "field", "value"),
    [
        (DecodeConfig, "max_new_tokens", 0),
        (DecodeConfig, "max_new_tokens", 100_000),
        (DecodeConfig, "lens_top_k", 0),
        (SamplingConfig, "temperature", -0.1),
        (SamplingConfig, "top_p", 0.0),
        (SamplingConfig, "top_p", 1.5),
        (SamplingConfig, "top_k", -1),
        (SamplingConfig, "seed", -3),
        (EngineConfig, "dtype", "float16x"),
        (EngineConfig, "device", "tpu"),
        (EngineConfig, "model", "  "),
    ],
)
def test_out_of_range_values_name_the_field(factory, field, value):
    with pytest.raises(ConfigError) as info:
        factory(**{field: value})
    assert field in str(info.value)
    assert repr(value) in str(info.value)
    assert isinstance(info.value, M2R2Error)


def test_defaults_are_valid_and_greedy():
    cfg = DecodeConfig()
    assert cfg.sampling.greedy
    assert cfg.replace(max_new_tokens=5).max_new_tokens == 5
    with pytest.raises(ConfigError):
        cfg.replace(max_new_tokens=0)


def test_batched_precision_is_bf16_only_where_native(monkeypatch):
    """Training's default precision: bfloat16 only on CUDA or a CPU whose oneDNN has bf16
    instructions, float32 where torch would emulate it."""
    import torch

    from m2r2core.config import DTYPES, batched_dtype

    assert batched_dtype() in DTYPES
    for cuda, cpu_bf16, want in ((False, False, "float32"), (False, True, "bfloat16"),
                                 (True, False, "bfloat16")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported",
                            lambda cpu_bf16=cpu_bf16: cpu_bf16)
        batched_dtype.cache_clear()
        assert batched_dtype() == want
    monkeypatch.undo()
    batched_dtype.cache_clear()
