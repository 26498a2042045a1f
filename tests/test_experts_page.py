"""AppTest flows of the Expert Loading page on a tiny Mixtral: generate with offloaded experts,
see the charts, refuse bad controls and bad models while keeping results."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app import state
from app.pages.experts import MODEL_KEY, RESULT_KEY

ENTRY = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")


@pytest.fixture
def app(tiny_model_dirs, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("M2R2_MOE_DIR", str(tiny_model_dirs["mixtral"]))
    monkeypatch.setenv("M2R2_CACHE", str(tmp_path_factory.mktemp("page-cache")))
    at = AppTest.from_file(ENTRY, default_timeout=300)
    at.session_state[state.DTYPE] = "float32"
    at.run()
    at.switch_page("app/pages/experts.py")
    return at.run()


def generate(at, capacity=4, predictor="pregate", policy="predicted", budget=8, lookahead=2):
    at.text_area(key=state.PROMPT).input("Tell me about the sea.")
    at.number_input(key=state.MAX_NEW_TOKENS).set_value(budget)
    at.number_input(key="experts_capacity").set_value(capacity)
    at.selectbox(key="experts_predictor").set_value(predictor)
    at.selectbox(key="experts_policy").set_value(policy)
    at.number_input(key="experts_lookahead").set_value(lookahead)
    at.button(key="experts_generate").click()
    return at.run()


def test_page_starts_and_explains(app):
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert app.title[0].value == "Expert Loading"
    assert any("m2r2 predictor is unavailable" in w.value for w in app.warning)


@pytest.mark.parametrize("predictor", ["pregate", "previous", "oracle", "none"])
def test_generation_is_identical_and_charted(app, predictor):
    at = generate(app, predictor=predictor)
    assert not at.exception and not at.error, [e.value for e in at.error]
    session = at.session_state[RESULT_KEY]
    assert session.identical
    assert session.summary["decode_tokens"] == 7
    assert at.metric[0].label == "Speedup vs on-demand LRU"
    assert at.metric[4].value == "yes"
    beside = {m.label: m.value for m in at.metric}
    assert beside["Ceiling (all resident)"].endswith("x") and beside["Oracle"].endswith("x")
    assert session.ceiling == pytest.approx(session.baseline["decode_ms"]
                                            / session.resident["decode_ms"])
    if predictor == "oracle":
        assert session.oracle == session.summary
    keys = {c.proto.id for c in at.get("plotly_chart")}
    for name in ("experts_gantt", "experts_residency", "experts_hits"):
        assert any(name in k for k in keys), keys


def test_the_prefetch_order_is_a_control_and_named(app):
    """Deadline order is the default; fifo (the engine before) stays one click away, runs with
    the same output, and the run's caption names the order it ran with."""
    assert app.selectbox(key=state.EXPERTS_QUEUE).value == "deadline"
    app.selectbox(key=state.EXPERTS_QUEUE).set_value("fifo")
    at = generate(app, predictor="pregate", budget=4)
    assert not at.exception and not at.error, [e.value for e in at.error]
    session = at.session_state[RESULT_KEY]
    assert session.offload.queue == "fifo" and session.identical
    assert any("prefetches by fifo" in c.value for c in at.caption)


def test_the_margin_gap_is_a_control_and_named(app):
    """Empty by default (every margin expert, as before); with a margin and a gap the run is
    gated, gives the same output, and its caption names the gap."""
    assert app.number_input(key=state.EXPERTS_MARGIN_GAP).value is None
    app.number_input(key=state.EXPERTS_MARGIN).set_value(1)
    app.number_input(key=state.EXPERTS_MARGIN_GAP).set_value(0.2)
    at = generate(app, predictor="pregate", budget=4)
    assert not at.exception and not at.error, [e.value for e in at.error]
    session = at.session_state[RESULT_KEY]
    assert session.offload.margin == 1 and session.offload.margin_gap == 0.2
    assert session.identical
    assert any("margin 1 (gap 0.2σ)" in c.value for c in at.caption)


