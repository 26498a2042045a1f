"""Trace values equal an independent computation from transformers' output_hidden_states, and
traces survive a JSON round trip."""

import numpy as np
import pytest
import torch

from m2r2core.trace import ResidualCapture, RunTrace


def independent_trajectories(model, prompt_ids, generated_ids):
    """h_0..h_N at the positions that produced each generated token, from one HF forward."""
    ids = torch.tensor([list(prompt_ids) + list(generated_ids)])
    last_block = {}
    handle = model.model.layers[-1].register_forward_hook(
        lambda module, args, output: last_block.update(h=output))
    try:
        with torch.inference_mode():
            out = model(ids, output_hidden_states=True)
    finally:
        handle.remove()
    # hidden_states[N] is after the final norm; use the last block's raw output instead
    stack = torch.stack(list(out.hidden_states[:-1]) + [last_block["h"]])[:, 0]  # (N+1, S, H)
    start = len(prompt_ids) - 1
    return stack[:, start:start + len(generated_ids)].transpose(0, 1).float()  # (T, N+1, H)


def check_against_independent(engine, result, atol=1e-4):
    trace = result.trace
    prompt_ids = engine.encode(trace.prompt, _cfg(trace))
    h = independent_trajectories(engine.model, prompt_ids, trace.token_ids)
    with torch.inference_mode():
        logits = engine.model.lm_head(engine.model.model.norm(h)).float()  # (T, N+1, V)
    probs = logits.softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    for t, step in enumerate(trace.steps):
        ht = h[t]
        norms = ht.norm(dim=-1)
        np.testing.assert_allclose(step.residual_norm, norms, rtol=1e-4, atol=atol)
        speed = (ht[1:] - ht[:-1]).norm(dim=-1) / norms[:-1]
        np.testing.assert_allclose(step.relative_speed, speed, rtol=1e-4, atol=atol)
        cos = torch.nn.functional.cosine_similarity(ht, ht[-1:], dim=-1)
        np.testing.assert_allclose(step.cosine_to_final, cos, rtol=1e-4, atol=atol)
        np.testing.assert_allclose(step.lens_entropy, entropy[t], rtol=1e-3, atol=1e-3)
        top = probs[t].topk(len(step.lens_top_ids[0]), dim=-1)
        np.testing.assert_allclose(step.lens_top_probs, top.values, rtol=1e-3, atol=1e-5)
        assert [row[0] for row in step.lens_top_ids] == top.indices[:, 0].tolist()
        final_top1 = int(logits[t, -1].argmax())
        assert final_top1 == step.token_id  # greedy: the token is the final top-1
        assert list(step.lens_agrees) == (top.indices[:, 0] == final_top1).tolist()
        if result.capture is not None:
            np.testing.assert_allclose(result.capture.hidden[t], ht, rtol=1e-4, atol=atol)


def _cfg(trace):
    from m2r2core.config import DecodeConfig
    return DecodeConfig(max_new_tokens=trace.config["max_new_tokens"])


def test_trace_values_match_output_hidden_states(tiny_engine, tiny_run):
    assert len(tiny_run.trace.steps) == 12
    check_against_independent(tiny_engine, tiny_run)


def test_trace_shapes(tiny_engine, tiny_run):
    n = tiny_engine.parts.n_layers
    step = tiny_run.trace.steps[0]
    assert len(step.residual_norm) == n + 1
    assert len(step.relative_speed) == n
    assert len(step.lens_top_ids) == n + 1 and len(step.lens_top_ids[0]) == 5
    assert step.lens_agrees[-1] is True
    assert step.cosine_to_final[-1] == pytest.approx(1.0)
    assert tiny_run.capture.hidden.shape == (12, n + 1, 64)


def test_json_round_trip_is_lossless(tiny_run):
    text = tiny_run.trace.to_json()
    again = RunTrace.from_json(text)
    assert again == tiny_run.trace
    assert again.to_json() == text


def test_json_from_other_schema_is_refused(tiny_run):
    text = tiny_run.trace.to_json().replace('"schema_version": 2', '"schema_version": 99')
    with pytest.raises(ValueError, match="schema"):
        RunTrace.from_json(text)


def test_untraced_run_has_no_layer_statistics(tiny_engine):
    from m2r2core.config import DecodeConfig
    result = tiny_engine.run("Hello", DecodeConfig(max_new_tokens=3, trace=False))
    assert not result.trace.steps[0].traced
    assert result.capture is None
    assert 0.0 < result.trace.steps[0].token_prob <= 1.0


def test_capture_validates_its_array():
    with pytest.raises(ValueError, match="float32"):
        ResidualCapture("r", np.zeros((2, 3, 4), dtype=np.float64))
    with pytest.raises(ValueError, match="T, N\\+1, H"):
        ResidualCapture("r", np.zeros((2, 3), dtype=np.float32))
