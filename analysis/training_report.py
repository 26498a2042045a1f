"""What the committed trained files say about themselves: each artifact's card (data, steps,
settings, held-out figures) and the adapters' training log (held-out agreement by depth over
steps, the loss). Read from the files only; nothing here trains or runs the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from m2r2core.artifacts import HISTORY, TRAINING_LOG

ARTIFACT_CARDS = {
    "adapters": "card.json",
    "routers": "routers.json",
    "Medusa heads": "medusa.json",
    "tuned lens": "tuned_lens.json",
}
"""The artifact kinds of a model folder, by the card each writes."""


@dataclass(frozen=True)
class TrainingReport:
    """The cards and the adapters' training curve of one artifact folder."""

    folder: str
    cards: dict[str, dict] = field(default_factory=dict)
    """{artifact kind: its card} for every card present and readable."""
    problems: tuple[str, ...] = ()
    """A line for every card or log that could not be read."""
    evaluations: tuple[dict, ...] = ()
    """The adapters' held-out evaluations: step, dev agreement by depth for both streams."""
    steps: tuple[dict, ...] = ()
    """Thinned training metrics: step, loss, tokens, per-depth KL and agreement."""
    history: tuple[dict, ...] = ()
    """Every committed adapter state, oldest first: run, tokens (cumulative, every run that led
    to it), agreement (test split, fast stream, by depth)."""

    def history_points(self, depth: int) -> list[tuple[int, float]]:
        """[(cumulative training tokens, test agreement at `depth`)] of the committed states."""
        points = []
        for row in self.history:
            values = row.get("agreement", [])
            if 1 <= depth <= len(values) and row.get("tokens", 0) > 0:
                points.append((int(row["tokens"]), float(values[depth - 1])))
        return points

    def agreement_curve(self, depths: tuple[int, ...], stream: str = "fast") -> dict[int, list]:
        """{depth: [(step, dev agreement)]} of the chosen fast (or slow) depths (1-based)."""
        curve: dict[int, list] = {d: [] for d in depths}
        for row in self.evaluations:
            values = row.get("dev_lens_agreement", {}).get(stream, [])
            for d in depths:
                if 1 <= d <= len(values):
                    curve[d].append((row["step"], values[d - 1]))
        return curve

    def held_out_by_depth(self) -> dict[str, list[float]]:
        """The committed adapters' held-out (test split) agreement by depth, per stream, with
        the tuned lens's (its own card, same split) as the 'tuned' stream.
        """
        metrics = self.cards.get("adapters", {}).get("metrics", {})
        found = metrics.get("held_out_lens_agreement", {})
        found = dict(found) if isinstance(found, dict) else {"fast": list(found)}
        tuned = self.cards.get("tuned lens", {}).get("metrics", {}).get("held_out", {})
        if isinstance(tuned, dict) and tuned.get("tuned"):
            found["tuned"] = list(tuned["tuned"])
        return found

    def reads_like(self, stream: str = "fast") -> list[ReadsLike]:
        """For every depth of `stream` ('fast' or 'tuned'), the slow layer its held-out
        agreement matches on the slow stream's logit-lens curve (same split, same tokens).
        """
        curves = self.held_out_by_depth()
        slow, values = curves.get("slow"), curves.get(stream)
        if not slow or not values:
            return []
        return [ReadsLike(d, float(a), slow_layer_for(slow, float(a)))
                for d, a in enumerate(values, start=1)]


@dataclass(frozen=True)
class ReadsLike:
    """Where one depth of a stream sits on the slow stream's logit-lens curve."""

    depth: int
    agreement: float
    slow_layer: float | None
    """The slow layer (interpolated between whole layers) whose logit lens agrees as often;
    None when the slow curve only gets there at its last layer."""

    def rate(self) -> float | None:
        """Slow layers per layer run: the acceleration the stream achieved at this depth."""
        return None if self.slow_layer is None else self.slow_layer / self.depth


def slow_layer_for(slow: list[float], agreement: float) -> float | None:
    """The (fractional) slow layer whose logit-lens agreement first reaches `agreement`.

    The slow curve is made non-decreasing first (its running maximum: a layer cannot read
    worse than an earlier one it has already passed), then interpolated linearly between
    whole layers; layer 0 (the embeddings) counts as agreement 0. None when only the last layer
    (the full model, agreement 1.0 by definition) reaches it.
    """
    best, previous = 0.0, 0.0
    for layer, value in enumerate(slow[:-1], start=1):
        best = max(best, value)
        if best >= agreement:
            step = best - previous
            return layer if step <= 0 else layer - 1 + (agreement - previous) / step
        previous = best
    return None


