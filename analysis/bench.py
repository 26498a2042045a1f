"""`python -m analysis.bench`: the engine's own decoding against transformers' `generate` on a
real prompt set, same process, same dtype, same threads; medians over interleaved repeats.

Writes a JSON report (config, command line, versions, per-prompt timings and output equality)
and prints a table. Example:

    python -m analysis.bench --prompts mt-bench --limit 20 --max_new_tokens 128 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from analysis.prompts import load_prompts
from m2r2core.config import DecodeConfig, EngineConfig
from m2r2core.engine import Engine, environment

METHODS = ("hf_generate", "engine", "engine_traced")


@dataclass
class BenchArgs:
    """Command-line arguments of the benchmark."""

    prompts: str = field(default="mt-bench", metadata={"help": "named set or JSONL file"})
    limit: int = field(default=20, metadata={"help": "first N prompts"})
    max_new_tokens: int = 128
    dtype: str = "bfloat16"
    threads: int = 2
    repeats: int = 3
    model: str = EngineConfig.model
    out: str = field(default="bench_out/decode.json", metadata={"help": "JSON report path"})


def run_parser(prog: str, doc: str, max_new_tokens: int, repeats: int
               ) -> argparse.ArgumentParser:
    """The arguments every benchmark CLI shares: prompt set and selection, budget, dtype,
    threads, repeats.
    """
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default="mt-bench", help="named set or JSONL file")
    p.add_argument("--limit", type=int, default=0, help="first N prompts (0: all)")
    p.add_argument("--per-category", type=int, default=0,
                   help="first N prompts of each category (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=repeats)
    return p


def run_method(engine: Engine, method: str, text: str, max_new_tokens: int,
               **generate_kwargs: object) -> tuple[float, tuple[int, ...]]:
    """Generate once with a method; return (wall seconds, generated ids).

    `generate_kwargs` go to transformers' `generate` (hf_generate only): e.g. prompt lookup.
    """
    cfg = DecodeConfig(max_new_tokens=max_new_tokens, trace=method == "engine_traced",
                       capture_residuals=False)
    if method == "hf_generate":
        ids = torch.tensor([engine.encode(text, cfg)], device=engine.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=max_new_tokens, **generate_kwargs)
        return time.perf_counter() - start, tuple(out[0, ids.shape[1]:].tolist())
    start = time.perf_counter()
    result = engine.run(text, cfg)
    return time.perf_counter() - start, result.trace.token_ids


def bench(args: BenchArgs) -> dict:
    """Run every method on every prompt, interleaved in rotating order, `repeats` times."""
    engine = Engine.load(EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads))
    prompts = load_prompts(args.prompts, args.limit)
    run_method(engine, "engine_traced", prompts[0].text, 8)  # warm-up: kernels, caches
    rows = []
    for index, prompt in enumerate(prompts):
        timings = {m: [] for m in METHODS}
        outputs = {}
        for repeat in range(args.repeats):
            # rotate the order each repeat so no method always runs first (or after another)
            order = METHODS[repeat % len(METHODS):] + METHODS[:repeat % len(METHODS)]
            for method in order:
                gc.collect()  # start every timed run with the same collector state
                seconds, ids = run_method(engine, method, prompt.text, args.max_new_tokens)
                timings[method].append(seconds)
                outputs[method] = ids
        tokens = {m: len(outputs[m]) for m in METHODS}
        rows.append({
            "id": prompt.id, "category": prompt.category, "new_tokens": tokens,
            "seconds": timings,
            "tokens_per_s": {m: tokens[m] / statistics.median(timings[m]) for m in METHODS},
            "identical_to_hf": {m: outputs[m] == outputs["hf_generate"] for m in METHODS},
        })
        print(f"[{index + 1}/{len(prompts)}] {prompt.id}: " + ", ".join(
            f"{m} {rows[-1]['tokens_per_s'][m]:.1f} tok/s" for m in METHODS), file=sys.stderr)
    return {"args": asdict(args), "command": " ".join(["python -m analysis.bench"] + sys.argv[1:]),
            "environment": environment(), "model": asdict(engine.info), "prompts": rows,
            "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    """Medians over prompts of tokens/s and of per-prompt speed ratios."""
    def median_of(key):
        return {m: statistics.median(r[key][m] for r in rows) for m in METHODS}

    ratio = {m: statistics.median(r["tokens_per_s"][m] / r["tokens_per_s"]["hf_generate"]
                                  for r in rows) for m in METHODS}
    return {
        "median_tokens_per_s": median_of("tokens_per_s"),
        "median_speed_ratio_vs_hf_generate": ratio,
        "traced_over_untraced_time": statistics.median(
            r["tokens_per_s"]["engine"] / r["tokens_per_s"]["engine_traced"] for r in rows),
        "identical_outputs": {m: sum(r["identical_to_hf"][m] for r in rows) for m in METHODS},
        "prompts": len(rows),
    }


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run, print a table and write the JSON report."""
    (args,) = HfArgumentParser(BenchArgs).parse_args_into_dataclasses(args=argv)
    report = bench(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    summary = report["summary"]
    for method in METHODS:
        print(f"{method:14s} {summary['median_tokens_per_s'][method]:7.1f} tok/s  "
              f"x{summary['median_speed_ratio_vs_hf_generate'][method]:.3f} vs generate  "
              f"identical {summary['identical_outputs'][method]}/{summary['prompts']}")
    print(f"tracing costs x{summary['traced_over_untraced_time']:.3f} time; report: {out}")
    return report


if __name__ == "__main__":
    main()
