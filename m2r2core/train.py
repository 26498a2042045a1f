"""Training the accelerated stream's adapters and the exit routers, on CPU or CUDA.

    python -m m2r2core.train data      # self-distillation corpus (m2r2core/distill.py)
    python -m m2r2core.train adapters  # accelerator adapters (resumable checkpoints)
    python -m m2r2core.train routers   # ARLA and the MLP baseline, on the trained fast stream
    python -m m2r2core.train medusa    # Medusa-style draft heads (a speculative-decoding peer)

Every command takes --out (default: the packaged `m2r2core/trained/<model>` folder for the
adapters and routers, the model cache for data and checkpoints), fixed seeds, a progress bar,
and writes a metrics log (JSONL) beside its output.
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
from torch.nn import functional as F

from m2r2core import distill, hf_compat
from m2r2core.accel import (
    TRAINED_DIR,
    WEIGHTS_NAME,
    AccelConfig,
    Accelerator,
    AdapterCard,
    train_fast_states,
)
from m2r2core.config import EngineConfig, batched_dtype
from m2r2core.errors import M2R2Error
from m2r2core.model import default_cache_dir, fingerprint, load

log = logging.getLogger("m2r2core.train")


def default_out(model: str) -> Path:
    """Where the committed adapters and routers of a model live."""
    return TRAINED_DIR / model.replace("/", "--")


def work_dir(model: str) -> Path:
    """Cache folder for corpora and checkpoints (never committed)."""
    return default_cache_dir() / "training" / model.replace("/", "--")


def progress_bar(label: str):
    """A tqdm-backed callback(done, total), printing to stderr."""
    from tqdm import tqdm

    bar = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=label, unit="step")
        bar["bar"].n = done
        bar["bar"].refresh()
        if done >= total:
            bar["bar"].close()

    return update


def slow_states(parts, ids: torch.Tensor) -> tuple[list[torch.Tensor], tuple]:
    """h^s_0..h^s_N for a (B, T) batch (no gradients), and the rotary tables."""
    with torch.no_grad():
        hidden = parts.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        cache = hf_compat.new_cache(parts)
        masks = hf_compat.attention_masks(parts, hidden, cache, positions)
        rotary = parts.rotary_emb(hidden, positions)
        states = [hidden]
        for index in range(parts.n_layers):
            hidden = hf_compat.call_layer(parts, index, hidden, masks[parts.layer_types[index]],
                                          rotary, positions, None)
            states.append(hidden)
    return states, rotary


def batches(samples: list[distill.Sample], batch_size: int, seq_len: int, seed: int):
    """Endless seeded batches of equal-length windows (B, seq_len) cut from the samples."""
    rng = random.Random(seed)
    usable = [s for s in samples if len(s.ids) >= 16]
    while True:
        rng.shuffle(usable)
        for start in range(0, len(usable) - batch_size + 1, batch_size):
            rows = []
            for s in usable[start:start + batch_size]:
                ids = s.ids[:seq_len]
                rows.append(ids + [ids[-1]] * (seq_len - len(ids)))
            chunk = usable[start:start + batch_size]
            lengths = [min(len(s.ids), seq_len) for s in chunk]
            # The position that produces the first answer token is answer_start - 1.
            starts = [max(0, min(s.answer_start - 1, seq_len - 1)) for s in chunk]
            yield torch.tensor(rows), torch.tensor(lengths), torch.tensor(starts)


def train_split(samples: list[distill.Sample]) -> list[distill.Sample]:
    """Nine in ten samples train the adapters; the tenth is kept for the routers."""
    return [s for i, s in enumerate(samples) if i % 10]


def router_split(samples: list[distill.Sample]) -> list[distill.Sample]:
    """The samples the adapters never saw: the routers learn the fast stream's real errors."""
    return [s for i, s in enumerate(samples) if i % 10 == 0]


