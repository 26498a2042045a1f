"""Speculative Decoding: the fast stream drafts, the unmodified model verifies; watch which drafts
survive, what each step costs, and how the speed compares with plain decoding and the peers."""

from __future__ import annotations

import json
import time

import pandas as pd
import streamlit as st

from analysis import bundle, compare, ledger, speculation
from app import charts, resources, spec_ab, spec_charts, state
from app.components import bundles, controls, metrics
from m2r2core.config import SamplingConfig
from m2r2core.errors import M2R2Error
from m2r2core.runtime.environment import cpu_kind
from m2r2core.spec.speculative import (
    DRAFT_RULES,
    DRAFT_VOCABS,
    DRAFT_WEIGHTS,
    MAX_DRAFT_LIMIT,
    NARROW_MODES,
    SpecConfig,
)

# The committed issue-setting runs, one per machine kind and precision (sessions 34, 26, 40, 35).
REPORTS = {"CPU without native bf16 (AVX2), fp32": ("avx2", "spec_fp32_narrow065_s34.json"),
           "CPU with native bf16 (avx512_bf16), bf16": ("avx512_bf16", "spec_bf16_s26.json"),
           "CPU with AMX (Xeon), bf16": ("amx", "spec_bf16_amx_s40.json"),
           "CPU with AMX (Xeon), fp32": ("amx", "spec_fp32_amx_k2_s35.json")}
# label -> (the machine kind it was measured on: runtime/environment.py's cpu_kind, its report);
# the first of this machine's kind is selected first.
RESULT_KEY = "spec_result"
COMPARE_KEY = "spec_compare_result"

INTRO = """
**Self-speculative decoding** makes the model check several tokens in one pass. A cheap **draft
stream** (the first few blocks; on M2R2's **fast stream** with its accelerator adapters, or on
the plain slow stream) guesses a chain of tokens; the **unmodified model** then runs all of them
at once and keeps the longest prefix it agrees with, plus one token of its own. The peer
**Medusa** drafts without any draft stream: small heads on the model's own final state guess the
next few tokens at once. The output is
exactly the model's own: greedy gives the same tokens as plain decoding, and sampling uses
speculative rejection sampling so the distribution is unchanged. It pays only when drafts are
cheap *and* usually right.
"""

CHOICES = """
**Choices our reading of the method made (all switchable below):** the draft exits at a fixed
*draft layer* and reads either the full LM head or a **sub-vocabulary head** (the 2,048 most
frequent tokens of the training answers: about 30x cheaper; a token outside it simply cannot be
drafted). The chain stops at *K* drafts or, with **adaptive length**, after the first draft whose
top-1 probability is below the confidence bound (that draft is still verified: it is already paid
for). The draft depth is fixed, or picked **per token by
an exit rule** (ARLA, the MLP, confidence, ...) on the draft stream; a deeper draft reads earlier
shallower drafts' keys/values made from their exit states (copy-up). Draft keys/values live in a
side buffer and never enter the model's cache; verification runs transformers' own blocks. Timings
are engine time (drafting + verification), measured in this session against plain decoding of the
same prompt. In bfloat16 a multi-token verification can round differently from one-token steps, so
a near-tie may flip; in float32 the output is identical (tests prove it). The **Medusa** heads
(`python -m m2r2core.train medusa`, same corpus as the adapters) share the model's frozen LM head
and draft a chain of each head's top-1 (no tree); the draft layer does not apply to them.
"""


SpecSession = compare.SpecComparison  # what one Generate press produced (analysis/compare.py)


def render() -> None:
    engine = resources.page_start("Speculative Decoding", INTRO, CHOICES)
    if engine is None:
        return
    if "fast" not in engine.capabilities().draft_streams:
        st.warning(f"{engine.accel_note} Only slow-stream drafting is available.")
    opened = bundles.open_control("spec", bundle.owner_of(engine), state.SPEC_BUNDLE)
    if opened is not None:
        bundles.restore(opened, RESULT_KEY, state.PROMPT, ())
    got = controls.decode_controls_or_error()
    if got is None:
        return
    text, cfg = got
    spec, sampling = _spec_controls(engine)
    if st.button("Generate speculatively", key=state.SPEC_GENERATE, type="primary"):
        if spec is not None:
            if sampling and cfg.sampling.greedy:
                st.error("Sampling needs a temperature above 0: set the temperature slider, or "
                         "turn sampling off for greedy decoding.")
            else:
                if not sampling:
                    cfg = cfg.replace(sampling=SamplingConfig(seed=cfg.sampling.seed))
                _generate(engine, text, cfg, spec, sampling)
    session: SpecSession | None = st.session_state.get(RESULT_KEY)
    if session is None:
        st.info("Generate to see drafts accepted and refused, token by token.")
    else:
        _show(engine, session)
        spec_ab.ab(engine, session)
    _comparison(engine)


