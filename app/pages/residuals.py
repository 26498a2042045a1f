"""Residual Dynamics: watch each generated token's residual stream move through the layers."""

from __future__ import annotations

import time

import pandas as pd
import plotly.io
import streamlit as st

from analysis import bundle, exits, velocity
from analysis.bundle import BundleError
from app import charts, exit_charts, resources, state
from app.components import bundles, controls
from app.components.tokens import token_strip_html
from m2r2core.engine import RunResult
from m2r2core.errors import M2R2Error
from m2r2core.trace import RunTrace

INTRO = """
A transformer keeps one vector per token, the **residual stream**, and every layer *adds* an
update to it. The LM head reads only the last state. Projecting an intermediate state through the
same head (the **logit lens**) shows what the model "would say" if it stopped at that layer.
How fast the stream still moves (its **velocity**) and how close it already points to its final
direction (its **alignment**) tell when a token's answer is settled, which is what early exit
and M2R2's accelerated residuals exploit.
"""

LESSON = """
1. **Predict first.** Ask *"What is the capital of France?"*. Before you look: at which layer
   will the logit lens first say " Paris"? Halfway? In the last few layers?
2. **Check.** Open " Paris" in *One token across depth*: in SmolLM2 it locks in only at the
   very last layer. Over a few chat answers, about 7 tokens in 10 lock in within the last 5 of
   the 30 layers, and about half only at the last one. Early states point elsewhere (low cosine
   to the final state) even where they barely move (low relative speed).
3. **Compare token kinds.** Function words and continuations (" of" after " capital") often lock
   in far earlier, around layer 10. Find them in the token strip (dark colours).
4. **Why it matters.** Plain early exit needs the state to be final early. Here it is not, which is
   why M2R2 trains an *accelerated* residual stream that gets there sooner.
"""

STOP_REASONS = {"eos": "end of answer", "max_new_tokens": "token budget"}

EXPLAIN = {
    "relative_speed": "How much each layer changes the state, relative to its size. Bright cells "
                      "are layers that still rewrite the token; dark ones barely touch it.",
    "cosine_to_final": "How closely the state after layer l already points where the last layer "
                       "ends up (1 = same direction). Red rising to the right is the stream "
                       "converging.",
    "lens_agrees": "Green where the logit lens at layer l already picks the token the full model "
                   "chose. The first green cell of an unbroken run is where the token locks in.",
    "lens_entropy": "Uncertainty of the logit lens in nats: high means the layer has not yet "
                    "committed to any token.",
}


def render() -> None:
    st.title("Residual Dynamics")
    st.markdown(INTRO)
    with st.expander("Try this: a five-minute lesson"):
        st.markdown(LESSON)
    engine = resources.engine_or_error()
    _generation_form(engine)
    _trace_upload(engine)
    run = state.result()
    if run is None:
        st.info("Generate a continuation (or open a saved trace) to see its residual dynamics.")
        return
    _results(run, engine)


def _generation_form(engine) -> None:
    seed = int(st.session_state.get(state.SEED, 0))
    try:
        text, cfg = controls.decode_controls(seed)
    except M2R2Error as exc:
        st.error(str(exc))
        st.button("Generate", key=state.GENERATE, type="primary", disabled=True)
        return
    if st.button("Generate", key=state.GENERATE, type="primary", disabled=engine is None):
        _generate(engine, text, cfg)


def _generate(engine, text, cfg) -> None:
    try:
        generation = engine.generate(text, cfg)
    except M2R2Error as exc:
        st.error(str(exc))
        return
    progress = st.progress(0.0, text="Prefilling the prompt…")
    strip = st.empty()
    shown = 0.0
    try:
        for step in generation:
            if time.monotonic() - shown < 0.5:  # redraw twice a second: the browser shares the CPU
                continue
            shown = time.monotonic()
            progress.progress((step.position + 1) / cfg.max_new_tokens,
                              text=f"token {step.position + 1}/{cfg.max_new_tokens} · "
                                   f"{step.latency_ms:.0f} ms")
            strip.markdown(token_strip_html(generation.steps, engine.capabilities().n_layers),
                           unsafe_allow_html=True)
    except Exception as exc:  # noqa: BLE001
        st.error(f"Generation failed: {type(exc).__name__}: {exc}. Earlier results are kept.")
        return
    finally:
        progress.empty()
    strip.empty()
    state.store_result(generation.result)


