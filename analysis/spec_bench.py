"""`python -m analysis.spec_bench`: self-speculative decoding against its peers on a real prompt
set, one process, same prompts, dtype and threads; medians over interleaved repeats.

Methods (`--methods`, any subset):

- `hf_generate`: transformers `generate`, greedy: the reference for speed and for output;
- `engine`: the engine's own plain decoding;
- `prompt_lookup`: transformers prompt-lookup decoding (`prompt_lookup_num_tokens`);
- `hf_early_exit`: transformers `assistant_early_exit` (LayerSkip-style self-drafting);
- `spec_slow`: the engine's self-speculative decoder drafting from the slow stream (no adapters);
- `spec_tuned`: the same decoder drafting from the slow stream read through the tuned lens at
  `--slow-draft-layer` (the distance-based baseline; needs a trained tuned lens);
- `spec_fast`: the same decoder drafting from the M2R2 accelerated stream (its adapters folded
  into the draft blocks' weights);
- `spec_fast_deltas` (only when asked for): the same, adding the adapters' low-rank deltas to
  each projection instead (`SpecConfig.merge_adapters=False`, what drafting did before);
- `spec_fast_model` (only when asked for, with `--draft-weights int8`): spec_fast with its
  draft weights in the model's dtype, to measure what int8 draft weights buy in the same run;
- `spec_fast_wide` (only when asked for): spec_fast verifying with transformers' own
  `rows @ weight.T` products (`narrow_verify="off"`), to measure what narrow products buy
  (`--narrow-verify` sets every other speculative method's choice; auto by default);
- `spec_fast_router`: the same, with an exit rule (`--draft-rule`, ARLA by default) picking each
  draft's depth per token between `--min-draft-layer` and `--draft-layer`;
- `medusa`: the same decoder drafting with Medusa-style heads on the model's final state (trained
  on the same corpus: `python -m m2r2core.train medusa`), a chain of each head's top-1.

The JSON report holds, per method and prompt: tokens/s, speed ratio against `hf_generate`,
whether the output equals `hf_generate`'s token for token (and, where it does not, the first
differing position with the reference model's logit margin there), and for the engine's
speculative methods: tokens per verification and acceptance by draft position. Example:

    python -m analysis.spec_bench --prompts mt-bench --per-category 2 --max-new-tokens 128 \
        --dtype bfloat16 --threads 2 --repeats 2 --out benchmarks/spec_bf16.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from analysis.bench import run_method, run_parser
from analysis.ledger import SpecLedger
from analysis.prompts import select_prompts
from analysis.speculation import acceptance
from m2r2core.config import DecodeConfig, EngineConfig
from m2r2core.engine import Engine, environment
from m2r2core.runtime import narrow
from m2r2core.spec.speculative import (
    DRAFT_RULES,
    DRAFT_WEIGHTS,
    MAX_DRAFT_LIMIT,
    NARROW_MODES,
    SpecConfig,
)
from m2r2core.trace import SpecRound

METHODS = ("hf_generate", "engine", "prompt_lookup", "hf_early_exit", "spec_slow", "spec_tuned",
           "spec_fast", "spec_fast_router", "medusa", "spec_fast_deltas", "spec_fast_model",
           "spec_fast_wide")
DEFAULT_METHODS = METHODS[:-3]
SPEC_METHODS = ("spec_slow", "spec_tuned", "spec_fast", "spec_fast_router", "medusa",
                "spec_fast_deltas", "spec_fast_model", "spec_fast_wide")
FAST_METHODS = ("spec_fast", "spec_fast_router", "spec_fast_deltas", "spec_fast_model",
                "spec_fast_wide")
"""M2R2 drafting; spec_fast_deltas adds the adapters' low-rank deltas to each projection
instead of drafting through the weights they are folded into (SpecConfig.merge_adapters);
spec_fast_model drafts with the weights in the model's dtype whatever --draft-weights says."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = run_parser("python -m analysis.spec_bench", __doc__, max_new_tokens=128, repeats=2)
    p.add_argument("--model", default=EngineConfig.model)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS,
                   help="default: all but spec_fast_deltas, spec_fast_model and spec_fast_wide")
    p.add_argument("--draft-layer", type=int, default=8, help="spec_fast draft depth")
    p.add_argument("--slow-draft-layer", type=int, default=8, help="spec_slow draft depth")
    p.add_argument("--max-draft", type=int, default=4, help="K, longest draft chain")
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="adaptive draft length: stop below this top-1 probability (0: off)")
    p.add_argument("--draft-vocab", default="sub", choices=("full", "sub"))
    p.add_argument("--draft-weights", default=SpecConfig.draft_weights, choices=DRAFT_WEIGHTS,
                   help="every drafter's draft blocks and head: the model's dtype or int8")
    p.add_argument("--narrow-verify", default=SpecConfig.narrow_verify, choices=NARROW_MODES,
                   help="verification's products of a few rows (runtime/narrow.py)")
    p.add_argument("--draft-rule", default="arla", choices=DRAFT_RULES[1:],
                   help="spec_fast_router's rule choosing each draft's depth")
    p.add_argument("--draft-threshold", type=float, default=0.3,
                   help="spec_fast_router: exit once the rule's score reaches this")
    p.add_argument("--min-draft-layer", type=int, default=4,
                   help="spec_fast_router: the shallowest depth a draft may exit at")
    p.add_argument("--medusa-min-confidence", type=float, default=0.0,
                   help="medusa's adaptive bound (0: draft every head; its drafts cost ~nothing)")
    p.add_argument("--medusa-draft", type=int, default=0,
                   help="medusa's K (0: --max-draft, capped at the number of heads)")
    p.add_argument("--early-exit-layer", type=int, default=8, help="hf_early_exit's layer")
    p.add_argument("--lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens")
    p.add_argument("--out", default="bench_out/spec.json", help="JSON report path")
    args = p.parse_args(argv)
    if not 1 <= args.max_draft <= MAX_DRAFT_LIMIT:
        p.error(f"--max-draft must be 1..{MAX_DRAFT_LIMIT}")
    if not 1 <= args.min_draft_layer <= args.draft_layer:
        p.error("--min-draft-layer must be 1..--draft-layer")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def spec_config(args: argparse.Namespace, method: str, medusa_heads: int | None = None
                ) -> SpecConfig:
    """The speculative decoder's settings for spec_fast(_router), spec_slow, spec_tuned or
    medusa.
    """
    if method == "medusa":
        k = args.medusa_draft or min(args.max_draft, medusa_heads or args.max_draft)
        return SpecConfig(stream="medusa", max_draft=k, min_confidence=args.medusa_min_confidence,
                          draft_vocab=args.draft_vocab, draft_weights=args.draft_weights,
                          narrow_verify=args.narrow_verify)
    fast = method in FAST_METHODS
    rule = ({"draft_rule": args.draft_rule, "draft_threshold": args.draft_threshold,
             "min_draft_layer": args.min_draft_layer} if method == "spec_fast_router" else {})
    stream = "fast" if fast else "tuned" if method == "spec_tuned" else "slow"
    return SpecConfig(draft_layer=args.draft_layer if fast else args.slow_draft_layer,
                      stream=stream, max_draft=args.max_draft,
                      min_confidence=args.min_confidence, draft_vocab=args.draft_vocab,
                      merge_adapters=method != "spec_fast_deltas",
                      draft_weights="model" if method == "spec_fast_model" else args.draft_weights,
                      narrow_verify="off" if method == "spec_fast_wide" else args.narrow_verify,
                      **rule)