def _spec_controls(engine) -> tuple[SpecConfig | None, bool]:
    """Stream, draft layer, K, adaptive bound, draft head and sampling; None if invalid."""
    caps = engine.capabilities()
    streams = list(caps.draft_streams)
    cols = st.columns(6)
    stream = cols[0].selectbox("Draft stream", streams, key=state.SPEC_STREAM,
                               help="fast = M2R2's accelerated stream; slow = plain early-exit "
                                    "drafting (LayerSkip-style, no adapters); tuned = the slow "
                                    "stream read through the tuned lens (the distance-based "
                                    "baseline); medusa = the Medusa-style heads peer (no draft "
                                    "stream).")
    fast_depth, medusa_heads = caps.fast_depth, caps.medusa_heads
    deepest = fast_depth if stream == "fast" else caps.n_layers - 1
    layer = cols[1].number_input("Draft layer", value=min(8, deepest), step=1, key=state.SPEC_LAYER,
                                 disabled=stream == "medusa",
                                 help=f"Depth the draft exits at (1–{deepest} on this stream; "
                                      "not used by Medusa).")
    longest = medusa_heads if stream == "medusa" else MAX_DRAFT_LIMIT
    k = cols[2].number_input("Max drafts K", value=4, step=1, key=state.SPEC_K,
                             help=f"Longest draft chain per verification (1–{longest}"
                                  + (", one per Medusa head)." if stream == "medusa" else ")."))
    bound = cols[3].number_input("Adaptive bound", value=0.65, step=0.05, key=state.SPEC_CONF,
                                 help="Stop the chain after a draft whose top-1 probability is "
                                      "below this (0 = always draft K). On the AlpacaEval "
                                      "helpful-base prompts (a tuning set no report uses) 0.65 "
                                      "was the fastest of 0.5–0.8 on an AVX2 CPU in fp32 "
                                      "(session 34), 0.8 of 0.4–0.9 on a CPU with native bf16 "
                                      "(session 23).")
    has_sub = caps.sub_vocab
    vocab = cols[4].selectbox("Draft head", DRAFT_VOCABS if has_sub else ("full",),
                              index=1 if has_sub else 0, key=state.SPEC_VOCAB,
                              help="sub = the 2,048 most frequent tokens (about 30x cheaper).")
    sampling = cols[5].checkbox("Sampling", key=state.SPEC_SAMPLING,
                                help="Speculative rejection sampling at the temperature and "
                                     "top-p above (needs temperature > 0).")
    cols = st.columns(5)
    draft_stream = stream if stream in ("fast", "tuned") else "slow"
    rules = tuple(r for r in DRAFT_RULES if r == "fixed" or caps.has_rule(r, draft_stream))
    rule = cols[0].selectbox("Draft depth", rules, key=state.SPEC_RULE,
                             disabled=stream == "medusa",
                             help="fixed = every draft exits at the draft layer; a rule (ARLA, "
                                  "confidence, ...) on the draft stream picks each draft's "
                                  "depth, up to the draft layer.")
    threshold = cols[1].number_input("Rule threshold", value=0.5, step=0.05,
                                     key=state.SPEC_RULE_THR,
                                     disabled=rule == "fixed",
                                     help="A draft exits once the rule's score reaches this "
                                          "(0–1).")
    shallowest = cols[2].number_input("Shallowest draft depth", value=min(4, int(layer)),
                                      step=1, key=state.SPEC_RULE_MIN, disabled=rule == "fixed",
                                      help="The rule is not asked before this depth.")
    weights = _default_select(cols[3], "Draft weights", DRAFT_WEIGHTS, "draft_weights",
                              state.SPEC_WEIGHTS,
                              "model = the draft blocks and head in the model's dtype; "
                              "int8 = the same weights rounded to int8 per output "
                              "channel: about half the bytes to read per draft, so "
                              "cheaper drafts on a CPU. Verification always runs the "
                              "model's own weights, so the output does not change.")
    products = _default_select(cols[4], "Verification products", NARROW_MODES, "narrow_verify",
                               state.SPEC_NARROW,
                               "How the verification pass multiplies its few rows (the "
                               "last token and the drafts) by each weight. on = weight × "
                               "rowsᵀ, which keeps reading the weights the way a "
                               "one-token step does: on an AVX2 CPU in float32, "
                               "verifying one draft then costs 1.27 decoding steps "
                               "instead of 1.6. off = transformers' own rows × weightᵀ. "
                               "On an AVX-512 Xeon the usual form is the faster one. "
                               "auto = whichever times faster on this machine (timed "
                               "once). The two differ only by "
                               "float32 rounding; the output stays plain decoding's.")
    spec = SpecConfig(draft_layer=int(layer), stream=stream, max_draft=int(k),
                      min_confidence=float(bound), draft_vocab=vocab, draft_weights=weights,
                      draft_rule=rule if stream != "medusa" else "fixed",
                      draft_threshold=float(threshold), min_draft_layer=int(shallowest),
                      narrow_verify=products)
    try:
        spec.validate(caps.n_layers, fast_depth, medusa_heads, "tuned" in caps.draft_streams)
    except M2R2Error as exc:
        st.error(str(exc))
        return None, sampling
    return spec, sampling


