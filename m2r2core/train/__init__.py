"""Training the accelerated stream's adapters and the exit routers, on CPU or CUDA.

    python -m m2r2core.train corpus    # the distillation corpus (m2r2core/train/corpus.py)
    python -m m2r2core.train data      # the first, small self-distillation corpus (distill.py)
    python -m m2r2core.train adapters  # accelerator adapters (resumable checkpoints)
    python -m m2r2core.train routers   # ARLA and the MLP baseline, on the trained fast stream
    python -m m2r2core.train medusa    # Medusa-style draft heads (a speculative-decoding peer)
    python -m m2r2core.train lens      # the tuned lens (an affine translator per slow layer)
    python -m m2r2core.train speed     # training tokens per second, before and after
    python -m m2r2core.train agreement # held-out lens agreement of saved adapters, by depth
    python -m m2r2core.train gap       # the same on trained and held-out answers, by source
    python -m m2r2core.train soup      # the greedy average of several adapter states
    python -m m2r2core.train variants  # the adapters' design variants on an equal budget

Every command takes --out (default: the committed `artifacts/<model>` folder for the
adapters and routers, the model cache for data and checkpoints), fixed seeds, a progress bar,
and writes a metrics log (JSONL) beside its output.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from m2r2core import artifacts
from m2r2core.artifacts import HISTORY
from m2r2core.config import EngineConfig
from m2r2core.errors import ConfigError, M2R2Error
from m2r2core.runtime import hf_compat
from m2r2core.runtime.model import fingerprint, load
from m2r2core.stream.accel import Accelerator, train_fast_states
from m2r2core.train import cli, distill
from m2r2core.train.adapters import (  # noqa: F401  (the package's public names)
    adapter_loss,
    batches,
    bucketed_batches,
    cmd_adapters,
    datasets,
    held_out_agreement,
    init_adapters,
    set_dropout,
    slow_states,
    training_dtype,
)
from m2r2core.train.common import (  # noqa: F401
    command_line,
    default_out,
    emit_report,
    frozen_model,
    progress_bar,
    router_split,
    train_split,
    work_dir,
)
from m2r2core.train.data import head_data
from m2r2core.train.lens import cmd_lens
from m2r2core.train.soup import cmd_soup
from m2r2core.train.speed import cmd_speed
from m2r2core.train.variants import cmd_variants

log = logging.getLogger("m2r2core.train")


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


def cmd_corpus(args: argparse.Namespace) -> None:
    """Build or resume the distillation corpus (ShareGPT and Wikipedia; train/corpus.py)."""
    from m2r2core.train import corpus

    if args.growth_only and not args.grow:
        raise corpus.CorpusError("--growth-only answers a growth round alone; say which with "
                                 "--grow N --grow-round R.")
    torch.manual_seed(args.seed)
    loaded = load(EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads,
                               device=args.device))
    settings = corpus.Settings(n_sharegpt=args.n_sharegpt, n_wiki=args.n_wiki,
                               heldout_per_split=args.heldout, max_new_tokens=args.max_new_tokens,
                               text_tokens=args.text_tokens, window=args.window, seed=args.seed)
    folder = args.out or work_dir(args.model) / "corpus"
    started = time.time()
    splits = (() if args.plan_only else ("dev", "test") if args.growth_only
              else corpus.SPLITS)
    manifest = corpus.build(folder, loaded.model, loaded.tokenizer, args.model,
                            fingerprint(loaded.model), settings, args.batch_size,
                            args.shard_size, progress_bar("answering instructions"), splits)
    if args.grow:
        manifest = corpus.grow(folder, loaded.model, loaded.tokenizer, args.model,
                               fingerprint(loaded.model), settings, args.grow, args.grow_round,
                               args.batch_size, args.shard_size,
                               progress_bar(f"growth round {args.grow_round}"),
                               answer=not args.plan_only)
    counts = {split: sum(len(s.ids) for s in corpus.load(folder, split, with_text=False))
              for split in corpus.SPLITS}
    text = sum(len(s.ids) for s in corpus.load(folder, "train")) - counts["train"]
    log.info("corpus in %s: chat tokens by split %s, teacher-forced text %d tokens, %d records "
             "removed for overlapping an evaluation prompt (%.0f s)", folder, counts, text,
             manifest.get("removed_for_overlap", 0), time.time() - started)


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
    from m2r2core.exits.routers import RouterNet

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
    from m2r2core.exits.routers import CheckHead, RouterBundle, RouterCard
    from m2r2core.stream.accel import load_accelerator

    torch.manual_seed(args.seed)
    loaded = load(EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads))
    parts = hf_compat.decoder_parts(loaded.model)
    splits, source = datasets(args, fingerprint(loaded.model))
    if not splits["router"]:
        raise M2R2Error("The routers learn on the corpus's train answers (every tenth), and none "
                        "is built yet: run `python -m m2r2core.train corpus` until its first "
                        "train shard is written.")
    out = args.out or default_out(args.model)
    accel, _ = load_accelerator(args.adapters or out, parts, args.model,
                                fingerprint(loaded.model))
    accel.to(loaded.model.dtype)
    # The check head's sub-vocabulary: the most frequent tokens of the training answers.
    counts = torch.bincount(torch.tensor([t for s in splits["train"] for t in s.ids]),
                            minlength=parts.lm_head.weight.shape[0])
    check_ids = counts.topk(args.check_vocab).indices.sort().values if args.check_vocab else None
    check = CheckHead(parts, check_ids)
    started = time.time()
    samples = splits["router"][:args.limit or None]
    data = collect_trajectories(parts, accel, check, samples, args.seq_len, args.per_sample,
                                args.seed)
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
        training={"data": source, "samples": len(samples),
                  "positions": int(data["fast"]["labels"].shape[0]),
                  "per_sample": args.per_sample, "epochs": args.epochs, "seed": args.seed,
                  "wall_s": round(time.time() - started, 1)},
        metrics=metrics)
    RouterBundle(parts, check_ids, nets, card).save(out)
    log.info("saved routers to %s", out)


def cmd_medusa(args: argparse.Namespace) -> None:
    """Train Medusa-style draft heads on the adapters' corpus (the peer of issue 4)."""
    from m2r2core.spec import medusa

    loaded, parts, _ = frozen_model(args)
    splits, source = datasets(args, fingerprint(loaded.model))
    train, held_out = splits["train"], splits["test"]
    if args.limit:  # a seeded sample, so answers and text windows keep their shares
        train = random.Random(args.seed).sample(train, min(args.limit, len(train)))
        held_out = held_out[:max(1, args.limit // 9)]
    started = time.time()
    data = head_data(loaded.model, train, args.seq_len, progress_bar("model states"))
    check = head_data(loaded.model, held_out, args.seq_len)
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
        training={"data": source, "samples": len(train),
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


def _saved_adapters(args: argparse.Namespace) -> tuple:
    """The frozen model's parts, the saved adapters' folder, the adapters (on the model's device)
    and their card, and the data splits with their description: what `agreement` and `gap`
    measure.
    """
    from m2r2core.stream.accel import load_accelerator

    loaded, parts, _ = frozen_model(args)
    folder = args.adapters or default_out(args.model)
    accel, card = load_accelerator(folder, parts, args.model, fingerprint(loaded.model))
    accel.to(parts.lm_head.weight.device)
    splits, source = datasets(args, fingerprint(loaded.model))
    return parts, folder, accel, card, splits, source


def cmd_agreement(args: argparse.Namespace) -> None:
    """Teacher-forced lens agreement of saved adapters on a corpus split, by depth (held out
    for dev and test; on the train split it shows how far the adapters fit what they saw).
    """
    if args.skip < 0 or args.limit < 0:
        raise ConfigError("--skip and --limit count samples: 0 or more.")
    if args.record_tokens and (args.split != "test" or args.limit or args.skip or args.source):
        raise ConfigError("--record-tokens records the whole test split only.")
    parts, folder, accel, _, splits, source = _saved_adapters(args)
    pool = [s for s in splits[args.split] if not args.source or s.source == args.source]
    samples = pool[args.skip:args.skip + args.limit if args.limit else None]
    if not samples:
        which = f"{args.source} samples" if args.source else "samples"
        raise ConfigError(f"The {args.split} split has {len(pool)} {which}; "
                          f"--skip {args.skip} leaves none.")
    started = time.time()
    found = held_out_agreement(parts, accel, samples, args.seq_len)
    report = {"command": command_line(args),
              "adapters": artifacts.portable(str(folder)), "data": source, "split": args.split,
              "sample_source": args.source or "all", "skip": args.skip,
              "samples": len(samples), "dtype": args.dtype, "seq_len": args.seq_len,
              "wall_s": round(time.time() - started, 1), "agreement": found}
    emit_report(report, args.report)
    if args.record_tokens:
        _record_history(args, report, default_out(args.model))


GAP_SLICES = (("test", "sharegpt"), ("test", "wiki"), ("train", "sharegpt"), ("train", "wiki"),
              ("train", "sharegpt-followup"))
"""The generalisation gap's slices: held-out answers of each kind, then trained ones (the train
split lists the first build's answers first, so its first N are answers every committed state of
the adapters trained on), and ShareGPT follow-ups (later turns of train conversations)."""


def gap_slices(splits: dict, limit: int) -> list[tuple[str, str, list]]:
    """(split, source, its first `limit` samples) for each GAP_SLICES slice the corpus has."""
    out = []
    for split, source in GAP_SLICES:
        samples = [s for s in splits.get(split, ()) if s.source == source][:limit]
        if samples:
            out.append((split, source, samples))
    return out


def cmd_gap(args: argparse.Namespace) -> None:
    """Saved adapters' lens agreement on the answers they trained on against held-out answers
    of the same kinds, by source: how much of what they learned carries over.
    """
    if args.limit < 1:
        raise ConfigError("--limit counts samples per slice: 1 or more.")
    parts, folder, accel, card, splits, source = _saved_adapters(args)
    slices = gap_slices(splits, args.limit)
    if not any(split == "test" for split, _, _ in slices) or \
            not any(split == "train" for split, _, _ in slices):
        raise ConfigError("The gap needs held-out and trained answers that name their source: "
                          "a corpus built by `python -m m2r2core.train corpus` (an old-style "
                          "--data file has no sources).")
    started, rows, bar = time.time(), [], progress_bar("measuring slices")
    for split, kind, samples in slices:
        found = held_out_agreement(parts, accel, samples, args.seq_len)
        rows.append({"split": split, "source": kind, "samples": len(samples),
                     "agreement": found["fast"]})
        bar(len(rows), len(slices))
    report = {"command": command_line(args),
              "adapters": artifacts.portable(str(folder)), "data": source, "dtype": args.dtype,
              "seq_len": args.seq_len, "first_depth": accel.depths.start,
              "report_depth": card.metrics.get("report_depth"),
              "wall_s": round(time.time() - started, 1), "slices": rows}
    emit_report(report, args.report)


def _record_history(args: argparse.Namespace, report: dict, folder: Path) -> None:
    """Append a committed adapter state (cumulative tokens, test agreement) to the history the
    Training page fits its scaling curve to; atomic.
    """
    path = folder / HISTORY
    history = json.loads(path.read_text()) if path.is_file() else {"states": []}
    history["states"].append({
        "run": args.run_label or str(report["adapters"]), "tokens": args.record_tokens,
        "split": "test", "samples": report["samples"], "dtype": report["dtype"],
        "command": report["command"], "agreement": report["agreement"]["fast"]})
    artifacts.write_json(path, history)
    log.info("recorded %s at %d tokens in %s", history["states"][-1]["run"], args.record_tokens,
             path)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = cli.parser(__doc__).parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    commands = {"corpus": cmd_corpus, "data": cmd_data, "adapters": cmd_adapters,
                "routers": cmd_routers,
                "medusa": cmd_medusa, "lens": cmd_lens, "speed": cmd_speed,
                "agreement": cmd_agreement, "gap": cmd_gap, "soup": cmd_soup,
                "variants": cmd_variants}
    try:
        commands[args.command](args)
    except M2R2Error as err:
        raise SystemExit(f"error: {err}") from None

