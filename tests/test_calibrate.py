"""Calibrating an exit threshold with a guarantee: the p-value, the fixed-sequence procedure on
losses whose answer is known, real decoding on the tiny model, and random splits."""

import math

import pytest

from analysis import calibrate
from analysis.prompts import Prompt

PROMPTS = [Prompt(f"p{i}", "test", text) for i, text in enumerate(
    ["The capital of France is", "Tell me about the sea.", "Why is the sky blue?",
     "Name three colours.", "What is two plus two?", "Write a haiku about rain."])]


def test_hoeffding_p():
    assert calibrate.hoeffding_p([0.0] * 10, 0.2) == pytest.approx(0.8 ** 10)
    kl = 0.1 * math.log(0.1 / 0.2) + 0.9 * math.log(0.9 / 0.8)
    assert calibrate.hoeffding_p([0.1] * 10, 0.2) == pytest.approx(math.exp(-10 * kl))
    assert calibrate.hoeffding_p([0.1] * 10, 0.2) <= math.exp(-2 * 10 * 0.1 ** 2)  # tighter
    assert calibrate.hoeffding_p([0.5] * 10, 0.2) == 1.0  # mean above epsilon
    assert calibrate.hoeffding_p([], 0.2) == 1.0
    assert calibrate.best_level(30, 0.1) == pytest.approx(0.1 ** (1 / 30))


class FakeDecoder(calibrate.Decoder):
    """Losses set by hand: risk grows as the threshold falls."""

    def __init__(self, risk):
        self.rule, self.stream, self.risk, self.calls = "confidence", "slow", risk, 0

    def loss(self, prompt, threshold, metric):
        self.calls += 1
        return self.risk[threshold]

    def full(self, prompt):
        return calibrate.Outcome([], "", 10.0, 30.0)

    def exit(self, prompt, threshold):
        return calibrate.Outcome([], "", 10.0 * (0.5 + threshold / 2), 30 * threshold)


def test_fixed_sequence_stops_at_the_first_threshold_it_cannot_certify():
    risk = {1.0: 0.0, 0.9: 0.0, 0.8: 0.3, 0.7: 0.0}  # 0.7 is safe again, but never reached
    decoder = FakeDecoder(risk)
    result = calibrate.learn_then_test(decoder, PROMPTS * 5, "rouge", 0.9, 0.1,
                                       grid=(1.0, 0.9, 0.8, 0.7))
    assert [t["threshold"] for t in result.tested] == [1.0, 0.9, 0.8]
    assert [t["certified"] for t in result.tested] == [True, True, False]
    assert result.threshold == 0.9 and decoder.calls == 3 * 30
    assert result.calibration_speedup == pytest.approx(1 / 0.95)
    held = calibrate.check_heldout(decoder, result, PROMPTS)
    assert held.heldout_risk == pytest.approx(0.0) and held.held


def test_too_few_prompts_certify_nothing():
    result = calibrate.learn_then_test(FakeDecoder({1.0: 0.0}), PROMPTS * 3, "rouge", 0.9, 0.1,
                                       grid=(1.0,))
    assert result.threshold is None and not result.tested[0]["certified"]  # 0.9^18 > 0.1


def test_real_decoding_on_the_tiny_model(tiny_engine):
    decoder = calibrate.Decoder(tiny_engine, "confidence", "slow", 1, 8)
    result = calibrate.learn_then_test(decoder, PROMPTS[:4], "agreement", 0.5, 0.2,
                                       grid=(1.0, 0.3, 0.0))
    first = result.tested[0]
    assert first["threshold"] == 1.0 and first["risk"] == 0.0  # nothing exits: the full model
    assert first["certified"] and result.threshold is not None
    assert result.mean_exit_depth is not None and result.calibration_speedup > 0
    assert len(decoder.cache) >= 4 * 2  # the full model and threshold 1.0, per prompt
    checked = calibrate.check_heldout(decoder, result, PROMPTS[4:])
    assert checked.held is not None and 0 <= checked.heldout_risk <= 1
    gap = calibrate.teacher_forced_gap(decoder, PROMPTS[:2], 1.0)
    assert gap["teacher_forced_agreement"] == 1.0 == gap["real_agreement"]  # nothing exits


def test_random_splits_report_how_often_the_guarantee_held():
    decoder = FakeDecoder({t: 0.0 if t >= 0.5 else 0.6 for t in calibrate.GRID})
    report = calibrate.splits(decoder, PROMPTS * 6, 30, 5, "rouge", 0.9, 0.1)
    assert report["splits"] == 5 and report["certified"] == 5
    assert report["held"] == 5 and report["held_rate"] == 1.0
    assert all(r["threshold"] == 0.5 for r in report["runs"])
