"""AppTest flows of the Residual Dynamics page on the tiny model (real tokenizer)."""

from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from app import state

ENTRY = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")


@pytest.fixture
def app(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("M2R2_MODEL_DIR", str(tiny_model_dir))
    at = AppTest.from_file(ENTRY, default_timeout=120)
    at.session_state[state.DTYPE] = "float32"
    return at.run()


def generate(at, prompt, budget=8):
    at.text_area(key=state.PROMPT).input(prompt)
    at.number_input(key=state.MAX_NEW_TOKENS).set_value(budget)
    at.button(key=state.GENERATE).click()
    return at.run()


def test_page_starts_without_error(app):
    assert not app.exception
    assert app.title[0].value == "Residual Dynamics"
    assert not app.error


def test_generate_stores_a_real_trace_and_draws_charts(app):
    at = generate(app, "The capital of France is", budget=6)
    assert not at.exception and not at.error
    trace = at.session_state[state.TRACE]
    assert len(trace.steps) == 6
    assert trace.steps[0].traced
    assert len(trace.steps[0].lens_top_ids) == trace.n_layers + 1
    assert at.session_state[state.RESULT].capture is not None
    assert at.metric[0].value == "6"
    assert len(at.get("plotly_chart")) >= 4  # heat map, 2 profiles, lens trajectory, projection


def test_empty_prompt_is_refused_and_keeps_earlier_results(app):
    at = generate(app, "Hello there", budget=4)
    first = at.session_state[state.TRACE]
    at = generate(at, "   ")
    assert not at.exception
    assert "empty" in at.error[0].value
    assert at.session_state[state.TRACE] is first


@pytest.mark.parametrize(("budget", "needle"), [(0, "max_new_tokens = 0"),
                                                 (5000, "1 to 2048")])
def test_out_of_range_budget_is_refused(app, budget, needle):
    at = generate(app, "Hello", budget=budget)
    assert not at.exception
    assert needle in at.error[0].value
    assert at.button(key=state.GENERATE).disabled


def test_prompt_longer_than_context(app):
    at = generate(app, "word " * 700, budget=4)
    assert not at.exception
    assert "context holds 512" in at.error[0].value


def test_control_characters(app):
    at = generate(app, "bell\x07", budget=4)
    assert "control character" in at.error[0].value


def test_unknown_model_gives_a_clear_message(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("M2R2_MODEL_DIR", str(tmp_path / "no-such-model"))
    at = AppTest.from_file(ENTRY, default_timeout=60).run()
    assert not at.exception
    assert "No model folder" in at.error[0].value
    assert at.button(key=state.GENERATE).disabled


def test_selecting_a_token_shows_its_lens(app):
    at = generate(app, "Count: one, two,", budget=5)
    at.selectbox(key=state.SELECTED_TOKEN).set_value(3).run()
    assert not at.exception
    assert at.session_state[state.SELECTED_TOKEN] == 3
    assert len(at.dataframe) >= 1


def test_threads_control_reaches_the_engine(app):
    before = torch.get_num_threads()
    try:
        app.number_input(key=state.THREADS).set_value(1).run()
        at = generate(app, "Hello", budget=3)
        assert not at.exception
        assert at.session_state[state.TRACE].environment["threads"] == 1
    finally:
        torch.set_num_threads(before)  # the setting is process-wide