TUNED_NOTE = (" Through the tuned lens, middle layers usually agree with the final token "
              "earlier than through the logit lens: part of what looks like late computation is "
              "only a change of basis. The accelerated stream has to beat this reading.")


def _trace_upload(engine) -> None:
    with st.expander("Open a saved trace or bundle (JSON)"):
        upload = st.file_uploader("Trace or bundle file", type=["json"], key=state.TRACE_UPLOAD)
        if upload is None:
            return
        data = upload.getvalue()
        try:
            if bundle.is_bundle(data):
                if engine is None:
                    raise BundleError("Load a model first: a bundle is checked against it.")
                trace = bundle.loads(data, "trace", bundle.owner_of(engine)).record
            else:
                trace = RunTrace.from_json(data.decode("utf-8"))
        except BundleError as exc:
            st.error(f"{upload.name} was not opened: {exc} What the page showed is kept.")
            return
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            st.error(f"{upload.name} is not a trace this app can open: {exc}. What the page "
                     "showed is kept.")
            return
        current = state.result()
        if current is None or current.trace.run_id != trace.run_id:
            state.store_result(RunResult(trace, None))
        st.success(f"Opened run {trace.run_id} ({len(trace.steps)} tokens).")


def _results(run, engine) -> None:
    trace = run.trace
    n = trace.n_layers
    st.subheader("Generated continuation")
    cols = st.columns(4)
    cols[0].metric("Tokens", len(trace.steps))
    cols[1].metric("Tokens/s", f"{trace.tokens_per_s:.1f}",
                   help="Engine time only (forward passes, sampling, tracing), prefill included; "
                        "not the time the page spends drawing.")
    cols[2].metric("Prefill", f"{trace.prefill_ms:.0f} ms",
                   help=f"{trace.prompt_token_count} prompt tokens, chat template included.")
    cols[3].metric("Stopped by", STOP_REASONS.get(trace.stop_reason, trace.stop_reason))
    st.caption(f"Model {trace.model['name']} ({trace.model['model_type']}, {trace.n_layers} "
               f"layers, {trace.model['dtype']}, fingerprint {trace.model['fingerprint']}) · "
               f"torch {trace.environment['torch']} · transformers "
               f"{trace.environment['transformers']} · {trace.environment['threads']} threads · "
               f"run {trace.run_id}")
    st.caption("Each token is coloured by the layer where the logit lens locked in on it "
               "(dark = early, yellow = only at the end). Hover a token for details.")
    st.markdown(token_strip_html(trace.steps, n), unsafe_allow_html=True)
    if not velocity.traced_steps(trace):
        st.warning("This run was not traced, so there are no per-layer statistics to show.")
        return
    _heatmaps(trace, engine)
    _profiles(trace)
    _two_streams(run)
    _token_inspector(trace)
    _projection(run)
    _downloads(trace, engine)


def _heatmaps(trace: RunTrace, engine) -> None:
    st.subheader("Tokens × layers")
    cols = st.columns([3, 1])
    quantity = cols[0].radio("Quantity", list(charts.HEATMAP_STYLE), horizontal=True,
                             format_func=lambda q: velocity.QUANTITIES[q],
                             key=state.HEATMAP_QUANTITY)
    lenses = list(velocity.LENSES) if velocity.has_tuned(trace) else ["logit"]
    lens = cols[1].radio("Read layers through", lenses, horizontal=True, key=state.HEATMAP_LENS,
                         format_func=velocity.LENSES.get,
                         disabled=quantity not in velocity.LENS_QUANTITIES,
                         help="The logit lens reads h_l with the model's own final norm and "
                              "head; the tuned lens first moves h_l by a small affine map "
                              "trained to predict the final distribution (Belrose et al.). "
                              "Offered when a tuned lens was loaded for this run.")
    st.caption(EXPLAIN[quantity] + " Hover a cell for the lens's top tokens; pick a token "
               "below to see its whole table." + (TUNED_NOTE if lens == "tuned" else ""))
    text = engine.token_text if engine is not None else None
    fig = charts.token_layer_heatmap(velocity.layer_matrix(trace, quantity, lens, text))
    st.plotly_chart(fig, key=state.HEATMAP, alt=f"Heat map of {velocity.QUANTITIES[quantity]}")