def _default_select(col, label: str, options: tuple[str, ...], field: str, key: str,
                    help: str) -> str:
    """A selectbox over `options` that starts at SpecConfig's default for `field`."""
    return col.selectbox(label, options, index=options.index(getattr(SpecConfig, field)),
                         key=key, help=help)


def _generate(engine, text, cfg, spec: SpecConfig, sampling: bool) -> None:
    progress = st.progress(0.0, text="Plain decoding (the speed baseline)…")
    strip = st.empty()
    budget, shown = cfg.max_new_tokens, [0.0]

    def on_token(kind: str, count: int, run) -> None:
        if kind == "plain":
            progress.progress(count / (2 * budget), text=f"plain decoding: token {count}")
        elif time.monotonic() - shown[0] > 0.4:
            shown[0] = time.monotonic()
            rate = speculation.running_rate(run.rounds)
            now = f" · {rate[-1][1]:.1f} tok/s" if rate else ""
            progress.progress(min(1.0, (budget + count) / (2 * budget)),
                              text=f"speculative: token {count}{now}")
            strip.markdown(spec_charts.round_strip_html(run.rounds), unsafe_allow_html=True)

    try:
        session = compare.compare_spec(engine, text, cfg, spec, sampling, on_token)
    except M2R2Error as exc:
        st.error(str(exc))
        return
    except Exception as exc:  # noqa: BLE001 — a traceback must never reach the page
        st.error(f"Generation failed: {type(exc).__name__}: {exc}. Earlier results are kept.")
        return
    finally:
        progress.empty()
        strip.empty()
    st.session_state[RESULT_KEY] = session


