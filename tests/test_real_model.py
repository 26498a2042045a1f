"""On the real SmolLM2-135M-Instruct: greedy output token-identical to transformers' generate on
20 MT-Bench prompts of 128 new tokens (fp32), and trace values equal to an independent
computation from output_hidden_states."""

import pytest
import torch

from analysis.prompts import load_prompts
from m2r2core.config import DecodeConfig
from m2r2core.spec.speculative import SpecConfig

from .test_trace import check_against_independent

pytestmark = pytest.mark.slow
PROMPTS = load_prompts("mt-bench", limit=20)


REFERENCE_TOKENS = 128
_references: dict[tuple[int, str], tuple[int, ...]] = {}


def hf_greedy(engine, text, max_new_tokens):
    """transformers' greedy output for `text`. Greedy decoding does not depend on the length
    limit, so one 128-token `generate` per prompt serves every shorter test as its prefix."""
    assert max_new_tokens <= REFERENCE_TOKENS
    key = (id(engine), text)
    if key not in _references:
        ids = torch.tensor([engine.encode(text, DecodeConfig(max_new_tokens=REFERENCE_TOKENS))])
        with torch.inference_mode():
            out = engine.model.generate(ids, attention_mask=torch.ones_like(ids),
                                        do_sample=False, max_new_tokens=REFERENCE_TOKENS)
        _references[key] = tuple(out[0, ids.shape[1]:].tolist())
    return _references[key][:max_new_tokens]


def test_default_model_is_smollm2(real_engine_fp32):
    info = real_engine_fp32.info
    assert (info.model_type, info.n_layers, info.hidden_size, info.vocab_size) == (
        "llama", 30, 576, 49152)
    assert 134e6 < info.n_params < 135e6
    assert real_engine_fp32.eos_ids == frozenset({2})


def test_greedy_equals_generate_on_20_mt_bench_prompts(real_engine_fp32):
    mismatches = []
    for prompt in PROMPTS:
        cfg = DecodeConfig(max_new_tokens=128, trace=False)
        ours = real_engine_fp32.run(prompt.text, cfg).trace.token_ids
        if ours != hf_greedy(real_engine_fp32, prompt.text, 128):
            mismatches.append(prompt.id)
    assert mismatches == []


@pytest.mark.parametrize("prompt", PROMPTS[:3], ids=lambda p: p.id)
def test_traced_greedy_equals_generate(real_engine_fp32, prompt):
    result = real_engine_fp32.run(prompt.text, DecodeConfig(max_new_tokens=64))
    assert result.trace.token_ids == hf_greedy(real_engine_fp32, prompt.text, 64)


def test_real_trace_values_match_output_hidden_states(real_engine_fp32):
    result = real_engine_fp32.run("What is the capital of France?",
                                  DecodeConfig(max_new_tokens=16))
    assert result.trace.completion.strip()
    check_against_independent(real_engine_fp32, result, atol=2e-3)
    last = result.trace.steps[0]
    assert last.lens_agrees[-1] and not all(last.lens_agrees[:5])  # early layers do not know yet


def test_committed_adapters_and_routers_load_by_default(real_engine_fp32):
    engine = real_engine_fp32
    assert engine.accel is not None, engine.accel_note
    assert engine.accel_card.model_fingerprint == engine.info.fingerprint
    assert engine.accel.n_fast == 17 and engine.accel.config.rate == 2.0
    assert {"arla/fast", "arla/slow", "mlp/fast", "mlp/slow"} <= set(engine.routers.nets)


@pytest.mark.parametrize("fill", ["jit", "copy"])
def test_exit_decoder_without_exits_is_plain_greedy(real_engine_fp32, fill):
    """The exit decoder's own block path (slow rows batched with fast ones) equals transformers'
    greedy output when the rule never fires, on the real model in fp32."""
    from m2r2core.exits.early_exit import ExitConfig
    from m2r2core.exits.routers import ExitRule

    for prompt in PROMPTS[:2]:
        cfg = DecodeConfig(max_new_tokens=48, trace=False)
        gen = real_engine_fp32.generate_exits(prompt.text, cfg, ExitConfig(
            ExitRule("arla", "fast", 1.0, 4), fill))
        assert tuple(s.token_id for s in gen) == hf_greedy(real_engine_fp32, prompt.text, 48)


def test_fast_stream_runs_ahead_of_the_slow_stream(real_engine_fp32):
    """On generated answers, the fast stream's logit lens agrees with the final token more often
    at depth N/r = 15 than the slow stream does at the same depth."""
    from analysis.exits import lens_agreement_by_layer

    steps = []
    for prompt in load_prompts("vicuna", limit=2):
        steps += real_engine_fp32.run(prompt.text, DecodeConfig(
            max_new_tokens=48, capture_residuals=False)).trace.steps[1:]
    agreement = lens_agreement_by_layer(tuple(steps))
    assert agreement["fast"][15] > 1.5 * agreement["slow"][15], agreement


@pytest.mark.parametrize("spec", [SpecConfig(draft_layer=8, max_draft=4, draft_vocab="sub"),
                                  SpecConfig(stream="slow", draft_layer=12, max_draft=3)],
                         ids=["fast", "slow"])
def test_speculative_greedy_equals_generate(real_engine_fp32, spec):
    """fp32: the self-speculative decoder's output is `generate`'s, token for token."""
    for prompt in PROMPTS[:2]:
        want = hf_greedy(real_engine_fp32, prompt.text, 48)
        run = real_engine_fp32.speculate(prompt.text, DecodeConfig(max_new_tokens=48,
                                                                   trace=False), spec).run()
        assert tuple(run.tokens) == want