@dataclass(frozen=True)
class ScalingFit:
    """Agreement against training tokens, fitted as a + b·log2(tokens) (least squares): the
    simplest curve that a handful of points can support; it says where the trend points, not
    where training will end (such curves bend down as they near what the adapters can learn).
    """

    depth: int
    points: tuple[tuple[int, float], ...]
    per_doubling: float
    """Agreement gained per doubling of the training tokens."""
    intercept: float

    def at(self, tokens: float) -> float:
        """The fitted agreement after `tokens` training tokens."""
        return self.intercept + self.per_doubling * math.log2(tokens)

    def tokens_for(self, target: float) -> float | None:
        """Training tokens at which the fit reaches `target`; None when it never does."""
        if self.per_doubling <= 0:
            return None
        return 2 ** ((target - self.intercept) / self.per_doubling)


def scaling_fit(points: list[tuple[int, float]], depth: int) -> ScalingFit | None:
    """The log-linear fit of agreement on tokens; None with fewer than two distinct sizes."""
    if len({t for t, _ in points}) < 2:
        return None
    xs = [math.log2(t) for t, _ in points]
    ys = [a for _, a in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return ScalingFit(depth, tuple(points), slope, my - slope * mx)


def variant_rows(report: dict | None) -> list[dict]:
    """The adapters' variant comparison (benchmarks/adapter_variants.json) as table rows."""
    rows = []
    for name, v in ((report or {}).get("variants") or {}).items():
        rows.append({"variant": name, "changes": ", ".join(f"{k}={x}" for k, x in
                                                           v.get("overrides", {}).items())
                     or "(baseline)", "steps": v.get("steps"), "tokens": v.get("tokens"),
                     "train s": v.get("train_s"), "dev agreement d8": v.get("dev_agreement_d8"),
                     "dev agreement d15": v.get("dev_agreement_d15")})
    return rows


GAP_SOURCES = {"sharegpt": "ShareGPT first turns", "wiki": "Wikipedia instructions",
               "sharegpt-followup": "ShareGPT later turns",
               "sharegpt-turn": "ShareGPT later turns asked alone"}
"""The corpus sources of `train gap`'s slices, in words."""


@dataclass(frozen=True)
class GapSlice:
    """One slice of `python -m m2r2core.train gap`: the fast stream's agreement by depth on the
    first answers of one split and source.
    """

    split: str
    source: str
    samples: int
    agreement: tuple[float, ...]
    first_depth: int = 1

    @property
    def held_out(self) -> bool:
        """Whether nothing was trained on these answers (dev or test)."""
        return self.split != "train"

    @property
    def label(self) -> str:
        """The slice in words: which answers, and whether they are in the train split."""
        kind = GAP_SOURCES.get(self.source, self.source)
        return f"{kind}, {'held out' if self.held_out else 'train split'}"

    def at(self, depth: int) -> float | None:
        """The agreement at one fast depth, or None outside the stream."""
        index = depth - self.first_depth
        return self.agreement[index] if 0 <= index < len(self.agreement) else None


def gap_slices(report: dict | None) -> list[GapSlice]:
    """The slices of a `train gap` report (rows that are not well-formed are skipped)."""
    if not isinstance(report, dict) or not isinstance(report.get("slices"), list):
        return []
    first, out = report.get("first_depth", 1), []
    for row in report["slices"]:
        try:
            out.append(GapSlice(str(row["split"]), str(row["source"]), int(row["samples"]),
                                tuple(float(a) for a in row["agreement"]),
                                int(first) if isinstance(first, int) else 1))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _read(path: Path, problems: list[str]) -> object | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.append(f"{path.name} could not be read ({err}).")
        return None


def training_report(folder: str | Path | None) -> TrainingReport:
    """Everything the folder's cards and training log say; an empty report without a folder."""
    if folder is None:
        return TrainingReport(folder="", problems=("No trained files are loaded for this model; "
                                                   "train them with `python -m m2r2core.train`.",))
    folder = Path(folder)
    problems: list[str] = []
    cards = {}
    for kind, name in ARTIFACT_CARDS.items():
        card = _read(folder / name, problems)
        if isinstance(card, dict):
            cards[kind] = card
    log = _read(folder / TRAINING_LOG, problems)
    log = log if isinstance(log, dict) else {}
    history = _read(folder / HISTORY, problems)
    history = history.get("states", []) if isinstance(history, dict) else []
    return TrainingReport(folder=folder.name, cards=cards, problems=tuple(problems),
                          evaluations=tuple(log.get("evaluations", ())),
                          steps=tuple(log.get("steps", ())),
                          history=tuple(r for r in history if isinstance(r, dict)))
