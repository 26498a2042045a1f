"""Two panels of the Exit Threshold debugger: the speedup ledger of the generated run and the
oracle gap of the re-decided exits (records in, Streamlit out; the figures are built in
app/charts.py and app/oracle_charts.py, the numbers in analysis/)."""

from __future__ import annotations

import streamlit as st

from analysis import ledger as ledgers
from analysis import oracle
from app import charts, oracle_charts, state
from app.components import metrics
from m2r2core.exits.routers import RULE_LABELS


def ledger(s) -> None:
    """Where early exit's time went, its predicted speedup, and what a target needs."""
    if not s.costs:
        return  # a bundle made before the ledger existed
    book = ledgers.exit_ledger(s.exit_steps, s.costs, s.plain_ms, s.exit_ms, s.rule.rule.min_layer)
    with st.expander("Speedup ledger: where the time went, and what 1.5x would need"):
        target = metrics.ledger_panel(
            "The speedup this run's exit distribution predicts: one over the mean cost of a "
            "token (its exit depth × a block call, its exit checks, the head, KV filling), each "
            "as a fraction of a full-model step measured on the same prompt. The gap to the "
            "measured speedup is the rest of the step.", book,
            [("One block call", f"{book.block_cost:.3f} steps"),
             ("One exit check", f"{book.check_cost:.3f} steps")],
            charts.ledger_figure(book.time_ms, s.plain_ms, book.tokens, "early exit"),
            state.EXIT_LEDGER, state.EXIT_TARGET)
        depth = book.needed_depth(target)
        if depth is None:
            st.warning(f"{target:.1f}x is out of reach at these costs: even exiting every "
                       "token at depth 1 would not pay for the checks and the head.")
        else:
            st.info(f"At these costs, {target:.1f}x needs a **mean exit depth of {depth:.1f}** "
                    f"(this run: {book.mean_depth:.1f}).")


def oracle_gap(steps, decisions, stream: str, rule: str, threshold: float, min_layer: int,
                n: int) -> None:
    st.subheader("The oracle gap")
    st.caption("The oracle exits each token at the first depth from which the stream's lens "
               "agrees with the full model and never changes its mind. Against it, an exit is "
               "**premature** (a wrong token: a token lost), **late** (the right token, but "
               "layers wasted after the oracle) or **right**. Teacher-forced on the recorded "
               "run, like the re-decisions above.")
    rows = oracle.gap_rows(steps, decisions, stream, n)
    summ = oracle.gap_summary(rows, n)
    metrics.metric_row([
        ("Premature (tokens lost)", f"{summ['premature']} ({summ['premature_share']:.0%})"),
        ("Late", f"{summ['late']} ({summ['late_share']:.0%})"),
        ("Layers wasted per token", f"{summ['wasted_per_token']:.2f}"),
        ("Mean oracle depth", f"{summ['mean_oracle_depth']:.1f} / {n}",
         "How deep tokens must go at the least, on this stream: the best any rule could do "
         "without losing a token.")])
    st.plotly_chart(oracle_charts.gap_heatmap(steps, rows, stream), key=state.EXIT_ORACLE_MAP)
    st.caption("Green cells: the stream's lens already reads the full model's token there. ◆ "
               "the oracle depth; × where the rule exits (green right, orange late, red "
               "premature). Hover for the layers wasted.")
    left, right = st.columns(2)
    sweep = oracle.gap_sweep(steps, stream, rule, min_layer, n)
    left.plotly_chart(oracle_charts.gap_sweep_figure(sweep, threshold),
                      key=state.EXIT_ORACLE_SWEEP)
    left.caption("Every threshold from 0 to 1: lowering it loses tokens, raising it wastes "
                 "layers. The star is the threshold above; the best threshold sits at the "
                 "corner you can afford.")
    rel = oracle.reliability(steps, stream, rule, min_layer, n)
    right.plotly_chart(oracle_charts.reliability_figure(rel, RULE_LABELS[rule]),
                       key=state.EXIT_RELIABILITY)
    right.caption("The rule's scores in ten bins against how often the lens was right at those "
                  "depths: bars on the diagonal mean a score can be read as a probability. ECE "
                  "is the average gap, weighted by how many scores fall in each bin.")
