"""Training the accelerator adapters: batches, the loss, held-out agreement, the training run.

    python -m m2r2core.train adapters [--corpus DIR | --data FILE] [--steps N] ...

The loss is the method note's: sum over fast depths d of (1 - cos(h^f_d, sg h^s_tau(d))) plus
kl_weight * KL(p^s_N || p^f_d) at exit depths. Training tokens are made cheap three ways:
- batches cut by length (`bucketed`): rows of similar length, each batch padded only to its own
  longest row and holding about `batch_tokens` tokens, instead of every row padded to seq_len;
- the teacher (the frozen slow stream) runs once per batch without gradients, and its final
  distribution is read at the KL positions only;
- the precision that is faster for training on the device (`training_dtype`).
Held-out agreement on the corpus's dev split is measured every `eval_every` steps; the best
adapters so far are written to `out` (atomic), so a run interrupted at any point leaves its
best result in place, and the checkpoint resumes it.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from m2r2core.errors import M2R2Error
from m2r2core.runtime import hf_compat
from m2r2core.stream.accel import (
    CARD_NAME,
    WEIGHTS_NAME,
    AccelConfig,
    Accelerator,
    AdapterCard,
    train_fast_states,
)
from m2r2core.train import distill
from m2r2core.train.data import (  # noqa: F401  (also the package's names)
    Batch,
    batches,
    bucketed_batches,
    datasets,
    length_chunks,
    pad_rows,
)
from m2r2core.train.runs import TRAINING_LOG, Run, write_training_log  # noqa: F401

log = logging.getLogger("m2r2core.train")




def training_dtype() -> str:
    """The precision of the frozen model during adapter training: the machine's native one
    (`config.batched_dtype`: bfloat16 on CUDA or a CPU with native bf16 instructions, float32
    where torch emulates bf16). The adapters themselves stay float32; `python -m
    m2r2core.train speed` measures the difference on the machine at hand (BENCHMARKS.md).
    """
    from m2r2core.config import batched_dtype

    return batched_dtype()


def top_token(logits: torch.Tensor) -> torch.Tensor:
    """The argmax over the last dimension: `max(-1).indices`, the same first maximum, which torch
    2.13's CPU kernel finds in half the time of `argmax` over a 49,152-token vocabulary.
    """
    return logits.max(-1).indices


@dataclass(frozen=True)
class Teacher:
    """The full model's distribution at a step's KL positions, computed once for every exit
    depth: its probabilities and negative entropy make each depth's KL(p || q) one product and
    a sum, where `F.kl_div` would redo the exponent and the difference at every depth.
    """

    log_probs: torch.Tensor
    probs: torch.Tensor
    neg_entropy: torch.Tensor
    top: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor) -> Teacher:
        """From the teacher's (P, V) logits (no gradients)."""
        log_probs = F.log_softmax(logits, -1)
        probs = log_probs.exp()
        return cls(log_probs, probs, (probs * log_probs).sum() / len(logits), top_token(logits))

    def kl(self, student_log_probs: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student), the mean over positions (`F.kl_div`'s "batchmean")."""
        return self.neg_entropy - (self.probs * student_log_probs).sum() / len(self.probs)


def slow_states(parts, ids: torch.Tensor) -> tuple[list[torch.Tensor], tuple]:
    """h^s_0..h^s_N for a (B, T) batch (no gradients), and the rotary tables."""
    with torch.no_grad():
        hidden = parts.embed_tokens(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        cache = hf_compat.new_cache(parts)
        masks = hf_compat.attention_masks(parts, hidden, cache, positions)
        rotary = parts.rotary_emb(hidden, positions)
        states = [hidden]
        for index in range(parts.n_layers):
            hidden = hf_compat.call_layer(parts, index, hidden, masks[parts.layer_types[index]],
                                          rotary, positions, None)
            states.append(hidden)
    return states, rotary


def adapter_loss(parts, accel: Accelerator, ids: torch.Tensor, lengths: torch.Tensor,
                 kl_weight: float, kl_positions: int, kl_every: int, generator: torch.Generator,
                 answer_starts: torch.Tensor | None = None,
                 kl_depths: tuple[int, ...] = (), local: bool = False,
                 kl_depth_weights: tuple[float, ...] = ()) -> tuple[torch.Tensor, dict]:
    """The method note's loss: sum over fast depths of (1 - cos(h^f_d, sg h^s_tau(d))), plus
    kl_weight * KL(p^s_N || p^f_d) at exit depths, on a sample of positions.

    Exit depths: `kl_depths` where given (each step's cost grows with their number: one LM-head
    pass per depth), else every kl_every-th fast depth and the deepest one; `kl_depth_weights`,
    one per `kl_depths` entry, multiply their KL terms (default: 1 each). `local`: each fast
    block starts from its input depth's slow target (block-by-block warm start).

    The KL positions are drawn from the answers (chat samples; from `answer_starts`) and the
    plain text, never from the prompt template: exits happen while generating answers.
    """
    n, device = parts.n_layers, ids.device
    slow, rotary = slow_states(parts, ids)
    fast = train_fast_states(parts, accel, slow, rotary, local=local)
    steps = torch.arange(ids.shape[1], device=device)[None]
    valid = steps < lengths[:, None].to(device)  # (B, T)
    cos_terms, kl_terms, metrics = [], [], {}
    kl_valid = valid if answer_starts is None else (
        valid & (steps >= answer_starts[:, None].to(device)))
    flat_valid = kl_valid.reshape(-1).nonzero().squeeze(1).cpu()
    pick = flat_valid[torch.randperm(len(flat_valid), generator=generator)[:kl_positions]]
    pick = pick.to(device)
    with torch.no_grad():
        teacher = Teacher.of(
            parts.lm_head(parts.norm(slow[n].reshape(-1, slow[n].shape[-1])[pick])).float())
    weights = dict(zip(kl_depths, kl_depth_weights, strict=True)) if kl_depth_weights else {}
    exit_depths = [d for d in accel.depths if d in kl_depths] if kl_depths else [
        d for d in accel.depths if (d - accel.first) % kl_every == 0 or d == accel.max_depth]
    for depth, state in zip(accel.depths, fast, strict=True):
        target = slow[accel.config.target_depth(depth, n)]
        cos = F.cosine_similarity(state.float(), target.float(), dim=-1)  # (B, T)
        cos_terms.append(((1 - cos) * valid).sum() / valid.sum())
        metrics[f"cos@{depth}"] = float(((cos * valid).sum() / valid.sum()).detach())
        if depth in exit_depths:
            student = F.log_softmax(parts.lm_head(parts.norm(
                state.reshape(-1, state.shape[-1])[pick])).float(), -1)
            kl = teacher.kl(student)
            kl_terms.append(kl * weights.get(depth, 1.0))
            metrics[f"kl@{depth}"] = float(kl.detach())
            metrics[f"agree@{depth}"] = float((top_token(student.detach()) == teacher.top)
                                              .float().mean())
    loss = torch.stack(cos_terms).sum()
    if kl_terms:
        loss = loss + kl_weight * torch.stack(kl_terms).sum()
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def init_adapters(accel: Accelerator, path: Path) -> None:
    """Start from another run's adapters: a training checkpoint (.pt) or a saved adapter folder
    or file (safetensors). Biases the source lacks start at zero. Adapters of a lower rank grow
    into this rank with the same function when both share the scale alpha / rank (the CLI's
    alpha = 2 x rank): their A rows and B columns fill the first slots, the new B columns stay
    zero. Any other mismatch is refused.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    try:
        state = (load_file(str(path)) if path.suffix == ".safetensors"
                 else torch.load(path, weights_only=False)["adapters"])
        state = _grow_rank({k: v.float() for k, v in state.items()}, accel.state_dict())
        missing, unexpected = accel.load_state_dict(state, strict=False)
    except (OSError, KeyError, RuntimeError) as err:
        raise M2R2Error(f"Cannot start from {path}; the adapters there do not fit this shape "
                        f"({err}).") from err
    if unexpected or any(not k.endswith(".bias") for k in missing):
        raise M2R2Error(f"The adapters in {path} do not fit this shape (missing {missing}, "
                        f"unexpected {unexpected}).")


def _grow_rank(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """Lower-rank A (r, in) and B (out, r) placed in the leading slots of this shape's tensors
    (the rest of A keeps its fresh values, the rest of B is zero, so B A is unchanged).
    """
    out = {}
    for key, value in source.items():
        mine = target.get(key)
        if mine is not None and value.shape != mine.shape and key.endswith((".A", ".B")):
            grown = mine.clone() if key.endswith(".A") else torch.zeros_like(mine)
            if key.endswith(".A") and value.shape[1] == mine.shape[1] and value.shape[0] < \
                    mine.shape[0]:
                grown[:value.shape[0]] = value
                value = grown
            elif key.endswith(".B") and value.shape[0] == mine.shape[0] and value.shape[1] < \
                    mine.shape[1]:
                grown[:, :value.shape[1]] = value
                value = grown
        out[key] = value
    return out


@torch.no_grad()
def held_out_agreement(parts, accel: Accelerator, samples: list[distill.Sample], seq_len: int,
                       batch_tokens: int = 4096) -> dict[str, list[float]]:
    """Teacher-forced logit-lens agreement with the full model's top-1 at every depth of both
    streams, over the answer and plain-text positions of samples the adapters never saw.
    The adapters are measured in eval mode (no dropout) and left in the mode they were in.
    """
    training = accel.training
    accel.eval()
    try:
        return _agreement(parts, accel, samples, seq_len, batch_tokens)
    finally:
        accel.train(training)


def _agreement(parts, accel: Accelerator, samples: list[distill.Sample], seq_len: int,
               batch_tokens: int) -> dict[str, list[float]]:
    """held_out_agreement's count, with the adapters as they are."""
    device = parts.lm_head.weight.device
    hits = {"fast": torch.zeros(accel.n_fast), "slow": torch.zeros(parts.n_layers)}
    count = 0
    for chunk in length_chunks(samples, batch_tokens, seq_len):
        ids, lengths, starts = (t.to(device) for t in pad_rows(chunk, min(
            seq_len, max(len(s.ids) for s in chunk))))
        slow, rotary = slow_states(parts, ids)
        fast = train_fast_states(parts, accel, slow, rotary)
        steps = torch.arange(ids.shape[1], device=device)[None]
        keep = (steps < lengths[:, None]) & (steps >= starts[:, None])  # answers and text
        final = top_token(parts.lm_head(parts.norm(slow[-1][keep])))
        for stream, states in (("slow", slow[1:]), ("fast", fast)):
            for depth, state in enumerate(states):  # one head call per depth keeps memory flat
                top = top_token(parts.lm_head(parts.norm(state[keep])))
                hits[stream][depth] += float((top == final).sum())
        count += len(final)
    return {stream: [round(float(h) / max(count, 1), 4) for h in v] for stream, v in hits.items()}


def accel_config(args: argparse.Namespace) -> AccelConfig:
    """The adapter shape a command line asks for."""
    return AccelConfig(rate=args.rate, rank=args.rank, alpha=2.0 * args.rank,
                       margin=args.margin, branch_layer=args.branch_layer, target=args.target,
                       bias=args.bias, blocks=args.blocks, kv=args.kv)


def set_dropout(accel: Accelerator, share: float) -> None:
    """Dropout on every adapter's input while training (`LowRank.dropout`)."""
    from m2r2core.stream.accel import LowRank

    if not 0.0 <= share < 1.0:
        raise M2R2Error(f"--adapter-dropout must be in [0, 1); got {share}.")
    for module in accel.modules():
        if isinstance(module, LowRank):
            module.dropout = share


def optimizer(accel: Accelerator, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; biases get their own learning-rate multiplier."""
    # A bias has to move by the size of the massive activations it removes (tens to hundreds),
    # while Adam moves every parameter by about lr per step.
    biases = [p for name, p in accel.named_parameters() if name.endswith(".bias")]
    others = [p for name, p in accel.named_parameters() if not name.endswith(".bias")]
    groups = [{"params": others, "lr_mult": 1.0}]
    if biases:
        groups.append({"params": biases, "lr_mult": args.bias_lr_mult})
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """Linear warmup, then cosine to zero at args.steps."""
    return args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(step, args.steps) / args.steps))


class AdapterTraining:
    """One training run of the adapters: data, optimiser, checkpoint, held-out evaluation."""

    def __init__(self, args: argparse.Namespace) -> None:
        """Load the frozen model, the data splits and the adapters (resuming a checkpoint)."""
        from m2r2core.runtime.model import fingerprint
        from m2r2core.train.common import default_out, frozen_model, work_dir

        self.args = args
        loaded, self.parts, _ = frozen_model(args)
        self.device = self.parts.lm_head.weight.device
        self.fingerprint = fingerprint(loaded.model)
        self.data, self.source = datasets(args, self.fingerprint)
        self.accel = Accelerator(self.parts, accel_config(args), seed=args.seed).to(self.device)
        outside = sorted(set(args.kl_depths) - set(self.accel.depths))
        if outside:
            raise M2R2Error(f"--kl-depths {outside} are not fast depths; this stream has depths "
                            f"{self.accel.depths.start}..{self.accel.depths.stop - 1}.")
        weights = getattr(args, "kl_depth_weights", None)
        if weights and len(weights) != len(args.kl_depths):
            raise M2R2Error(f"--kl-depth-weights gives {len(weights)} weights for "
                            f"{len(args.kl_depths)} --kl-depths; give one per depth.")
        if weights and min(weights) < 0:
            raise M2R2Error("--kl-depth-weights must not be negative.")
        set_dropout(self.accel, getattr(args, "adapter_dropout", 0.0))
        self.optim = optimizer(self.accel, args)
        self.run = Run(work_dir(args.model) / (args.run_name or f"adapters-r{args.rate:g}"))
        self.step, self.best, tokens = self.run.resume(self.accel, self.optim, args.restart)
        if args.init and self.step == 0:
            init_adapters(self.accel, args.init)
            log.info("initialised adapters from %s", args.init)
        self.out = args.out or default_out(args.model)
        self.report_depth = min(self.accel.max_depth,
                                math.ceil(self.parts.n_layers / args.rate))
        self.select_depths = tuple(getattr(args, "select_depths", None) or (self.report_depth,))
        outside = sorted(set(self.select_depths) - set(self.accel.depths))
        if outside:
            raise M2R2Error(f"--select-depths {outside} are not fast depths; this stream has "
                            f"depths {self.accel.depths.start}..{self.accel.depths.stop - 1}.")
        self.started, self.tokens, self.last = time.time(), tokens, {}
        self.resumed_tokens = tokens
        """Tokens trained before this process started (a resumed run's)."""
        self.untested = self._saved_untested()
        """The best adapters in `out` still lack their test figures (measured at the end): saved
        by this process, or by this run before it was interrupted and resumed."""

    def _saved_untested(self) -> bool:
        """Whether `out` holds adapters this run saved whose card has no test figures yet."""
        from m2r2core.stream.accel import read_card

        if self.step == 0 or not (self.out / CARD_NAME).is_file():
            return False
        try:
            card = read_card(self.out)
        except M2R2Error:
            return False
        return (card.training.get("run") == self.run.folder.name
                and "held_out_lens_agreement" not in card.metrics)

    def batches(self) -> Iterator[Batch]:
        """The training batches, positioned after the steps already taken."""
        args = self.args
        stream = (batches(self.data["train"], args.batch_size, args.seq_len, args.seed)
                  if args.batching == "padded" else
                  bucketed_batches(self.data["train"],
                                   args.batch_tokens or args.batch_size * args.seq_len,
                                   args.seq_len, args.seed))
        for _ in range(self.step):  # the same data order after a resume
            next(stream)
        return stream

    def train_step(self, batch: Batch, generator: torch.Generator) -> None:
        """One optimiser step on one batch; logs its metrics."""
        args = self.args
        ids, lengths, starts = (t.to(self.device) for t in batch)
        lr = learning_rate(args, self.step)
        for group in self.optim.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        loss, metrics = adapter_loss(self.parts, self.accel, ids, lengths, args.kl_weight,
                                     args.kl_positions, args.kl_every, generator, starts,
                                     tuple(args.kl_depths), local=self.step < args.warm_start,
                                     kl_depth_weights=tuple(args.kl_depth_weights or ()))
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.accel.parameters(), 1.0)
        self.optim.step()
        self.step += 1
        self.tokens += int(lengths.sum())
        elapsed = time.time() - self.started
        self.last = metrics | {"step": self.step, "lr": lr, "tokens": self.tokens,
                               "elapsed_s": elapsed,
                               "tokens_per_s": (self.tokens - self.resumed_tokens) / elapsed}
        self.run.log(self.last)

    def evaluate(self, save: bool = True) -> None:
        """Held-out agreement on the dev samples; a new best is saved with its test figures
        (with save=False it only becomes the figure to beat: the adapters a run starts from).
        """
        args = self.args
        dev = held_out_agreement(self.parts, self.accel, self.data["dev"][:args.eval_samples],
                                 args.seq_len)
        score = sum(dev["fast"][d - self.accel.depths.start]
                    for d in self.select_depths) / len(self.select_depths)
        self.run.log({"step": self.step, "dev_lens_agreement": dev, "dev_score": score,
                      "elapsed_s": round(time.time() - self.started, 1)}, evaluation=True)
        log.info("step %d: dev agreement at depths %s = %.4f (best %.4f)", self.step,
                 "+".join(map(str, self.select_depths)), score, self.best)
        if not save:
            self.best = max(self.best, score)
        elif score > self.best:
            self.best, self.untested = score, True
            self.accel.save(self.out, self.card({"dev": dev, "test": None}))
            write_training_log(self.run, self.out)
            log.info("saved adapters (step %d) to %s", self.step, self.out)
        self.run.save(self.accel, self.optim, self.step, self.best, self.tokens)

    def test_best(self) -> None:
        """The test split's figures for the best adapters the run saved, written into their
        card. Once, at the end: measuring all of test at every new best cost a third of a run.
        """
        from m2r2core.stream.accel import load_accelerator

        best, card = load_accelerator(self.out, self.parts, self.args.model, self.fingerprint)
        best.to(self.device)
        test = held_out_agreement(self.parts, best, self.data["test"], self.args.seq_len)
        card.metrics["held_out_lens_agreement"] = test
        best.save(self.out, card)
        self.untested = False
        log.info("test agreement of the best adapters at depth %d: %.4f", self.report_depth,
                 test["fast"][self.report_depth - best.depths.start])

    def card(self, held_out: dict) -> AdapterCard:
        """The card of the adapters as they are now."""
        args, config = self.args, self.accel.config
        training = {k: getattr(args, k) for k in (
            "steps", "batching", "batch_size", "batch_tokens", "seq_len", "lr", "kl_weight",
            "kl_positions", "kl_every", "kl_depths", "warm_start", "seed", "dtype")}
        training["kl_depth_weights"] = getattr(args, "kl_depth_weights", None)
        training["select_depths"] = list(self.select_depths)
        training["adapter_dropout"] = getattr(args, "adapter_dropout", 0.0)
        return AdapterCard(
            config=vars(config) | {"projections": list(config.projections)},
            model_name=args.model, model_fingerprint=self.fingerprint,
            n_layers=self.parts.n_layers, hidden_size=self.parts.config.hidden_size,
            training=training | {
                "data": self.source, "samples": len(self.data["train"]), "step": self.step,
                "init": args.init.name if args.init else None,
                "bias_lr_mult": args.bias_lr_mult if args.bias else None,
                "device": str(self.device), "threads": torch.get_num_threads(),
                "tokens_this_run": self.tokens, "run": self.run.folder.name,
                "wall_s_this_run": round(time.time() - self.started, 1)},
            metrics={k: round(v, 4) for k, v in self.last.items() if isinstance(v, float)}
            | {"report_depth": self.report_depth, "dev_lens_agreement": held_out["dev"]}
            | ({"held_out_lens_agreement": held_out["test"]} if held_out["test"] else {}),
        )

    def train(self) -> None:
        """Train to args.steps or the wall-clock budget, evaluating every eval_every steps."""
        from m2r2core.train.common import progress_bar

        args = self.args
        generator = torch.Generator().manual_seed(args.seed + self.step)
        stream, bar = self.batches(), progress_bar("training adapters")
        deadline = self.started + args.max_minutes * 60 if args.max_minutes else math.inf
        if args.init and args.eval_every and self.step == 0:
            self.evaluate(save=False)  # the adapters started from are the figure to beat
        while self.step < args.steps and time.time() < deadline:
            self.train_step(next(stream), generator)
            bar(self.step, args.steps)
            if args.eval_every and self.step % args.eval_every == 0:
                self.evaluate()
            elif self.step % args.save_every == 0:
                self.run.save(self.accel, self.optim, self.step, self.best, self.tokens)
        if not args.eval_every or self.step % args.eval_every:
            self.evaluate()
        if self.untested:
            self.test_best()


def cmd_adapters(args: argparse.Namespace) -> None:
    """Train the accelerator adapters (see AdapterTraining)."""
    AdapterTraining(args).train()
