"""The adapters' design variants, compared on an equal budget before a long run.

    python -m m2r2core.train variants --steps 60 [--only rank64 final-target ...]

Every variant trains from scratch with the same seed, data order, learning-rate schedule and
number of steps (so the same training tokens; the wall-clock each took is reported, and
--minutes caps it), then its
teacher-forced lens agreement with the full model is measured by depth on the corpus's dev split
(the tuning split; the reported figures of the chosen adapters are on the test split). Variants
differ only in the overrides listed in VARIANTS. The report (default
`benchmarks/adapter_variants.json`) is rewritten atomically after each variant, and a rerun skips
the variants already in it, so an interrupted comparison resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from m2r2core.engine import environment
from m2r2core.train.adapters import AdapterTraining, held_out_agreement
from m2r2core.train.common import work_dir

log = logging.getLogger("m2r2core.train")

BASELINE = {"rank": 16, "target": "rate", "kv": "shared", "blocks": "same", "warm_start": 0}
"""The shape every variant starts from (the committed adapters' shape)."""

VARIANTS: dict[str, dict] = {
    "baseline": {},
    "rank64": {"rank": 64},
    "final-target": {"target": "final"},
    "own-kv": {"kv": "own"},
    "rate-blocks": {"blocks": "rate"},
    "warm-start": {"warm_start": 40},
}
"""Name → the command-line fields it changes from the baseline (rank 16, rate target, the shared
slow KV cache, fast depth d runs block d, end-to-end from the first step)."""

DEFAULT_REPORT = Path("benchmarks/adapter_variants.json")


def run_variant(args: argparse.Namespace, name: str) -> dict:
    """Train one variant for args.steps (at most args.minutes) and measure it on the dev
    split.
    """
    a = copy.copy(args)
    for field, value in (BASELINE | VARIANTS[name]).items():
        setattr(a, field, value)
    a.run_name, a.restart, a.init, a.eval_every = f"variant-{name}", True, None, 0
    a.out = work_dir(a.model) / "variants" / name
    training = AdapterTraining(a)
    generator = torch.Generator().manual_seed(a.seed)
    stream = training.batches()
    start = time.time()
    deadline = start + args.minutes * 60
    while training.step < a.steps and time.time() < deadline:
        training.train_step(next(stream), generator)
    train_s = time.time() - start
    dev = held_out_agreement(training.parts, training.accel,
                             training.data["dev"][:args.eval_samples], a.seq_len)
    first = training.accel.depths.start
    at = {d: dev["fast"][d - first] for d in (8, 15) if d - first < len(dev["fast"])}
    log.info("variant %s: %d steps, %d tokens, dev agreement %s", name, training.step,
             training.tokens, at)
    return {"overrides": VARIANTS[name], "steps": training.step, "tokens": training.tokens,
            "train_s": round(train_s, 1), "tokens_per_s": round(training.tokens / train_s, 1),
            "dev_agreement_d8": at.get(8), "dev_agreement_d15": at.get(15),
            "dev_lens_agreement": dev, "loss_last": training.last.get("loss"),
            "data": training.source, "dev_samples": min(args.eval_samples,
                                                        len(training.data["dev"]))}


def cmd_variants(args: argparse.Namespace) -> None:
    """Run the variants not yet in the report, one after the other, saving after each."""
    path = args.report or DEFAULT_REPORT
    report = json.loads(path.read_text()) if path.is_file() else {}
    results = report.setdefault("variants", {})
    report.update(minutes=args.minutes, seed=args.seed, dtype=args.dtype, seq_len=args.seq_len,
                  batch_size=args.batch_size, lr=args.lr, kl_depths=args.kl_depths,
                  kl_weight=args.kl_weight, text_share=args.text_share,
                  environment=environment(), argv=getattr(args, "argv", []))
    for name in args.only or list(VARIANTS):
        if name in results:
            log.info("variant %s already measured; skipped", name)
            continue
        results[name] = run_variant(args, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(path)
    print(json.dumps({k: {f: v.get(f) for f in ("steps", "tokens", "dev_agreement_d8",
                                                 "dev_agreement_d15")}
                      for k, v in results.items()}, indent=1))
