"""Expert Loading: a Mixture-of-Experts model with too little fast memory for all its experts.
Watch the fast residual predict which experts later layers will need, the loader fetch them while
earlier layers compute, and what it buys against loading on demand."""

from __future__ import annotations

import os
from dataclasses import asdict

import pandas as pd
import streamlit as st

from analysis import bundle, compare
from analysis import expert_timeline as timeline
from app import expert_charts, resources, state
from app.components import bundles, controls
from m2r2core.errors import M2R2Error
from m2r2core.moe import distilled, moefy
from m2r2core.moe.channel import PRESETS, QUEUES, UNRECORDED_QUEUE
from m2r2core.moe.eviction import POLICIES
from m2r2core.moe.experts import READS
from m2r2core.moe.offload import OffloadConfig, OffloadEngine
from m2r2core.moe.prefetch import PREDICTORS

REPORT = "moe_fp32_s42.json"  # the distilled MoE (the page's default model), sweeps included
RESULT_KEY = "experts_result"
MODEL_KEY = "experts_model"

INTRO = """
In a **Mixture-of-Experts** model each layer's MLP is split into *experts*, and a router sends
every token to only a few of them. When the experts do not all fit in fast memory, they live in a
slow tier (flash, disk, host memory) and a bounded **fast tier** caches some. A token whose
experts are missing must **wait** while they load. M2R2's **accelerated residual** already
resembles the states of deeper layers, so the routers of layers l+1 … l+D applied to it predict
their experts *ahead of time*; the loader fetches them while the current layers compute. The
output never changes (the same weights compute, only earlier); the waiting does.
"""

CHOICES = """
**The model.** No MoE ships offline, so the default one is built from SmolLM2 by
*MoEfication* (`python -m m2r2core.train.moe`): each layer's 1,536 MLP neurons are split into an
always-on shared expert (the 768 neurons that matter most on average) and 8 routed experts of 96
neurons clustered by co-activation, a router per layer picks the top 2, and the down projections
are refitted by least squares. Layer 0 stays dense. Cutting the MLPs costs quality (held-out
perplexity 2.5x the dense model's; the 1.85x after distillation is in the panel below), so by
default the page runs the **distilled** MoE: the same experts and routers fine-tuned against
the dense model's distributions (`python -m m2r2core.train.moe distill`; small low-rank
corrections and new routers, committed beside the MoEfication; 1.76M tokens so far, still far
from the dense model, so its answers still loop more often than the dense model's). Both
are stored as standard Qwen2-MoE checkpoints; the same engine runs Mixtral and Qwen2-MoE folders
(give one below). Their quality against the dense model is in the panel below the model field.

**The tiers.** Every routed expert is a file in an expert store. A load takes the time the chosen
storage would (bytes ÷ bandwidth + a per-read latency), on one storage channel, one load after
the other, while compute goes on: the presets and that clock are modelled, the reads are real.
**Reads** (a choice): *thread*, the default, reads the file on a background thread as soon as
the load is queued; *compute* reads it in the compute thread when a layer first uses an expert
whose load has ended, as a DMA engine would leave it, so a wrong guess is never read. The fast
tier is *capacity*
buffers allocated once; a load reads the file straight into one, as a serving engine fills a
slot of device memory. The model's own weights stay in memory for the all-resident reference,
so the budget is modelled, not enforced by the operating system.

**The predictors (our reading, switchable).** *m2r2*: the state after block l through a trained
low-rank **rate accelerator** (the MoE model's fast residual; issue 3's block-level adapters need
the dense MLPs), then through the routers of layers l+1 … l+D, top-k plus a margin; it is trained
on the MoE's own states to make the used experts the router's top-k (the objective is a choice
of `fit-accel --loss`: *rank*, the committed one, or *set*). *pregate*:
the same routers on the unaccelerated state. *previous*: the previous token's experts. *oracle*:
the experts this run will use (from the reference run; an upper bound). *none*: load on demand.
A **margin gap** makes the margin selective: m2r2 and pregate then name an expert beyond the
top-k only where the router hesitates (its logit within that many standard deviations of the
k-th expert's), about one layer in eight at 0.1σ.
**Eviction**: LRU, LFU, *predicted* (keep what a predictor expects in this token's later
layers, evict the rest by LRU), or *ahead* (a Belady estimate with the layers as the clock:
decoding visits layers 1 … N token after token, so the expert whose layer comes round last
leaves first; a predicted expert is expected this token, an unpredicted one of an already
predicted layer only next token). LRU is the worst choice when one token needs more experts
than the tier holds: it evicts exactly the expert the next token reaches first. Demand loads
jump the queue of prefetches; a closer prediction for a layer cancels its queued prefetches
that it no longer names. **Prefetch order**: *deadline* (the default) queues a prediction
ahead of those for later layers, and a layer that starts computing drops its queued
predictions it did not use; *fifo* keeps the order predicted (the engine before session 29).
With a lookahead above 1 the difference matters: under fifo the next layer's experts can wait
behind guesses for layers further on.

**Timings** are decode-phase wall-clock of this session, the setting against on-demand LRU at
the same capacity and bandwidth, measured one after the other on the same prompt.
"""