def _show(engine, s: SpecSession) -> None:
    stats = speculation.acceptance(s.rounds, s.spec.max_draft)
    st.subheader("The generation")
    st.caption("Green: drafts the model accepted. Orange: the model's own token where it refused "
               "a draft (the refused drafts follow, struck through). Blue: a bonus token after "
               "every draft passed. Grey: the first token, from the prompt's pass. A bar ends "
               "each verification; hover any token for its round's timings.")
    st.markdown(spec_charts.round_strip_html(s.rounds), unsafe_allow_html=True)
    cols = st.columns(5)
    cols[0].metric("Measured speedup", f"{s.plain_ms / s.spec_ms:.2f}x",
                   help="Plain ms/token ÷ speculative ms/token, both measured just now.")
    cols[1].metric("Speculative tok/s", f"{1000 / s.spec_ms:.1f}",
                   f"{1000 / s.spec_ms - 1000 / s.plain_ms:+.1f} vs plain")
    cols[2].metric("Tokens per verification", f"{stats['tokens_per_verification']:.2f}",
                   help="Accepted drafts plus the model's own token, per verification pass.")
    cols[3].metric("Mean accepted drafts", f"{stats['mean_accepted']:.2f} / {s.spec.max_draft}")
    same = s.spec_tokens == s.plain_tokens
    cols[4].metric("Same as plain decoding", "yes" if same else "no",
                   help="Greedy must match (up to bf16 near-ties); sampling draws differ by "
                        "design, only their distribution is the same.")
    spec = s.spec
    depths = stats.get("draft_depths") or []
    source = ("by the Medusa heads" if spec.stream == "medusa"
              else f"on the {spec.stream} stream at layer {spec.draft_layer}"
              if spec.draft_rule == "fixed"
              else f"on the {spec.stream} stream, depth chosen by {spec.draft_rule} "
                   f"(threshold {spec.draft_threshold:g}, mean depth "
                   f"{sum(depths) / max(1, len(depths)):.1f})")
    st.caption(f"Drafted {source}, K = "
               f"{spec.max_draft}, adaptive bound {spec.min_confidence:g}, {spec.draft_vocab} "
               f"draft head, {spec.draft_weights} draft weights, verification products "
               f"{spec.narrow_verify}, "
               f"{'sampling' if s.sampling else 'greedy'}. Drafting took "
               f"{stats['draft_ms'] / max(1e-9, stats['draft_ms'] + stats['verify_ms']):.0%} "
               "of decoding time.")
    left, right = st.columns(2)
    left.plotly_chart(spec_charts.acceptance_by_position(
        {"this run": stats["acceptance_by_position"]}), key=state.SPEC_ACCEPT_POS)
    left.caption("Of the chains that drafted that far, how often the i-th draft was accepted. "
                 "A draft only counts once every draft before it passed.")
    right.plotly_chart(spec_charts.accepted_histogram(stats["accepted_lengths"],
                                                      spec.max_draft), key=state.SPEC_ACCEPT_HIST)
    right.caption("How many drafts each verification kept. A pile at 0 means the model paid "
                  "for drafts it did not use.")
    left, right = st.columns(2)
    left.plotly_chart(spec_charts.step_timeline(s.rounds), key=state.SPEC_TIMELINE)
    left.caption("Where the time goes, round by round: drafting (red) then one verification "
                 "pass (blue). Hover a round for what it drafted and kept.")
    right.plotly_chart(spec_charts.running_rate_figure(speculation.running_rate(s.rounds),
                                                       s.plain_rate), key=state.SPEC_RATE)
    right.caption("Tokens per second so far, speculative against plain decoding of the same "
                  "prompt in this session.")
    _ledger(s, stats)
    rows = pd.DataFrame(speculation.round_rows(s.rounds))
    with st.expander("Every round"):
        st.dataframe(rows, hide_index=True)
    cols = st.columns(2)
    cols[0].download_button("Download rounds (CSV)", rows.to_csv(index=False),
                            file_name="speculative-rounds.csv", key=state.SPEC_DL_CSV)
    bundles.download(cols[1], "spec", s, bundle.owner_of(engine), s.prompt,
                     {"decode": s.decode, "spec": vars(s.spec), "sampling": s.sampling},
                     key=state.SPEC_DL_JSON, file_name="speculative-bundle.json")


def _ledger(s: SpecSession, stats: dict) -> None:
    st.subheader("Speedup ledger")
    book = ledger.spec_ledger(s.rounds, s.plain_ms, s.spec_ms)
    target = metrics.ledger_panel(
        "The speedup this run's own measured quantities predict: tokens per round (accepted "
        "drafts + 1) over the cost of a round (drafts × their cost + one verification), costs "
        "as fractions of a plain decoding step. The gap to the measured speedup is the "
        "bookkeeping between rounds.", book,
        [("One draft costs", f"{book.draft_cost:.2f} steps"),
         ("One verification costs", f"{book.verify_cost:.2f} steps")],
        charts.ledger_figure(book.time_ms, s.plain_ms, len(s.spec_tokens) - 1),
        state.SPEC_LEDGER, state.SPEC_TARGET)
    need = book.needed_accepted(target)
    alpha = book.needed_acceptance(target, s.spec.max_draft)
    measured = [a for a in stats["acceptance_by_position"] if a is not None]
    if alpha is None:
        st.warning(f"{target:.1f}x is out of reach at these costs: it needs {need:.2f} accepted "
                   f"drafts per round, more than the {s.spec.max_draft} a round drafts. Cheaper "
                   "drafts or a cheaper verification would have to come first.")
    else:
        st.info(f"At these costs, {target:.1f}x needs **{max(0.0, need):.2f} accepted drafts "
                f"per round** (this run: {book.mean_accepted:.2f}), i.e. each draft accepted "
                f"with probability **{alpha:.2f}** in a chain of {s.spec.max_draft} (this run, "
                f"first draft: {measured[0] if measured else 0:.2f}).")


