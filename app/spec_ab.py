"""The Speculative Decoding page's A/B panel: the run on the page (A) against a second setting
(B: draft stream, draft layer, K) on the same prompt and decoding settings, with one plain
baseline: both token strips with their differences underlined, both ledgers, and the first
token where they part and why. The engine and analysis do the work (compare.spec_variant,
speculation.first_divergence, ledger.spec_ledger); this module only renders.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import streamlit as st

from analysis import compare, ledger, speculation
from app import spec_charts, state
from m2r2core.errors import M2R2Error


def ab(engine, a: compare.SpecComparison) -> None:
    """Controls for setting B, the run button, and the comparison once B exists."""
    st.subheader("A/B: a second setting on this prompt")
    st.caption("Setting A is the run above. Pick B's draft stream, draft layer and K; B decodes "
               "the same prompt with the same decoding settings, and both are measured against "
               "the same plain run. Greedy speculation is lossless, so the two texts agree; "
               "what differs is which tokens came from an accepted draft and which the model "
               "had to correct, and so the time.")
    caps = engine.capabilities()
    cols = st.columns(4)
    streams = list(caps.draft_streams)
    stream = cols[0].selectbox("B: draft stream", streams, key=state.SPEC_AB_STREAM)
    deepest = caps.fast_depth if stream == "fast" else caps.n_layers - 1
    layer = cols[1].number_input("B: draft layer", value=min(12, deepest or 1), step=1,
                                 key=state.SPEC_AB_LAYER, disabled=stream == "medusa",
                                 help=f"1–{deepest} on this stream.")
    k = cols[2].number_input("B: max drafts K", value=a.spec.max_draft, step=1,
                             key=state.SPEC_AB_K)
    spec_b = dataclasses.replace(a.spec, stream=stream, draft_layer=int(layer),
                                 max_draft=int(k),
                                 draft_rule=a.spec.draft_rule if stream != "medusa" else "fixed")
    if cols[3].button("Run B on this prompt", key=state.SPEC_AB_RUN):
        try:
            spec_b.validate(caps.n_layers, caps.fast_depth, caps.medusa_heads,
                            "tuned" in caps.draft_streams)
            with st.spinner("Decoding setting B…"):
                st.session_state[state.SPEC_AB_RESULT] = (a.prompt, a.decode,
                                                          compare.spec_variant(engine, a, spec_b))
        except M2R2Error as exc:
            st.error(f"Setting B was not run: {exc}")
    got = st.session_state.get(state.SPEC_AB_RESULT)
    if got is None or got[0] != a.prompt or got[1] != a.decode:
        st.info("Run B to compare it with A on this prompt.")
        return
    _show(a, got[2])


def _label(spec) -> str:
    where = "heads" if spec.stream == "medusa" else f"layer {spec.draft_layer}"
    return f"{spec.stream} stream, {where}, K = {spec.max_draft}"


def _show(a: compare.SpecComparison, b: compare.SpecComparison) -> None:
    differ = speculation.kind_differences(a.rounds, b.rounds)
    left, right = st.columns(2)
    for col, name, run in ((left, "A", a), (right, "B", b)):
        col.markdown(f"**{name}: {_label(run.spec)}**")
        col.markdown(spec_charts.round_strip_html(run.rounds, differ), unsafe_allow_html=True)
    st.caption(f"{len(differ)} token(s) underlined in red: there one setting kept a draft and "
               "the other corrected one or had not drafted that far (or, when sampling, the "
               "tokens differ).")
    rows = []
    for name, run in (("A", a), ("B", b)):
        book = ledger.spec_ledger(run.rounds, run.plain_ms, run.spec_ms)
        stats = speculation.acceptance(run.rounds, run.spec.max_draft)
        first = [x for x in stats["acceptance_by_position"] if x is not None]
        rows.append({"setting": name, "drafting": _label(run.spec),
                     "measured speedup": round(book.measured_speedup, 3),
                     "predicted speedup": round(book.predicted_speedup, 3),
                     "tokens / verification": round(stats["tokens_per_verification"], 3),
                     "first draft accepted": round(first[0], 3) if first else None,
                     "one draft costs (steps)": round(book.draft_cost, 3),
                     "one verification costs (steps)": round(book.verify_cost, 3),
                     **{f"{k} ms": round(v, 1) for k, v in book.time_ms.items()}})
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    st.caption("Both ledgers: the speedup each run's own measured quantities predict beside the "
               "one measured, and where its decoding time went. Both use the same plain run.")
    part = speculation.first_divergence(a.rounds, b.rounds)
    if part is None:
        st.success("The two settings produced every shared token the same way.")
        return
    x, y = part["a"], part["b"]
    st.markdown(f"**They part at token {part['position']}** ({part['reason']}): "
                f"A {_fate(x)}; B {_fate(y)}.")


def _fate(t: dict) -> str:
    text = repr(t["text"])
    if t["kind"] == "accepted":
        return (f"drafted {text} (draft probability {t['draft_prob']:.2f}) and the model kept "
                "it")
    if t["kind"] == "correction":
        return (f"drafted {t['draft_text']!r} (draft probability {t['draft_prob']:.2f}), the "
                f"model refused it and wrote {text}")
    if t["kind"] == "bonus":
        return f"had used up its drafts; the model wrote {text} itself"
    return f"took {text} from the prompt's pass"