def runner(engine: Engine, args: argparse.Namespace, method: str
           ) -> Callable[[str], tuple[float, tuple[int, ...], list[SpecRound]]]:
    """A function running one method on one prompt: (wall seconds, generated ids, rounds)."""
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, trace=False, capture_residuals=False)
    if method in SPEC_METHODS:
        spec = spec_config(args, method, engine.medusa.n_heads if engine.medusa else None)

        def run_spec(text):
            start = time.perf_counter()
            run = engine.speculate(text, cfg, spec).run()
            return time.perf_counter() - start, tuple(run.tokens), run.rounds
        return run_spec
    extra = {"hf_generate": {}, "engine": {},
             "prompt_lookup": {"prompt_lookup_num_tokens": args.lookup_tokens},
             "hf_early_exit": {"assistant_early_exit": args.early_exit_layer}}[method]
    base = "engine" if method == "engine" else "hf_generate"

    def run_plain(text):
        return (*run_method(engine, base, text, args.max_new_tokens, **extra), [])
    return run_plain


def divergence(engine: Engine, text: str, max_new_tokens: int, reference: tuple[int, ...],
               output: tuple[int, ...]) -> dict | None:
    """Where an output first leaves the reference, and the model's own margin there: the logit
    gap between its top two tokens and between the reference token and the output's token.
    None when the outputs are identical.
    """
    if output == reference:
        return None
    at = next((i for i, (a, b) in enumerate(zip(reference, output, strict=False)) if a != b),
              min(len(reference), len(output)))
    if at >= min(len(reference), len(output)):
        return {"position": at, "length_only": True}
    cfg = DecodeConfig(max_new_tokens=max_new_tokens, trace=False)
    ids = torch.tensor([engine.encode(text, cfg) + list(reference[:at])], device=engine.device)
    with torch.inference_mode():
        logits = engine.model(ids).logits[0, -1].float()
    top2 = torch.topk(logits, 2).values
    return {"position": at, "length_only": False,
            "top2_margin": float(top2[0] - top2[1]),
            "reference_minus_output_logit": float(logits[reference[at]] - logits[output[at]])}


