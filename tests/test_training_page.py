"""The Training page and its report: cards and training logs read from the trained-files folder,
charts drawn from them, an unreadable card reported without losing the rest."""

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis.training_report import (
    gap_slices,
    scaling_fit,
    slow_layer_for,
    training_report,
    variant_rows,
)
from app import state

ENTRY = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")


def _log(folder: Path) -> None:
    evaluations = [{"step": s, "dev_lens_agreement": {"fast": [0.1 + s / 100, 0.2 + s / 100],
                                                      "slow": [0.05, 0.06]}}
                   for s in (0, 10, 20)]
    steps = [{"step": s, "loss": 3.0 - s / 10, "tokens": 100 * s} for s in (5, 10, 15, 20)]
    (folder / "adapters_log.json").write_text(json.dumps({"run": "r", "evaluations": evaluations,
                                                          "steps": steps}))


def test_report_reads_cards_and_curve(tmp_path):
    (tmp_path / "card.json").write_text(json.dumps(
        {"training": {"data": "corpus", "step": 20},
         "metrics": {"held_out_lens_agreement": {"fast": [0.3, 0.4], "slow": [0.1, 0.2]}}}))
    (tmp_path / "routers.json").write_text("{not json")
    _log(tmp_path)
    report = training_report(tmp_path)
    assert set(report.cards) == {"adapters"}
    assert len(report.problems) == 1 and "routers.json" in report.problems[0]
    curve = report.agreement_curve((2,))[2]
    assert [s for s, _ in curve] == [0, 10, 20]
    assert [round(v, 6) for _, v in curve] == [0.2, 0.3, 0.4]
    assert report.held_out_by_depth()["fast"] == [0.3, 0.4]
    assert training_report(None).problems  # nothing loaded: said, not an error
    (tmp_path / "tuned_lens.json").write_text(json.dumps(
        {"metrics": {"held_out": {"logit": [0.1, 1.0], "tuned": [0.2, 1.0]}}}))
    assert training_report(tmp_path).held_out_by_depth()["tuned"] == [0.2, 1.0]


def test_slow_layer_each_depth_reads_like(tmp_path):
    slow = [0.1, 0.3, 0.2, 0.5, 1.0]  # layer 3 reads worse than layer 2: the running max counts
    assert slow_layer_for(slow, 0.05) == pytest.approx(0.5)  # half way from the embeddings
    assert slow_layer_for(slow, 0.3) == pytest.approx(2.0)
    assert slow_layer_for(slow, 0.4) == pytest.approx(3.5)  # between layer 3 (0.3) and 4 (0.5)
    assert slow_layer_for(slow, 0.6) is None  # only the final layer gets there
    (tmp_path / "card.json").write_text(json.dumps(
        {"metrics": {"held_out_lens_agreement": {"fast": [0.3, 0.5], "slow": slow}}}))
    rows = training_report(tmp_path).reads_like()
    assert [(r.depth, r.slow_layer) for r in rows] == [(1, 2.0), (2, 4.0)]
    assert rows[1].rate() == pytest.approx(2.0)
    assert training_report(tmp_path).reads_like("tuned") == []  # no tuned-lens card


def _history(folder: Path) -> None:
    states = [{"run": name, "tokens": tokens, "agreement": [a / 2, a]}
              for name, tokens, a in (("a", 1_000_000, 0.3), ("b", 2_000_000, 0.35),
                                      ("c", 4_000_000, 0.4))]
    (folder / "adapters_history.json").write_text(json.dumps({"states": states}))


