r"""`python -m m2r2core.train.answer_bench`: what answering the distillation corpus costs,
transformers' greedy `generate` against the corpus's own loop (`distill.greedy_answers`: the LM
head fed a contiguous input, finished rows leaving the batch), on the same batch, in one process,
interleaved; medians over repeats, and whether every answer is the same token for token.

    python -m m2r2core.train.answer_bench --threads 1 --batch 96 --repeats 2 \
        --out benchmarks/answer_speed.json

The batch is instructions written from the Wikipedia train split with the corpus's templates
(seeded), sorted by prompt length as the corpus's shards are, `--skip` shortest left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from m2r2core.config import EngineConfig
from m2r2core.engine import environment
from m2r2core.runtime.model import load
from m2r2core.runtime.prompt import encode
from m2r2core.train import distill


def generate_answers(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int
                     ) -> list[list[int]]:
    """Greedy `generate` of transformers, each row cut after its first end-of-sequence token."""
    eos = distill.eos_ids(model)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=0)
    answers = []
    for row in out[:, ids.shape[1]:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), len(row) - 1)
        answers.append(row[:stop + 1])
    return answers


METHODS = {"generate": generate_answers, "greedy_answers": distill.greedy_answers}


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m m2r2core.train.answer_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EngineConfig.model)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=96, help="instructions answered in one batch")
    p.add_argument("--skip", type=int, default=100, help="shortest instructions left out")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench_out/answer_speed.json"))
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.max_new_tokens < 1:
        p.error("--batch, --repeats and --max-new-tokens must be at least 1")
    torch.set_num_threads(args.threads)
    loaded = load(EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads))
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = distill.instructions(distill.wiki_articles("train"), 4 * (args.batch + args.skip), 0)
    encoded = sorted((encode(tokenizer, t) for t in texts), key=len)[args.skip:]
    encoded = encoded[:args.batch]
    ids, mask = distill.left_padded(encoded, 0)
    seconds: dict[str, list[float]] = {name: [] for name in METHODS}
    answers: dict[str, list[list[int]]] = {}
    for repeat in range(args.repeats):
        order = list(METHODS) if repeat % 2 == 0 else list(reversed(METHODS))
        for name in order:
            start = time.perf_counter()
            answers[name] = METHODS[name](model, ids, mask, args.max_new_tokens)
            seconds[name].append(time.perf_counter() - start)
    tokens = sum(map(len, answers["generate"]))
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    report = {
        "command": "python -m m2r2core.train.answer_bench " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "environment": environment(), "dtype": args.dtype, "threads": args.threads,
        "batch": len(encoded), "prompt_tokens": [len(encoded[0]), ids.shape[1]],
        "max_new_tokens": args.max_new_tokens, "answer_tokens": tokens,
        "answers_at_cap": sum(len(a) >= args.max_new_tokens for a in answers["generate"]),
        "seconds": {name: [round(x, 2) for x in s] for name, s in seconds.items()},
        "answer_tokens_per_s": {name: round(tokens / m, 1) for name, m in medians.items()},
        "speedup": round(medians["generate"] / medians["greedy_answers"], 3),
        "identical_rows": sum(a == b for a, b in zip(answers["generate"],
                                                     answers["greedy_answers"], strict=True)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, rate in report["answer_tokens_per_s"].items():
        print(f"{name:>15}: {rate:7.1f} answer tokens/s (median of {args.repeats})")
    print(f"speedup {report['speedup']}x; identical rows {report['identical_rows']} of "
          f"{len(encoded)}; wrote {args.out}")


if __name__ == "__main__":
    main()
