"""Training: what the committed trained files are, on what data, and how well they do held out.
Read from the cards and logs beside the files; nothing is trained here."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from analysis.training_report import (
    gap_slices,
    scaling_fit,
    slow_layer_for,
    training_report,
    variant_rows,
)
from app import resources, state, training_charts

VARIANTS = "adapter_variants.json"
GAP = "agreement_gap.json"

INTRO = """Every learned part of M2R2 (the fast stream's adapters, the exit routers, the Medusa
heads of the peer, the tuned lens) is trained offline by `python -m m2r2core.train …` and
committed with a **card**: the data it saw, its settings, and its held-out figures. This page
reads those cards and the adapters' training log. The figure that matters is **held-out
agreement**: on text the adapters never saw, how often the logit lens at a depth already names
the token the full model picks."""

CHOICES = """- Agreement is teacher-forced: each position sees the real preceding text, and the lens
at depth d is read through the model's own final norm and head (`W_U LN_f(h_d)`).
- *dev* is the split the training run used to keep its best adapters; *test* (the curve by
depth) was never used for any choice.
- The fast stream's depth d is meant to look like slow depth r·d (rate r); the method's goal is
agreement near 0.9 at depth N/r."""


def render() -> None:
    engine = resources.page_start("Training", INTRO, CHOICES)
    if engine is None:
        return
    report = training_report(engine.trained_folder)
    for problem in report.problems:
        st.warning(problem)
    if not report.cards:
        st.info("No cards to show. Train the adapters with `python -m m2r2core.train adapters` "
                "(the README lists every training command).")
        return
    caps = engine.capabilities()
    st.subheader(f"Trained files: `{report.folder}`")
    if report.held_out_by_depth():
        st.plotly_chart(training_charts.agreement_by_depth(report), key=state.TRAIN_BY_DEPTH,
                        alt="Held-out agreement by depth, fast and slow streams")
        st.caption("Each point: the share of held-out tokens whose logit lens at that depth "
                   "already gives the full model's token. The fast stream should rise far "
                   "earlier than the slow one; hover for the exact value.")
    _reads_like(report, caps)
    if report.evaluations:
        n_over_r = _n_over_r(caps)
        depths = tuple(sorted({d for d in (4, 8, n_over_r, caps.n_fast) if 1 <= d <= caps.n_fast}))
        st.plotly_chart(training_charts.agreement_over_steps(report, depths),
                        key=state.TRAIN_OVER_STEPS, alt="Dev agreement over training steps")
        st.caption("How the held-out figure moved while training: still rising at the end means "
                   "more training would help. Step 0 is the adapters the run started from.")
    _scaling(report, caps)
    if report.steps:
        st.plotly_chart(training_charts.loss_over_steps(report), key=state.TRAIN_LOSS,
                        alt="Training loss over steps")
        st.caption("The quantity the optimiser lowers (cosine distance to the rate targets plus "
                   "the weighted KL to the final distribution), on training batches: a falling "
                   "loss with a flat held-out curve above means the adapters fit the training "
                   "text without generalising.")
    _gap(caps)
    _variants()
    _cards(report)


def _n_over_r(caps) -> int:
    """The depth N/r the method's headline figures are read at (15 for SmolLM2 at r = 2)."""
    return round(caps.n_layers / caps.rate) if caps.rate else 15


def _targets(caps) -> dict[int, float]:
    """The issue's agreement targets by depth."""
    return {8: 0.45, _n_over_r(caps): 0.60}


def _reads_like(report, caps) -> None:
    """The fast stream's depths placed on the slow stream's agreement curve."""
    rows = {stream: report.reads_like(stream) for stream in ("fast", "tuned")}
    if not any(r.slow_layer is not None for r in rows["fast"]):
        return
    st.plotly_chart(training_charts.reads_like_figure(rows, caps.rate or 2.0, caps.n_layers),
                    key=state.TRAIN_READS_LIKE, alt="Slow layer each fast depth reads like")
    n_over_r = _n_over_r(caps)
    at = {r.depth: r for r in rows["fast"]}
    notes = []
    for depth in (8, n_over_r):
        r = at.get(depth)
        if r is not None and r.slow_layer is not None:
            notes.append(f"after {depth} layers the fast stream names the final token as often "
                         f"as the slow stream after {r.slow_layer:.1f} (rate {r.rate():.2f})")
    slow = report.held_out_by_depth()["slow"]
    goal = _targets(caps)[n_over_r]
    target = slow_layer_for(slow, goal)
    where = (f"slow layer {target:.1f}'s" if target is not None else
             f"every slow layer's but the last (layer {len(slow) - 1}: {slow[-2]:.3f})")
    st.caption("Agreement read another way: each fast depth is placed at the slow layer whose "
               "logit lens agrees with the final token as often, on the same held-out tokens. "
               "Above the dashed line the fast stream is ahead of the rate the method aims at; "
               + "; ".join(notes) + f". The issue's {goal:.2f} at depth {n_over_r} is above "
               f"{where} agreement: the slow stream of this model settles its token only in its "
               "last layers, so the target asks for more than rate-r acceleration of its curve."
               + _kl_note(report))
    st.download_button(
        "Download the table (CSV)", key=state.TRAIN_READS_LIKE_DL, file_name="reads_like.csv",
        mime="text/csv", data=pd.DataFrame(
            [{"stream": stream, "depth": r.depth, "agreement": r.agreement,
              "slow layer": r.slow_layer, "achieved rate": r.rate()}
             for stream, found in rows.items() for r in found]).to_csv(index=False))


