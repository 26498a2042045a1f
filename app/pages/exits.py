"""Exit Threshold debugger: generate with early exit, then move the threshold and watch every
token's exit decision change, without regenerating."""

from __future__ import annotations

import dataclasses
import time

import pandas as pd
import streamlit as st

from analysis import bundle, compare
from analysis import exits as ex
from app import exit_charts, exit_panels, resources, state
from app.charts import visible
from app.components import bundles, calibration, controls, metrics
from m2r2core.config import DecodeConfig
from m2r2core.errors import M2R2Error
from m2r2core.exits.early_exit import KV_FILLS, NARROW_MODES, ExitConfig
from m2r2core.exits.routers import LEARNED, RULE_LABELS, RULES, ExitRule

REPORT = "exits_bf16_s42.json"
RESULT_KEY = "exit_result"

INTRO = """
**Early exit** stops a token's computation at the first layer where an **exit rule** is confident
enough, and emits the token from there. M2R2 runs the rule on the **fast (accelerated) stream**:
small adapters make fast depth *d* look like slow depth *r·d*, so confident states come sooner.
This page generates with the rule you pick and measures the speedup against the full model in the
same session. Then it **re-decides** every token from the recorded trajectories as you move the
threshold, so you see at once which tokens would exit where, and which would come out wrong.
"""

CHOICES = """
**Choices our reading of the method made (all switchable):** fast stream branches at the
embedding; exit checks read a *check head* (the LM head restricted to the 2,048 most frequent
tokens of the training answers), while the emitted token always comes from the full head; an
exited token's missing keys/values are filled **just in time** with the next token that goes
deeper (or copied from the exit state, CALM-style); a token whose rule never fires runs the full
model. A rule checks every depth from the minimum layer unless you name the only depths it may
decide at (*Decide only at depths*; by default the fast stream's adapters' KL depths, where it
is trained to be read): a check costs time whether or not it fires, and checked only there every
fast-stream rule measured faster at the same quality. Re-decided tokens are
*teacher-forced* (the context stays the full model's own output).
"""


LESSON = """
1. **Predict, then see.** Generate with *softmax confidence* on the **slow** stream at threshold
   0.9. Before you scroll, guess which tokens leave early: punctuation? the second piece of a
   split word? a repeated name? Then read the strip: light tokens left early.
2. **Move the threshold.** In *Re-decide the exits*, lower the threshold step by step and watch
   *the oracle gap*: red crosses (premature exits, tokens lost) appear where the lens had not
   settled yet, and the layers wasted fall. Switch to the **fast** stream: its oracle depths sit
   lower, which is the whole point of M2R2.
3. **Calibrate.** Open *Calibrate a threshold with a guarantee*, ask for quality 0.8 with δ = 0.1
   on 24 prompts, and press Calibrate. Note the certified threshold, then whether the held-out
   risk kept the promise. Change the sidebar seed (a new split) and calibrate again: over many
   splits the promise may fail at most δ of the time (BENCHMARKS.md counts it).
"""

ExitSession = compare.ExitComparison  # what one Generate press produced (analysis/compare.py)

# The re-decide controls a bundle restores.
VIEW_KEYS = (state.EXIT_RE_STREAM, state.EXIT_RE_RULE, state.EXIT_RE_THR, state.EXIT_RE_MIN,
             state.EXIT_RE_DEPTHS)


def render() -> None:
    engine = resources.page_start("Exit Threshold debugger", INTRO, CHOICES)
    if engine is None:
        return
    if "fast" not in engine.capabilities().streams:
        st.warning(f"{engine.accel_note} The fast stream is unavailable; slow-stream rules "
                   "still work.")
    with st.expander("Try this: a five-minute lesson"):
        st.markdown(LESSON)
    opened = bundles.open_control("exit", bundle.owner_of(engine), state.EXIT_BUNDLE)
    if opened is not None:
        bundles.restore(opened, RESULT_KEY, state.PROMPT, VIEW_KEYS)
    got = controls.decode_controls_or_error()
    if got is None:
        return
    text, cfg = got
    exit_cfg = _rule_controls(engine, state.EXIT_GEN)
    if st.button("Generate with early exit", key=state.EXIT_GENERATE, type="primary"):
        if exit_cfg is not None:
            _generate(engine, text, cfg, exit_cfg)
    session: ExitSession | None = st.session_state.get(RESULT_KEY)
    calibration.section(engine)
    if session is None:
        st.info("Generate to record trajectories; the threshold controls below then re-decide "
                "every token instantly.")
        _pareto(None, None)
        return
    _live_summary(engine, session)
    exit_panels.ledger(session)
    _redecide(engine, session)