def test_a_run_timed_past_its_ceiling_says_why(app):
    """One run per setting on a noisy CPU can time faster than a bound it cannot pass in
    expectation; the page says so instead of showing a share over 100% unexplained."""
    import dataclasses

    at = generate(app, predictor="pregate", budget=4)
    session = at.session_state[RESULT_KEY]
    base = session.baseline["decode_ms"]
    slow = dataclasses.replace(session, summary={**session.summary, "decode_ms": base * 10},
                               resident={**session.resident, "decode_ms": base / 2},
                               oracle={**session.oracle, "decode_ms": base / 2})
    assert slow.speedup == pytest.approx(0.1) and slow.bounds_passed() == []
    fast = dataclasses.replace(slow, summary={**session.summary, "decode_ms": base / 4})
    assert fast.speedup == pytest.approx(4.0)
    assert fast.bounds_passed() == ["the ceiling", "the oracle"]
    assert fast.oracle_share == pytest.approx(3.0)
    oracle = dataclasses.replace(fast, offload=dataclasses.replace(fast.offload,
                                                                   predictor="oracle"))
    assert oracle.bounds_passed() == []  # the oracle is its own bound
    at.session_state[RESULT_KEY] = fast
    at.run()
    assert not at.exception
    assert any("timed faster than the ceiling and the oracle" in c.value for c in at.caption)
    at.session_state[RESULT_KEY] = slow
    at.run()
    assert not any("timed faster than" in c.value for c in at.caption)


@pytest.mark.parametrize(("changes", "needle"), [
    ({"capacity": 1}, "the minimum capacity is 2"),
    ({"capacity": 99}, "the most is 16"),
    ({"lookahead": 0}, "Lookahead 0 is out of range"),
])
def test_bad_controls_are_refused_and_keep_results(app, changes, needle):
    at = generate(app, budget=4)
    first = at.session_state[RESULT_KEY]
    at = generate(at, **{"budget": 4, **changes})
    assert not at.exception
    assert any(needle in e.value for e in at.error), [e.value for e in at.error]
    assert at.session_state[RESULT_KEY] is first


def test_a_dense_model_is_refused_clearly(app, tiny_model_dir):
    at = app
    at.text_input(key=MODEL_KEY).input(str(tiny_model_dir))
    at = at.run()
    assert not at.exception
    assert any("needs a Mixture-of-Experts model" in e.value for e in at.error), \
        [e.value for e in at.error]


def test_the_quality_panel_shows_each_moe_beside_the_dense_model(tiny_model_dirs, monkeypatch,
                                                                  tmp_path):
    import json

    from m2r2core.moe import distilled, moefy

    row = {"ppl": 20.0, "ppl_ratio": 1.1, "repeated_4grams_mean": 0.05}
    card = {"metrics": {"quality": {
        "dense": row, "moefied": row | {"ppl_ratio": 4.0, "rouge_l_vs_dense": 0.2},
        "distilled": row | {"rouge_l_vs_dense": 0.6,
                            "router_agreement": {"mean": 0.8, "by_layer": {"1": 0.8}}}}}}
    (tmp_path / distilled.CARD).write_text(json.dumps(card))
    monkeypatch.setattr(moefy, "TRAINED_DIR", tmp_path)
    monkeypatch.setenv("M2R2_MOE_DIR", str(tiny_model_dirs["mixtral"]))
    at = AppTest.from_file(ENTRY, default_timeout=300)
    at.session_state[state.DTYPE] = "float32"
    at.run()
    at.switch_page("app/pages/experts.py")
    at.run()
    assert not at.exception, at.exception
    frame = at.dataframe[0].value
    assert list(frame["model"]) == ["dense", "moefied", "distilled"]
    assert list(frame["× dense perplexity"]) == [1.1, 4.0, 1.1]
    assert frame["router top-k vs oracle experts"].iloc[2] == 0.8
    (tmp_path / distilled.CARD).write_text("{")  # a damaged card: no panel, no traceback
    at.run()
    assert not at.exception


def test_the_committed_report_is_the_committed_moes_with_its_own_sweeps(app):
    from app import resources
    from app.pages import experts
    from m2r2core.moe import moefy

    report = resources.benchmark_report(experts.REPORT)
    card, _ = moefy.load_trained()
    # the benchmark ran the committed structure, distilled (not an earlier MoE's report)
    assert report["model"]["name"].endswith(f"{card.folder_name}-distilled")
    captions = [c.value for c in app.caption]
    assert any(report["command"] in c for c in captions)
    keys = {c.proto.id for c in app.get("plotly_chart")}
    assert any(state.EXPERTS_RECALL_REPORT in k for k in keys), keys
    assert experts._has_sweeps(report)  # the page's sweeps come from the same report
    for key in (state.EXPERTS_SWEEP_CAPACITY, state.EXPERTS_SWEEP_HITS, state.EXPERTS_SWEEP_BW):
        assert any(key in k for k in keys), (key, keys)
