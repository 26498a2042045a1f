"""The oracle gap and the reliability diagram on hand-made trajectories whose answers are known,
and on a real traced run of the tiny model."""

import math

import numpy as np
import pytest

from analysis import oracle
from analysis.exits import decide_all
from m2r2core.config import DecodeConfig, EngineConfig
from m2r2core.engine import Engine
from m2r2core.trace import TokenStep

N = 4
FINAL = 7


def step(position: int, tops: list[int], scores: list[float]) -> TokenStep:
    """A traced token of a 4-layer model: the slow lens top-1 at depths 0..4 and the
    confidence rule's scores at depths 1..4."""
    return TokenStep(position=position, token_id=FINAL, text=f"t{position}", token_prob=0.9,
                     exit_layer=N, source="full", latency_ms=1.0, forward_ms=1.0, trace_ms=0.0,
                     residual_norm=(1.0,) * (N + 1), lens_top_ids=tuple((t,) for t in tops),
                     lens_agrees=tuple(t == FINAL for t in tops),
                     rule_scores={"slow/confidence": tuple(scores)})


STEPS = (
    step(0, [1, 7, 7, 7, 7], [0.2, 0.95, 0.95, 1.0]),  # settles at 1; exits at 2: late by 1
    step(1, [1, 7, 3, 7, 7], [0.95, 0.1, 0.1, 1.0]),   # agrees at 1 by luck, settles at 3
    step(2, [1, 2, 3, 7, 7], [0.1, 0.95, 0.1, 1.0]),   # exits at 2 with token 3: premature
    step(3, [1, 2, 3, 4, 7], [0.1, 0.1, 0.1, 1.0]),    # never settles before N: right at N
)


def test_oracle_depth_is_where_the_lens_settles():
    assert [oracle.oracle_depth(s, "slow", N) for s in STEPS] == [1, 3, 3, 4]


def test_verdicts_and_totals():
    decisions = decide_all(STEPS, "slow", "confidence", 0.9, 1, N)
    rows = oracle.gap_rows(STEPS, decisions, "slow", N)
    assert [(r.depth, r.verdict, r.wasted) for r in rows] == [
        (2, "late", 1), (1, "right", 0), (2, "premature", 0), (4, "right", 0)]
    summary = oracle.gap_summary(rows, N)
    assert (summary["right"], summary["late"], summary["premature"]) == (2, 1, 1)
    assert summary["wasted_per_token"] == pytest.approx(0.25)
    assert summary["mean_oracle_depth"] == pytest.approx(11 / 4)


def test_a_rule_that_never_fires_wastes_every_settled_layer():
    decisions = decide_all(STEPS, "slow", "confidence", 1.01, 1, N)
    rows = oracle.gap_rows(STEPS, decisions, "slow", N)
    assert [r.wasted for r in rows] == [3, 1, 1, 0]
    assert all(r.verdict != "premature" for r in rows)


def test_sweep_trades_wasted_layers_for_lost_tokens():
    sweep = oracle.gap_sweep(STEPS, "slow", "confidence", 1, N)
    lost = [p["premature_share"] for p in sweep]
    wasted = [p["wasted_per_token"] for p in sweep]
    assert lost[0] >= lost[-1] and wasted[0] <= wasted[-1]  # threshold 0 exits everything


def test_reliability_bins_and_ece():
    rel = oracle.reliability(STEPS, "slow", "confidence", 1, N, n_bins=2)
    # depths 1..3 (the last block always emits): 8 scores below 0.5, right 3 times; 4 scores
    # of 0.95, right 3 times (the third token's depth 2 reads another token)
    assert rel.counts == (8, 4)
    assert rel.accuracy == pytest.approx((3 / 8, 3 / 4))
    low_conf = np.mean([0.2] + [0.1] * 7)
    assert rel.confidence == pytest.approx((low_conf, 0.95))
    want = 8 / 12 * abs(3 / 8 - low_conf) + 4 / 12 * abs(3 / 4 - 0.95)
    assert rel.ece == pytest.approx(want)
    assert set(rel.ece_by_depth) == {1, 2, 3} and all(0 <= v <= 1 for v in
                                                      rel.ece_by_depth.values())


def test_reliability_reads_only_the_check_depths():
    rel = oracle.reliability(STEPS, "slow", "confidence", 1, N, n_bins=2, depths=(2,))
    assert set(rel.ece_by_depth) == {2} and sum(rel.counts) == len(STEPS)


@pytest.mark.parametrize("stream", ["fast", "slow", "tuned"])
def test_on_a_real_traced_run(tiny_model_dir, tiny_trained_dir, stream):
    engine = Engine.load(EngineConfig(model=str(tiny_model_dir), dtype="float32"))
    engine.load_trained(tiny_trained_dir / "tiny")
    steps = engine.run("Why is the sky blue?", DecodeConfig(max_new_tokens=8)).trace.steps[1:]
    n = engine.parts.n_layers
    decisions = decide_all(steps, stream, "confidence", 0.5, 1, n)
    rows = oracle.gap_rows(steps, decisions, stream, n)
    assert len(rows) == len(steps) and all(1 <= r.oracle <= n for r in rows)
    assert all(r.verdict in oracle.VERDICTS for r in rows)
    assert all((r.verdict == "premature") == (not d.agrees) for r, d in zip(rows, decisions,
                                                                             strict=True))
    rel = oracle.reliability(steps, stream, "confidence", 1, n)
    assert sum(rel.counts) > 0 and 0 <= rel.ece <= 1 and not math.isnan(rel.ece)