def adapter_loss(parts, accel: Accelerator, ids: torch.Tensor, lengths: torch.Tensor,
                 kl_weight: float, kl_positions: int, kl_every: int, generator: torch.Generator,
                 answer_starts: torch.Tensor | None = None,
                 kl_depths: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict]:
    """The method note's loss: sum over fast depths of (1 - cos(h^f_d, sg h^s_tau(d))), plus
    kl_weight * KL(p^s_N || p^f_d) at exit depths, on a sample of positions.

    Exit depths: `kl_depths` where given (each step's cost grows with their number: one LM-head
    pass per depth), else every kl_every-th fast depth and the deepest one.

    The KL positions are drawn from the answers (chat samples; from `answer_starts`) and the
    plain text, never from the prompt template: exits happen while generating answers.
    """
    n = parts.n_layers
    slow, rotary = slow_states(parts, ids)
    fast = train_fast_states(parts, accel, slow, rotary)
    valid = torch.arange(ids.shape[1])[None] < lengths[:, None]  # (B, T)
    cos_terms, kl_terms, metrics = [], [], {}
    kl_valid = valid if answer_starts is None else (
        valid & (torch.arange(ids.shape[1])[None] >= answer_starts[:, None]))
    flat_valid = kl_valid.reshape(-1).nonzero().squeeze(1)
    pick = flat_valid[torch.randperm(len(flat_valid), generator=generator)[:kl_positions]]
    with torch.no_grad():
        teacher = F.log_softmax(
            parts.lm_head(parts.norm(slow[n].reshape(-1, slow[n].shape[-1])[pick])).float(), -1)
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
            kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
            kl_terms.append(kl)
            metrics[f"kl@{depth}"] = float(kl.detach())
            metrics[f"agree@{depth}"] = float((student.argmax(-1) == teacher.argmax(-1))
                                              .float().mean())
    loss = torch.stack(cos_terms).sum() + kl_weight * torch.stack(kl_terms).sum()
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def init_adapters(accel: Accelerator, path: Path) -> None:
    """Start from another run's adapters: a training checkpoint (.pt) or a saved adapter folder
    or file (safetensors). Biases the source lacks start at zero; any other mismatch is refused.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    try:
        state = (load_file(str(path)) if path.suffix == ".safetensors"
                 else torch.load(path, weights_only=False)["adapters"])
        missing, unexpected = accel.load_state_dict({k: v.float() for k, v in state.items()},
                                                    strict=False)
    except (OSError, KeyError, RuntimeError) as err:
        raise M2R2Error(f"Cannot start from {path}; the adapters there do not fit this shape "
                        f"({err}).") from err
    if unexpected or any(not k.endswith(".bias") for k in missing):
        raise M2R2Error(f"The adapters in {path} do not fit this shape (missing {missing}, "
                        f"unexpected {unexpected}).")


@torch.no_grad()
def held_out_agreement(parts, accel: Accelerator, samples: list[distill.Sample], seq_len: int
                       ) -> dict[str, list[float]]:
    """Teacher-forced logit-lens agreement with the full model's top-1 at every depth of both
    streams, over the answer and plain-text positions of samples the adapters never saw.
    """
    hits = {"fast": torch.zeros(accel.n_fast), "slow": torch.zeros(parts.n_layers)}
    count = 0
    for sample in samples:
        ids = torch.tensor([sample.ids[:seq_len]])
        slow, rotary = slow_states(parts, ids)
        fast = train_fast_states(parts, accel, slow, rotary)
        first = max(0, min(sample.answer_start - 1, ids.shape[1] - 1))
        final = parts.lm_head(parts.norm(slow[-1][0, first:])).argmax(-1)
        for stream, states in (("slow", slow[1:]), ("fast", fast)):
            stack = torch.stack([s[0, first:] for s in states])  # (D, P, H): one head call
            hits[stream] += (parts.lm_head(parts.norm(stack)).argmax(-1) == final).sum(1)
        count += len(final)
    return {stream: [round(float(h) / count, 4) for h in v] for stream, v in hits.items()}


def frozen_model(args: argparse.Namespace) -> tuple:
    """Seed, load the model with every weight frozen; (loaded, its parts, the corpus path)."""
    torch.manual_seed(args.seed)
    loaded = load(EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads))
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return (loaded, hf_compat.decoder_parts(loaded.model),
            args.data or work_dir(args.model) / "corpus.jsonl")


def cmd_data(args: argparse.Namespace) -> None:
    """Build the self-distillation corpus."""
    torch.manual_seed(args.seed)
    loaded = load(EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads))
    out = args.out or work_dir(args.model) / "corpus.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    samples = distill.build(loaded.model, loaded.tokenizer, args.n_chat, args.n_text,
                            args.max_new_tokens, args.seq_len, args.seed,
                            progress=progress_bar("distilling answers"))
    distill.save(samples, out)
    log.info("wrote %d samples (%d tokens) to %s", len(samples),
             sum(len(s.ids) for s in samples), out)


def cmd_adapters(args: argparse.Namespace) -> None:
    """Train the accelerator adapters with resumable checkpoints and a metrics log."""
    loaded, parts, data_path = frozen_model(args)
    corpus = distill.load(data_path)
    samples = train_split(corpus)
    config = AccelConfig(rate=args.rate, rank=args.rank, alpha=2.0 * args.rank,
                         margin=args.margin, branch_layer=args.branch_layer, target=args.target,
                         bias=args.bias)
    accel = Accelerator(parts, config, seed=args.seed)
    outside = sorted(set(args.kl_depths) - set(accel.depths))
    if outside:
        raise M2R2Error(f"--kl-depths {outside} are not fast depths; this stream has depths "
                        f"{accel.depths.start}..{accel.depths.stop - 1}.")
    # A bias has to move by the size of the massive activations it removes (tens to hundreds),
    # while Adam moves every parameter by about lr per step: biases get their own multiplier.
    biases = [p for name, p in accel.named_parameters() if name.endswith(".bias")]
    others = [p for name, p in accel.named_parameters() if not name.endswith(".bias")]
    groups = [{"params": others, "lr_mult": 1.0}]
    if biases:
        groups.append({"params": biases, "lr_mult": args.bias_lr_mult})
    optim = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    ckpt_dir = work_dir(args.model) / (args.run_name or f"adapters-r{args.rate:g}")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / "checkpoint.pt"
    step = 0
    if ckpt.is_file() and not args.restart:
        state = torch.load(ckpt, weights_only=False)
        accel.load_state_dict(state["adapters"])
        optim.load_state_dict(state["optim"])
        step = state["step"]
        log.info("resumed from %s at step %d", ckpt, step)
    if args.init and step == 0:
        init_adapters(accel, args.init)
        log.info("initialised adapters from %s", args.init)
    gen = torch.Generator().manual_seed(args.seed)
    stream = batches(samples, args.batch_size, args.seq_len, args.seed)
    for _ in range(step):  # same data order after a resume
        next(stream)
    metrics_log = ckpt_dir / "metrics.jsonl"
    bar = progress_bar("training adapters")
    started = time.time()
    last = {}
    while step < args.steps:
        ids, lengths, starts = next(stream)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (
            1 + math.cos(math.pi * step / args.steps))
        for group in optim.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        loss, metrics = adapter_loss(parts, accel, ids, lengths, args.kl_weight,
                                     args.kl_positions, args.kl_every, gen, starts,
                                     tuple(args.kl_depths))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(accel.parameters(), 1.0)
        optim.step()
        step += 1
        last = metrics | {"step": step, "lr": lr, "elapsed_s": time.time() - started}
        with metrics_log.open("a") as handle:
            handle.write(json.dumps(last) + "\n")
        bar(step, args.steps)
        if step % args.save_every == 0 or step == args.steps:
            torch.save({"adapters": accel.state_dict(), "optim": optim.state_dict(),
                        "step": step}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
    held_out = held_out_agreement(parts, accel, router_split(corpus)[:48], args.seq_len)
    out = args.out or default_out(args.model)
    card = AdapterCard(
        config=vars(config) | {"projections": list(config.projections)},
        model_name=args.model, model_fingerprint=fingerprint(loaded.model),
        n_layers=parts.n_layers, hidden_size=parts.config.hidden_size,
        training={"data": str(data_path.name), "samples": len(samples), "steps": args.steps,
                  "init": args.init.parent.name if args.init else None,
                  "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                  "kl_weight": args.kl_weight, "kl_positions": args.kl_positions,
                  "kl_every": args.kl_every, "kl_depths": args.kl_depths,
                  "bias_lr_mult": args.bias_lr_mult if args.bias else None, "seed": args.seed,
                  "dtype": args.dtype,
                  "threads": torch.get_num_threads(),
                  "wall_s_this_run": round(time.time() - started, 1)},
        metrics={k: round(v, 4) for k, v in last.items() if isinstance(v, float)}
        | {"held_out_lens_agreement": held_out},
    )
    accel.save(out, card)
    log.info("saved adapters to %s", out)


@torch.no_grad()
def collect_trajectories(parts, accel: Accelerator, check, samples: list[distill.Sample],
                         seq_len: int, per_sample: int, seed: int) -> dict[str, dict]:
    """Teacher-forced trajectories of both streams at sampled positions, with exit labels.

    Returns {stream: {normed (P, D, H), lens (P, D, 3), labels (P, D) bool}}; a label says
    whether the logit lens at that depth already gives the full model's top-1 token.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {"fast": [], "slow": []}
    bar = progress_bar("collecting trajectories")
    for done, sample in enumerate(samples, 1):
        ids = torch.tensor([sample.ids[:seq_len]])
        slow, rotary = slow_states(parts, ids)
        fast = train_fast_states(parts, accel, slow, rotary)
        steps = ids.shape[1]
        first = max(0, min(sample.answer_start - 1, steps - 1))  # answers and text, as decoded
        pick = first + torch.randperm(steps - first, generator=gen)[:per_sample]
        final = parts.lm_head(parts.norm(slow[-1][0, pick])).argmax(-1)  # (p,)
        for stream, states in (("slow", slow[1:]), ("fast", fast)):
            stack = torch.stack([s[0, pick] for s in states], dim=1)  # (p, D, H)
            normed = parts.norm(stack)
            labels = parts.lm_head(normed).argmax(-1) == final[:, None]
            out[stream].append((normed.to(torch.bfloat16), check.features(normed), labels))
        bar(done, len(samples))
    return {k: {"normed": torch.cat([r[0] for r in v]), "lens": torch.cat([r[1] for r in v]),
                "labels": torch.cat([r[2] for r in v])} for k, v in out.items()}