def _rule_controls(engine, prefix: str) -> ExitConfig | None:
    """Rule, stream, threshold, minimum layer, KV fill and block products; None (with a message)
    if invalid."""
    caps = engine.capabilities()
    streams = list(caps.streams)
    cols = st.columns(6)
    rule = cols[0].selectbox("Exit rule", RULES, key=state.keyed(prefix, "rule"),
                             format_func=lambda r: RULE_LABELS[r])
    stream = cols[1].selectbox("Stream", streams, key=state.keyed(prefix, "stream"),
                               help="fast = M2R2's accelerated stream; slow = plain early exit; "
                                    "tuned = the slow stream read through the tuned lens (the "
                                    "distance-based baseline; heuristic rules only).")
    threshold = cols[2].number_input("Threshold", value=0.9, step=0.05, format="%.3f",
                                     key=state.keyed(prefix, "thr"),
                                     help="0 to 1; a token exits at the first depth whose "
                                          "score reaches it. Quality close to the full model's "
                                          "needs strict thresholds (0.99 and above).")
    shallow = caps.n_fast or caps.n_layers - 1
    min_layer = cols[3].number_input("Minimum layer", value=min(4, shallow), step=1,
                                     key=state.keyed(prefix, "min"),
                                     help="No exit before this depth.")
    fill = cols[4].selectbox("Missing KV", KV_FILLS, key=state.keyed(prefix, "fill"),
                             help="jit: computed with the next token that goes deeper; copy: "
                                  "projected from the exit state (CALM).")
    products = cols[5].selectbox("Block products", NARROW_MODES,
                                 index=NARROW_MODES.index(ExitConfig.narrow),
                                 key=state.keyed(prefix, "narrow"),
                                 help="How a block call over a few rows (the token's slow and "
                                      "fast rows, filled rows) multiplies them by each weight. "
                                      "on = weight × rowsᵀ, which makes speculative "
                                      "verification 1.3x cheaper on an AVX2 CPU in float32; "
                                      "off = transformers' own rows × weightᵀ; auto = whichever "
                                      "times faster on this machine. Off by default: here, "
                                      "with work between one block call and the next, on "
                                      "measured no faster. Only float32 rounding differs.")
    deepest = max(caps.max_depth(s) for s in streams)
    trained = _trained_depths(engine, streams, deepest)
    depths = st.multiselect("Decide only at depths", range(1, deepest + 1), default=trained,
                            key=state.keyed(prefix, "depths"), help=exit_panels.DEPTHS_HELP + (
                                f" The fast stream's adapters were trained to be read at "
                                f"depths {', '.join(map(str, trained))} (the default here)."
                                if trained else ""))
    cfg = ExitConfig(ExitRule(rule, stream, float(threshold), int(min_layer),
                              tuple(int(d) for d in depths)), fill, products)
    try:
        cfg.validate(caps.max_depth(stream))
    except M2R2Error as exc:
        st.error(str(exc))
        return None
    if not caps.has_rule(rule, stream):
        st.error(f"No trained '{rule}' router for the {stream} stream; train routers with "
                 "`python -m m2r2core.train routers`.")
        return None
    return cfg


def _trained_depths(engine, streams: list[str], deepest: int) -> list[int]:
    """The fast stream's KL depths from its adapters' card, the check depths' default: checked
    only there, every fast rule measured faster at the same quality (exit_eval, session 42).
    """
    card = engine.accel_card if "fast" in streams else None
    return [d for d in (card.training.get("kl_depths") or ()) if d <= deepest] if card else []


def _generate(engine, text, cfg, exit_cfg: ExitConfig) -> None:
    progress = st.progress(0.0, text="Full model (the speed baseline)…")
    strip = st.empty()
    budget, shown = cfg.max_new_tokens, [0.0, 0.0]
    phases = {"plain": (0, "full model"), "exit": (1, "early exit"),
              "trace": (2, "recording trajectories")}

    def on_token(kind: str, count: int, run) -> None:
        offset, label = phases[kind]
        note = ""
        if kind == "plain":
            shown[1] = run.ms_per_token
        elif kind == "exit":
            ms = run.ms_per_token
            note = f" · running speedup {shown[1] / ms if ms else 1:.2f}x"
        if time.monotonic() - shown[0] > 0.5 or kind == "plain":
            shown[0] = time.monotonic()
            progress.progress(min(1.0, (offset * budget + count) / (3 * budget)),
                              text=f"{label}: token {count}{note}")
            if kind == "exit":
                strip.markdown(exit_charts.exit_strip_html(
                    run.steps, [s.exit_layer for s in run.steps],
                    engine.capabilities().n_layers), unsafe_allow_html=True)

    try:
        session = compare.compare_exit(engine, text, cfg, exit_cfg, on_token)
    except M2R2Error as exc:
        st.error(str(exc))
        return
    except Exception as exc:  # noqa: BLE001
        st.error(f"Generation failed: {type(exc).__name__}: {exc}. Earlier results are kept.")
        return
    finally:
        progress.empty()
        strip.empty()
    st.session_state[RESULT_KEY] = session


