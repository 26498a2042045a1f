"""Our own layer walk equals transformers: logits allclose and greedy ids equal, for every
supported family, with tracing off and on."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from m2r2core.config import DecodeConfig, EngineConfig
from m2r2core.engine import Engine
from m2r2core.errors import UnsupportedModel
from m2r2core.runtime import hf_compat
from m2r2core.runtime.decode import DecodeState, forward

from .conftest import FAMILIES

PROMPT = "Explain why the sky is blue in one sentence."


@pytest.fixture(scope="module")
def engines(tiny_model_dirs):
    return {f: Engine.load(EngineConfig(model=str(d), dtype="float32"))
            for f, d in tiny_model_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_walk_logits_match_model_forward(engines, family):
    engine = engines[family]
    ids = torch.tensor([engine.encode(PROMPT, DecodeConfig())])
    state = DecodeState(hf_compat.new_cache(engine.parts), torch.Generator())
    ours = forward(engine.parts, ids, state, keep_states=False).logits
    with torch.inference_mode():
        theirs = engine.model(ids).logits[0, -1].float()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # and a second chunk on top of the cache (decode path)
    nxt = torch.tensor([[int(ours.argmax())]])
    ours2 = forward(engine.parts, nxt, state, keep_states=False).logits
    with torch.inference_mode():
        theirs2 = engine.model(torch.cat([ids, nxt], 1)).logits[0, -1].float()
    torch.testing.assert_close(ours2, theirs2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("trace", [False, True])
def test_greedy_ids_equal_generate(engines, family, trace):
    engine = engines[family]
    cfg = DecodeConfig(max_new_tokens=24, trace=trace)
    ours = engine.run(PROMPT, cfg).trace.token_ids
    ids = torch.tensor([engine.encode(PROMPT, cfg)])
    with torch.inference_mode():
        out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                    do_sample=False)
    assert ours == tuple(out[0, ids.shape[1]:].tolist())
    assert len(ours) >= 1


def test_sliding_window_family_goes_past_its_window(engines):
    # the tiny Mistral has a window of 8: 24 new tokens exercise the sliding cache
    assert engines["mistral"].parts.layer_types[0] == "sliding_attention"


def test_crop_cache_keeps_prefix(engines):
    engine = engines["llama"]
    ids = torch.tensor([engine.encode(PROMPT, DecodeConfig())])
    state = DecodeState(hf_compat.new_cache(engine.parts), torch.Generator())
    forward(engine.parts, ids, state, keep_states=False)
    n = hf_compat.cache_length(state.cache)
    hf_compat.crop_cache(state.cache, n - 3)
    assert hf_compat.cache_length(state.cache) == n - 3
    with pytest.raises(ValueError):
        hf_compat.crop_cache(state.cache, n + 5)


def test_unknown_architecture_is_refused():
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModel, match="gpt2"):
        hf_compat.decoder_parts(model)
