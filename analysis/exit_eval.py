r"""Early-exit evaluation: every rule x stream x threshold on real prompt sets, against the full
model measured in the same run.

    python -m analysis.exit_eval --prompts koala selfinstruct vicuna mt-bench --limit 3 \\
        --max-new-tokens 64 --out benchmarks/exits_bf16.json --chart docs/exits_pareto.html

Per prompt: one traced full-model run (lens agreement by layer for both streams, and
teacher-forced agreement of every rule on a fine threshold grid), one timed plain run, and one
timed early-exit run per configuration of the grid. Per configuration: ROUGE-L against the full
model's own output and against the set's reference answers, teacher-forced token agreement,
mean exit layer, the measured speedup (median over prompts of plain time / exit time per
token, same prompts, dtype and threads), and its break-even line (analysis/ledger.py: the exit
distribution and unit costs, the speedup they predict, the mean exit depth 1.0x would need).

`--check-depths 8 12 15 17` adds, for the streams of `--check-streams` (the fast stream by
default), each rule checked only at those depths (ExitRule.depths) beside the same rule checked at
every depth; such a setting is labelled `rule@8,12,15,17` in the report's curves.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from analysis import exits as ex
from analysis.ledger import exit_ledger
from analysis.prompts import load_prompts
from m2r2core.config import DecodeConfig, EngineConfig
from m2r2core.engine import Engine, environment
from m2r2core.exits.early_exit import NARROW_MODES, ExitConfig
from m2r2core.exits.routers import LEARNED, RULES, ExitRule

QUALITY_TARGET = 0.9


def default_grid(fast_depth: int, n_layers: int) -> dict[tuple[str, str], list[float]]:
    """Thresholds decoded for real, per (stream, rule)."""
    grid = {}
    for stream, depth in (("fast", fast_depth), ("slow", n_layers), ("tuned", n_layers)):
        # up to strict thresholds: one wrong token changes the rest of a greedy answer, so
        # ROUGE-L 0.9 against the full model needs exits that are almost never wrong
        grid[(stream, "arla")] = [0.6, 0.8, 0.9, 0.97, 0.99, 0.997]
        grid[(stream, "mlp")] = [0.6, 0.8, 0.9, 0.97, 0.99, 0.997]
        grid[(stream, "confidence")] = [0.3, 0.5, 0.7, 0.9, 0.97, 0.99]
        grid[(stream, "entropy")] = [0.5, 0.65, 0.8, 0.9, 0.95, 0.98]
        grid[(stream, "saturation")] = [0.9, 0.95, 0.98, 0.995]
        layers = ([8, 10, 12, 15] if stream == "fast" else [12, 18, 24, 28])
        grid[(stream, "static")] = [round(min(depth, x) / depth, 4) for x in layers]
    for rule in LEARNED:  # the routers are trained on the fast and slow streams only
        grid.pop(("tuned", rule))
    return grid


def _timed(generation) -> tuple[list, float]:
    steps = list(generation)
    return steps, generation.ms_per_token


def _break_even(generation, steps: list, full_ms: float, ms: float, rule: ExitRule) -> dict:
    """The run's ledger (analysis/ledger.py): its exit distribution and unit costs as fractions
    of a full-model step, the speedup they predict beside the measured one, and the mean exit
    depth 1.0x would need at those costs (None: out of reach even at depth 1).
    """
    book = exit_ledger(steps, generation.loop.ledger_costs, full_ms, ms, rule.min_layer,
                       rule.depths)
    return {"mean_depth": book.mean_depth, "checks_per_token": book.checks_per_token,
            "block_cost": book.block_cost, "check_cost": book.check_cost,
            "head_cost": book.head_cost, "fill_cost": book.fill_cost,
            "predicted": book.predicted_speedup, "measured": book.measured_speedup,
            "needed_depth_1x": book.needed_depth(1.0)}


def _exit_run(engine: Engine, prompt, plain_cfg: DecodeConfig, cfg: ExitConfig, full_steps,
              full_ms: float, full_text: str) -> dict:
    """One early-exit generation measured against the full model's run of the same prompt."""
    generation = engine.generate_exits(prompt.text, plain_cfg, cfg)
    steps, ms = _timed(generation)
    text = engine.tokenizer.decode([s.token_id for s in steps], skip_special_tokens=True)
    return {
        "prompt_id": prompt.id, "tokens": len(steps), "ms_per_token": ms,
        "full_ms_per_token": full_ms, "speedup": full_ms / ms if ms > 0 else float("nan"),
        "rouge_full": ex.rouge_l(text, full_text),
        "rouge_ref": ex.rouge_l(text, prompt.reference) if prompt.reference else None,
        "mean_exit_layer": float(np.mean([s.exit_layer for s in steps[1:]]))
        if len(steps) > 1 else float(engine.parts.n_layers),
        "identical": [s.token_id for s in steps] == [s.token_id for s in full_steps],
        "ledger": _break_even(generation, steps, full_ms, ms, cfg.rule),
    }