def _comparison(engine) -> None:
    st.subheader("All methods, side by side")
    kinds = list(REPORTS)
    here = cpu_kind()
    first = next((n for n, (k, _) in enumerate(REPORTS.values()) if k == here), 0)
    kind = st.radio("Measured on", kinds, index=first, horizontal=True,
                    key=state.SPEC_REPORT_KIND,
                    help="Whether speculative decoding pays depends on the CPU: without native "
                         "bf16 a forward of several rows costs 1.6 one-row steps the usual way; "
                         "with AMX about one. The kind of machine this one is "
                         f"({here}) is selected first.")
    report = resources.benchmark_report(REPORTS[kind][1])
    if report is not None:
        overall = report["summary"]["overall"]
        st.plotly_chart(spec_charts.methods_figure(overall), key=state.SPEC_METHODS_REPORT)
        st.dataframe(_methods_table(overall), hide_index=True)
        st.caption(f"Measured by `{report['command']}` ({len(report['prompts'])} prompts, "
                   f"{report['args']['max_new_tokens']} new tokens, {report['args']['dtype']}, "
                   f"{report['args']['threads']} threads). Speedup is against transformers "
                   "`generate` on the same prompts in the same run.")
    st.markdown("**Run the comparison here** (same engine, same prompts, one repeat):")
    cols = st.columns(3)
    prompts = cols[0].selectbox("Prompt set", ("mt-bench", "koala", "selfinstruct", "vicuna"),
                                key=state.SPEC_CMP_SET)
    count = cols[1].number_input("Prompts", value=2, step=1, key=state.SPEC_CMP_N,
                                 help="1 to 8 (each runs every method once).")
    tokens = cols[2].number_input("New tokens", value=32, step=16, key=state.SPEC_CMP_TOKENS,
                                  help="8 to 256.")
    if st.button("Compare all methods", key=state.SPEC_COMPARE):
        if not (1 <= count <= 8 and 8 <= tokens <= 256):
            st.error(f"Prompts must be 1–8 and new tokens 8–256 (got {count} and {tokens}).")
        else:
            _run_comparison(engine, prompts, int(count), int(tokens))
    result = st.session_state.get(COMPARE_KEY)
    if result is not None:
        overall = result["summary"]["overall"]
        st.plotly_chart(spec_charts.methods_figure(overall), key=state.SPEC_METHODS_LIVE)
        st.dataframe(_methods_table(overall), hide_index=True)
        st.download_button("Download comparison (JSON)", json.dumps(result, indent=2),
                           file_name="speculative-comparison.json", key=state.SPEC_DL_CMP)


def _run_comparison(engine, prompts: str, count: int, tokens: int) -> None:
    from analysis import spec_bench

    key = (engine.info.fingerprint, prompts, count, tokens)
    cache = st.session_state.setdefault("spec_compare_cache", {})
    if key in cache:
        st.session_state[COMPARE_KEY] = cache[key]
        return
    caps = engine.capabilities()
    # spec_bench leaves out the drafters this engine has not loaded
    args = spec_bench.parse_args(["--prompts", prompts, "--limit", str(count),
                                  "--max-new-tokens", str(tokens), "--repeats", "1",
                                  "--draft-vocab", "sub" if caps.sub_vocab else "full"])
    if caps.fast_depth is not None:
        args.draft_layer = min(args.draft_layer, caps.fast_depth)
        args.min_draft_layer = min(args.min_draft_layer, args.draft_layer)
    args.slow_draft_layer = min(args.slow_draft_layer, caps.n_layers - 1)
    args.early_exit_layer = min(args.early_exit_layer, caps.n_layers - 1)
    bar = st.progress(0.0, text="Warming up every method…")
    try:
        result = spec_bench.bench(args, lambda f, what: bar.progress(f, text=what), engine)
    except Exception as exc:  # noqa: BLE001
        st.error(f"The comparison failed: {type(exc).__name__}: {exc}")
        return
    finally:
        bar.empty()
    cache[key] = result
    st.session_state[COMPARE_KEY] = result


def _methods_table(overall: dict) -> pd.DataFrame:
    return pd.DataFrame([{
        "method": m, "tok/s": round(s["median_tokens_per_s"], 1),
        "speedup vs generate": round(s["median_speedup_vs_hf_generate"], 3),
        "identical outputs": f"{s['identical']}/{s['prompts']}",
        "tokens per verification": round(s["tokens_per_verification"], 2)
        if "tokens_per_verification" in s else None,
    } for m, s in overall.items()])


render()
