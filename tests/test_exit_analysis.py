"""Re-deciding exits offline agrees with decoding, ROUGE-L and the Pareto helper are right, the
evaluation CLI writes a report, and captum attributions explain a learned router's decision."""

import json
import math

import numpy as np
import pytest

from analysis import exit_eval
from analysis import exits as ex
from analysis.attribution import explain_exit
from m2r2core.config import DecodeConfig, EngineConfig
from m2r2core.engine import Engine
from m2r2core.errors import ConfigError
from m2r2core.exits.early_exit import ExitConfig
from m2r2core.exits.routers import RULES, ExitRule

PROMPT = "Why is the sky blue?"


@pytest.fixture(scope="module")
def trained_engine(tiny_model_dir, tiny_trained_dir):
    engine = Engine.load(EngineConfig(model=str(tiny_model_dir), dtype="float32"))
    engine.load_trained(tiny_trained_dir / "tiny")
    return engine


@pytest.fixture(scope="module")
def traced(trained_engine):
    return trained_engine.run(PROMPT, DecodeConfig(max_new_tokens=10))


def test_rouge_l():
    assert ex.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert ex.rouge_l("a b c", "x y z") == 0.0
    # LCS "the cat mat" = 3 of 6 and 3 of 4 words
    assert math.isclose(ex.rouge_l("the cat sat on the mat", "the black cat mat"),
                        2 * 0.5 * 0.75 / 1.25)
    assert ex.rouge_l("", "") == 1.0


def test_speedup_at_quality_interpolates():
    pts = [{"speedup": 1.0, "rouge_full": 1.0}, {"speedup": 2.0, "rouge_full": 0.8}]
    assert math.isclose(ex.speedup_at_quality(pts, 0.9), 1.5)
    assert math.isnan(ex.speedup_at_quality([{"speedup": 3.0, "rouge_full": 0.1}], 0.9))


def test_traced_run_records_both_streams_and_every_rule(trained_engine, traced):
    step = traced.trace.steps[1]
    d = trained_engine.accel.n_fast
    assert len(step.fast.lens_top1) == d + 1 and len(step.fast.cosine_to_final) == d + 1
    assert {k.split("/")[0] for k in step.rule_scores} == {"fast", "slow", "tuned"}
    n = trained_engine.parts.n_layers
    assert len(step.tuned.lens_top1) == n + 1 and step.tuned.lens_agrees[-1]
    assert len(step.rule_scores["tuned/confidence"]) == n
    assert "tuned/arla" not in step.rule_scores  # the routers are not trained on it
    assert len(step.rule_scores["slow/arla"]) == trained_engine.parts.n_layers
    assert len(step.rule_scores["fast/arla"]) == d
    assert traced.capture.fast.shape[1] == d + 1
    matrix = ex.fast_slow_cosine(traced.capture)
    assert matrix.shape == (d + 1, trained_engine.parts.n_layers + 1)
    assert np.isclose(matrix[0, 0], 1.0)  # both streams start from the same embedding


@pytest.mark.parametrize("stream, rule", [(s, r) for s in ("fast", "slow") for r in RULES]
                         + [("tuned", r) for r in RULES if r not in ("arla", "mlp")])
def test_offline_decisions_match_real_exit_decisions(trained_engine, traced, stream, rule):
    """The scores recorded by the traced run are the scores the decoder uses, for every rule:
    re-deciding the second generated token offline gives the depth the early-exit decoder chose
    for it."""
    n = trained_engine.parts.n_layers
    step = traced.trace.steps[1]
    scores = step.rule_scores[f"{stream}/{rule}"]
    last = len(scores) if stream == "fast" else n - 1
    ordered = sorted(set(s for s in scores[:last] if 0.0 <= s <= 1.0))
    assert len(ordered) >= 2, scores
    middle = len(ordered) // 2  # halfway between two recorded scores: rounding cannot flip it
    threshold = float(ordered[middle - 1] + ordered[middle]) / 2
    offline = ex.decide(step, stream, rule, threshold, 1, n)
    assert offline.exited
    gen = trained_engine.generate_exits(
        PROMPT, DecodeConfig(max_new_tokens=2, trace=False),
        ExitConfig(ExitRule(rule, stream, threshold, 1)))
    real = list(gen)[1]
    assert real.exit_layer == offline.depth
    assert real.token_id == offline.token_id


def test_offline_decisions_with_check_depths_match_the_decoder(trained_engine, traced):
    """Re-deciding with named check depths gives the decoder's depth, and counts its checks."""
    n = trained_engine.parts.n_layers
    steps = traced.trace.steps[1:]
    for depths in ((2,), (1, 3)):
        offline = ex.decide_all(steps[:1], "slow", "confidence", 0.0, 1, n, depths)
        assert offline[0].depth == depths[0] and offline[0].exited
        gen = trained_engine.generate_exits(
            PROMPT, DecodeConfig(max_new_tokens=2, trace=False),
            ExitConfig(ExitRule("confidence", "slow", 0.0, 1, depths)))
        assert list(gen)[1].exit_layer == depths[0]
    never = ex.decide_all(steps, "slow", "confidence", 1.01, 1, n, (1, 3))
    assert ex.checks_made(never, 1, n - 1, (1, 3)) == [2] * len(steps)
    assert ex.checks_made(never, 1, n - 1) == [n - 1] * len(steps)
    assert ex.checked_depths(2, 3, (1, 3)) == [3]  # below the minimum layer: not checked