def _profiles(trace: RunTrace) -> None:
    st.subheader("Per-layer curves over all generated tokens")
    st.caption("The line is the median token, the band holds the middle half of the tokens. "
               "Speed usually spikes in the first and last layers; alignment climbs late.")
    speed_fig, align_fig = _profile_figures(trace)
    agree = velocity.layer_profile(trace, "lens_agrees")
    left, right = st.columns(2)
    left.plotly_chart(speed_fig, key=state.PROFILE_SPEED, alt="Median relative speed per layer")
    right.plotly_chart(align_fig,
                       key=state.PROFILE_ALIGNMENT, alt="Median cosine to final per layer")
    first = next((layer for layer, share in zip(agree.layers, agree.mean) if share >= 0.5), None)
    st.caption(f"The logit lens agrees with the final token for half of the tokens from layer "
               f"{first} on." if first is not None else "")


def _profile_figures(trace: RunTrace) -> tuple:
    """The speed and alignment profiles, shared by the page and the HTML download."""
    speed = velocity.layer_profile(trace, "relative_speed")
    align = velocity.layer_profile(trace, "cosine_to_final")
    return (charts.layer_profile_figure(speed, "Residual velocity by layer",
                                        "relative speed (ratio, log)", log_y=True),
            charts.layer_profile_figure(align, "Alignment with the final state by layer",
                                        "cos(h_l, h_N)"))


def _two_streams(run) -> None:
    trace = run.trace
    steps = velocity.traced_steps(trace)
    st.subheader("Slow stream and accelerated (fast) stream")
    if not steps or steps[0].fast is None:
        st.info("This run has no accelerated stream: no adapters trained for this model are "
                "loaded (see the Exit Threshold debugger page).")
        return
    rate = trace.config.get("accel_rate") or 2.0
    st.caption("M2R2's fast stream applies the same blocks plus small adapters, trained so that "
               f"fast depth d looks like slow depth {rate:g}·d. Left: median alignment with the "
               "full model's final state; right: how often the logit lens already gives the "
               "final token. The dotted red curve redraws the fast stream at depth × r: where "
               "it sits on the blue one, the fast stream runs r times ahead.")
    left, right = st.columns(2)
    left.plotly_chart(exit_charts.stream_curves(
        exits.alignment_by_layer(steps), "Alignment cos(h_d, h^s_N) by depth",
        "median cosine", rate), key=state.STREAMS_ALIGNMENT)
    right.plotly_chart(exit_charts.stream_curves(
        exits.lens_agreement_by_layer(steps), "Logit lens agrees with the final token",
        "share of tokens", rate), key=state.STREAMS_AGREEMENT)
    if run.capture is not None and run.capture.fast is not None:
        st.plotly_chart(exit_charts.cosine_matrix_figure(exits.fast_slow_cosine(run.capture),
                                                         rate), key=state.STREAMS_MATRIX)
        st.caption("Mean cosine between fast depth i and slow depth j over the generated "
                   f"tokens. A ridge along the dotted line j = {rate:g}·i means fast depth i "
                   "matches slow depth r·i: the stream is accelerated.")