def _live_summary(engine, s: ExitSession) -> None:
    n = engine.capabilities().n_layers
    st.subheader("The generation")
    st.caption("Each token coloured by the depth it left at (light: early, dark: full depth). "
               "Hover a token for its exit depth.")
    st.markdown(exit_charts.exit_strip_html(s.exit_steps, [x.exit_layer for x in s.exit_steps],
                                            n), unsafe_allow_html=True)
    depths = [x.exit_layer for x in s.exit_steps[1:]] or [n]
    cols = st.columns(4)
    cols[0].metric("Measured speedup", f"{s.plain_ms / s.exit_ms:.2f}x",
                   help="Full model ms/token ÷ early-exit ms/token, both measured just now.")
    cols[1].metric("ms per token", f"{s.exit_ms:.1f}", f"{s.exit_ms - s.plain_ms:+.1f} vs full",
                   delta_color="inverse")
    cols[2].metric("Mean exit depth", f"{sum(depths) / len(depths):.1f} / {n}")
    cols[3].metric("ROUGE-L vs full output", f"{ex.rouge_l(s.exit_text, s.plain_text):.3f}")
    r = s.rule.rule
    checked = (f"checked only at depths {', '.join(map(str, r.depths))}" if r.depths
               else f"minimum layer {r.min_layer}")
    st.caption(f"Generated with {RULE_LABELS[r.rule]} on the {r.stream} stream, threshold "
               f"{r.threshold:g}, {checked}, KV fill {s.rule.kv_fill}.")


def _redecide(engine, s: ExitSession) -> None:
    n = engine.capabilities().n_layers
    steps = s.traced.trace.steps[1:]  # the first token comes from the prompt's prefill
    if not steps or not steps[0].rule_scores:
        st.info("This run recorded no rule scores (no adapters loaded), so thresholds cannot "
                "be re-decided.")
        return
    st.subheader("Re-decide the exits")
    st.caption("Move the threshold: every token's exit is re-decided from the recorded "
               "trajectories of the full-model run, without generating again.")
    available = ex.available_rules(steps)
    cols = st.columns(4)
    streams = list(available)
    used = s.rule.rule  # start from the setting the generation used
    stream = cols[0].selectbox("Stream ", streams, key=state.EXIT_RE_STREAM,
                               index=streams.index(used.stream) if used.stream in streams else 0)
    rules = available[stream]
    rule = cols[1].selectbox("Rule ", rules, key=state.EXIT_RE_RULE,
                             index=rules.index(used.rule) if used.rule in rules else 0,
                             format_func=lambda x: RULE_LABELS[x])
    threshold = cols[2].slider("Threshold ", 0.0, 1.0, float(min(1.0, s.rule.rule.threshold)),
                               0.001, format="%.3f", key=state.EXIT_RE_THR)
    min_layer = cols[3].slider("Minimum layer ", 1, n - 1, min(s.rule.rule.min_layer, n - 1),
                               key=state.EXIT_RE_MIN)
    depths = tuple(st.multiselect("Decide only at depths ", range(1, n),
                                  default=[d for d in used.depths if d < n],
                                  key=state.EXIT_RE_DEPTHS, help=exit_panels.DEPTHS_HELP))
    decisions = ex.decide_all(steps, stream, rule, threshold, min_layer, n, depths)
    summ = ex.summary(decisions, n)
    metrics.metric_row([
        ("Agreement with the full model", f"{summ['agreement']:.1%}"),
        ("Tokens that exit early", f"{summ['exit_rate']:.0%}"),
        ("Mean exit depth", f"{summ['mean_depth']:.1f}"),
        ("Layer ratio N / depth", f"{summ['layer_ratio']:.2f}x",
         "An upper bound on the speedup; the measured figure is above.")])
    would = [None if d.agrees else engine.token_text(d.token_id) for d in decisions]
    st.markdown(exit_charts.exit_strip_html(steps, [d.depth for d in decisions], n, would),
                unsafe_allow_html=True)
    st.plotly_chart(exit_charts.router_heatmap(steps, stream, rule, threshold, decisions),
                    key=state.EXIT_HEATMAP)
    st.caption("Each cell is the rule's score for a token (row) at a depth (column). A token "
               "leaves at the first cell right of the minimum layer that crosses the red "
               "threshold line (marked ×).")
    left, right = st.columns(2)
    left.plotly_chart(exit_charts.exit_histogram(decisions, n), key=state.EXIT_HIST)
    left.caption("Where tokens leave. A tall bar at depth N means the rule rarely fires.")
    with right:
        _pareto(s, {"stream": stream, "rule": rule, "threshold": threshold,
                    "min_layer": min_layer, "depths": depths} | summ)
    exit_panels.oracle_gap(steps, decisions, stream, rule, threshold, min_layer, n, depths)
    exit_panels.ab(engine, s, steps, n)
    _disagreements(engine, s, steps, decisions, stream, rule)
    _downloads(engine, s, steps, decisions, stream, rule, threshold, min_layer, depths)