def test_evaluation_runs_check_depth_variants_beside_every_depth(trained_engine):
    report = exit_eval.evaluate(trained_engine, ["vicuna"], 1, 4, ["confidence"], ["fast"], 1,
                                "jit", check_depths=(2,))
    plain = [c for c in report["configs"] if not c["depths"]]
    named = [c for c in report["configs"] if c["depths"] == [2]]
    assert plain and len(named) == len(plain)
    assert set(report["speedup_at_rouge_0.9"]) == {"fast/confidence", "fast/confidence@2"}
    assert set(report["offline_sweeps"]) == {"fast/confidence", "fast/confidence@2"}
    for config in named:
        for run in config["runs"]:  # one check a token at most: only depth 2 is asked
            assert run["ledger"]["checks_per_token"] <= 1.0
    assert report["check_depths"] == [2]
    rows = ex.break_even_rows(report["configs"])
    assert {r["checked_at"] for r in rows} == {"every depth", "2"}
    with pytest.raises(ConfigError, match="depths"):  # refused before the first prompt
        exit_eval.evaluate(trained_engine, ["vicuna"], 1, 4, ["confidence"], ["fast"], 1, "jit",
                           check_depths=(99,))


def test_evaluation_writes_a_report(trained_engine, tmp_path):
    report = exit_eval.evaluate(trained_engine, ["vicuna"], 1, 6, ["confidence", "arla"],
                                ["fast", "slow"], 1, "jit")
    assert {c["rule"] for c in report["configs"]} == {"confidence", "arla"}
    for config in report["configs"]:  # each setting decoded once per prompt
        assert len(config["runs"]) == 1 and config["depths"] == []
    assert all(c["speedup"] > 0 and 0 <= c["rouge_full"] <= 1 for c in report["configs"])
    assert set(report["lens_agreement_by_layer"]) == {"fast", "slow", "tuned"}
    for config in report["configs"]:  # a break-even line per setting, from its own runs
        line = config["break_even"]
        assert line["predicted"] > 0 and 1 <= line["mean_depth"] <= trained_engine.parts.n_layers
        assert line["block_cost"] > 0 and line["head_cost"] > 0
        for run in config["runs"]:
            assert run["ledger"]["measured"] == pytest.approx(run["speedup"])
            assert run["ledger"]["mean_depth"] == pytest.approx(run["mean_exit_layer"])
    json.dumps(report, allow_nan=False)  # strict JSON: null, not NaN, where nothing reaches 0.9


@pytest.mark.parametrize("stream", ["fast", "slow"])
def test_attribution_explains_a_learned_router(trained_engine, traced, stream):
    ids = trained_engine.encode(PROMPT, DecodeConfig()) + [traced.trace.steps[0].token_id]
    att = explain_exit(trained_engine.parts, trained_engine.accel, trained_engine.routers,
                       trained_engine.token_text, ids, stream, "arla", depth=2, n_steps=4)
    assert len(att.token_scores) == len(ids)
    assert len(att.depth_scores) == 2
    assert 0.0 <= att.probability <= 1.0
    assert any(abs(x) > 0 for x in att.token_scores)
    with pytest.raises(ValueError, match="learned routers"):
        explain_exit(trained_engine.parts, trained_engine.accel, trained_engine.routers,
                     trained_engine.token_text, ids, stream, "confidence", 2)


def test_break_even_rows_read_each_settings_line_and_skip_older_reports():
    line = {"measured": 0.8, "predicted": 0.82, "mean_depth": 12.5, "checks_per_token": 9.0,
            "block_cost": 0.05, "check_cost": 0.004, "head_cost": 0.1, "fill_cost": 0.02,
            "needed_depth_1x": None}
    configs = [
        {"stream": "slow", "rule": "confidence", "threshold": 0.9, "rouge_full": 0.95,
         "break_even": line | {"needed_depth_1x": 15.0}},
        {"stream": "fast", "rule": "arla", "threshold": 0.97, "rouge_full": 0.7,
         "break_even": line},
        {"stream": "fast", "rule": "arla", "threshold": 0.6, "rouge_full": 0.3},  # older report
    ]
    rows = ex.break_even_rows(configs)
    assert [(r["stream"], r["threshold"]) for r in rows] == [("fast", 0.97), ("slow", 0.9)]
    assert rows[0]["head_and_fill_cost"] == pytest.approx(0.12)
    assert rows[0]["needed_depth_1x"] is None and rows[1]["needed_depth_1x"] == 15.0
    assert rows[1]["measured"] == 0.8 and rows[1]["rouge_full"] == 0.95
