r"""`python -m analysis.dtype_bench`: what one forward pass of the model costs in bfloat16 and in
float32 on this machine, for the row counts the engine uses: 1 (a decoding step), 9 (verifying 8
drafts) and a prompt's worth (prefill). Both precisions run in one process, interleaved, after
the same cached prefix; medians over repeats.

    python -m analysis.dtype_bench --threads 2 --repeats 7 --out benchmarks/dtype_cpu.json

It answers one question: where does bfloat16 pay here? A step of one row is bound by reading the
weights, which bf16 halves; on a CPU without bf16 instructions torch emulates bf16 arithmetic,
and products of many rows (prompts, verification, training) get slower than in float32.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from m2r2core.config import EngineConfig
from m2r2core.engine import environment
from m2r2core.runtime import hf_compat
from m2r2core.runtime.decode import forward
from m2r2core.runtime.model import load
from m2r2core.runtime.state import DecodeState

PREFIX = 64


def time_forward(parts, rows: int, prefix: torch.Tensor, repeats_out: list[float]) -> None:
    """Append the wall time (ms) of one forward of `rows` new tokens after the cached prefix."""
    state = DecodeState(hf_compat.new_cache(parts), torch.Generator())
    forward(parts, prefix, state, keep_states=False)
    ids = prefix[:, :rows] if rows <= prefix.shape[1] else prefix.repeat(1, -(-rows // PREFIX))[
        :, :rows]
    started = time.perf_counter()
    # Verification reads every row's logits; a prompt only its last one.
    forward(parts, ids, state, keep_states=False, all_positions=1 < rows <= 16)
    repeats_out.append((time.perf_counter() - started) * 1000)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m analysis.dtype_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EngineConfig.model)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 9, 128])
    p.add_argument("--out", type=Path, default=Path("bench_out/dtype_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load(EngineConfig(model=args.model, dtype="float32", threads=args.threads))
    models = {"float32": loaded.model,
              "bfloat16": copy.deepcopy(loaded.model).to(torch.bfloat16)}
    parts = {name: hf_compat.decoder_parts(m) for name, m in models.items()}
    prefix = torch.tensor([loaded.tokenizer(
        "The tides are caused by the gravitational pull of the moon and the sun on the oceans "
        "of the Earth, which rotate beneath two bulges of water." * 4)["input_ids"][:PREFIX]])
    times = {(name, rows): [] for name in models for rows in args.rows}
    for name in models:  # warm-up
        time_forward(parts[name], 1, prefix, [])
    for repeat in range(args.repeats):
        order = list(models) if repeat % 2 == 0 else list(reversed(models))
        for rows in args.rows:
            for name in order:
                time_forward(parts[name], rows, prefix, times[(name, rows)])
    table = []
    for rows in args.rows:
        fp32 = statistics.median(times[("float32", rows)])
        bf16 = statistics.median(times[("bfloat16", rows)])
        table.append({"rows": rows, "float32_ms": round(fp32, 2), "bfloat16_ms": round(bf16, 2),
                      "bf16_over_fp32": round(bf16 / fp32, 3)})
    report = {"command": "python -m analysis.dtype_bench " + " ".join(sys.argv[1:] if argv is None
                                                                       else argv),
              "environment": environment(), "prefix_tokens": PREFIX, "repeats": args.repeats,
              "table": table,
              "all_ms": {f"{n}/{r}": [round(t, 2) for t in v] for (n, r), v in times.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'rows':>5} {'float32 ms':>11} {'bfloat16 ms':>12} {'bf16/fp32':>10}")
    for row in table:
        print(f"{row['rows']:>5} {row['float32_ms']:>11} {row['bfloat16_ms']:>12} "
              f"{row['bf16_over_fp32']:>10}")
    print(f"cpu {report['environment']['cpu_capability']}, faster for batched work: "
          f"{report['environment']['batched_dtype']}; wrote {args.out}")


if __name__ == "__main__":
    main()
