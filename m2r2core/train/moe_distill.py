"""Distilling the MoEfied model against the dense one it was cut from.

    python -m m2r2core.train.moe distill --max-minutes 60

The dense model is loaded once. Each MoE layer's MLP is wrapped in a `SparseMLP` that runs it
either as the dense MLP (the teacher) or as the MoE layer the build writes (the student: shared
neurons, plus the router's top-k experts weighted as Qwen2-MoE weights them), with a trainable
router and low-rank corrections of the gate, up and down projections (or, with --full, those
projections' own weights: 77M parameters, a measurement of what the corrections leave, whose
~150 MB file the repository does not carry). A step runs the teacher
without gradients, then the student, and minimises

    KL(dense || MoE) over every position
    + local_weight * each layer's squared error against the dense MLP on the same input
      (relative to the dense output's energy)
    + balance_weight * the Switch load-balancing term (1.0 when experts are used evenly).

Attention, embeddings and norms stay frozen; so do the MoEfication's clustering and its refitted
down projections, which the corrections add to. Data: the distillation corpus of the learned-parts
issue (the dense model's own greedy answers and teacher-forced text; its dev and test splits, and
every evaluation prompt set, are kept out). Held-out figure for choosing the best state:
perplexity on Wikipedia lead sections of the held-out split that the reported perplexity set does
not use. Resumable (checkpoint every --save-every steps), atomic, a progress line per step; the
best state so far is written to the artifacts whenever the dev perplexity improves.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import torch

from m2r2core.moe import distilled
from m2r2core.moe.moefy import TRAINED_DIR, load_trained, refit_all
from m2r2core.train.moe_student import SparseMLP, kl_loss, set_teacher, wrap

log = logging.getLogger(__name__)


def dev_texts(count: int) -> list[str]:
    """Held-out Wikipedia lead sections the reported perplexity set (the first 60 of the same
    shuffle, moe.heldout_texts) never uses: the split the best state is chosen on.
    """
    from m2r2core.train import distill

    articles = distill.wiki_articles("heldout")
    random.Random(0).shuffle(articles)
    return [a["extract"] for a in articles[200:200 + count]]


class Distillation:
    """One distillation run: model, data, optimiser, checkpoint, held-out choice of the best."""

    def __init__(self, args: argparse.Namespace) -> None:
        """Load the dense model, refit the MoEfication, wrap it, and resume a checkpoint."""
        from m2r2core.config import EngineConfig
        from m2r2core.runtime.model import DEFAULT_MODEL, fingerprint, load
        from m2r2core.train import data
        from m2r2core.train.common import work_dir

        self.args = args
        torch.manual_seed(args.seed)
        self.trained = Path(args.trained)
        self.card, tensors = load_trained(self.trained)
        exact = load(EngineConfig(model=DEFAULT_MODEL, dtype="float32", threads=args.threads))
        downs = refit_all(exact.model, exact.tokenizer, tensors, self.card)  # as build does
        self.fp_dense = fingerprint(exact.model)
        del exact
        loaded = load(EngineConfig(model=DEFAULT_MODEL, dtype=args.dtype, threads=args.threads))
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        for p in self.model.parameters():
            p.requires_grad_(False)
        if args.full:
            args.rank = 0
        if args.lr is None:
            args.lr = 5e-5 if args.full else 1e-3
        self.sparse = wrap(self.model, self.card, tensors, downs, args.rank, args.seed,
                           args.full)
        self.model.train()
        routers = [m.router for m in self.sparse.values()]
        fixes = [p for m in self.sparse.values()
                 for p in (*m.fix.values(), *m.weights.values())]
        self.optim = torch.optim.AdamW([{"params": fixes, "lr": args.lr},
                                        {"params": routers, "lr": args.router_lr}],
                                       weight_decay=0.0)
        args.model, args.data = DEFAULT_MODEL, None
        splits, self.data_note = data.datasets(args, self.fp_dense)
        self.train_samples = splits["train"]
        self.run = work_dir(DEFAULT_MODEL) / (args.run_name or "moe-distill")
        self.run.mkdir(parents=True, exist_ok=True)
        self.checkpoint = self.run / "checkpoint.pt"
        self.step, self.best, self.tokens = 0, float("inf"), 0
        if args.restart or not self.checkpoint.is_file():
            if args.init and distilled.exists(self.trained):
                _, saved = distilled.load(self.trained, self.card.base_model)
                for index, mlp in self.sparse.items():
                    mlp.load(saved, index)
        else:
            self._resume()
        self.dev = dev_texts(args.dev_texts)
        self.generator = torch.Generator().manual_seed(args.seed + self.step)
        self.ppl_dense = None

    def _resume(self) -> None:
        state = torch.load(self.checkpoint, weights_only=False, map_location="cpu")
        for index, mlp in self.sparse.items():
            mlp.load(state["tensors"], index)
        self.optim.load_state_dict(state["optim"])
        self.step, self.best, self.tokens = state["step"], state["best"], state["tokens"]
        log.info("resumed from %s at step %d (best dev perplexity %.3f)", self.checkpoint,
                 self.step, self.best)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The distillation as it is now."""
        out = {}
        for index, mlp in self.sparse.items():
            out |= mlp.tensors(index)
        return out

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically."""
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save({"tensors": self.tensors(), "optim": self.optim.state_dict(),
                    "step": self.step, "best": self.best, "tokens": self.tokens}, tmp)
        tmp.replace(self.checkpoint)

    def lr_scale(self) -> float:
        """Linear warm-up, then cosine to a tenth over --steps."""
        a = self.args
        warm = min(1.0, (self.step + 1) / max(1, a.warmup))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(self.step, a.steps)
                                                        / a.steps)))

    def train_step(self, batch) -> dict:
        """One optimiser step on a batch; the step's losses."""
        ids, lengths, _ = batch
        valid = (torch.arange(ids.shape[1])[None] < lengths[:, None]).flatten().nonzero()[:, 0]
        pick = valid[torch.randperm(len(valid), generator=self.generator)[:self.args.kl_positions]]
        head = self.model.lm_head
        set_teacher(self.sparse, True)
        with torch.no_grad():
            teacher = head(self.model.model(ids).last_hidden_state.flatten(0, 1)[pick])
        set_teacher(self.sparse, False)
        student = head(self.model.model(ids).last_hidden_state.flatten(0, 1)[pick])
        kl = kl_loss(student, teacher, torch.ones(len(pick)), self.args.kl_top)
        local = torch.stack([m.losses["local"] for m in self.sparse.values()]).mean()
        balance = torch.stack([m.losses["balance"] for m in self.sparse.values()]).mean()
        loss = kl + self.args.local_weight * local + self.args.balance_weight * balance
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.optim.param_groups for p in g["params"]],
                                       1.0)
        for group, base in zip(self.optim.param_groups, (self.args.lr, self.args.router_lr)):
            group["lr"] = base * self.lr_scale()
        self.optim.step()
        return {"kl": kl.item(), "local": local.item(), "balance": balance.item()}

    def train(self) -> None:
        """Train until --steps or --max-minutes; evaluate, checkpoint and keep the best."""
        from m2r2core.train import data

        a = self.args
        batches = data.bucketed_batches(self.train_samples, a.batch_tokens, a.seq_len,
                                        a.seed + self.step)
        start = time.perf_counter()
        log_path = self.run / "metrics.jsonl"
        if self.step == 0:
            self._evaluate_and_keep(time.perf_counter() - start)
        while self.step < a.steps:
            if a.max_minutes and time.perf_counter() - start > a.max_minutes * 60:
                log.info("time budget reached at step %d", self.step)
                break
            batch = next(batches)
            t0 = time.perf_counter()
            row = self.train_step(batch)
            self.step += 1
            n = int(batch[1].sum())
            self.tokens += n
            row |= {"step": self.step, "tokens": self.tokens, "tokens_per_s":
                    round(n / (time.perf_counter() - t0), 1)}
            with log_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(f"step {self.step}/{a.steps} kl {row['kl']:.3f} local {row['local']:.3f} "
                  f"balance {row['balance']:.3f} {row['tokens_per_s']} tok/s", flush=True)
            if self.step % a.eval_every == 0 or self.step == a.steps:
                self._evaluate_and_keep(time.perf_counter() - start)
            if self.step % a.save_every == 0:
                self.save_checkpoint()
        self.save_checkpoint()

    def _evaluate_and_keep(self, elapsed: float) -> None:
        row = evaluate(self) | {"step": self.step, "tokens": self.tokens,
                                 "elapsed_s": round(elapsed, 1)}
        with (self.run / "eval.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"eval at step {self.step}: dev perplexity {row['dev_ppl']} "
              f"(dense {row['dev_ppl_dense']}, ratio {row['dev_ratio']})", flush=True)
        if self.step and row["dev_ppl"] < self.best:
            self.best = row["dev_ppl"]
            distilled.save(self.trained, self.tensors(), card_for(self, row))
            log.info("dev perplexity improved: wrote %s", self.trained / distilled.WEIGHTS)


