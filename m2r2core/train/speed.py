"""Training tokens per second of the adapter trainer, before and after, in one run.

    python -m m2r2core.train speed --steps 6 --report benchmarks/train_speed.json

"Before" is the trainer as it was on CPU: every batch --batch-size rows padded to --seq-len, in
float32. "After" is the default now: bucketed batches of the same token budget, in
`training_dtype()` (the machine's native precision: bfloat16 where the CPU has native bf16).
Both train fresh adapters on the same corpus samples, with the same loss settings and threads;
a token counts when it is a real (not padding) position. Reports the median over steps after a
warm-up step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from m2r2core.config import EngineConfig
from m2r2core.engine import environment
from m2r2core.runtime import hf_compat
from m2r2core.runtime.model import load
from m2r2core.stream.accel import Accelerator
from m2r2core.train.adapters import (
    accel_config,
    adapter_loss,
    batches,
    bucketed_batches,
    datasets,
    optimizer,
    training_dtype,
)


def measure(args: argparse.Namespace, dtype: str, batching: str, samples: list) -> dict:
    """Median valid tokens per second of `args.steps` training steps in one setting."""
    loaded = load(EngineConfig(model=args.model, dtype=dtype, threads=args.threads))
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    parts = hf_compat.decoder_parts(loaded.model)
    accel = Accelerator(parts, accel_config(args), seed=args.seed)
    optim = optimizer(accel, args)
    stream = (batches(samples, args.batch_size, args.seq_len, args.seed) if batching == "padded"
              else bucketed_batches(samples, args.batch_size * args.seq_len, args.seq_len,
                                    args.seed))
    gen = torch.Generator().manual_seed(args.seed)
    rates, padded = [], []
    for step in range(args.steps + 1):
        ids, lengths, starts = next(stream)
        started = time.perf_counter()
        loss, _ = adapter_loss(parts, accel, ids, lengths, args.kl_weight, args.kl_positions,
                               args.kl_every, gen, starts, tuple(args.kl_depths))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        wall = time.perf_counter() - started
        if step:  # the first step warms up allocators and kernels
            rates.append(float(lengths.sum()) / wall)
            padded.append(ids.numel() / wall)
    return {"dtype": dtype, "batching": batching,
            "valid_tokens_per_s": round(statistics.median(rates), 1),
            "all_tokens_per_s": round(statistics.median(padded), 1),
            "steps": args.steps}


def cmd_speed(args: argparse.Namespace) -> None:
    """Measure before and after; print and write the report."""
    from m2r2core.runtime.model import fingerprint

    torch.manual_seed(args.seed)
    probe = load(EngineConfig(model=args.model, dtype="float32", threads=args.threads))
    data, source = datasets(args, fingerprint(probe.model))
    del probe
    before = measure(args, "float32", "padded", data["train"])
    after = measure(args, training_dtype(), "bucketed", data["train"])
    report = {
        "command": "python -m m2r2core.train " + " ".join(args.argv),
        "data": source, "environment": environment(),
        "settings": {k: getattr(args, k) for k in (
            "batch_size", "seq_len", "rank", "kl_positions", "kl_depths", "kl_weight")},
        "before": before, "after": after,
        "speedup_valid_tokens": round(after["valid_tokens_per_s"]
                                      / before["valid_tokens_per_s"], 2),
    }
    print(json.dumps(report, indent=2))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
