r"""`python -m analysis.dtype_bench`: what one forward pass of the model costs in bfloat16 and in
float32 on this machine, for the row counts the engine uses: 1 (a decoding step), 2–9 (verifying
1–8 drafts) and a prompt's worth (prefill). Every variant runs in one process, interleaved, after
the same cached prefix; medians over repeats.

    python -m analysis.dtype_bench --threads 2 --repeats 7 --out benchmarks/dtype_cpu.json
    python -m analysis.dtype_bench --threads 2 --rows 1 2 3 5 9 --narrow --dtypes float32

It answers two questions. Where does bfloat16 pay here? A step of one row is bound by reading the
weights, which bf16 halves; on a CPU without bf16 instructions torch emulates bf16 arithmetic,
and products of many rows (prompts, verification, training) get slower than in float32. And
with --narrow: what the verification pass's products of a few rows cost written as
`weight @ rows.T` (runtime/narrow.py) beside transformers' own `rows @ weight.T`.
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
from m2r2core.runtime.narrow import narrow_products, verified_modules
from m2r2core.runtime.state import DecodeState

PREFIX = 64
DTYPES = ("float32", "bfloat16")


def time_forward(parts, rows: int, prefix: torch.Tensor, repeats_out: list[float],
                 narrow: bool = False) -> None:
    """Append the wall time (ms) of one forward of `rows` new tokens after the cached prefix
    (with `narrow`, inside narrow_products, as verification runs it).
    """
    state = DecodeState(hf_compat.new_cache(parts), torch.Generator())
    forward(parts, prefix, state, keep_states=False)
    ids = prefix[:, :rows] if rows <= prefix.shape[1] else prefix.repeat(1, -(-rows // PREFIX))[
        :, :rows]
    started = time.perf_counter()
    with narrow_products(verified_modules(parts), narrow):
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
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--narrow", action="store_true",
                   help="also time each dtype with the verification pass's narrow products")
    p.add_argument("--out", type=Path, default=Path("bench_out/dtype_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load(EngineConfig(model=args.model, dtype="float32", threads=args.threads))
    parts = {"float32": hf_compat.decoder_parts(loaded.model)}
    if "bfloat16" in args.dtypes:
        parts["bfloat16"] = hf_compat.decoder_parts(
            copy.deepcopy(loaded.model).to(torch.bfloat16))
    variants = [(dtype, False) for dtype in args.dtypes]
    variants += [(dtype, True) for dtype in args.dtypes] if args.narrow else []
    prefix = torch.tensor([loaded.tokenizer(
        "The tides are caused by the gravitational pull of the moon and the sun on the oceans "
        "of the Earth, which rotate beneath two bulges of water." * 4)["input_ids"][:PREFIX]])
    times = {(variant, rows): [] for variant in variants for rows in args.rows}
    for dtype, narrow in variants:  # warm-up
        time_forward(parts[dtype], 2, prefix, [], narrow)
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else list(reversed(variants))
        for rows in args.rows:
            for dtype, narrow in order:
                time_forward(parts[dtype], rows, prefix, times[((dtype, narrow), rows)], narrow)
    table = [table_row(rows, {name(v): statistics.median(times[(v, rows)]) for v in variants})
             for rows in args.rows]
    report = {"command": "python -m analysis.dtype_bench " + " ".join(sys.argv[1:] if argv is None
                                                                       else argv),
              "environment": environment(), "prefix_tokens": PREFIX, "repeats": args.repeats,
              "table": table,
              "all_ms": {f"{name(v)}/{r}": [round(t, 2) for t in ts]
                         for (v, r), ts in times.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("  ".join(f"{key:>18}" for key in table[0]))
    for row in table:
        print("  ".join(f"{value:>18}" for value in row.values()))
    print(f"cpu {report['environment']['cpu_capability']}, faster for batched work: "
          f"{report['environment']['batched_dtype']}; wrote {args.out}")


def name(variant: tuple[str, bool]) -> str:
    """'float32', 'float32+narrow', ..."""
    return variant[0] + ("+narrow" if variant[1] else "")


def table_row(rows: int, ms: dict[str, float]) -> dict:
    """One row of the report: each variant's median and the ratios that answer the questions."""
    row = {"rows": rows} | {f"{variant}_ms": round(t, 2) for variant, t in ms.items()}
    if "float32" in ms and "bfloat16" in ms:
        row["bf16_over_fp32"] = round(ms["bfloat16"] / ms["float32"], 3)
    for dtype in DTYPES:
        if f"{dtype}+narrow" in ms:
            row[f"{dtype}_narrow_over_plain"] = round(ms[f"{dtype}+narrow"] / ms[dtype], 3)
    return row


if __name__ == "__main__":
    main()
