"""The accelerated stream's block math: it reproduces transformers' blocks on slow rows, the
training pattern equals the inference pattern position by position, and bad shapes or files are
refused with clear messages."""

import json

import pytest
import torch

from m2r2core.config import DecodeConfig, EngineConfig
from m2r2core.engine import Engine
from m2r2core.errors import ConfigError
from m2r2core.runtime import hf_compat
from m2r2core.runtime.decode import DecodeState, forward
from m2r2core.stream import accel
from m2r2core.stream.accel import AccelConfig, Accelerator, AdapterError
from m2r2core.stream.blocks import block_rows, visible
from m2r2core.train import slow_states

from .conftest import FAMILIES


@pytest.fixture(scope="module")
def engines(tiny_model_dirs):
    return {f: Engine.load(EngineConfig(model=str(d), dtype="float32"))
            for f, d in tiny_model_dirs.items()}


def _ids(engine, n=20):
    return torch.tensor([engine.encode("Tell me about the moon and the tides.",
                                       DecodeConfig())[:n]])


def _random_adapters(parts, seed=1, **kw):
    acc = Accelerator(parts, AccelConfig(rate=2.0, rank=4, margin=0, **kw), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in acc.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return acc


@pytest.mark.parametrize("family", FAMILIES)
def test_block_rows_equal_transformers_blocks(engines, family):
    engine = engines[family]
    parts = engine.parts
    ids = _ids(engine)
    slow, (cos, sin) = slow_states(parts, ids)
    pos = torch.arange(ids.shape[1])
    for index in range(parts.n_layers):
        bp = hf_compat.block_parts(parts, index)
        out, _, _ = block_rows(bp, None, slow[index], cos, sin, None, None,
                               visible(pos, pos, bp.sliding_window), n_fast=0)
        torch.testing.assert_close(out, slow[index + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_adapters_make_the_fast_stream_the_slow_stream(engines, family):
    parts = engines[family].parts
    ids = _ids(engines[family])
    slow, rotary = slow_states(parts, ids)
    acc = Accelerator(parts, AccelConfig(rate=2.0, rank=4, margin=0))
    fast = accel.train_fast_states(parts, acc, slow, rotary)
    for depth, state in zip(acc.depths, fast, strict=True):
        torch.testing.assert_close(state, slow[depth], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,bias", [("llama", False), ("mistral", False), ("llama", True)])
def test_parallel_training_pattern_equals_token_by_token_inference(engines, family, bias):
    """Fast position t, computed alone over the slow cache of positions < t, equals row t of the
    parallel training computation (fast query, slow keys/values before t, own key at t). With
    biases, this also checks the fused decoding adapters against the training modules."""
    engine = engines[family]
    parts = engine.parts
    ids = _ids(engine)
    acc = _random_adapters(parts, bias=bias)
    assert bias == any(k.endswith(".bias") for k in acc.state_dict())
    slow, rotary = slow_states(parts, ids)
    fast = accel.train_fast_states(parts, acc, slow, rotary)
    cache = hf_compat.new_cache(parts)
    state = DecodeState(cache, torch.Generator())
    t = ids.shape[1] - 1
    forward(parts, ids[:, :t], state, keep_states=False)
    sequential = accel.fast_trajectory(parts, acc, slow[acc.first][:, t:t + 1], cache, t)
    for depth, state_t in zip(acc.depths, sequential, strict=True):
        torch.testing.assert_close(state_t[0, 0], fast[depth - acc.first - 1][0, t],
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,bias", [("llama", True), ("qwen2", False)])
def test_merged_blocks_equal_blocks_plus_deltas(engines, family, bias):
    """A block with the adapters folded into its weights gives, on fast rows, what the block
    gives with the low-rank deltas added (fp32); the model's own weights stay untouched."""
    from m2r2core.stream.blocks import merged_block

    engine = engines[family]
    parts = engine.parts
    ids = _ids(engine)
    acc = _random_adapters(parts, bias=bias)
    slow, (cos, sin) = slow_states(parts, ids)
    pos = torch.arange(ids.shape[1])
    for index in range(acc.first, acc.first + acc.n_fast):
        bp = hf_compat.block_parts(parts, index)
        before = bp.q_proj.weight.clone()
        mask = visible(pos, pos, bp.sliding_window)
        want = block_rows(bp, acc.inference_block(index), slow[index], cos, sin, None, None,
                          mask, n_fast=ids.shape[1])
        got = block_rows(merged_block(bp, acc.block(index)), None, slow[index], cos, sin, None,
                         None, mask, n_fast=0)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert torch.equal(bp.q_proj.weight, before)
        assert acc.merged_block(index, bp) is acc.merged_block(index, bp)  # built once


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_adapters_keep_the_slow_rows_and_add_the_fast_rows_deltas(engines, family):
    """Folding the A matrices into the block's own projections: the slow rows of a block call
    are the unfolded call's bit for bit (where this CPU's products allow it; otherwise a group is
    left unfolded), and the fast rows get the same deltas to rounding."""
    from m2r2core.stream.blocks import FoldedAdapters

    parts = engines[family].parts
    acc = _random_adapters(parts, bias=True)
    gen = torch.Generator().manual_seed(4)
    hidden, heads = parts.config.hidden_size, parts.config.num_key_value_heads
    dim = hidden // parts.config.num_attention_heads
    for index in range(acc.first, acc.first + acc.n_fast):
        bp = hf_compat.block_parts(parts, index)
        folded = acc.inference_block(index, bp)
        assert isinstance(folded, FoldedAdapters) and acc.inference_block(index, bp) is folded
        assert folded.folded, "no group folded: this CPU's products differ by shape"
        for rows in (1, 2, 5):
            x = torch.randn(1, rows, hidden, generator=gen)
            keys, values = (torch.randn(1, heads, 7, dim, generator=gen) for _ in range(2))
            cos, sin = parts.rotary_emb(x, torch.arange(7, 7 + rows)[None])
            mask = torch.cat([torch.ones(rows, 7, dtype=torch.bool),
                              visible(torch.arange(rows), torch.arange(rows), None)], dim=1)
            plain = block_rows(bp, acc.inference_block(index), x, cos, sin, keys, values, mask, 1)
            got = block_rows(bp, folded, x, cos, sin, keys, values, mask, 1)
            assert torch.equal(got[0][:, :-1], plain[0][:, :-1])
            assert torch.equal(got[1][:, :, :-1], plain[1][:, :, :-1])
            assert torch.equal(got[2][:, :, :-1], plain[2][:, :, :-1])
            for a, b in zip(got, plain, strict=True):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fused_adapters_on_the_last_rows_of_a_bf16_block_input(engines):
    """Decoding's fused adapters, fed the strided last row of a bf16 block input (as the exit
    decoder feeds them), give the training adapters' deltas in the input's dtype."""
    from m2r2core.stream.blocks import GROUPS, FusedAdapters

    parts = engines["llama"].parts
    acc = _random_adapters(parts, bias=True)
    adapters = acc.block(acc.first)
    fused = FusedAdapters(adapters)
    gen = torch.Generator().manual_seed(3)
    for group, names in GROUPS.items():
        present = [n for n in names if n in adapters]
        if not present:
            continue
        width = adapters[present[0]].A.shape[1]
        rows = torch.randn(1, 3, width, generator=gen).to(torch.bfloat16)
        got = fused.deltas(group, rows[:, -1:])
        assert set(got) == set(present)
        for name in present:
            want = adapters[name](rows[:, -1:].float())
            assert got[name].dtype == torch.bfloat16 and got[name].shape == want.shape
            torch.testing.assert_close(got[name].float(), want, atol=2e-2, rtol=2e-2)


def test_rate_target_and_shape():
    cfg = AccelConfig(rate=2.0, margin=2)
    assert cfg.fast_layers(30) == 17
    assert [cfg.target_depth(d, 30) for d in (1, 2, 7, 15, 16, 17)] == [2, 4, 14, 30, 30, 30]
    assert AccelConfig(rate=3.0, margin=0).fast_layers(30) == 10
    assert AccelConfig(target="final").target_depth(3, 30) == 30
    assert AccelConfig(rate=2.0, branch_layer=4).target_depth(6, 30) == 8


@pytest.mark.parametrize("bad", [dict(rate=1.0), dict(rate=0.5), dict(rate=40.0),
                                 dict(branch_layer=30), dict(rank=0), dict(target="fast"),
                                 dict(projections=("qq",))])
def test_bad_shapes_are_refused(bad):
    with pytest.raises(ConfigError):
        AccelConfig(**bad).validate(30)


def _save(acc, folder):
    """Save adapters of the tiny model with a card naming it 'tiny' (fingerprint 'abc')."""
    card = accel.AdapterCard(config=vars(acc.config) | {"projections": list(accel.PROJECTIONS)},
                             model_name="tiny", model_fingerprint="abc", n_layers=4,
                             hidden_size=64)
    acc.save(folder, card)
    return card


def test_save_load_roundtrip_and_refusals(engines, tmp_path):
    parts = engines["llama"].parts
    acc = _random_adapters(parts)
    card = _save(acc, tmp_path / "a")
    loaded, got = accel.load_accelerator(tmp_path / "a", parts, "tiny", "abc")
    for (k, v), (k2, v2) in zip(acc.state_dict().items(), loaded.state_dict().items(),
                                strict=True):
        assert k == k2
        torch.testing.assert_close(v.to(torch.bfloat16).float(), v2)
    with pytest.raises(AdapterError, match="trained for 'tiny'.*loaded model is 'other'"):
        accel.load_accelerator(tmp_path / "a", parts, "other", "zzz")
    (tmp_path / "a" / accel.WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="could not be loaded"):
        accel.load_accelerator(tmp_path / "a", parts, "tiny", "abc")
    (tmp_path / "a" / accel.CARD_NAME).write_text("{broken")
    with pytest.raises(AdapterError, match="corrupt"):
        accel.load_accelerator(tmp_path / "a", parts, "tiny", "abc")
    with pytest.raises(AdapterError, match="No adapter card"):
        accel.load_accelerator(tmp_path / "missing", parts, "tiny", "abc")
    assert json.loads(json.dumps(card.config))["rate"] == 2.0


def test_matmul_attention_matches_the_fused_kernel():
    """The drafting path's plain-matmul attention computes the same function as sdpa (GQA, mask)."""
    from m2r2core.stream.blocks import _matmul_attention

    torch.manual_seed(0)
    q = torch.randn(1, 6, 3, 8)
    keys, values = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    mask = torch.rand(3, 7) > 0.3
    mask[:, 0] = True
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                            scale=0.3, enable_gqa=True)
    torch.testing.assert_close(_matmul_attention(q, keys, values, mask, 0.3), want)
    torch.testing.assert_close(_matmul_attention(q, keys, values, None, 0.3),
                               torch.nn.functional.scaled_dot_product_attention(
                                   q, keys, values, scale=0.3, enable_gqa=True))


def test_bias_adapters_roundtrip_and_initialise_from_unbiased(engines, tmp_path):
    """Adapters with residual biases save and load; a biased run can start from unbiased
    adapters (the biases start at zero), and adapters of another shape are refused."""
    from m2r2core.errors import M2R2Error
    from m2r2core.train import init_adapters

    parts = engines["llama"].parts
    plain = _random_adapters(parts)
    _save(plain, tmp_path / "plain")
    biased = Accelerator(parts, AccelConfig(rate=2.0, rank=4, margin=0, bias=True))
    init_adapters(biased, tmp_path / "plain")
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(biased.state_dict()[key], value.to(torch.bfloat16).float())
    assert all(float(v.abs().sum()) == 0 for k, v in biased.state_dict().items()
               if k.endswith(".bias"))
    with torch.no_grad():
        for k, v in biased.named_parameters():
            if k.endswith(".bias"):
                v.fill_(0.25)
    _save(biased, tmp_path / "biased")
    loaded, _ = accel.load_accelerator(tmp_path / "biased", parts, "tiny", "abc")
    assert loaded.config.bias
    assert float(loaded.blocks[0]["down"].bias[0]) == 0.25
    # rank 4 grows into rank 8 with the same function, at the CLI's scale (alpha = 2 x rank)
    small = _random_adapters(parts, alpha=8.0)
    _save(small, tmp_path / "small")
    wider = Accelerator(parts, AccelConfig(rate=2.0, rank=8, margin=0, alpha=16.0))
    init_adapters(wider, tmp_path / "small")
    plain = small
    x = torch.randn(3, parts.config.hidden_size)
    for name in ("q", "down"):
        source, grown = plain.blocks[0][name], wider.blocks[0][name]
        if name == "down":
            x = torch.randn(3, source.A.shape[1])
        torch.testing.assert_close(grown(x), source.to(torch.bfloat16).float()(x))
    narrower = Accelerator(parts, AccelConfig(rate=2.0, rank=2, margin=0))
    with pytest.raises(M2R2Error, match="do not fit"):
        init_adapters(narrower, tmp_path / "plain")
