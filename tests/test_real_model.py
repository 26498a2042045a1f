"""On the real SmolLM2-135M-Instruct: greedy output token-identical to transformers' generate on
20 MT-Bench prompts of 128 new tokens (fp32), and trace values equal to an independent
computation from output_hidden_states."""

import pytest
import torch

from analysis.prompts import load_prompts
from m2r2core.config import DecodeConfig

from .test_trace import check_against_independent

pytestmark = pytest.mark.slow
PROMPTS = load_prompts("mt-bench", limit=20)


def hf_greedy(engine, text, max_new_tokens):
    ids = torch.tensor([engine.encode(text, DecodeConfig(max_new_tokens=max_new_tokens))])
    with torch.inference_mode():
        out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_new_tokens)
    return tuple(out[0, ids.shape[1]:].tolist())


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
