"""The Exit Threshold debugger's calibration section: pick a tolerance and a confidence, and find
the most aggressive threshold that meets it with a guarantee, by real early-exit decoding
(analysis/calibrate.py); then check it on held-out prompts."""

from __future__ import annotations

import random

import pandas as pd
import streamlit as st

from analysis import calibrate
from analysis.prompts import NAMED_SETS, load_prompts
from app import state
from m2r2core.errors import M2R2Error
from m2r2core.exits.routers import LEARNED, RULE_LABELS, RULES

EXPLAIN = """
**Calibrate a threshold with a guarantee.** The slider above re-decides tokens on the full model's
own trajectory; real early exit changes every later token's context, so its quality can differ.
Here every tested threshold decodes the calibration prompts for real. The thresholds are tested
in a fixed order, from 1.0 (nothing exits) down, and each is *certified* when a Hoeffding bound
says, with confidence 1 − δ, that its average loss (1 − quality against the full model's own
output) is at most 1 − level; testing stops at the first one that is not (**Learn-then-Test with
fixed-sequence testing**, as CALM calibrates its exits: the fixed order needs no multiple-testing
correction). The chosen threshold is then decoded on held-out prompts: the guarantee promises
that it holds there with probability at least 1 − δ. At zero loss, n prompts can certify a level
of at most δ^(1/n), so small sets certify only loose tolerances.
"""


def section(engine) -> None:
    """Controls, the run (with a progress bar), and its result."""
    with st.expander("Calibrate a threshold with a guarantee", expanded=False):
        st.markdown(EXPLAIN)
        got = _controls(engine)
        if got is not None and st.button("Calibrate", key=state.CAL_RUN, type="primary"):
            _run(engine, *got)
        found = st.session_state.get(state.CAL_RESULT)
        if found is not None:
            _show(*found)


def _controls(engine):
    caps = engine.capabilities()
    cols = st.columns(4)
    rule = cols[0].selectbox("Rule", RULES, index=RULES.index("confidence"), key=state.CAL_RULE,
                             format_func=RULE_LABELS.get)
    stream = cols[1].selectbox("Stream", list(caps.streams), key=state.CAL_STREAM)
    metric = cols[2].selectbox("Quality", calibrate.METRICS, key=state.CAL_METRIC,
                               format_func={"rouge": "ROUGE-L vs the full model",
                                            "agreement": "token agreement"}.get)
    deepest = caps.max_depth(stream)
    min_layer = cols[3].number_input("Minimum layer", 1, deepest, min(4, deepest),
                                     key=state.CAL_MIN)
    cols = st.columns(5)
    level = cols[0].number_input("Quality at least", 0.05, 0.99, 0.8, 0.05, key=state.CAL_LEVEL)
    delta = cols[1].number_input("δ (1 − confidence)", 0.01, 0.5, 0.1, 0.01, key=state.CAL_DELTA)
    n_cal = cols[2].number_input("Calibration prompts", 2, 200, 24, key=state.CAL_N)
    n_held = cols[3].number_input("Held-out prompts", 1, 200, 12, key=state.CAL_HELD)
    tokens = cols[4].number_input("Tokens each", 4, 256, 24, key=state.CAL_TOKENS)
    sets = st.multiselect("Prompt sets", NAMED_SETS, ["koala", "selfinstruct", "vicuna",
                                                      "mt-bench"], key=state.CAL_SETS)
    if rule in LEARNED and not caps.has_rule(rule, stream):
        st.error(f"{RULE_LABELS[rule]} is not trained on the {stream} stream; pick a heuristic "
                 "rule or train the routers.")
        return None
    if not sets:
        st.error("Pick at least one prompt set.")
        return None
    best = calibrate.best_level(int(n_cal), delta)
    if level > best:
        st.warning(f"{int(n_cal)} prompts can certify a level of at most {best:.3f} at δ = "
                   f"{delta:g}, even if early exit never changed a word: expect no threshold to "
                   "be certified, or add prompts.")
    return rule, stream, metric, int(min_layer), level, delta, int(n_cal), int(n_held), \
        int(tokens), tuple(sets)


def _run(engine, rule, stream, metric, min_layer, level, delta, n_cal, n_held, tokens, sets):
    pool = [p for name in sets for p in load_prompts(name)]
    picked = random.Random(int(st.session_state.get(state.SEED) or 0)).sample(
        pool, min(len(pool), n_cal + n_held))
    calib, held = picked[:n_cal], picked[n_cal:]
    decoders = st.session_state.setdefault(state.CAL_CACHE, {})
    key = (engine.info.fingerprint, engine.trained_fingerprint, rule, stream, min_layer, tokens)
    decoder = decoders.setdefault(key, calibrate.Decoder(engine, rule, stream, min_layer, tokens))
    bar = st.progress(0.0, text="Decoding the calibration prompts…")
    done = [0]
    total = n_cal * (len(calibrate.GRID) + 1) + n_held

    def progress(what: str) -> None:
        done[0] += 1
        bar.progress(min(1.0, done[0] / total), text=what)

    try:
        result = calibrate.learn_then_test(decoder, calib, metric, level, delta,
                                           progress=progress)
        bar.progress(0.95, text="Decoding the held-out prompts at the chosen threshold…")
        result = calibrate.check_heldout(decoder, result, held)
        gap = (calibrate.teacher_forced_gap(decoder, calib[:6], result.threshold)
               if result.threshold is not None else None)
    except M2R2Error as exc:
        st.error(str(exc))
        return
    finally:
        bar.empty()
    st.session_state[state.CAL_RESULT] = (result, gap, len(calib), len(held))


def _show(result: calibrate.Calibration, gap: dict | None, n_cal: int, n_held: int) -> None:
    epsilon = 1 - result.level
    table = pd.DataFrame(result.tested)
    st.dataframe(table, hide_index=True)
    st.caption(f"Every threshold tested, in order, on {n_cal} calibration prompts: its mean loss "
               f"(risk), the p-value of 'risk > {epsilon:.2f}', and whether it was certified "
               f"(p ≤ δ = {result.delta:g}).")
    if result.threshold is None:
        st.warning("No threshold was certified: not even 1.0 (nothing exits) could be shown to "
                   "meet the tolerance with this many prompts. Loosen the level, raise δ or add "
                   "calibration prompts.")
        return
    cols = st.columns(4)
    cols[0].metric("Certified threshold", f"{result.threshold:g}")
    cols[1].metric("Speedup (calibration)", f"{result.calibration_speedup:.2f}x")
    cols[2].metric("Mean exit depth", f"{result.mean_exit_depth:.1f}")
    if result.held is not None:
        cols[3].metric(f"Held-out risk ({n_held} prompts)", f"{result.heldout_risk:.3f}",
                       f"{'held' if result.held else 'FAILED'}: ≤ {epsilon:.2f} promised",
                       delta_color="normal" if result.held else "inverse")
    if gap is not None:
        st.info(f"At threshold {gap['threshold']:g}, re-deciding on the full model's trajectory "
                f"(teacher-forced, the slider above) gives token agreement "
                f"{gap['teacher_forced_agreement']:.1%}; real early-exit decoding gives "
                f"{gap['real_agreement']:.1%}. The gap is what the context shift costs.")