def fit_router(kind: str, data: dict, epochs: int, seed: int, lr: float = 2e-3) -> tuple:
    """Train one RouterNet with BCE; return it and its validation metrics."""
    from m2r2core.routers import RouterNet

    torch.manual_seed(seed)
    normed, lens, labels = data["normed"], data["lens"], data["labels"].float()
    count, depth = labels.shape
    order = torch.randperm(count)
    val, train = order[: count // 6], order[count // 6:]
    net = RouterNet(kind, normed.shape[-1], depth)
    depths = torch.arange(1, depth + 1)
    optim = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    best, best_state, best_epoch = float("inf"), None, 0
    for epoch in range(epochs):
        for start in range(0, len(train), 256):
            idx = train[start:start + 256]
            logits, _ = net(normed[idx], lens[idx], depths)
            loss = F.binary_cross_entropy_with_logits(logits, labels[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
        with torch.no_grad():  # keep the epoch with the best validation loss
            logits, _ = net(normed[val], lens[val], depths)
            val_loss = float(F.binary_cross_entropy_with_logits(logits, labels[val]))
        if val_loss < best:
            best, best_epoch = val_loss, epoch + 1
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    with torch.no_grad():
        logits, _ = net(normed[val], lens[val], depths)
        prob = torch.sigmoid(logits)
        metrics = {"best_epoch": float(best_epoch),
                   "val_bce": float(F.binary_cross_entropy_with_logits(logits, labels[val])),
                   "val_accuracy": float(((prob > 0.5) == (labels[val] > 0.5)).float().mean()),
                   "val_positive_rate": float(labels[val].mean())}
        for cut in (0.8, 0.9, 0.95):
            chosen = prob >= cut
            if chosen.any():
                metrics[f"precision@{cut}"] = float(labels[val][chosen].mean())
            metrics[f"coverage@{cut}"] = float(chosen.float().mean())
    return net.eval(), metrics


def cmd_routers(args: argparse.Namespace) -> None:
    """Train ARLA and the MLP baseline for both streams on the router split of the corpus."""
    from m2r2core.accel import load_accelerator
    from m2r2core.routers import CheckHead, RouterBundle, RouterCard

    torch.manual_seed(args.seed)
    loaded = load(EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads))
    parts = hf_compat.decoder_parts(loaded.model)
    out = args.out or default_out(args.model)
    accel, _ = load_accelerator(args.adapters or out, parts, args.model,
                                fingerprint(loaded.model))
    accel.to(loaded.model.dtype)
    data_path = args.data or work_dir(args.model) / "corpus.jsonl"
    samples = distill.load(data_path)
    # The check head's sub-vocabulary: the most frequent tokens of the training answers.
    counts = torch.bincount(torch.tensor([t for s in train_split(samples) for t in s.ids]),
                            minlength=parts.lm_head.weight.shape[0])
    check_ids = counts.topk(args.check_vocab).indices.sort().values if args.check_vocab else None
    check = CheckHead(parts, check_ids)
    started = time.time()
    data = collect_trajectories(parts, accel, check, router_split(samples), args.seq_len,
                                args.per_sample, args.seed)
    nets, metrics = {}, {}
    for stream, stream_data in data.items():
        metrics[f"lens_agreement/{stream}"] = [
            round(float(x), 4) for x in stream_data["labels"].float().mean(0)]
        for kind in ("arla", "mlp"):
            net, m = fit_router(kind, stream_data, args.epochs, args.seed)
            nets[f"{kind}/{stream}"] = net
            metrics[f"{kind}/{stream}"] = {k: round(v, 4) for k, v in m.items()}
            log.info("%s/%s: %s", kind, stream, metrics[f"{kind}/{stream}"])
    card = RouterCard(
        model_name=args.model, model_fingerprint=fingerprint(loaded.model),
        check_vocab=args.check_vocab,
        max_depth={k: v.max_depth for k, v in nets.items()},
        training={"data": data_path.name, "samples": len(router_split(samples)),
                  "positions": int(data["fast"]["labels"].shape[0]),
                  "per_sample": args.per_sample, "epochs": args.epochs, "seed": args.seed,
                  "wall_s": round(time.time() - started, 1)},
        metrics=metrics)
    RouterBundle(parts, check_ids, nets, card).save(out)
    log.info("saved routers to %s", out)


def cmd_medusa(args: argparse.Namespace) -> None:
    """Train Medusa-style draft heads on the adapters' corpus (the peer of issue 4)."""
    from m2r2core import medusa

    loaded, parts, data_path = frozen_model(args)
    samples = distill.load(data_path)
    train, held_out = train_split(samples), router_split(samples)
    if args.limit:
        train, held_out = train[:args.limit], held_out[:max(1, args.limit // 9)]
    started = time.time()
    data = medusa.head_data(loaded.model, train, args.seq_len, progress_bar("model states"))
    check = medusa.head_data(loaded.model, held_out, args.seq_len)
    states_s = time.time() - started
    run_dir = work_dir(args.model) / "medusa"
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_log = run_dir / "metrics.jsonl"
    metrics_log.write_text("")

    def log_line(metrics: dict) -> None:
        with metrics_log.open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")

    heads = medusa.train_heads(parts, data, args.heads, args.epochs, args.batch_size, args.lr,
                               args.seed, progress_bar("training heads"), log_line)
    accuracy = medusa.head_accuracy(parts, heads, check)
    wall = time.time() - started
    card = medusa.HeadsCard(
        model_name=args.model, model_fingerprint=fingerprint(loaded.model),
        hidden_size=parts.config.hidden_size, n_heads=args.heads,
        training={"data": str(data_path.name), "samples": len(train),
                  "positions": int(data[3].sum()), "epochs": args.epochs,
                  "batch_positions": args.batch_size, "lr": args.lr, "seq_len": args.seq_len,
                  "seed": args.seed, "dtype": args.dtype, "threads": torch.get_num_threads(),
                  "model_states_s": round(states_s, 1), "wall_s": round(wall, 1),
                  "target": "the model's own greedy token k positions ahead",
                  "from": "answer and plain-text positions (not the instruction template)",
                  "lm_head": "the model's own, frozen and shared by every head"},
        metrics={"held_out_samples": len(held_out), "held_out_positions": int(check[3].sum()),
                 "held_out_top1_by_head": [round(a, 4) for a in accuracy]},
    )
    medusa.save_heads(heads, args.out or default_out(args.model), card)
    log.info("held-out top-1 by head: %s (%.0f s)", [round(a, 3) for a in accuracy], wall)


def parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    p = argparse.ArgumentParser(prog="python -m m2r2core.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("data", "adapters", "routers", "medusa"):
        s = sub.add_parser(name)
        s.add_argument("--model", default="smollm2-135m-instruct")
        s.add_argument("--dtype", default=batched_dtype(), choices=["bfloat16", "float32"],
                       help="default: the faster one for batched work on this machine")
        s.add_argument("--threads", type=int, default=0)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--out", type=Path, default=None)
        s.add_argument("--seq-len", type=int, default=192)
        if name == "data":
            s.add_argument("--n-chat", type=int, default=480)
            s.add_argument("--n-text", type=int, default=480)
            s.add_argument("--max-new-tokens", type=int, default=128)
        else:
            s.add_argument("--data", type=Path, default=None)
            s.add_argument("--adapters", type=Path, default=None)
        if name == "routers":
            s.add_argument("--check-vocab", type=int, default=2048,
                           help="sub-vocabulary of the exit-check head (0: full head)")
            s.add_argument("--per-sample", type=int, default=48)
            s.add_argument("--epochs", type=int, default=30)
        if name == "medusa":
            s.add_argument("--heads", type=int, default=4, help="K, drafts per verification")
            s.add_argument("--epochs", type=int, default=4)
            s.add_argument("--batch-size", type=int, default=512, help="positions per step")
            s.add_argument("--lr", type=float, default=1e-3)
            s.add_argument("--limit", type=int, default=0,
                           help="use only this many training samples (0: all; for smoke runs)")
        if name == "adapters":
            s.add_argument("--rate", type=float, default=2.0)
            s.add_argument("--rank", type=int, default=16)
            s.add_argument("--margin", type=int, default=2)
            s.add_argument("--branch-layer", type=int, default=0)
            s.add_argument("--target", default="rate", choices=["rate", "final"])
            s.add_argument("--steps", type=int, default=240)
            s.add_argument("--batch-size", type=int, default=8)
            s.add_argument("--lr", type=float, default=2e-3)
            s.add_argument("--warmup", type=int, default=20)
            s.add_argument("--kl-weight", type=float, default=0.5)
            s.add_argument("--kl-positions", type=int, default=128)
            s.add_argument("--kl-every", type=int, default=3)
            s.add_argument("--kl-depths", type=int, nargs="*", default=[],
                           help="the fast depths with the KL term (default: every --kl-every)")
            s.add_argument("--bias", action="store_true",
                           help="also learn a bias on each adapted block's MLP output")
            s.add_argument("--bias-lr-mult", type=float, default=50.0,
                           help="learning-rate multiplier of those biases")
            s.add_argument("--save-every", type=int, default=10)
            s.add_argument("--restart", action="store_true", help="ignore a checkpoint")
            s.add_argument("--init", type=Path, default=None,
                           help="start from another run's adapters (checkpoint .pt, or an "
                                "adapter folder or .safetensors file)")
            s.add_argument("--run-name", default=None,
                           help="checkpoint folder name (default adapters-r<rate>)")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    commands = {"data": cmd_data, "adapters": cmd_adapters, "routers": cmd_routers,
                "medusa": cmd_medusa}
    try:
        commands[args.command](args)
    except M2R2Error as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