def test_scaling_fit_of_the_committed_history(tmp_path):
    _history(tmp_path)
    points = training_report(tmp_path).history_points(2)
    assert points == [(1_000_000, 0.3), (2_000_000, 0.35), (4_000_000, 0.4)]
    fit = scaling_fit(points, 2)
    assert fit.per_doubling == pytest.approx(0.05)
    assert fit.at(8_000_000) == pytest.approx(0.45)
    assert fit.tokens_for(0.6) == pytest.approx(64_000_000, rel=1e-6)  # four more doublings
    assert fit.at(fit.tokens_for(0.6)) == pytest.approx(0.6)
    flat = scaling_fit([(1_000, 0.3), (2_000, 0.3)], 2)
    assert flat.per_doubling == 0 and flat.tokens_for(0.6) is None
    assert scaling_fit(points[:1], 2) is None  # one size: no trend
    assert training_report(tmp_path).history_points(9) == []  # a depth it never measured
    (tmp_path / "adapters_history.json").write_text('{"states": [')  # damaged: said, no trend
    report = training_report(tmp_path)
    assert report.history == () and any("adapters_history.json" in p for p in report.problems)


def test_variant_rows():
    report = {"variants": {"baseline": {"overrides": {}, "steps": 60, "tokens": 9,
                                        "dev_agreement_d8": 0.2, "dev_agreement_d15": 0.3},
                           "rank64": {"overrides": {"rank": 64}, "steps": 60, "tokens": 9,
                                      "dev_agreement_d8": 0.25, "dev_agreement_d15": 0.35}}}
    rows = variant_rows(report)
    assert [r["changes"] for r in rows] == ["(baseline)", "rank=64"]
    assert rows[1]["dev agreement d15"] == 0.35
    assert variant_rows(None) == []


def test_gap_slices_read_a_gap_report():
    report = {"first_depth": 1, "slices": [
        {"split": "test", "source": "sharegpt", "samples": 60, "agreement": [0.1, 0.4, 0.5]},
        {"split": "train", "source": "sharegpt", "samples": 60, "agreement": [0.2, 0.6, 0.7]},
        {"split": "train", "source": "sharegpt-followup", "samples": 9, "agreement": [0.1]},
        {"split": "test", "source": "wiki"}]}  # no figures: skipped
    slices = gap_slices(report)
    assert [s.held_out for s in slices] == [True, False, False]
    assert slices[0].label == "ShareGPT first turns, held out"
    assert slices[1].label == "ShareGPT first turns, train split"
    assert slices[2].label == "ShareGPT later turns, train split"
    assert slices[1].at(3) == 0.7 and slices[1].at(4) is None and slices[1].at(0) is None
    assert gap_slices(None) == [] and gap_slices([1, 2]) == [] and gap_slices({"slices": 3}) == []


def test_page_shows_the_committed_cards(tiny_model_dir, tiny_trained_dir, monkeypatch,
                                        tmp_path):
    import shutil

    from app import resources

    resources.get_engine.clear()  # an engine cached by an earlier test read other trained files
    trained = tmp_path / "trained"
    shutil.copytree(tiny_trained_dir, trained)
    _log(trained / "tiny")
    _history(trained / "tiny")
    monkeypatch.setenv("M2R2_MODEL_DIR", str(tiny_model_dir))
    monkeypatch.setenv("M2R2_TRAINED_DIR", str(trained))
    at = AppTest.from_file(ENTRY, default_timeout=180)
    at.session_state[state.DTYPE] = "float32"
    at.run()
    at.switch_page("app/pages/training.py")
    at.run()
    assert not at.exception
    assert at.title[0].value == "Training"
    charts = [c.proto.id for c in at.get("plotly_chart")]
    variants = resources.benchmark_report("adapter_variants.json") is not None
    gap = bool(gap_slices(resources.benchmark_report("agreement_gap.json")))
    # by depth, reads like, over steps, agreement against tokens, loss (+ gap, variants)
    assert len(charts) == 5 + gap + variants, charts
    assert gap == any(state.TRAIN_GAP in c for c in charts)
    assert any(state.TRAIN_SCALING in c for c in charts)
    assert any(state.TRAIN_READS_LIKE in c for c in charts)
    assert any("reads like" in c.value or "as often as the slow stream" in c.value
               for c in at.caption)
    assert any("per doubling" in c.value for c in at.caption)
    assert set(at.selectbox(key=state.TRAIN_CARD).options) >= {"adapters", "routers",
                                                               "Medusa heads", "tuned lens"}
    at.selectbox(key=state.TRAIN_CARD).set_value("routers").run()
    assert not at.exception