def unavailable(engine: Engine, args: argparse.Namespace) -> dict[str, str]:
    """The asked-for methods this engine cannot run, with why (they are left out)."""
    caps = engine.capabilities()
    needs = {"spec_fast": "fast", "spec_fast_router": "fast", "spec_fast_deltas": "fast",
             "spec_fast_model": "fast", "spec_fast_wide": "fast", "spec_tuned": "tuned",
             "medusa": "medusa"}
    skipped = {m: f"no {needs[m]} drafter is loaded" for m in args.methods
               if m in needs and needs[m] not in caps.draft_streams}
    if "spec_fast_router" in args.methods and not caps.has_rule(args.draft_rule, "fast"):
        skipped.setdefault("spec_fast_router", f"no trained {args.draft_rule} router")
    return skipped


def bench(args: argparse.Namespace, progress: Callable[[float, str], None] | None = None,
          engine: Engine | None = None) -> dict:
    """Run every method on every prompt, interleaved in rotating order, `repeats` times.

    Args:
        progress: called with (fraction done, what ran last) after every run.
        engine: an already loaded engine (the app's); None loads args.model.
    """
    if engine is None:
        engine = Engine.load(EngineConfig(model=args.model, dtype=args.dtype,
                                          threads=args.threads))
    skipped = unavailable(engine, args)
    methods = tuple(m for m in METHODS if m in args.methods and m not in skipped)
    if skipped:
        print(f"skipped: {skipped}", file=sys.stderr)
    if "hf_generate" not in methods:
        methods = ("hf_generate",) + methods  # the reference for speed and output
    prompts = select_prompts(args)
    runs = {m: runner(engine, args, m) for m in methods}
    for method in methods:  # warm-up: kernels, caches, generation-config paths
        runs[method](prompts[0].text)
    rows = []
    total = len(prompts) * args.repeats * len(methods)
    done = 0
    for index, prompt in enumerate(prompts):
        timings = {m: [] for m in methods}
        outputs, stats = {}, {}
        for repeat in range(args.repeats):
            shift = repeat % len(methods)
            for method in methods[shift:] + methods[:shift]:
                gc.collect()
                seconds, ids, rounds = runs[method](prompt.text)
                timings[method].append(seconds)
                outputs[method] = ids
                if rounds:
                    stats[method] = acceptance(rounds, args.max_draft)
                done += 1
                if progress:
                    progress(done / total, f"{prompt.id} · {method}")
        rows.append(_prompt_row(engine, args, prompt, methods, timings, outputs, stats))
        print(f"[{index + 1}/{len(prompts)}] {prompt.id} ({prompt.category}): " + ", ".join(
            f"{m} x{rows[-1]['speedup'][m]:.2f}" for m in methods), file=sys.stderr)
    return {"command": " ".join(["python -m analysis.spec_bench"] + sys.argv[1:]),
            "args": vars(args), "dtype": str(engine.model.dtype).removeprefix("torch."),
            "environment": environment(), "model": engine.info.name,
            "adapters": engine.accel_note, "methods": list(methods), "skipped": skipped,
            "medusa": engine.medusa_note,
            "narrow_timing": narrow.measure(narrow.verified_modules(engine.parts))
            if engine.model.device.type == "cpu" else None,
            "spec_configs": {m: vars(spec_config(args, m, engine.medusa.n_heads
                                                 if engine.medusa else None))
                             for m in methods if m in SPEC_METHODS},
            "prompts": rows, "summary": summarise(rows, methods, args.max_draft)}


def _prompt_row(engine: Engine, args: argparse.Namespace, prompt, methods: tuple[str, ...],
                timings: dict[str, list[float]], outputs: dict[str, list[int]],
                stats: dict) -> dict:
    """One prompt's figures: speed against generate, identity and divergence, acceptance."""
    reference = outputs["hf_generate"]
    tps = {m: len(outputs[m]) / statistics.median(timings[m]) for m in methods}
    return {
        "id": prompt.id, "category": prompt.category,
        "new_tokens": {m: len(outputs[m]) for m in methods},
        "seconds": timings, "tokens_per_s": tps,
        "speedup": {m: tps[m] / tps["hf_generate"] for m in methods},
        "identical_to_hf": {m: outputs[m] == reference for m in methods},
        "divergence": {m: divergence(engine, prompt.text, args.max_new_tokens, reference,
                                     outputs[m]) for m in methods},
        "acceptance": stats,
    }


