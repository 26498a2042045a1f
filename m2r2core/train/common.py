"""What every training command shares: where outputs go, the progress bar, the frozen model,
and the old corpus's train/router split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from m2r2core import artifacts
from m2r2core.config import EngineConfig
from m2r2core.runtime import hf_compat
from m2r2core.runtime.model import default_cache_dir, load
from m2r2core.train import distill


def default_out(model: str) -> Path:
    """Where the committed adapters and routers of a model live."""
    return artifacts.model_folder(model, artifacts.ARTIFACTS_DIR)


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


def train_split(samples: list[distill.Sample]) -> list[distill.Sample]:
    """Nine in ten samples train the adapters; the tenth is kept for the routers."""
    return [s for i, s in enumerate(samples) if i % 10]


def router_split(samples: list[distill.Sample]) -> list[distill.Sample]:
    """The samples the adapters never saw: the routers learn the fast stream's real errors."""
    return [s for i, s in enumerate(samples) if i % 10 == 0]


def frozen_model(args: argparse.Namespace) -> tuple:
    """Seed, load the model with every weight frozen; (loaded, its parts, the corpus path)."""
    torch.manual_seed(args.seed)
    loaded = load(EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads,
                               device=getattr(args, "device", "auto")))
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return (loaded, hf_compat.decoder_parts(loaded.model),
            args.data or work_dir(args.model) / "corpus.jsonl")


def labelled_bars():
    """A callback(label, done, total) with one tqdm bar per label (train.progress_bar)."""
    bars: dict[str, object] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in bars:
            bars[label] = progress_bar(label)
        bars[label](done, total)

    return update


def command_line(args: argparse.Namespace) -> str:
    """The command a report was made by, without this machine's paths."""
    return artifacts.portable("python -m m2r2core.train " + " ".join(args.argv))


def emit_report(report: dict, path: Path | None) -> None:
    """Print a command's JSON report and, given a path, write it there (atomically)."""
    print(json.dumps(report))
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(path, report)