# The two builds of the default MoE the page offers (the first is the default).
BUILDS = ("distilled", "MoEfication only")

ExpertSession = compare.ExpertComparison  # what one Generate press produced (compare.py)


@st.cache_resource(max_entries=1, show_spinner="Loading the MoE… (the first start builds it "
                   "from SmolLM2, about a minute)")
def get_moe(model: str, dtype: str, threads: int, distilled: bool = True) -> OffloadEngine:
    """The MoE engine with its expert store; shared by all sessions, read-only after this."""
    from m2r2core.moe.offload import load_moe

    return load_moe(model or None, dtype, threads, distilled=distilled)


def moe_or_error() -> OffloadEngine | None:
    """The MoE for the page's model field, or None after saying why not."""
    model = (st.session_state.get(MODEL_KEY) or os.environ.get("M2R2_MOE_DIR", "")).strip()
    dtype = st.session_state.get(state.DTYPE) or "bfloat16"
    threads = int(st.session_state.get(state.THREADS) or resources.cpu_cores())
    distilled = st.session_state.get(state.EXPERTS_BUILD, BUILDS[0]) == BUILDS[0]
    return resources.load_or_error("MoE model", get_moe, model, dtype, threads, distilled)


def render() -> None:
    st.title("Expert Loading")
    st.markdown(INTRO)
    with st.expander("What exactly is computed"):
        st.markdown(CHOICES)
    st.text_input("MoE model", key=MODEL_KEY, value=os.environ.get("M2R2_MOE_DIR", ""),
                  placeholder="empty: the MoEfied SmolLM2 (built on first use)",
                  help="A Mixtral or Qwen2-MoE folder; a dense model is refused.")
    if not st.session_state.get(MODEL_KEY) and distilled.exists(moefy.TRAINED_DIR):
        st.radio("Which MoEfied SmolLM2", BUILDS, key=state.EXPERTS_BUILD, horizontal=True,
                 help="The distilled MoE is the MoEfication fine-tuned against the dense model; "
                 "the plain one is the MoEfication alone (its m2r2 predictor was trained for the "
                 "distilled one, so m2r2 is unavailable there).")
    _quality()
    moe = moe_or_error()
    if moe is None:
        return
    if moe.accel is None:
        st.warning(f"The m2r2 predictor is unavailable for this model ({moe.accel_note}).")
    opened = bundles.open_control("experts", bundle.owner_of(moe), state.EXPERTS_BUNDLE)
    if opened is not None:
        bundles.restore(opened, RESULT_KEY, state.PROMPT, ())
    got = controls.decode_controls_or_error()
    if got is None:
        return
    text, cfg = got
    offload = _offload_controls(moe)
    if st.button("Generate with offloaded experts", key=state.EXPERTS_GENERATE, type="primary"):
        if offload is not None:
            _generate(moe, text, cfg.replace(trace=False, capture_residuals=False), offload)
    session: ExpertSession | None = st.session_state.get(RESULT_KEY)
    if session is None:
        st.info("Generate to watch experts load, hit and miss, token by token.")
    else:
        try:
            _show(session)
            _downloads(moe, session)
        except Exception as exc:  # noqa: BLE001 — a traceback must never reach the page
            st.error(f"The run could not be drawn: {type(exc).__name__}: {exc}")
    _report()


