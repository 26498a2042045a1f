"""Weight-only int8 layers (runtime/int8.py): close to the layer they quantise, one scale per
output channel, the bias kept, and a block's projections swapped without touching the model."""

from __future__ import annotations

import pytest
import torch

from m2r2core.config import EngineConfig
from m2r2core.engine import Engine
from m2r2core.runtime import hf_compat
from m2r2core.runtime.int8 import Int8Linear, int8_block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_close_to_the_layer(dtype, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight[3] *= 50  # a loud channel must not cost the quiet ones their precision
    q = Int8Linear.of(linear)
    x = torch.randn(2, 5, 96).to(dtype)
    got, want = q(x), linear(x)
    assert got.shape == want.shape and got.dtype == dtype
    err = (got.float() - want.float()).norm(dim=(0, 1)) / want.float().norm(dim=(0, 1))
    assert float(err.max()) < (0.02 if dtype == torch.float32 else 0.05)
    w = linear.weight.float()
    assert torch.allclose(q.scale.float(), w.abs().amax(1) / 127, rtol=1e-2)
    # each weight to its nearest step, up to the scale's own rounding in the layer's dtype
    grid = q.qweight.float() * q.scale.float()[:, None]
    rounding = torch.finfo(dtype).eps * w.abs()
    assert bool(((grid - w).abs() <= q.scale.float()[:, None] * 0.5 + rounding + 1e-6).all())
    assert q.qweight.dtype == torch.int8 and int(q.qweight.abs().max()) == 127


def test_int8_linear_matches_its_dequantized_weight():
    """The kernel multiplies by exactly the stored int8 weight and scales."""
    torch.manual_seed(1)
    q = Int8Linear(torch.randn(64, 32), torch.randn(64))
    x = torch.randn(3, 32)
    assert torch.allclose(q(x), x @ q.dequantized().T + q.bias, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_int8_block_swaps_projections_only(tiny_model_dirs, family):
    parts = Engine.load(EngineConfig(model=str(tiny_model_dirs[family]), dtype="float32")).parts
    bp = hf_compat.block_parts(parts, 0)
    q = int8_block(bp)
    assert isinstance(q.q_proj, Int8Linear) and isinstance(q.o_proj, Int8Linear)
    assert isinstance(bp.q_proj, torch.nn.Linear)  # the model's block is untouched
    if bp.mlp_proj is None:  # sparse MoE: experts stay as they are
        assert q.mlp is bp.mlp and q.mlp_proj is None
    else:
        assert all(isinstance(p, Int8Linear) for p in q.mlp_proj)


def test_int8_forms_are_made_once_per_layer_and_row_set():
    """Decoders build their draft blocks per run: the quantisation must not be redone."""
    from m2r2core.runtime.int8 import int8_head
    linear = torch.nn.Linear(16, 8)
    assert Int8Linear.of(linear) is Int8Linear.of(linear)
    head = torch.nn.Linear(16, 10, bias=False)
    rows = torch.tensor([1, 4, 7])
    assert int8_head(head, rows) is int8_head(head, rows.clone())
    assert int8_head(head, rows) is not int8_head(head, None)
    assert int8_head(head, rows).out_features == 3 and int8_head(head, None).out_features == 10
    x = torch.randn(2, 16)
    assert torch.allclose(int8_head(head, rows)(x), int8_head(head, None)(x)[:, rows], atol=0.05)
