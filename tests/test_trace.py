"""Trace values equal an independent computation from transformers' output_hidden_states, and
traces survive a JSON round trip."""

import numpy as np
import pytest
import torch

from m2r2core.trace import SCHEMA_VERSION, ResidualCapture, RunTrace


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
    text = tiny_run.trace.to_json().replace(f'"schema_version": {SCHEMA_VERSION}',
                                            '"schema_version": 99')
    assert '"schema_version": 99' in text
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


def test_every_record_type_survives_a_json_round_trip(tiny_engine):
    """The trace contract covers all four run types: TokenStep (with the fast stream's
    FastStats), SpecRound, OffloadToken and Event come back equal from JSON."""
    import dataclasses
    import json

    from m2r2core.trace import (
        Event,
        FastStats,
        OffloadToken,
        SpecRound,
        TokenStep,
        from_dict,
        to_dict,
    )

    fast = FastStats((1.0, 2.0), (0.5,), (0.1, 0.9), (3.0, 2.0), (7, 8), (0.2, 0.6), (False, True))
    records = [
        TokenStep(0, 5, "a", 0.5, 30, "exit", 1.0, 0.8, 0.1, fast=fast,
                  rule_scores={"fast/arla": (0.1, 0.9)}, lens_top_ids=((1, 2), (3, 4))),
        SpecRound(1, 1, (4, 5), ("x", "y"), (0.9, 0.4), 1, (4, 6), ("x", "z"), True, 1.5, 2.5,
                  (2, 3)),
        OffloadToken(0, 9, "b", 3.0, 0.5, 4, 2, ((0, 1), (2, 3))),
        Event("load", 1, 2, 3, 0.5, 1.5, "prefetch"),
    ]
    for record in records:
        back = from_dict(type(record), json.loads(json.dumps(to_dict(record))))
        assert back == record, type(record).__name__
    with pytest.raises(TypeError):
        from_dict(Event, dataclasses.asdict(records[3]) | {"bogus": 1})


def test_a_schema_2_trace_with_flat_fast_fields_still_opens(tiny_run):
    """Traces downloaded before the FastStats record (schema 2) open with the fast stream in
    its record."""
    import json

    data = json.loads(tiny_run.trace.to_json())
    data["schema_version"] = 2
    for step in data["steps"]:
        step.pop("fast")
        step["fast_residual_norm"], step["fast_relative_speed"] = [1.0, 2.0], [0.5]
        step["fast_cosine_to_final"], step["fast_lens_entropy"] = [0.1, 0.9], [3.0, 2.0]
        step["fast_lens_top1"], step["fast_lens_top1_prob"] = [7, 8], [0.2, 0.6]
        step["fast_lens_agrees"] = [False, True]
    back = RunTrace.from_json(json.dumps(data))
    assert back.steps[0].fast.lens_top1 == (7, 8) and back.steps[0].fast.lens_agrees == (False,
                                                                                         True)
    assert back.schema_version == SCHEMA_VERSION


def test_a_schema_3_trace_without_the_tuned_stream_still_opens(tiny_run):
    import json

    data = json.loads(tiny_run.trace.to_json())
    data["schema_version"] = 3
    for step in data["steps"]:
        step.pop("tuned")
    back = RunTrace.from_json(json.dumps(data))
    assert back.steps == tiny_run.trace.steps and back.schema_version == SCHEMA_VERSION


def test_rule_scores_are_a_read_only_record_that_round_trips():
    import copy
    import json
    import pickle

    from m2r2core.trace import RuleScores, TokenStep, from_dict, to_dict

    step = TokenStep(position=0, token_id=1, text="a", token_prob=0.5, exit_layer=2,
                     source="exit", latency_ms=1.0, forward_ms=1.0, trace_ms=0.0,
                     rule_scores={"fast/arla": [0.1, 0.9]})
    assert isinstance(step.rule_scores, RuleScores)
    assert step.rule_scores.of("fast", "arla") == (0.1, 0.9)
    assert step.rule_scores.of("slow", "arla") == ()
    for change in (lambda r: r.__setitem__("x", ()), lambda r: r.pop("fast/arla"),
                   lambda r: r.update({}), lambda r: r.clear()):
        with pytest.raises(TypeError, match="cannot be changed"):
            change(step.rule_scores)
    back = from_dict(TokenStep, json.loads(json.dumps(to_dict(step))))
    assert back == step and isinstance(back.rule_scores, RuleScores)
    assert copy.deepcopy(step.rule_scores) == step.rule_scores
    assert pickle.loads(pickle.dumps(step)).rule_scores == step.rule_scores