def _offload_controls(moe: OffloadEngine) -> OffloadConfig | None:
    total, top_k = moe.total_experts, moe.moe.top_k
    cols = st.columns(9)
    capacity = cols[0].number_input(
        "Capacity (experts)", value=max(top_k, total // 3), step=1, key=state.EXPERTS_CAPACITY,
        help=f"Experts the fast tier holds ({top_k}–{total}; {total} routed experts in all).")
    names = list(PRESETS)
    preset = cols[1].selectbox("Storage", names, index=names.index("ufs"),
                               format_func=lambda n: PRESETS[n].label, key=state.EXPERTS_BANDWIDTH)
    choices = [p for p in PREDICTORS if p != "m2r2" or moe.accel is not None]
    predictor = cols[2].selectbox("Predictor", choices, key=state.EXPERTS_PREDICTOR,
                                  help="m2r2 = accelerated residual through later routers.")
    lookahead = cols[3].number_input("Lookahead D", value=2, step=1, key=state.EXPERTS_LOOKAHEAD,
                                     help=f"Layers ahead to predict (1–{moe.moe.n_layers - 1}).")
    margin = cols[4].number_input("Margin", value=0, step=1, key=state.EXPERTS_MARGIN,
                                  help="Experts fetched per layer beyond the top-k.")
    gap = cols[5].number_input(
        "Margin gap (σ)", value=None, min_value=0.0, step=0.05, key=state.EXPERTS_MARGIN_GAP,
        placeholder="every", help="With a margin, on m2r2 and pre-gating: fetch a margin expert "
        "only where the router hesitates, its logit within this many standard deviations (of "
        "that prediction's logits) of the k-th expert's. Empty: every margin expert.")
    policy = cols[6].selectbox("Eviction", POLICIES, index=POLICIES.index("predicted"),
                               key=state.EXPERTS_POLICY)
    queue = cols[7].selectbox("Prefetch order", QUEUES, key=state.EXPERTS_QUEUE,
                              help="deadline: a prediction for a nearer layer goes ahead of "
                              "queued ones for later layers; fifo: in the order predicted.")
    reads = cols[8].selectbox("Reads", READS, key=state.EXPERTS_READS,
                              help="Who copies a loaded expert's bytes into the fast tier: "
                              "thread, a reader thread as soon as the load is queued (every "
                              "load, wrong guesses too, costs this CPU a thread switch); "
                              "compute, the compute thread at the expert's first use, as a DMA "
                              "engine would leave it (a wrong guess costs only storage time).")
    offload = OffloadConfig(capacity=int(capacity), bandwidth=preset, predictor=predictor,
                            lookahead=int(lookahead), margin=int(margin), policy=policy,
                            queue=queue, margin_gap=None if gap is None else float(gap),
                            reads=reads)
    try:
        offload.validate(total, moe.moe.n_layers, moe.moe.n_experts, top_k)
    except M2R2Error as exc:
        st.error(str(exc))
        return None
    return offload


def _generate(moe: OffloadEngine, text: str, cfg, offload: OffloadConfig) -> None:
    budget = cfg.max_new_tokens
    progress = st.progress(0.0, text="Every expert resident (the reference)…")
    strip = st.empty()
    phases = {"reference": (0, "reference"), "baseline": (1, "on-demand LRU"),
              "offload": (2, offload.predictor), "oracle": (3, "the oracle, for its gain")}
    runs = 3 if offload.predictor == "oracle" else 4

    def on_token(kind: str, count: int, run) -> None:
        offset, label = phases[kind]
        progress.progress(min(1.0, (offset * budget + count) / (runs * budget)),
                          text=f"{label}: token {count}")
        if kind == "offload" and (count - 1) % 4 == 0:
            strip.markdown(expert_charts.token_strip_html(
                [t.text for t in run.tokens], [t.stall_ms for t in run.tokens],
                [t.misses for t in run.tokens]), unsafe_allow_html=True)

    try:
        session = compare.compare_experts(moe, text, cfg, offload, on_token)
    except M2R2Error as exc:
        st.error(f"{exc} Earlier results are kept.")
        return
    except Exception as exc:  # noqa: BLE001 — a traceback must never reach the page
        st.error(f"Generation failed: {type(exc).__name__}: {exc}. Earlier results are kept.")
        return
    finally:
        progress.empty()
        strip.empty()
    st.session_state[RESULT_KEY] = session


def _show(s: ExpertSession) -> None:
    """The run: its tokens and headline figures, the timeline, the fast tier per pass."""
    _show_generation(s)
    _show_timeline(s)
    _show_tiers(s)


def _show_generation(s: ExpertSession) -> None:
    st.subheader("The generation")
    st.caption("Each token is shaded by how long its forward pass waited for experts (darker = "
               "longer); hover for the wait and the number of missing experts.")
    st.markdown(expert_charts.token_strip_html(s.texts, s.stalls, s.misses),
                unsafe_allow_html=True)
    mine, base = s.summary, s.baseline
    cols = st.columns(5)
    speedup = s.speedup
    cols[0].metric("Speedup vs on-demand LRU", "–" if speedup is None else f"{speedup:.2f}x",
                   help="On-demand LRU decode time ÷ this setting's, same prompt, measured "
                        "just now.")
    cols[1].metric("Tokens/s", f"{mine['tok_per_s'] or 0:.1f}",
                   f"{(mine['tok_per_s'] or 0) - (base['tok_per_s'] or 0):+.1f} vs on demand")
    cols[2].metric("Stall per token", f"{mine['stall_ms_per_token'] or 0:.1f} ms",
                   f"{(mine['stall_ms_per_token'] or 0) - (base['stall_ms_per_token'] or 0):+.1f}"
                   " ms", delta_color="inverse")
    cols[3].metric("Hit rate", f"{mine['hit_rate'] or 0:.0%}",
                   f"{(mine['hit_rate'] or 0) - (base['hit_rate'] or 0):+.0%}")
    cols[4].metric("Same output as all resident", "yes" if s.identical else "NO",
                   help="Prediction may change timing only; the tests prove identity.")
    cols = st.columns(5)
    ceiling, share = s.ceiling, s.oracle_share
    cols[0].metric("Ceiling (all resident)", "–" if ceiling is None else f"{ceiling:.2f}x",
                   help="On-demand LRU decode time ÷ all experts resident: what a predictor "
                        "would reach if loading cost nothing. No setting can pass it beyond the "
                        "noise of one run.")
    oracle = s.oracle_speedup
    cols[1].metric("Oracle", "–" if oracle is None else f"{oracle:.2f}x",
                   help="The oracle predictor (this run's own routing, known in advance) at "
                        "the same capacity, storage, lookahead and eviction.")
    cols[2].metric("Share of the oracle's gain", "–" if share is None else f"{share:.0%}",
                   help="(speedup − 1) ÷ (oracle's speedup − 1).")
    o = s.offload
    gated = f" (gap {o.margin_gap:g}σ)" if o.margin and o.margin_gap is not None else ""
    st.caption(f"{o.predictor} prediction, lookahead {o.lookahead}, margin {o.margin}{gated}, "
               f"{o.policy} eviction, prefetches by {o.queue}, {o.reads} reads, "
               f"{o.capacity} of {s.total} "
               f"experts resident ({o.capacity / s.total:.0%}), {PRESETS[o.bandwidth].label}. "
               f"{mine['loads_per_token']} loads per token "
               f"({mine['wasted_per_token']} prefetched and evicted unused).")
    passed = s.bounds_passed()
    if passed:
        st.caption(f"This run timed faster than {' and '.join(passed)}, which it cannot pass "
                   "in expectation: each setting ran once, on a CPU whose timings move by "
                   "about ±20% between runs. The committed benchmark below gives medians over "
                   "prompts and repeats.")


def _show_timeline(s: ExpertSession) -> None:
    st.subheader("Timeline")
    st.caption("One lane per layer's compute and one for the loader. Blue bars: a layer "
               "computing; red: a load on demand; green: a load ahead of time; dark red: the "
               "compute waiting (a stall). ● hit, ✕ miss, ▶ a prediction queued. Hover for "
               "token, layer, expert and timing; click a mark to list its events.")
    last = len(s.routes) - 1
    first, end = st.slider("Forward passes (0 = the prompt)", 0, last,
                           (min(1, last), min(last, 3)), key=state.EXPERTS_RANGE)
    rows = timeline.gantt_rows(s.events, first, end)
    texts = {i: (s.texts[i - 1] if i >= 1 else "prompt") for i in range(len(s.routes))}
    chosen = st.plotly_chart(expert_charts.gantt(rows, s.n_layers, texts),
                             key=state.EXPERTS_GANTT, on_select="rerun",
                             selection_mode="points")
    picked = _picked_events(chosen, rows)
    if picked is not None:
        st.dataframe(picked, hide_index=True)


def _show_tiers(s: ExpertSession) -> None:
    last = len(s.routes) - 1
    left, right = st.columns(2)
    token = left.number_input("Forward pass for the fast tier", 0, last, min(1, last),
                              key=state.EXPERTS_TOKEN)
    state_matrix = timeline.residency_at(s.events, int(token), s.n_layers, s.n_experts, s.warm)
    hits = {(e.layer, e.expert): e.kind for e in s.events
            if e.token == token and e.kind in ("hit", "miss")}
    label = "the prompt" if token == 0 else f"token {token} ({s.texts[token - 1]!r})"
    left.plotly_chart(expert_charts.residency_heatmap(state_matrix, s.routes[token], hits,
                                                      label), key=state.EXPERTS_RESIDENCY)
    left.caption("Which experts were in the fast tier when this pass began (dark blue resident, "
                 "orange in flight, white absent) and which the token used: ● found, ✕ waited.")
    matrix = timeline.hits_by_layer(s.events, len(s.routes), s.n_layers)
    right.plotly_chart(expert_charts.hits_heatmap(matrix, ["prompt"] + s.texts, s.routes),
                       key=state.EXPERTS_HITS)
    right.caption("For every pass and layer, the share of the experts it routed to that were "
                  "already resident (green) or had to be waited for (red). Hover for the "
                  "experts the token used.")
    if s.summary["recall_by_distance"]:
        st.plotly_chart(expert_charts.recall_figure(
            {f"{s.offload.predictor} (this run)": s.summary["recall_by_distance"]}),
            key=state.EXPERTS_RECALL_RUN)
        st.caption("Of the experts a layer used, the share predicted that many layers earlier.")


def _downloads(moe: OffloadEngine, s: ExpertSession) -> None:
    cols = st.columns(2)
    cols[0].download_button("Download events (CSV)",
                            timeline.events_frame(s.events).to_csv(index=False),
                            file_name="expert-events.csv", key=state.EXPERTS_DL_CSV)
    bundles.download(cols[1], "experts", s, bundle.owner_of(moe), s.prompt,
                     {"decode": s.decode, "offload": asdict(s.offload)},
                     key=state.EXPERTS_DL_JSON, file_name="expert-bundle.json")


def _picked_events(chosen, rows: pd.DataFrame) -> pd.DataFrame | None:
    points = (chosen or {}).get("selection", {}).get("points", []) if chosen else []
    if not points:
        return None
    keys = {tuple(int(v) for v in p.get("customdata", [])[:3]) for p in points
            if p.get("customdata")}
    mask = [(t, lay, e) in keys or (t, lay, -1) in keys
            for t, lay, e in zip(rows["token"], rows["layer"], rows["expert"])]
    return rows[mask][["kind", "token", "layer", "expert", "start_ms", "duration_ms", "cause"]]


def _quality() -> None:
    """The MoE's quality beside the dense model's, as `python -m m2r2core.train.moe quality`
    measured it (the distilled card records the figures).
    """
    rows = distilled.quality_table(moefy.TRAINED_DIR)
    if rows is None:
        return
    with st.expander("How good is this MoE? (quality against the dense model)", expanded=False):
        names = {"ppl": "perplexity", "ppl_ratio": "× dense perplexity",
                 "rouge_l_vs_dense": "ROUGE-L vs dense answers",
                 "repeated_4grams_mean": "repeated 4-grams (mean)",
                 "repeated_4grams_max": "repeated 4-grams (worst answer)",
                 "answers_over_half_repeated": "answers over half repeated",
                 "router_agreement": "router top-k vs oracle experts"}
        st.dataframe(pd.DataFrame(rows).rename(columns=names), hide_index=True)
        st.caption("Perplexity on 60 held-out Wikipedia lead sections; answers are greedy, to "
                   "the first 20 MT-Bench questions, in float32. A looping answer repeats most "
                   "of its 4-grams. Router agreement: how often the router's top-k are the "
                   "experts with the largest outputs. Measured by `python -m m2r2core.train.moe "
                   "quality`; nothing here was trained or tuned on these texts.")


def _report() -> None:
    st.subheader("Predictors, capacities and storage, measured")
    report = resources.benchmark_report(REPORT)
    if report is None:
        st.info(f"No committed benchmark report (benchmarks/{REPORT}); run "
                "`python -m analysis.moe_bench` to make one.")
        return
    summary = {k: v for k, v in report["summary"].items() if isinstance(v, dict)}
    args = report["args"]
    main = {k: v for k, v in summary.items()
            if v["capacity"] == args["capacity"] and v["bandwidth"] == args["bandwidth"]}
    table = pd.DataFrame([{
        "predictor": v["predictor"], "eviction": v["policy"], "lookahead": v["lookahead"],
        "prefetch order": v.get("queue", UNRECORDED_QUEUE),
        "speedup vs on-demand LRU": v["speedup_vs_ondemand_lru"],
        "ceiling (all resident)": v.get("ceiling"),
        "share of the oracle's gain": v.get("share_of_oracle_gain"), "tok/s": v["tok_per_s"],
        "stall ms/token": v["stall_ms_per_token"], "hit rate": v["hit_rate"],
        "identical": f"{v['identical']}/{v['prompts']}"} for v in main.values()])
    st.dataframe(table, hide_index=True)
    st.caption("The ceiling is all experts resident over on-demand LRU: no predictor can pass "
               "it. The share of the oracle's gain is (speedup − 1) ÷ (the oracle's speedup − 1) "
               "at the same capacity and storage: how close a predictor comes to knowing the "
               "future.")
    recalls = {}
    for v in main.values():  # per predictor, the run that looked furthest ahead
        if len(v["recall_by_distance"]) > len(recalls.get(v["predictor"], {})):
            recalls[v["predictor"]] = v["recall_by_distance"]
    left, right = st.columns(2)
    left.plotly_chart(expert_charts.recall_figure(recalls), key=state.EXPERTS_RECALL_REPORT)
    left.caption("Prediction recall by lookahead distance, each predictor on the same prompts.")
    if not _has_sweeps(report):
        right.info("This report has no capacity or storage sweep (`moe_bench --sweep-capacity "
                   "… --sweep-bandwidth …`).")
    else:
        _sweeps(report, right)
    _measured_by(report)


def _has_sweeps(report: dict) -> bool:
    args = report["args"]
    return bool(args.get("sweep_capacity") or args.get("sweep_bandwidth"))


def _sweeps(report: dict, right) -> None:
    """The capacity and storage sweeps, at the report's first lookahead with its sweep policy
    and first prefetch order (the baseline: no predictor, LRU)."""
    args = report["args"]
    queue = args.get("queues", [UNRECORDED_QUEUE])[0]
    summary = {k: dict(v) for k, v in report["summary"].items() if isinstance(v, dict)
               and v["lookahead"] == args["lookahead"][0]
               and (v["predictor"] == "none" or v.get("queue", UNRECORDED_QUEUE) == queue)
               and (v["policy"] == "lru" if v["predictor"] == "none"
                    else v["policy"] == args["sweep_policy"])}
    bws = {k: v.bytes_per_s for k, v in PRESETS.items()}
    for v in summary.values():
        v["bandwidth_bytes_per_s"] = bws.get(v["bandwidth"], 0)
    right.plotly_chart(expert_charts.sweep_figure(summary, "capacity", "speedup_vs_ondemand_lru",
                                                  {"bandwidth": args["bandwidth"]}),
                       key=state.EXPERTS_SWEEP_CAPACITY)
    right.caption("Speedup over on-demand LRU as the fast tier grows (same storage).")
    left, right = st.columns(2)
    left.plotly_chart(expert_charts.sweep_figure(summary, "capacity", "hit_rate",
                                                 {"bandwidth": args["bandwidth"]}),
                      key=state.EXPERTS_SWEEP_HITS)
    left.caption("Hit rate against capacity: prediction and eviction together.")
    right.plotly_chart(expert_charts.sweep_figure(summary, "bandwidth", "tok_per_s",
                                                  {"capacity": args["capacity"]}),
                       key=state.EXPERTS_SWEEP_BW)
    right.caption("Tokens/s against storage speed at the main capacity.")


def _measured_by(report: dict) -> None:
    args = report["args"]
    raw = "" if report.get("chat_template") else " (prompts without the chat template)"
    st.caption(f"Measured by `{report.get('command', 'python -m analysis.moe_bench')}` on "
               f"{len(report['prompts'])} prompts, {args['max_new_tokens']} new tokens, "
               f"{args['dtype']}, {args['threads']} threads{raw}.")


render()