def _pareto(session: ExitSession | None, current: dict | None) -> None:
    report = resources.benchmark_report(REPORT)
    if report is not None:
        point = None
        if current:
            wanted = (current["stream"], current["rule"], tuple(current["depths"]))
            same = [c for c in report["configs"] if ex.config_key(c) == wanted]
            if same:
                near = min(same, key=lambda c: abs(c["threshold"] - current["threshold"]))
                point = {"speedup": near["speedup"], "rouge_full": near["rouge_full"]}
        st.plotly_chart(exit_charts.pareto_figure(report["configs"], point), key=state.EXIT_PARETO)
        st.caption(f"Measured by `{report.get('command', 'analysis.exit_eval')}` on "
                   f"{', '.join(report['prompt_sets'])} ({report['limit']} prompts each, "
                   f"{report['max_new_tokens']} tokens, {report['environment']['dtype']}). The "
                   "star is the measured point nearest your rule and threshold.")
        _break_even(report)
    if session is not None and current is not None:
        steps = session.traced.trace.steps[1:]
        n = session.traced.trace.n_layers
        sweeps = [dict(stream=st_, rule=r, **row)
                  for st_, rules in ex.available_rules(steps).items() for r in rules
                  for row in ex.threshold_sweep(steps, st_, r, current["min_layer"], n,
                                                depths=current["depths"])]
        st.plotly_chart(exit_charts.pareto_figure(
            sweeps, {"layer_ratio": current["layer_ratio"], "agreement": current["agreement"]},
            x="layer_ratio", y="agreement"), key=state.EXIT_PARETO_SESSION)
        st.caption("The same trade-off on this generation, teacher-forced: agreement with the "
                   "full model against the layer ratio, for every rule and threshold.")


def _break_even(report: dict) -> None:
    rows = ex.break_even_rows(report["configs"])
    if not rows:
        return
    table = pd.DataFrame(rows)
    with st.expander("Break-even lines: what each measured setting would need to pay off"):
        st.caption("A token that leaves at depth d costs d block calls (the fast row rides in "
                   "them), its exit checks, the head and any cache filling; the costs are "
                   "fractions of one full-model step, medians over the prompts. 'predicted' is "
                   "the speedup those costs and this exit distribution give, beside the one "
                   "measured; 'needed depth' is the mean exit depth at which the setting would "
                   "break even (empty: not even depth 1 would). A rule pays when tokens leave "
                   "shallower than that and stay right.")
        st.dataframe(table, hide_index=True, column_config={
            "rouge_full": st.column_config.NumberColumn("ROUGE-L vs full", format="%.3f"),
            "measured": st.column_config.NumberColumn("measured ×", format="%.2f"),
            "predicted": st.column_config.NumberColumn("predicted ×", format="%.2f"),
            "mean_depth": st.column_config.NumberColumn("mean exit depth", format="%.1f"),
            "needed_depth_1x": st.column_config.NumberColumn("needed depth for 1.0×",
                                                             format="%.1f")})
        st.download_button("Download break-even lines (CSV)", table.to_csv(index=False),
                           file_name="exit-break-even.csv", key=state.EXIT_DL_BREAK_EVEN)