def _token_inspector(trace: RunTrace) -> None:
    st.subheader("One token across depth")
    steps = velocity.traced_steps(trace)
    labels = charts.token_labels(tuple(s.text for s in steps))
    index = st.selectbox("Token", range(len(steps)), format_func=lambda i: labels[i],
                         key=state.SELECTED_TOKEN)
    step = steps[index]
    rows = velocity.lens_table(step)
    st.caption(f"What the model would say if it stopped after each layer, for token "
               f"{charts.visible(step.text)}. It locks in at layer {velocity.lock_in_layer(step)}.")
    left, right = st.columns([3, 2])
    left.dataframe(pd.DataFrame([{
        "layer": r.layer,
        "lens top-5": " · ".join(f"{charts.visible(t)} {p:.2f}"
                                 for t, p in zip(r.top_tokens, r.top_probs)),
        "entropy (nats)": round(r.entropy, 3),
        "agrees": "✔" if r.agrees else "",
        "cos to final": round(r.cosine_to_final, 3),
        "rel. speed": None if r.relative_speed is None else round(r.relative_speed, 4),
    } for r in rows]), hide_index=True, height=420, key=state.LENS_TABLE)
    right.plotly_chart(charts.lens_trajectory_figure(rows, step.text), key=state.LENS_TRAJECTORY,
                       alt="Lens top-1 probability and cosine across layers for one token")


def _projection(run) -> None:
    st.subheader("Trajectories in two dimensions")
    if run.capture is None:
        st.info("Projections need the residual vectors, which a saved trace does not hold; "
                "generate to see them.")
        return
    trace = run.trace
    labels = charts.token_labels(tuple(s.text for s in trace.steps))
    chosen = st.multiselect("Tokens to draw", range(len(trace.steps)),
                            default=list(range(min(6, len(trace.steps)))),
                            format_func=lambda i: labels[i], key=state.PROJECTION_TOKENS)
    method = st.radio("Method", ["umap", "pca"], horizontal=True, key=state.PROJECTION_METHOD,
                      help="UMAP (seeded by the sidebar seed) keeps local neighbourhoods; PCA is "
                           "linear and instant.")
    st.caption("Every state of the chosen tokens, from the embedding (dark) to the last layer "
               "(yellow), is embedded together; each line follows one token through depth. "
               "Paths that start apart and converge show layers pulling tokens to their answer.")
    if not chosen:
        return
    seed = int(st.session_state.get(state.SEED, 0))
    try:
        proj = resources.projection(trace.run_id, run.capture, tuple(chosen), method, seed)
    except ValueError as exc:
        st.error(str(exc))
        return
    st.plotly_chart(charts.projection_figure(proj, tuple(s.text for s in trace.steps)),
                    key=state.PROJECTION, alt="2-D projection of residual trajectories")


def _downloads(trace: RunTrace, engine) -> None:
    st.subheader("Download")
    left, middle, right = st.columns(3)
    if engine is not None and trace.model.get("fingerprint") == engine.info.fingerprint:
        bundles.download(middle, "trace", trace, bundle.owner_of(engine), trace.prompt,
                         {"decode": trace.config}, key=state.DOWNLOAD_BUNDLE,
                         file_name=f"m2r2-bundle-{trace.run_id}.json")
    trace_json = bundles.record_text("trace", trace)  # the bundle's body is the same text
    charts_html = bundles.kept(state.DOWNLOAD_CHARTS, trace, lambda: _charts_html(trace))
    left.download_button("Trace (JSON)", data=trace_json, key=state.DOWNLOAD_TRACE,
                         file_name=f"m2r2-trace-{trace.run_id}.json", mime="application/json")
    right.download_button("Charts (HTML)", data=charts_html,
                          key=state.DOWNLOAD_CHARTS,
                          file_name=f"m2r2-charts-{trace.run_id}.html", mime="text/html",
                          help="Every heat map and curve in one offline HTML file. For a PNG, "
                               "use the camera icon on any chart.")


def _charts_html(trace: RunTrace) -> str:
    figures = [charts.token_layer_heatmap(velocity.layer_matrix(trace, q))
               for q in charts.HEATMAP_STYLE]
    figures.extend(_profile_figures(trace))
    parts = [plotly.io.to_html(fig, full_html=False, include_plotlyjs=i == 0)
             for i, fig in enumerate(figures)]
    return (f"<html><head><meta charset='utf-8'><title>M2R2 trace {trace.run_id}</title></head>"
            f"<body><h1>{trace.prompt[:80]}</h1>{''.join(parts)}</body></html>")


render()
