"""The distilled MoE: what a distillation fine-tune changed in the MoEfied model, as a small file.

MoEfication (moefy.py) keeps a token's shared neurons and its router's top-k experts and drops
the rest, which costs the dense model's quality (held-out perplexity 4x). `python -m
m2r2core.train.moe distill` trains the MoE against the dense model (the dense model's
distributions, and each layer's dense MLP output). It does not store 150 MB of experts: each MoE
layer's gate, up and down projections get a low-rank correction `b @ a` in the dense model's
neuron order (so every expert gets its own rows of `b`), and each router is replaced by a trained
one. `moefy.moe_state` applies them before it cuts the matrices into experts, so the built folder
is the same Qwen2-MoE format and everything that runs the MoE runs the distilled one unchanged.

Files, beside the MoEfication under artifacts/smollm2-135m-moe/: distilled.safetensors (per MoE
layer i: `layers.{i}.router` (E, H) logits weight, `layers.{i}.{gate,up,down}.{a,b}`, or for a
full-weight distillation (card rank 0, `distill --full`: about 150 MB, a measurement the repository
does not carry) `layers.{i}.{gate,up,down}.delta`, the trained weight minus the frozen one) and
distilled.json (its card: the MoEfication it was trained on, data, steps, figures).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from m2r2core import artifacts
from m2r2core.errors import ArtifactError

WEIGHTS = "distilled.safetensors"
CARD = "distilled.json"
DISTILL = "python -m m2r2core.train.moe distill"
PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class DistilledCard:
    """What a distillation is: the MoEfication it corrects, its shape, data, and figures."""

    base_model: str
    moefy_digest: str
    """sha256 of the moefy.safetensors it was trained on: another MoEfication is refused."""
    rank: int
    layers: list[int]
    steps: int
    tokens: int
    data: str
    settings: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def moefy_digest(folder: Path) -> str:
    """sha256 of a folder's MoEfication weights ('' when there are none)."""
    from m2r2core.moe.moefy import files_digest

    return files_digest(Path(folder), distilled=False)


def exists(folder: Path) -> bool:
    """Whether a folder holds a distillation (its card)."""
    return (Path(folder) / CARD).is_file()


def load(folder: Path, base_model: str) -> tuple[DistilledCard, dict[str, torch.Tensor]]:
    """The distillation in `folder`, checked against the MoEfication beside it and the base
    model; ArtifactError names a missing, corrupt or mismatched file.
    """
    card, _ = artifacts.read_record(folder, CARD, DistilledCard, "distilled MoE", DISTILL)
    if card.base_model != base_model:
        raise ArtifactError(f"The distilled MoE in {folder} was trained from '{card.base_model}'; "
                            f"this MoE is built from '{base_model}'. Distil it for this model "
                            f"(`{DISTILL}`) or remove {CARD}.")
    if card.moefy_digest != moefy_digest(folder):
        raise ArtifactError(f"The distilled MoE in {folder} was trained on another MoEfication "
                            f"(digest {card.moefy_digest[:12]}, the folder's is "
                            f"{moefy_digest(folder)[:12]}); rerun `{DISTILL}` or restore it.")
    tensors = artifacts.load_tensors(folder, WEIGHTS, "distilled MoE", DISTILL)
    parts = ("a", "b") if card.rank else ("delta",)  # rank 0: full-weight deltas
    expected = {f"layers.{i}.router" for i in card.layers} | {
        f"layers.{i}.{p}.{m}" for i in card.layers for p in PROJECTIONS for m in parts}
    if set(tensors) != expected:
        raise ArtifactError(f"{Path(folder) / WEIGHTS} does not hold the tensors its card "
                            f"describes; rerun `{DISTILL}` or restore it.")
    return card, {k: v.float() for k, v in tensors.items()}


def corrected(weight: torch.Tensor, tensors: dict[str, torch.Tensor], layer: int, name: str
              ) -> torch.Tensor:
    """A dense-order projection weight plus its low-rank correction or full delta (`weight`
    when none).
    """
    key = f"layers.{layer}.{name}"
    if f"{key}.delta" in tensors:
        return weight + tensors[f"{key}.delta"].float()
    if f"{key}.a" not in tensors:
        return weight
    return weight + tensors[f"{key}.b"].float() @ tensors[f"{key}.a"].float()


def save(folder: Path, tensors: dict[str, torch.Tensor], card: DistilledCard) -> None:
    """Write the distillation atomically: routers in float32, the corrections in bfloat16."""
    from dataclasses import asdict

    stored = {k: (v.float() if k.endswith("router") else v.to(torch.bfloat16))
              for k, v in tensors.items()}
    artifacts.save(folder, WEIGHTS, stored, CARD, asdict(card))


def quality_table(folder: Path) -> list[dict] | None:
    """The quality figures (`python -m m2r2core.train.moe quality`) recorded in the distilled
    card, one row per model (dense, moefied, distilled); None when nobody measured them.
    """
    import json

    try:
        card = json.loads((Path(folder) / CARD).read_text())
        quality = card["metrics"]["quality"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    rows = []
    for name in ("dense", "moefied", "distilled"):
        row = quality.get(name)
        if isinstance(row, dict):
            rows.append({"model": name} | {k: v for k, v in row.items() if not isinstance(v, dict)}
                        | ({"router_agreement": row["router_agreement"].get("mean")}
                           if isinstance(row.get("router_agreement"), dict) else {}))
    return rows or None