def evaluate(run: Distillation) -> dict:
    """Dev perplexity of the student (and, once, of the teacher)."""
    from m2r2core.train.moe import perplexity  # moe.py imports this module

    run.model.eval()
    try:
        if run.ppl_dense is None:
            set_teacher(run.sparse, True)
            run.ppl_dense = perplexity(run.model, run.tokenizer, run.dev)
        set_teacher(run.sparse, False)
        ppl = perplexity(run.model, run.tokenizer, run.dev)
    finally:
        set_teacher(run.sparse, False)
        run.model.train()
    return {"dev_ppl": round(ppl, 3), "dev_ppl_dense": round(run.ppl_dense, 3),
            "dev_ratio": round(ppl / run.ppl_dense, 4)}


def card_for(run: Distillation, metrics: dict) -> distilled.DistilledCard:
    """The card the artifacts carry."""
    a = run.args
    settings = {k: getattr(a, k) for k in (
        "rank", "full", "lr", "router_lr", "kl_top", "kl_positions", "local_weight",
        "balance_weight", "batch_tokens", "seq_len", "text_share", "dtype", "seed", "warmup")}
    return distilled.DistilledCard(
        base_model=run.card.base_model, moefy_digest=distilled.moefy_digest(run.trained),
        rank=a.rank, layers=sorted(run.sparse), steps=run.step, tokens=run.tokens,
        data=run.data_note, settings=settings, metrics=metrics)


