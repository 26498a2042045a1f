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