def _kl_note(report) -> str:
    """Which depths carried the KL term, when the card says (they read far better)."""
    depths = report.cards.get("adapters", {}).get("training", {}).get("kl_depths")
    if not depths:
        return ""
    listed = ", ".join(map(str, depths))
    return (f" The depths trained with the KL term to the final distribution ({listed}) stand "
            "out; the others only learn to look like their slow target state.")


def _scaling(report, caps) -> None:
    """Test agreement of every committed state against training tokens, and the trend's
    extrapolation to the issue's targets."""
    targets = _targets(caps)
    fits = [f for f in (scaling_fit(report.history_points(d), d) for d in targets) if f]
    if not fits:
        return
    st.plotly_chart(training_charts.scaling_figure(fits, max(targets.values())),
                    key=state.TRAIN_SCALING, alt="Test agreement against training tokens")
    lines = []
    for fit in fits:
        target = targets[fit.depth]
        reach = fit.tokens_for(target)
        where = (f"reaches {target:g} near {reach / 1e6:,.0f}M tokens" if reach
                 else f"does not rise, so it never reaches {target:g}")
        lines.append(f"depth {fit.depth}: {fit.per_doubling:+.3f} per doubling of the tokens; "
                     f"the trend {where}")
    st.caption("Each point is a committed state of the adapters, measured on the test split; "
               "the dashed line is a + b·log2(tokens) fitted to them. "
               + "; ".join(lines) + ". A handful of points from runs with different data and "
               "settings: the trend says how far the target is, not that training will get "
               "there (such curves bend down as they near what rank-limited adapters can learn).")


def _gap(caps) -> None:
    raw = resources.benchmark_report(GAP)
    slices = gap_slices(raw)
    if not slices:
        return
    st.subheader("What the adapters fit, and what carries over")
    st.plotly_chart(training_charts.gap_figure(slices), key=state.TRAIN_GAP,
                    alt="Fast-stream agreement by depth on trained and held-out answers")
    st.caption("The same measurement as above on answers of the corpus's train split (dashed: "
               "the first build's ShareGPT and Wikipedia answers, which every committed state "
               "trained on, and ShareGPT later turns, which the latest runs did) and on held-out "
               "answers of the same kind (solid). A wide gap means the adapters learned much that "
               "is specific to their training content: more passes over it will not move the "
               "held-out figure; new content can. "
               f"`{raw.get('command', 'python -m m2r2core.train gap')}`, "
               f"{raw.get('dtype', '')}.")
    depths = sorted({d for d in (8, _n_over_r(caps)) if 1 <= d <= caps.n_fast})
    rows = [{"answers": s.label, "samples": s.samples}
            | {f"depth {d}": s.at(d) for d in depths} for s in slices]
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    st.download_button("Download the gap report (JSON)", key=state.TRAIN_GAP_DL,
                       data=json.dumps(raw, indent=1), file_name=GAP,
                       mime="application/json")


def _variants() -> None:
    rows = variant_rows(resources.benchmark_report(VARIANTS))
    if not rows:
        return
    st.subheader("The adapters' design variants, on an equal budget")
    st.plotly_chart(training_charts.variants_figure(rows), key=state.TRAIN_VARIANTS,
                    alt="Dev agreement of each adapter variant at depths 8 and 15")
    st.caption("Each variant trained from scratch with the same seed, data, schedule and number "
               "of steps (`python -m m2r2core.train variants`), then measured on the dev split "
               "(the tuning split). The training-study variants (own KV, rate blocks) train "
               "only: decoding runs the shared slow cache and block d.")
    st.dataframe(pd.DataFrame(rows), hide_index=True)


def _cards(report) -> None:
    rows = []
    for kind, card in report.cards.items():
        training = card.get("training", {})
        rows.append({"artifact": kind, "data": str(training.get("data", "")),
                     "steps / epochs": training.get("step", training.get("steps",
                                                                          training.get("epochs"))),
                     "wall time (s)": training.get("wall_s_this_run", training.get("wall_s")),
                     "samples": training.get("samples")})
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    kind = st.selectbox("Card", list(report.cards), key=state.TRAIN_CARD)
    st.json(report.cards[kind], expanded=False)
    st.download_button("Download every card (JSON)", key=state.TRAIN_DOWNLOAD,
                       data=json.dumps(report.cards, indent=2), file_name="cards.json",
                       mime="application/json")


render()