def _disagreements(engine, s: ExitSession, steps, decisions, stream: str, rule: str) -> None:
    wrong = [i for i, d in enumerate(decisions) if not d.agrees]
    st.subheader(f"Tokens where the early exit disagrees ({len(wrong)})")
    if not wrong:
        st.caption("None at this threshold.")
        return
    labels = {i: f"{steps[i].position} {visible(steps[i].text)} → exit says "
                 f"{visible(engine.token_text(decisions[i].token_id))} at depth "
                 f"{decisions[i].depth}" for i in wrong}
    pick = st.selectbox("Open a token's trajectory", wrong, format_func=labels.get,
                        key=state.EXIT_WRONG)
    step, decision = steps[pick], decisions[pick]
    curves = {"slow": list(step.cosine_to_final)}
    if step.fast is not None:
        curves["fast"] = list(step.fast.cosine_to_final)
    if step.tuned is not None:
        curves["tuned"] = list(step.tuned.cosine_to_final)
    rate = engine.capabilities().rate
    st.plotly_chart(exit_charts.stream_curves(
        curves, f"Alignment with the final state for {visible(step.text)}",
        "cos(h_d, h^s_N)", rate), key=state.EXIT_TRAJ)
    st.caption("How close each depth's state already is to the full model's final state, on "
               "both streams; the dotted curve redraws the fast stream at depth × r, where it "
               "should meet the slow one.")
    depths = len(step.lens_top_ids)
    columns = {"depth": range(depths),
               "slow lens top-1": [engine.token_text(r[0]) for r in step.lens_top_ids]}
    for name in ("fast", "tuned"):
        record = getattr(step, name)
        top1 = record.lens_top1 if record is not None else ()
        columns[f"{name} lens top-1"] = ([engine.token_text(t) for t in top1]
                                         + [""] * (depths - len(top1)))
    table = pd.DataFrame(columns)
    st.dataframe(table, hide_index=True, height=260)
    if rule in LEARNED and decision.exited:
        _attribution(engine, s, pick, stream, rule, decision.depth)


def _attribution(engine, s: ExitSession, index: int, stream: str, rule: str, depth: int) -> None:
    st.markdown("**Why did the router let it exit?** Integrated Gradients (captum) on the "
                "router's probability at the exit depth.")
    if not st.button("Explain this exit", key=state.EXIT_EXPLAIN):
        return
    from analysis.attribution import explain_exit

    trace = s.traced.trace
    cfg = DecodeConfig(max_new_tokens=1, use_chat_template=trace.config["use_chat_template"],
                       system_prompt=trace.config["system_prompt"])
    prompt_ids = engine.encode(trace.prompt, cfg)
    context = prompt_ids + [x.token_id for x in trace.steps[:index + 1]]
    with st.spinner("Integrated Gradients: 8 forward and backward passes…"):
        try:
            with engine.exclusive():
                att = explain_exit(engine.parts, engine.accel, engine.routers, engine.token_text,
                                   context, stream, rule, depth)
        except Exception as exc:  # noqa: BLE001
            st.error(f"Attribution failed: {type(exc).__name__}: {exc}")
            return
    tokens = pd.DataFrame({"token": [visible(t) for t in att.tokens],
                           "attribution": att.token_scores})
    top = tokens.reindex(tokens["attribution"].abs().sort_values(ascending=False).index)[:12]
    cols = st.columns(2)
    cols[0].caption(f"Context tokens that moved the probability ({att.probability:.2f}) most; "
                    f"completeness gap {att.convergence_delta:.3f}.")
    cols[0].dataframe(top, hide_index=True)
    depth_table = pd.DataFrame({"depth": range(1, len(att.depth_scores) + 1),
                                "attribution": att.depth_scores})
    cols[1].caption("Depths of the trajectory the router leaned on.")
    cols[1].bar_chart(depth_table, x="depth", y="attribution")


def _downloads(engine, s: ExitSession, steps, decisions, stream, rule, threshold, min_layer,
               depths: tuple[int, ...] = ()) -> None:
    table = pd.DataFrame([{
        "position": st_.position, "token": st_.text, "exit_depth": d.depth,
        "exit_token_id": d.token_id, "agrees": d.agrees} for st_, d in zip(steps, decisions,
                                                                           strict=True)])
    cols = st.columns(2)
    cols[0].download_button(
        "Download decisions (CSV)", table.to_csv(index=False),
        file_name=f"exits-{stream}-{rule}-{threshold:.2f}-min{min_layer}.csv",
        key=state.EXIT_DL_CSV)
    trace = s.traced.trace
    view = dict(zip(VIEW_KEYS, (stream, rule, threshold, min_layer, list(depths)), strict=True))
    bundles.download(cols[1], "exit", s, bundle.owner_of(engine), trace.prompt,
                     {"decode": trace.config, "exit": dataclasses.asdict(s.rule), "view": view},
                     key=state.EXIT_DL_JSON, file_name=f"exit-bundle-{trace.run_id}.json")


render()
