r"""`python -m analysis.moe_bench`: ahead-of-time expert loading against on-demand loading, on a
real prompt set, one process, same prompts, dtype and threads; medians over interleaved repeats.

For every prompt a reference run with every expert resident gives the output (and the routing the
`oracle` predictor replays); then each setting (predictor × eviction policy × lookahead, at the
main capacity and bandwidth, plus the capacity and bandwidth sweeps) decodes the prompt with its
experts in the slow tier. Every output is compared with the reference token for token. The
baseline of every ratio is on-demand loading (`none`) with LRU eviction at the same capacity and
bandwidth. Example:

    python -m analysis.moe_bench --prompts mt-bench --per-category 1 --max-new-tokens 64 \
        --capacity 80 --bandwidth ufs --out benchmarks/moe_bf16.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from analysis.bench import run_parser
from analysis.compare import share_of_gain
from analysis.prompts import select_prompts
from m2r2core import artifacts
from m2r2core.config import DecodeConfig
from m2r2core.engine import environment
from m2r2core.moe.channel import PRESETS, QUEUES
from m2r2core.moe.eviction import POLICIES
from m2r2core.moe.experts import READS
from m2r2core.moe.offload import OffloadConfig, OffloadEngine, load_moe
from m2r2core.moe.prefetch import PREDICTORS, ROUTER_PREDICTORS

BASELINE = ("none", "lru")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = run_parser("python -m analysis.moe_bench", __doc__, max_new_tokens=64, repeats=3)
    p.add_argument("--model", default=None, help="a Mixtral or Qwen2-MoE folder (default: "
                   "the MoEfied SmolLM2, built on first use)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="cuda: experts wait in pinned host memory and load on a side stream")
    p.add_argument("--undistilled", action="store_true",
                   help="the plain MoEfication instead of the distilled MoE")
    p.add_argument("--capacity", type=int, default=77, help="experts in the fast tier")
    p.add_argument("--bandwidth", default="ufs", choices=tuple(PRESETS))
    p.add_argument("--predictors", nargs="+", default=list(PREDICTORS), choices=PREDICTORS)
    p.add_argument("--policies", nargs="+", default=["lru", "predicted"], choices=POLICIES)
    p.add_argument("--lookahead", type=int, nargs="+", default=[2],
                   help="one or more D; the first is used in the sweeps")
    p.add_argument("--margin", type=int, nargs="+", default=[0],
                   help="one or more margins (experts per layer beyond the top-k); the first "
                        "is used in the sweeps")
    p.add_argument("--margin-gap", type=float, nargs="*", default=[],
                   help="also time each margin above 0 with its experts gated by these gaps "
                        "(m2r2 and pre-gating; m2r2core/moe/prefetch.py MARGIN_GAP); the first "
                        "is used in the sweeps when the first margin is above 0")
    p.add_argument("--queues", nargs="+", default=["deadline"], choices=QUEUES,
                   help="prefetch orders on the storage channel to time (the first is used in "
                        "the sweeps); on-demand loading has no prefetches and runs once")
    p.add_argument("--reads", nargs="+", default=[READS[0]], choices=READS,
                   help="who reads a loaded expert's bytes (m2r2core/moe/experts.py READS); "
                        "with several, the whole grid, baselines and oracle included, runs "
                        "under each, and each setting is timed against the baseline of its own")
    p.add_argument("--sweep-capacity", type=int, nargs="*", default=[],
                   help="capacities for the sweep (baseline and the sweep predictors)")
    p.add_argument("--sweep-bandwidth", nargs="*", default=[], choices=tuple(PRESETS))
    p.add_argument("--sweep-predictors", nargs="+", default=["m2r2", "pregate"],
                   choices=PREDICTORS)
    p.add_argument("--sweep-policy", default="predicted", choices=POLICIES)
    p.add_argument("--out", default="bench_out/moe.json", help="JSON report path")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def settings(args: argparse.Namespace) -> list[OffloadConfig]:
    """Every setting to time: the main grid, then the sweeps (each with its own baseline)."""
    out = [_baseline(OffloadConfig(args.capacity, args.bandwidth), args)]
    for predictor in args.predictors:
        # without predictions `predicted` is LRU; `lfu` and `ahead` still differ
        policies = (["lru"] + [q for q in args.policies if q in ("lfu", "ahead")]
                    if predictor == "none" else args.policies)
        lookaheads = [args.lookahead[0]] if predictor in ("none",) else args.lookahead
        queues = [QUEUES[0]] if predictor == "none" else args.queues
        margins = args.margin[:1] if predictor in ("none", "oracle") else args.margin
        for policy in policies:
            for lookahead in lookaheads:
                for queue in queues:
                    for margin in margins:
                        out.extend(OffloadConfig(args.capacity, args.bandwidth, predictor,
                                                 lookahead, margin, policy, queue=queue,
                                                 margin_gap=gap)
                                   for gap in [None, *_gaps(args, predictor, margin)])
    sweep = [(c, args.bandwidth) for c in args.sweep_capacity]
    sweep += [(args.capacity, b) for b in args.sweep_bandwidth]
    for capacity, bw in sweep:
        out.append(_baseline(OffloadConfig(capacity, bw), args))
        for predictor in args.sweep_predictors:
            gap = next(iter(_gaps(args, predictor, args.margin[0])), None)
            out.append(OffloadConfig(capacity, bw, predictor, args.lookahead[0], args.margin[0],
                                     args.sweep_policy, queue=args.queues[0], margin_gap=gap))
    out = [dataclasses.replace(s, reads=reads) for reads in args.reads for s in out]
    seen, unique = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def _gaps(args: argparse.Namespace, predictor: str, margin: int) -> list[float]:
    """The margin gaps to time beside the ungated margin: only router predictors have logits to
    gate, and only a margin above 0 has experts to gate.
    """
    return list(args.margin_gap) if margin and predictor in ROUTER_PREDICTORS else []


def label(s: OffloadConfig) -> str:
    """A setting's key in the report (a margin, its gap, and a prefetch order or reads other
    than the default are appended).
    """
    key = f"{s.predictor}/{s.policy}/D{s.lookahead}/cap{s.capacity}/{s.bandwidth}"
    key += f"/m{s.margin}" if s.margin else ""
    key += f"g{s.margin_gap:g}" if s.margin and s.margin_gap is not None else ""
    key = key if s.queue == QUEUES[0] else f"{key}/{s.queue}"
    return key if s.reads == READS[0] else f"{key}/{s.reads}"


def bench(args: argparse.Namespace, progress: Callable[[int, int, str], None] | None = None,
          offload: OffloadEngine | None = None) -> dict:
    """Time every setting on every prompt (rotating order per repeat); return the report."""
    offload = offload or load_moe(args.model, args.dtype, args.threads,
                                  distilled=not args.undistilled, device=args.device)
    prompts = select_prompts(args)
    grid = settings(args)
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, trace=False, capture_residuals=False)
    offload.generate(prompts[0].text, DecodeConfig(max_new_tokens=4, trace=False),
                     grid[0]).run()  # warm-up: kernels, the page cache of the expert files
    total = len(prompts) * (1 + len(grid) * args.repeats)
    done = 0
    rows = []
    for index, prompt in enumerate(prompts):
        gc.collect()
        reference = offload.generate(prompt.text, cfg, None).run()
        resident_s = reference.decode_ms / 1000.0
        done += 1
        runs: dict[str, list[dict]] = {label(s): [] for s in grid}
        for repeat in range(args.repeats):
            shift = repeat % len(grid)
            for setting in grid[shift:] + grid[:shift]:
                gc.collect()
                run = offload.generate(prompt.text, cfg, setting, reference.routes).run()
                summary = run.summary()
                summary["identical"] = run.token_ids == reference.token_ids
                runs[label(setting)].append(summary)
                done += 1
                if progress:
                    progress(done, total, f"{prompt.id} {label(setting)}")
        row = {"id": prompt.id, "category": prompt.category,
               "new_tokens": len(reference.tokens),
               "resident_tok_per_s": round((len(reference.tokens) - 1) / resident_s, 3)
               if resident_s else None, "settings": {}}
        for s in grid:
            got = runs[label(s)]
            row["settings"][label(s)] = _median_row(got)
        for s in grid:
            base = row["settings"][label(_baseline(s, args))]["decode_ms"]
            mine = row["settings"][label(s)]["decode_ms"]
            row["settings"][label(s)]["speedup_vs_ondemand_lru"] = round(base / mine, 4)
            row["settings"][label(s)]["ceiling"] = round(base / reference.decode_ms, 4)
        rows.append(row)
        print(f"[{index + 1}/{len(prompts)}] {prompt.id}: " + ", ".join(
            f"{k} x{v['speedup_vs_ondemand_lru']:.2f}" for k, v in row["settings"].items()
            if k.endswith(f"cap{args.capacity}/{args.bandwidth}")), file=sys.stderr)
    return {"args": vars(args), "environment": environment(), "model": _model(offload),
            "expert_bytes": offload.store.expert_bytes,
            "chat_template": bool(offload.engine.tokenizer.chat_template),
            "bandwidth_presets": {k: vars(v) for k, v in PRESETS.items()},
            "prompts": rows, "summary": summarise(rows, grid)}


def _model(offload: OffloadEngine) -> dict:
    info = {k: artifacts.portable(v) if isinstance(v, str) else v
            for k, v in vars(offload.engine.info).items()}  # no path of this machine
    info.update(n_experts=offload.moe.n_experts, top_k=offload.moe.top_k,
                total_experts=offload.total_experts, accelerator=offload.accel_note)
    return info


def _baseline(s: OffloadConfig, args: argparse.Namespace) -> OffloadConfig:
    """On-demand LRU at the same capacity, bandwidth and reads."""
    return OffloadConfig(s.capacity, s.bandwidth, BASELINE[0], args.lookahead[0], args.margin[0],
                         BASELINE[1], reads=s.reads)


def _median_row(runs: list[dict]) -> dict:
    """Medians over repeats of the timed fields; identity must hold in every repeat."""
    out = {}
    for key in ("decode_ms", "tok_per_s", "stall_ms_per_token", "hit_rate", "loads_per_token",
                "wasted_per_token"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = round(statistics.median(values), 4) if values else None
    out["recall_by_distance"] = runs[0]["recall_by_distance"]
    out["identical"] = all(r["identical"] for r in runs)
    out["repeats_decode_ms"] = [r["decode_ms"] for r in runs]
    return out


def summarise(rows: list[dict], grid: list[OffloadConfig]) -> dict:
    """Per setting: median over prompts of speedup, tok/s, stall, hit rate; recall pooled."""
    out = {}
    for s in grid:
        key = label(s)
        cells = [r["settings"][key] for r in rows]
        recall: dict[str, list[float]] = {}
        for c in cells:
            for d, v in c["recall_by_distance"].items():
                recall.setdefault(d, []).append(v)
        out[key] = {
            "predictor": s.predictor, "policy": s.policy, "lookahead": s.lookahead,
            "capacity": s.capacity, "bandwidth": s.bandwidth, "queue": s.queue,
            "reads": s.reads,
            "margin": s.margin, "margin_gap": s.margin_gap,
            "speedup_vs_ondemand_lru": round(statistics.median(
                c["speedup_vs_ondemand_lru"] for c in cells), 4),
            "tok_per_s": round(statistics.median(c["tok_per_s"] for c in cells), 3),
            "stall_ms_per_token": round(statistics.median(c["stall_ms_per_token"]
                                                          for c in cells), 3),
            "hit_rate": round(statistics.median(c["hit_rate"] for c in cells), 4),
            "loads_per_token": round(statistics.median(c["loads_per_token"] for c in cells), 3),
            "recall_by_distance": {d: round(statistics.mean(v), 4) for d, v in recall.items()},
            "identical": sum(c["identical"] for c in cells),
            "prompts": len(cells),
            "ceiling": round(statistics.median(c["ceiling"] for c in cells), 4),
        }
    for key, row in out.items():
        oracle = _oracle_of(out, row)
        row["oracle_speedup"] = oracle
        share = share_of_gain(row["speedup_vs_ondemand_lru"], oracle)
        row["share_of_oracle_gain"] = None if share is None else round(share, 4)
    out["resident_tok_per_s"] = round(statistics.median(r["resident_tok_per_s"] for r in rows),
                                      3)
    return out


def _oracle_of(summary: dict, row: dict) -> float | None:
    """The oracle's speedup at a setting's capacity and bandwidth: the same policy, lookahead
    and prefetch order when that was timed, else the best oracle there; None when no oracle ran
    there.
    """
    here = [r for r in summary.values() if r["predictor"] == "oracle"
            and r["capacity"] == row["capacity"] and r["bandwidth"] == row["bandwidth"]
            and r.get("reads", READS[0]) == row.get("reads", READS[0])]
    same = [r for r in here if r["policy"] == row["policy"] and r["lookahead"] == row["lookahead"]
            and r.get("queue") == row.get("queue")]  # the oracle runs at the first margin
    pick = same or here
    return max(r["speedup_vs_ondemand_lru"] for r in pick) if pick else None


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run, print a table and write the JSON report."""
    args = parse_args(argv)

    def progress(done: int, total: int, what: str) -> None:
        print(f"\r{done}/{total} {what[:70]:70s}", end="", file=sys.stderr, flush=True)

    report = bench(args, progress)
    report["command"] = " ".join(["python -m analysis.moe_bench"]
                                 + (sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(file=sys.stderr)
    summary = report["summary"]
    print(f"all experts resident: {summary['resident_tok_per_s']:.1f} tok/s")
    for key, v in summary.items():
        if key == "resident_tok_per_s":
            continue
        share = v["share_of_oracle_gain"]
        print(f"{key:44s} x{v['speedup_vs_ondemand_lru']:.2f} (ceiling x{v['ceiling']:.2f}, "
              f"oracle's gain {'-' if share is None else f'{share:.0%}'})  "
              f"{v['tok_per_s']:6.1f} tok/s  "
              f"stall {v['stall_ms_per_token']:6.1f} ms/tok  hit {v['hit_rate']:.2f}  "
              f"recall {v['recall_by_distance']}  identical {v['identical']}/{v['prompts']}")
    print(f"report: {out}")
    return report


if __name__ == "__main__":
    main()
