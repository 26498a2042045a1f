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

DEPTHS_HELP = ("A check costs time whether or not it fires. Checked only at a few depths (the "
               "fast stream's KL-trained depths, say), a rule pays for fewer checks and cannot "
               "exit where the stream is not trained to be read; empty: every depth from the "
               "minimum layer. A predicted speedup counts the checks the setting makes.")


def ledger(s) -> None:
    """Where early exit's time went, its predicted speedup, and what a target needs."""
    if not s.costs:
        return  # a bundle made before the ledger existed
    book = ledgers.exit_ledger(s.exit_steps, s.costs, s.plain_ms, s.exit_ms, s.rule.rule.min_layer,
                               s.rule.rule.depths)
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
               n: int, depths: tuple[int, ...] = ()) -> None:
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
    sweep = oracle.gap_sweep(steps, stream, rule, min_layer, n, depths=depths)
    left.plotly_chart(oracle_charts.gap_sweep_figure(sweep, threshold),
                      key=state.EXIT_ORACLE_SWEEP)
    left.caption("Every threshold from 0 to 1: lowering it loses tokens, raising it wastes "
                 "layers. The star is the threshold above; the best threshold sits at the "
                 "corner you can afford.")
    rel = oracle.reliability(steps, stream, rule, min_layer, n, depths=depths)
    right.plotly_chart(oracle_charts.reliability_figure(rel, RULE_LABELS[rule]),
                       key=state.EXIT_RELIABILITY)
    right.caption("The rule's scores in ten bins against how often the lens was right at those "
                  "depths: bars on the diagonal mean a score can be read as a probability. ECE "
                  "is the average gap, weighted by how many scores fall in each bin.")


def ab(engine, s, steps, n: int) -> None:
    """Two exit settings re-decided side by side on the recorded run."""
    from analysis import exits as ex
    from app import exit_charts

    st.subheader("A/B: two settings on this run")
    st.caption("Two settings re-decided on the same recorded trajectories: both token strips "
               "(struck-through text: what a disagreeing token would have become), their "
               "figures, and the first token where they part, with both rules' scores there. "
               "Predicted speedups use this run's measured unit costs (a block call, an exit "
               "check, the head), so they compare settings on equal terms.")
    available = ex.available_rules(steps)
    picked = []
    for column, name, prefix, default in zip(st.columns(2), ("A", "B"), state.EXIT_AB, (0.9, 0.5),
                                             strict=True):
        with column:
            stream = st.selectbox(f"{name}: stream", list(available),
                                  key=state.keyed(prefix, "stream"))
            rule = st.selectbox(f"{name}: rule", available[stream],
                                key=state.keyed(prefix, "rule"), format_func=RULE_LABELS.get)
            threshold = st.slider(f"{name}: threshold", 0.0, 1.0, default, 0.01,
                                  key=state.keyed(prefix, "thr"))
            min_layer = st.slider(f"{name}: minimum layer", 1, n - 1, min(4, n - 1),
                                  key=state.keyed(prefix, "min"))
            depths = tuple(st.multiselect(f"{name}: decide only at depths", range(1, n),
                                          key=state.keyed(prefix, "depths"), help=DEPTHS_HELP))
        decisions = ex.decide_all(steps, stream, rule, threshold, min_layer, n, depths)
        last = len(steps[0].rule_scores[f"{stream}/{rule}"]) if stream == "fast" else n - 1
        picked.append((name, stream, rule, threshold, min_layer, decisions,
                       ex.checks_made(decisions, min_layer, last, depths)))
    book = (ledgers.exit_ledger(s.exit_steps, s.costs, s.plain_ms, s.exit_ms,
                                s.rule.rule.min_layer, s.rule.rule.depths) if s.costs else None)
    for column, (name, stream, rule, _, _, decisions, checks) in zip(st.columns(2), picked,
                                                                        strict=True):
        summ = ex.summary(decisions, n)
        column.markdown(f"**{name}**: {RULE_LABELS[rule]}, {stream} stream")
        column.metric("Agreement with the full model", f"{summ['agreement']:.1%}")
        column.metric("Mean exit depth", f"{summ['mean_depth']:.1f}")
        if book is not None:
            column.metric("Predicted speedup",
                          f"{book.predict([d.depth for d in decisions], checks):.2f}x")
        would = [None if d.agrees else engine.token_text(d.token_id) for d in decisions]
        column.markdown(exit_charts.exit_strip_html(steps, [d.depth for d in decisions], n,
                                                    would), unsafe_allow_html=True)
    _first_difference(engine, steps, picked)


def _first_difference(engine, steps, picked) -> None:
    from analysis import exits as ex
    from app.charts import visible

    (_, sa, ra, ta, ma, a, _), (_, sb, rb, tb, mb, b, _) = picked
    index = ex.first_difference(a, b)
    if index is None:
        st.success("Both settings decide every token the same way.")
        return
    step = steps[index]
    st.markdown(
        f"**They first part at token {step.position} ({visible(step.text)})**: A exits at "
        f"depth {a[index].depth} with {visible(engine.token_text(a[index].token_id))}, B at "
        f"depth {b[index].depth} with {visible(engine.token_text(b[index].token_id))}.")
    scores_a = step.rule_scores[f"{sa}/{ra}"]
    scores_b = step.rule_scores[f"{sb}/{rb}"]
    depth = max(len(scores_a), len(scores_b))
    st.dataframe({"depth": list(range(1, depth + 1)),
                  f"A score (fires ≥ {ta:g} from {ma})": list(scores_a) + [None] * (
                      depth - len(scores_a)),
                  f"B score (fires ≥ {tb:g} from {mb})": list(scores_b) + [None] * (
                      depth - len(scores_b))}, hide_index=True)