def summarise(rows: list[dict], methods: tuple[str, ...], max_draft: int) -> dict:
    """Medians over prompts, overall and per category."""
    def block(subset: list[dict]) -> dict:
        out = {}
        for m in methods:
            entry = {
                "median_tokens_per_s": statistics.median(r["tokens_per_s"][m] for r in subset),
                "median_speedup_vs_hf_generate": statistics.median(r["speedup"][m]
                                                                   for r in subset),
                "identical": sum(r["identical_to_hf"][m] for r in subset),
                "prompts": len(subset),
            }
            accs = [r["acceptance"][m] for r in subset if m in r["acceptance"]]
            if accs:
                verifications = sum(a["verifications"] for a in accs)
                entry["tokens_per_verification"] = (
                    sum(a["tokens_per_verification"] * a["verifications"] for a in accs)
                    / max(1, verifications))
                entry["mean_accepted"] = sum(a["accepted"] for a in accs) / max(1, verifications)
                reached = [sum(a["reached_by_position"][i] for a in accs) for i in range(max_draft)]
                passed = [sum(a["accepted_by_position"][i] for a in accs)
                          for i in range(max_draft)]
                entry["acceptance_by_position"] = [p / r if r else None
                                                   for p, r in zip(passed, reached, strict=True)]
                depths = [d for a in accs for d in a.get("draft_depths", [])]
                if depths:
                    entry["mean_draft_depth"] = sum(depths) / len(depths)
                entry["draft_share_of_time"] = (
                    sum(a["draft_ms"] for a in accs)
                    / max(1e-9, sum(a["draft_ms"] + a["verify_ms"] for a in accs)))
            ties = [r["divergence"][m] for r in subset if r["divergence"][m]]
            entry["differences"] = [{k: v for k, v in d.items()} for d in ties]
            out[m] = entry
        return out

    categories = sorted({r["category"] for r in rows})
    return {"overall": block(rows),
            "by_category": {c: block([r for r in rows if r["category"] == c])
                            for c in categories},
            "break_even": {m: line for m in methods if (line := break_even(rows, m))}}


def break_even(rows: list[dict], method: str) -> dict | None:
    """A drafter's break-even line over all prompts (analysis/ledger.py's formula): drafts and
    accepted drafts per round, the cost of a draft (c_d) and of a verification (c_v) as fractions
    of a `generate` step T, the speedup those predict, E[a + 1] / (E[k]·c_d + c_v), beside the
    measured one (total time per token, prefill included), and the accepted drafts per round
    1.0x and 1.5x would need at these costs. None for a method without drafts.

    T and the measured times are medians over repeats; the round statistics are the last
    repeat's.
    """
    accs = [r["acceptance"][method] for r in rows if method in r["acceptance"]]
    rounds = sum(a["verifications"] for a in accs)
    if not rounds:
        return None

    def ms_per_token(m: str) -> float:
        seconds = sum(statistics.median(r["seconds"][m]) for r in rows)
        return 1000.0 * seconds / max(1, sum(r["new_tokens"][m] for r in rows))

    drafted = sum(a["drafted"] for a in accs)
    plain_ms = ms_per_token("hf_generate")
    book = SpecLedger(
        plain_ms=plain_ms, spec_ms=ms_per_token(method), rounds=rounds,
        mean_drafted=drafted / rounds, mean_accepted=sum(a["accepted"] for a in accs) / rounds,
        draft_cost=sum(a["draft_ms"] for a in accs) / max(1, drafted) / plain_ms,
        verify_cost=sum(a["verify_ms"] for a in accs) / rounds / plain_ms, time_ms={})
    return {"mean_drafted": book.mean_drafted, "mean_accepted": book.mean_accepted,
            "draft_cost": book.draft_cost, "verify_cost": book.verify_cost,
            "predicted_speedup": book.predicted_speedup,
            "measured_speedup": book.measured_speedup,
            "needed_accepted": {"1.0x": book.needed_accepted(1.0),
                                "1.5x": book.needed_accepted(1.5)}}


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run, print a table and write the JSON report."""
    args = parse_args(argv)
    report = bench(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    overall = report["summary"]["overall"]
    for method in report["methods"]:
        s = overall[method]
        extra = (f"  {s['tokens_per_verification']:.2f} tok/verify" if "tokens_per_verification"
                 in s else "")
        print(f"{method:14s} {s['median_tokens_per_s']:7.1f} tok/s  "
              f"x{s['median_speedup_vs_hf_generate']:.3f} vs generate  "
              f"identical {s['identical']}/{s['prompts']}{extra}")
    for method, line in report["summary"]["break_even"].items():
        print(f"break-even {method:14s} E[k] {line['mean_drafted']:.2f}  "
              f"E[a] {line['mean_accepted']:.2f}  c_d {line['draft_cost']:.3f}  "
              f"c_v {line['verify_cost']:.3f}  predicted x{line['predicted_speedup']:.2f}  "
              f"measured x{line['measured_speedup']:.2f}  "
              f"1.0x needs E[a] {line['needed_accepted']['1.0x']:.2f}")
    print(f"report: {out}")
    return report


if __name__ == "__main__":
    main()

