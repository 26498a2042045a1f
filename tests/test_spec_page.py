"""AppTest flows of the Speculative Decoding page on the tiny model with briefly trained adapters:
generate (greedy and sampling), refuse bad controls while keeping results, compare methods."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app import state
from app.pages.speculative import COMPARE_KEY, RESULT_KEY

ENTRY = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")


def open_page(model_dir, trained_dir, monkeypatch) -> AppTest:
    """The Speculative Decoding page on the tiny model, in fp32."""
    monkeypatch.setenv("M2R2_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("M2R2_TRAINED_DIR", str(trained_dir))
    at = AppTest.from_file(ENTRY, default_timeout=300)
    at.session_state[state.DTYPE] = "float32"
    at.run()
    at.switch_page("app/pages/speculative.py")
    return at.run()


@pytest.fixture
def app(tiny_model_dir, tiny_trained_dir, monkeypatch):
    return open_page(tiny_model_dir, tiny_trained_dir, monkeypatch)


def generate(at, layer=1, k=4, budget=12, sampling=False, temperature=0.0, stream="fast"):
    at.text_area(key=state.PROMPT).input("The capital of France is")
    at.number_input(key=state.MAX_NEW_TOKENS).set_value(budget)
    at.slider(key=state.TEMPERATURE).set_value(temperature)
    at.selectbox(key="spec_stream").set_value(stream)
    at.number_input(key="spec_layer").set_value(layer)
    at.number_input(key="spec_k").set_value(k)
    at.checkbox(key="spec_sampling").set_value(sampling)
    at.button(key="spec_generate").click()
    return at.run()


def test_page_starts(app):
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert app.title[0].value == "Speculative Decoding"


def test_greedy_generation_is_lossless_and_charted(app):
    at = generate(app)
    assert not at.exception and not at.error, [e.value for e in at.error]
    session = at.session_state[RESULT_KEY]
    assert session.spec_tokens == session.plain_tokens  # fp32: identical to plain decoding
    assert session.plain_ms > 0 and session.spec_ms > 0
    assert at.metric[0].label == "Measured speedup"
    assert at.metric[4].value == "yes"
    keys = {c.proto.id for c in at.get("plotly_chart")}
    for name in ("spec_accept_pos", "spec_accept_hist", "spec_timeline", "spec_rate"):
        assert any(name in k for k in keys), keys


def test_plain_verification_products_are_a_choice(app):
    app.selectbox(key=state.SPEC_NARROW).set_value("off")
    at = generate(app)
    assert not at.exception and not at.error, [e.value for e in at.error]
    session = at.session_state[RESULT_KEY]
    assert session.spec.narrow_verify == "off"
    assert session.spec_tokens == session.plain_tokens
    assert any("verification products off" in c.value for c in at.caption)


def test_medusa_generation_is_lossless(app):
    at = generate(app, k=3, stream="medusa")
    assert not at.exception and not at.error, [e.value for e in at.error]
    session = at.session_state[RESULT_KEY]
    assert session.spec.stream == "medusa"
    assert session.spec_tokens == session.plain_tokens
    assert any("Medusa heads" in c.value for c in at.caption)


def test_medusa_k_is_bounded_by_its_heads(app):
    at = generate(app, k=4, stream="medusa")
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any("one draft per Medusa head" in e for e in errors), errors


def test_rule_chosen_draft_depth(app):
    at = app
    at.selectbox(key="spec_rule").set_value("arla")
    at = at.run()  # the threshold and depth inputs are enabled once a rule is chosen
    at.number_input(key="spec_rule_thr").set_value(0.3)
    at.number_input(key="spec_rule_min").set_value(1)
    at = generate(at, layer=2)
    assert not at.exception and not at.error, [e.value for e in at.error]
    session = at.session_state[RESULT_KEY]
    assert session.spec.draft_rule == "arla" and session.spec_tokens == session.plain_tokens
    assert any("depth chosen by arla" in c.value for c in at.caption)
    at.number_input(key="spec_rule_thr").set_value(1.5)
    at = generate(at, layer=2)
    assert any("draft_threshold" in e.value for e in at.error), [e.value for e in at.error]
    assert at.session_state[RESULT_KEY] is session


def test_sampling_generation(app):
    at = generate(app, sampling=True, temperature=0.8)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.session_state[RESULT_KEY].sampling


@pytest.mark.parametrize(("changes", "needle"), [
    ({"k": 0}, "max_draft"), ({"k": 500}, "max_draft"), ({"layer": 0}, "draft_layer"),
    ({"layer": 99}, "draft_layer"), ({"sampling": True, "temperature": 0.0}, "temperature"),
])
def test_bad_controls_are_refused_and_keep_results(app, changes, needle):
    at = generate(app, budget=6)
    first = at.session_state[RESULT_KEY]
    at = generate(at, **{"budget": 6, **changes})
    assert not at.exception
    assert any(needle in e.value for e in at.error), [e.value for e in at.error]
    assert at.session_state[RESULT_KEY] is first


def test_compare_all_methods(app):
    at = app
    at.number_input(key="spec_cmp_n").set_value(1)
    at.number_input(key="spec_cmp_tokens").set_value(8)
    at.button(key="spec_compare").click()
    at = at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    overall = at.session_state[COMPARE_KEY]["summary"]["overall"]
    assert {"hf_generate", "engine", "prompt_lookup", "spec_slow", "spec_fast",
            "medusa"} <= set(overall)
    assert all(s["identical"] == 1 for s in overall.values() if s)  # fp32, greedy


def test_ledger_and_break_even(app):
    at = generate(app, stream="tuned", layer=2, k=3)
    assert not at.exception and not at.error, [e.value for e in at.error]
    labels = {m.label: m.value for m in at.metric}
    assert labels["Predicted speedup"].endswith("x") and labels["Measured speedup"].endswith("x")
    assert any(state.SPEC_LEDGER in c.proto.id for c in at.get("plotly_chart"))
    at.number_input(key=state.SPEC_TARGET).set_value(9.0)  # beyond 3 drafts per round
    at = at.run()
    assert any("out of reach" in w.value for w in at.warning)
    at.number_input(key=state.SPEC_TARGET).set_value(0.5)
    at = at.run()
    assert any("accepted drafts per round" in i.value for i in at.info)


def test_ab_compares_a_second_setting_on_the_same_prompt(app):
    at = generate(app, stream="fast", layer=1, k=4)
    assert any("Run B" in i.value for i in at.info)
    at.selectbox(key=state.SPEC_AB_STREAM).set_value("slow")
    at.number_input(key=state.SPEC_AB_LAYER).set_value(2)
    at.number_input(key=state.SPEC_AB_K).set_value(2)
    at.button(key=state.SPEC_AB_RUN).click()
    at = at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    a = at.session_state[RESULT_KEY]
    _, _, b = at.session_state[state.SPEC_AB_RESULT]
    assert b.spec.stream == "slow" and b.spec.max_draft == 2 and b.prompt == a.prompt
    assert b.spec_tokens == a.spec_tokens == a.plain_tokens  # fp32 greedy: both lossless
    assert b.plain_ms == a.plain_ms  # one plain baseline for both
    strips = [m.value for m in at.markdown if "m2r2-spec-strip" in m.value]
    assert len(strips) >= 3  # the run's own strip, then A and B
    table = [d.value for d in at.dataframe if "setting" in d.value.columns][0]
    assert list(table["setting"]) == ["A", "B"]
    assert table["predicted speedup"].notna().all()
    assert any("They part at token" in m.value or "every shared token" in (m.value or "")
               for m in list(at.markdown) + list(at.success))
    at.number_input(key=state.SPEC_AB_LAYER).set_value(99)  # out of range: refused, B kept
    at.button(key=state.SPEC_AB_RUN).click()
    at = at.run()
    assert any("Setting B was not run" in e.value for e in at.error)
    assert at.session_state[state.SPEC_AB_RESULT][2].spec.draft_layer == 2


def test_first_divergence_names_the_token_and_both_fates():
    from analysis import speculation
    from m2r2core.trace import SpecRound

    def rnd(i, pos, drafts, accepted, emitted, correction):
        return SpecRound(i, pos, tuple(drafts), tuple(map(str, drafts)), (0.9,) * len(drafts),
                         accepted, tuple(emitted), tuple(map(str, emitted)), correction, 1.0, 1.0)

    prefill = rnd(0, 0, (), 0, (5,), False)
    a = [prefill, rnd(1, 1, (6, 7), 2, (6, 7, 8), False)]
    b = [prefill, rnd(1, 1, (6, 9), 1, (6, 7), True), rnd(2, 3, (8,), 1, (8, 4), False)]
    part = speculation.first_divergence(a, b)
    assert part["position"] == 2 and part["reason"] == "different fates of the same token"
    assert part["a"]["kind"] == "accepted" and part["b"]["kind"] == "correction"
    assert part["b"]["draft_text"] == "9"
    assert speculation.kind_differences(a, b) == {2, 3}
    assert speculation.first_divergence(a, a) is None


@pytest.mark.parametrize("features, kind", [({"amx_tile", "avx512_bf16"}, "amx"),
                                            ({"avx512_bf16"}, "avx512_bf16"), (set(), "avx2")])
def test_the_machine_kind_picks_its_committed_comparison(features, kind, monkeypatch,
                                                         tiny_model_dir, tiny_trained_dir):
    """Each machine kind (runtime/environment.py's cpu_kind, from the CPU's features) selects the
    committed comparison measured on that kind first, and every committed report exists."""
    import torch

    from app.pages.speculative import REPORTS
    from m2r2core.runtime import environment

    for feature in ("amx_tile", "avx512_bf16"):
        monkeypatch.setattr(torch.cpu, f"_is_{feature}_supported",
                            lambda f=feature: f in features, raising=False)
    assert environment.cpu_kind() == kind
    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    assert all((bench / name).is_file() for _, name in REPORTS.values())
    at = open_page(tiny_model_dir, tiny_trained_dir, monkeypatch)
    assert not at.exception and not at.error, [e.value for e in at.error]
    chosen = at.radio(key=state.SPEC_REPORT_KIND).value
    assert REPORTS[chosen][0] == kind
    assert any(f"({kind})" in r.help for r in at.radio if r.key == state.SPEC_REPORT_KIND)