def cmd_distill(args: argparse.Namespace) -> None:
    """Run (or resume) a distillation; the best state lands in --trained."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    Distillation(args).train()


def add_parser(sub) -> None:
    """`distill` on the MoE command line."""
    from m2r2core.config import batched_dtype

    d = sub.add_parser("distill", help="distil the MoE against the dense model")
    d.add_argument("--trained", default=str(TRAINED_DIR))
    d.add_argument("--rank", type=int, default=16, help="rank of each projection's correction")
    d.add_argument("--steps", type=int, default=2000)
    d.add_argument("--batch-tokens", type=int, default=2048)
    d.add_argument("--seq-len", type=int, default=256)
    d.add_argument("--full", action="store_true",
                   help="train the experts' full gate, up and down weights instead of low-rank "
                   "corrections (a ~150 MB distillation; for measurement)")
    d.add_argument("--lr", type=float, default=None,
                   help="of the corrections (default 1e-3) or full weights (default 5e-5)")
    d.add_argument("--router-lr", type=float, default=3e-4,
                   help="relative to the router's largest entry")
    d.add_argument("--warmup", type=int, default=20)
    d.add_argument("--kl-positions", type=int, default=512,
                   help="positions per step whose distributions the KL compares (the layer "
                   "losses use all)")
    d.add_argument("--kl-top", type=int, default=64,
                   help="teacher tokens the KL keeps apart (the rest is one tail; 0: all)")
    d.add_argument("--local-weight", type=float, default=0.5)
    d.add_argument("--balance-weight", type=float, default=0.01)
    d.add_argument("--text-share", type=float, default=0.5,
                   help="teacher-forced text windows as this share of the training rows")
    d.add_argument("--dev-texts", type=int, default=30)
    d.add_argument("--eval-every", type=int, default=25)
    d.add_argument("--save-every", type=int, default=10)
    d.add_argument("--max-minutes", type=float, default=0)
    d.add_argument("--dtype", default=batched_dtype())
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--corpus", type=Path, default=None)
    d.add_argument("--run-name", default=None)
    d.add_argument("--restart", action="store_true", help="ignore a checkpoint")
    d.add_argument("--init", action="store_true",
                   help="start from the distillation already in --trained")
    d.set_defaults(func=cmd_distill)


__all__ = ["SparseMLP", "wrap", "set_teacher", "kl_loss", "Distillation", "evaluate", "card_for",
           "add_parser"]