def _summarise(key: ExitRule, runs: list[dict], steps: tuple, n: int) -> dict:
    """One setting's figures over every prompt, with its offline (re-decided) agreement."""
    offline = ex.summary(ex.decide_all(steps, key.stream, key.rule, key.threshold, key.min_layer,
                                       n, key.depths), n)
    refs = [r["rouge_ref"] for r in runs if r["rouge_ref"] is not None]
    return {
        "stream": key.stream, "rule": key.rule, "threshold": key.threshold,
        "depths": list(key.depths),
        "speedup": statistics.median(r["speedup"] for r in runs),
        "rouge_full": float(np.mean([r["rouge_full"] for r in runs])),
        "rouge_ref": float(np.mean(refs)) if refs else None,
        "agreement": offline["agreement"],
        "mean_exit_layer": float(np.mean([r["mean_exit_layer"] for r in runs])),
        "identical_outputs": sum(r["identical"] for r in runs),
        "break_even": _median_ledger([r["ledger"] for r in runs]), "runs": runs,
    }


def _median_ledger(ledgers: list[dict]) -> dict:
    """A setting's break-even line: the median over prompts of each ledger figure (the depth
    1.0x needs is None when no prompt's costs allow it at any depth).
    """
    out = {}
    for key in ledgers[0]:
        values = [b[key] for b in ledgers if b[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def evaluate(engine: Engine, prompt_sets: list[str], limit: int, max_new_tokens: int,
             rules: list[str], streams: list[str], min_layer: int, kv_fill: str,
             progress=None, narrow: str = ExitConfig.narrow,
             check_depths: tuple[int, ...] = (), check_streams: tuple[str, ...] = ("fast",)
             ) -> dict:
    """Run the whole evaluation; returns the JSON-ready report. `narrow`: ExitConfig.narrow
    (the exit decoder's products of a few rows). `check_depths`: on `check_streams`, each rule
    also checked only at those depths (ExitRule.depths).
    """
    n = engine.parts.n_layers
    fast_depth = engine.accel.first + engine.accel.n_fast if engine.accel else 0
    available = engine.capabilities().streams
    streams = [s for s in streams if s in available]
    grid = {k: v for k, v in default_grid(fast_depth, n).items()
            if k[0] in streams and k[1] in rules}
    settings = [ExitRule(rule, stream, threshold, min_layer, depths)
                for (stream, rule), thresholds in grid.items()
                for depths in [()] + ([tuple(check_depths)] if stream in check_streams
                                      and check_depths else [])
                for threshold in thresholds]
    for setting in settings:  # a bad depth is refused before the first prompt, not mid-run
        setting.validate(fast_depth if setting.stream == "fast" else n)
    plain_cfg = DecodeConfig(max_new_tokens=max_new_tokens, trace=False)
    traced_cfg = DecodeConfig(max_new_tokens=max_new_tokens, capture_residuals=False)
    prompts = [(name, p) for name in prompt_sets for p in load_prompts(name, limit)]
    total = len(prompts) * (2 + len(settings))
    done = 0
    traced_steps, rows = [], []
    per_config: dict[ExitRule, list[dict]] = {}
    for set_name, prompt in prompts:
        traced = engine.run(prompt.text, traced_cfg).trace
        traced_steps.extend(traced.steps[1:])  # the first token comes from the prefill
        full_steps, full_ms = _timed(engine.generate(prompt.text, plain_cfg))
        full_text = engine.tokenizer.decode([s.token_id for s in full_steps],
                                            skip_special_tokens=True)
        done += 2
        for setting in settings:
            cfg = ExitConfig(setting, kv_fill, narrow)
            per_config.setdefault(setting, []).append(
                {"set": set_name} | _exit_run(engine, prompt, plain_cfg, cfg, full_steps,
                                               full_ms, full_text))
            done += 1
            if progress:
                progress(done, total)
        rows.append({"set": set_name, "prompt_id": prompt.id, "full_ms_per_token": full_ms,
                     "full_rouge_ref": ex.rouge_l(full_text, prompt.reference)
                     if prompt.reference else None})
        gc.collect()
    return _report(engine, tuple(traced_steps), rows, per_config, fast_depth,
                   {"prompt_sets": prompt_sets, "limit": limit, "max_new_tokens": max_new_tokens,
                    "min_layer": min_layer, "kv_fill": kv_fill, "narrow": narrow,
                    "check_depths": list(check_depths),
                    "check_streams": list(check_streams) if check_depths else []})


def _report(engine: Engine, steps: tuple, rows: list[dict],
            per_config: dict[ExitRule, list[dict]], fast_depth: int, settings: dict) -> dict:
    """The JSON-ready report of an evaluation from its traced steps and per-setting runs."""
    n, min_layer = engine.parts.n_layers, settings["min_layer"]
    configs = [_summarise(key, runs, steps, n) for key, runs in per_config.items()]
    curves, sweeps, recorded = {}, {}, ex.available_rules(steps)
    for stream, rule, depths in sorted({ex.config_key(c) for c in configs}):
        key = f"{stream}/{ex.setting_label(rule, depths)}"
        pts = [c for c in configs if ex.config_key(c) == (stream, rule, depths)]
        curves[key] = ex.speedup_at_quality(pts, QUALITY_TARGET)
        if rule in recorded.get(stream, ()):
            sweeps[key] = ex.threshold_sweep(steps, stream, rule, min_layer, n, depths=depths)
    refs = [r["full_rouge_ref"] for r in rows if r["full_rouge_ref"] is not None]
    return {
        "environment": environment() | {"dtype": engine.info.dtype},
        "model": engine.info.name, "n_layers": n, "fast_depth": fast_depth,
        "adapters": engine.accel_card.training if engine.accel_card else None,
        **settings,
        "lens_agreement_by_layer": ex.lens_agreement_by_layer(steps),
        "alignment_by_layer": ex.alignment_by_layer(steps),
        "full_model": {"rouge_ref": float(np.mean(refs)) if refs else None,
                       "ms_per_token_median": statistics.median(
                           r["full_ms_per_token"] for r in rows)},
        # null, not NaN, where no configuration reaches the target: strict JSON readers refuse NaN
        "speedup_at_rouge_0.9": {k: (v if v == v else None) for k, v in curves.items()},
        "configs": configs, "offline_sweeps": sweeps,
        "traced_tokens": len(steps),
    }


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m analysis.exit_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", nargs="+", default=["koala", "selfinstruct", "vicuna",
                                                     "mt-bench"],
                   help="named sets or JSONL files with a 'prompt' field")
    p.add_argument("--limit", type=int, default=3, help="prompts per set")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    p.add_argument("--streams", nargs="+", default=["fast", "slow", "tuned"],
                   choices=["fast", "slow", "tuned"],
                   help="tuned: the slow stream read through the tuned lens (when one is loaded)")
    p.add_argument("--min-layer", type=int, default=4)
    p.add_argument("--check-depths", nargs="+", type=int, default=[],
                   help="also run each rule checked only at these depths (e.g. the fast "
                        "stream's KL depths 8 12 15 17), beside every depth from --min-layer")
    p.add_argument("--check-streams", nargs="+", default=["fast"],
                   choices=["fast", "slow", "tuned"],
                   help="the streams --check-depths applies to")
    p.add_argument("--kv-fill", default="jit", choices=["jit", "copy"])
    p.add_argument("--narrow", default=ExitConfig.narrow, choices=NARROW_MODES,
                   help="the exit decoder's products of a few rows (runtime/narrow.py)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/exits.json"))
    p.add_argument("--chart", type=Path, default=None, help="write the Pareto chart (HTML)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    engine = Engine.load(EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads))
    from tqdm import tqdm

    bar = tqdm(desc="early-exit evaluation", unit="run")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    started = time.time()
    report = evaluate(engine, args.prompts, args.limit, args.max_new_tokens, args.rules,
                      args.streams, args.min_layer, args.kv_fill, progress, args.narrow,
                      tuple(args.check_depths), tuple(args.check_streams))
    bar.close()
    report["wall_s"] = round(time.time() - started, 1)
    report["command"] = "python -m analysis.exit_eval " + " ".join(argv or __import__(
        "sys").argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, allow_nan=False))
    if args.chart:
        from app.exit_charts import pareto_figure  # plotly only when a chart is asked for

        args.chart.parent.mkdir(parents=True, exist_ok=True)
        pareto_figure(report["configs"]).write_html(args.chart, include_plotlyjs="cdn")
    for key, value in report["speedup_at_rouge_0.9"].items():
        shown = "none reaches it" if value is None else f"{value:.2f}"
        print(f"{key:28s} speedup at ROUGE-L {QUALITY_TARGET}: {shown}")
    print("lens agreement at depth", {k: [round(x, 2) for x in v]
                                      for k, v in report["lens_agreement_by_layer"].items()})
    return report


if __name__ == "__main__":
    main()
