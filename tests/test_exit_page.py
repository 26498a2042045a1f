"""AppTest flows of the Exit Threshold debugger on the tiny model with briefly trained adapters
and routers: generate, re-decide with the slider, refuse bad controls."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app import state
from app.pages.exits import RESULT_KEY

ENTRY = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")


def _start(model_dir, trained_dir, monkeypatch) -> AppTest:
    monkeypatch.setenv("M2R2_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("M2R2_TRAINED_DIR", str(trained_dir))
    at = AppTest.from_file(ENTRY, default_timeout=180)
    at.session_state[state.DTYPE] = "float32"
    return at.run()


@pytest.fixture
def app(tiny_model_dir, tiny_trained_dir, monkeypatch):
    at = _start(tiny_model_dir, tiny_trained_dir, monkeypatch)
    at.switch_page("app/pages/exits.py")
    return at.run()


def generate(at, rule="arla", stream="fast", threshold=0.5, budget=8):
    at.text_area(key=state.PROMPT).input("The capital of France is")
    at.number_input(key=state.MAX_NEW_TOKENS).set_value(budget)
    at.selectbox(key="exit_gen_rule").set_value(rule)
    at.selectbox(key="exit_gen_stream").set_value(stream)
    at.number_input(key="exit_gen_thr").set_value(threshold)
    at.button(key="exit_generate").click()
    return at.run()


def test_page_starts(app):
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert app.title[0].value == "Exit Threshold debugger"
    # the committed exit_eval report carries a break-even line per setting: shown as a table
    lines = [e for e in app.expander if e.label.startswith("Break-even lines")]
    assert len(lines) == 1
    assert len(lines[0].dataframe[0].value) >= 10


def test_generate_then_redecide_without_regenerating(app):
    at = generate(app)
    assert not at.exception and not at.error, [e.value for e in at.error]
    session = at.session_state[RESULT_KEY]
    assert len(session.exit_steps) == 8
    assert session.plain_ms > 0 and session.exit_ms > 0
    assert session.traced.trace.steps[1].rule_scores  # both streams, every rule
    assert at.metric[0].label == "Measured speedup"
    charts = len(at.get("plotly_chart"))
    assert charts >= 3  # router heat map, histogram, session Pareto
    at.slider(key="exit_re_thr").set_value(0.0)
    at = at.run()
    assert at.session_state[RESULT_KEY] is session  # nothing regenerated
    def rate(at):
        return next(m.value for m in at.metric if m.label == "Tokens that exit early")

    exit_rate = rate(at)
    at.slider(key="exit_re_thr").set_value(1.0)
    at = at.run()
    assert rate(at) != exit_rate or exit_rate == "0%"


@pytest.mark.parametrize(("threshold", "needle"), [(1.5, "threshold"), (-0.2, "threshold")])
def test_out_of_range_threshold_is_refused_and_keeps_results(app, threshold, needle):
    at = generate(app, threshold=0.5, budget=4)
    first = at.session_state[RESULT_KEY]
    at = generate(at, threshold=threshold, budget=4)
    assert not at.exception
    assert any(needle in e.value for e in at.error)
    assert at.session_state[RESULT_KEY] is first


def test_residual_page_shows_both_streams(tiny_model_dir, tiny_trained_dir, monkeypatch):
    at = _start(tiny_model_dir, tiny_trained_dir, monkeypatch)
    at.text_area(key=state.PROMPT).input("Hello")
    at.number_input(key=state.MAX_NEW_TOKENS).set_value(5)
    at.button(key=state.GENERATE).click()
    at = at.run()
    assert not at.exception and not at.error
    keys = {c.proto.id for c in at.get("plotly_chart")}
    assert any("streams_matrix" in k for k in keys), keys
    assert any("streams_alignment" in k for k in keys)


def test_oracle_gap_section_counts_every_token(app):
    at = generate(app, rule="confidence", stream="slow", threshold=0.3, budget=8)
    assert not at.exception and not at.error, [e.value for e in at.error]
    labels = {m.label: m.value for m in at.metric}
    premature = int(labels["Premature (tokens lost)"].split()[0])
    late = int(labels["Late"].split()[0])
    assert 0 <= premature + late <= 7  # the 7 tokens after the prefill's
    assert labels["Predicted speedup"].endswith("x")  # the speedup ledger
    at.number_input(key=state.EXIT_TARGET).set_value(9.0)
    at = at.run()
    assert any("out of reach" in w.value for w in at.warning) or any(
        "mean exit depth" in i.value for i in at.info)
    charts = {c.proto.id for c in at.get("plotly_chart")}
    for key in (state.EXIT_ORACLE_MAP, state.EXIT_ORACLE_SWEEP, state.EXIT_RELIABILITY,
                state.EXIT_LEDGER):
        assert any(key in c for c in charts), (key, charts)


def test_a_restored_run_renders_without_generating(app, tiny_model_dir, tiny_trained_dir,
                                                   monkeypatch):
    """What opening a bundle does (bundles.restore): the record goes back into the session and
    the page draws it, with the re-decide controls the bundle saved."""
    at = generate(app, budget=4)
    record = at.session_state[RESULT_KEY]
    fresh = _start(tiny_model_dir, tiny_trained_dir, monkeypatch)
    fresh.switch_page("app/pages/exits.py")
    fresh.session_state[RESULT_KEY] = record
    fresh.session_state[state.EXIT_RE_THR] = 0.25
    fresh = fresh.run()
    assert not fresh.exception and not fresh.error, [e.value for e in fresh.error]
    assert fresh.session_state[RESULT_KEY] is record
    assert fresh.slider(key=state.EXIT_RE_THR).value == 0.25
    assert any(m.label == "Measured speedup" for m in fresh.metric)


def test_calibration_certifies_a_threshold_and_checks_it_held_out(app):
    at = app
    at.selectbox(key=state.CAL_STREAM).set_value("slow")
    at.number_input(key=state.CAL_LEVEL).set_value(0.1)
    at.number_input(key=state.CAL_DELTA).set_value(0.5)
    at.number_input(key=state.CAL_N).set_value(2)
    at.number_input(key=state.CAL_HELD).set_value(1)
    at.number_input(key=state.CAL_TOKENS).set_value(4)
    at.multiselect(key=state.CAL_SETS).set_value(["mt-bench"])
    at.button(key=state.CAL_RUN).click()
    at = at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    result, gap, n_cal, n_held = at.session_state[state.CAL_RESULT]
    assert (n_cal, n_held) == (2, 1)
    assert result.tested[0]["threshold"] == 1.0 and result.tested[0]["certified"]
    assert result.threshold is not None and result.held is not None
    assert 0 <= gap["real_agreement"] <= 1
    labels = [m.label for m in at.metric]
    assert "Certified threshold" in labels and any(x.startswith("Held-out risk") for x in labels)


def test_calibration_warns_when_too_few_prompts_can_certify_the_level(app):
    app.number_input(key=state.CAL_N).set_value(5)
    app.number_input(key=state.CAL_LEVEL).set_value(0.95)
    at = app.run()
    assert any("can certify a level of at most" in w.value for w in at.warning)


def test_ab_shows_both_settings_and_where_they_part(app):
    at = generate(app, rule="confidence", stream="slow", threshold=0.5, budget=8)
    at.selectbox(key="ab_A_stream").set_value("slow")
    at.selectbox(key="ab_B_stream").set_value("slow")
    at.selectbox(key="ab_A_rule").set_value("confidence")
    at.selectbox(key="ab_B_rule").set_value("confidence")
    at.slider(key="ab_A_thr").set_value(1.0)   # never exits
    at.slider(key="ab_B_thr").set_value(0.0)   # exits at the minimum layer
    at.slider(key="ab_B_min").set_value(1)
    at = at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("first part at token" in m.value for m in at.markdown)
    assert sum(m.label == "Predicted speedup" for m in at.metric) >= 3  # ledger + A + B
    at.slider(key="ab_B_thr").set_value(1.0)
    at.slider(key="ab_B_min").set_value(at.slider(key="ab_A_min").value)
    at = at.run()
    assert any("same way" in x.value for x in at.success)


def test_check_depths_reach_the_decoder_and_the_redecisions(app):
    app.multiselect(key="exit_gen_depths").set_value([2])
    at = generate(app, rule="confidence", stream="slow", threshold=0.0, budget=4)
    assert not at.exception and not at.error, [e.value for e in at.error]
    session = at.session_state[RESULT_KEY]
    assert session.rule.rule.depths == (2,)
    assert {s.exit_layer for s in session.exit_steps[1:]} == {2}
    assert any("checked only at depths 2" in c.value for c in at.caption)
    assert at.multiselect(key=state.EXIT_RE_DEPTHS).value == [2]  # the run's depths to start
    at.slider(key="exit_re_thr").set_value(0.0)
    at.multiselect(key=state.EXIT_RE_DEPTHS).set_value([3])
    at = at.run()
    assert not at.exception, at.exception
    redecided = [m.value for m in at.metric if m.label == "Mean exit depth"][1]  # [0]: the run's
    assert redecided == "3.0"


def test_a_check_depth_below_the_minimum_layer_is_refused_and_keeps_results(app):
    at = generate(app, rule="confidence", stream="slow", threshold=0.5, budget=4)
    first = at.session_state[RESULT_KEY]
    at.multiselect(key="exit_gen_depths").set_value([1])
    at.number_input(key="exit_gen_min").set_value(3)
    at.button(key="exit_generate").click()
    at = at.run()
    assert any("depths" in e.value for e in at.error), [e.value for e in at.error]
    assert at.session_state[RESULT_KEY] is first
