"""The oracle gap of an exit rule, and how well its scores are calibrated.

For every traced token, the **oracle exit depth** on a stream is the first depth from which that
stream's lens agrees with the full model's token and keeps agreeing at every deeper depth the
stream has (the earliest exit that could never be wrong); a token whose stream never settles has
oracle depth N (only the full model is safe). Against it, a rule's exit (analysis/exits.py) is:

- **premature**: it exited and emitted another token than the full model (a token lost);
- **late**: it emitted the right token but deeper than the oracle (layers wasted, N − oracle when
  it never fired although the stream had settled);
- **right**: it emitted the right token no deeper than the oracle.

The reliability diagram bins a rule's scores at every (token, depth) from `min_layer` on and
compares each bin's mean score with how often the lens was right there (its top-1 equals the
full model's token); the expected calibration error (ECE) is the bin-size-weighted mean gap.
Everything is teacher-forced on the full model's recorded run, like the debugger's re-decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.exits import Decision, checked_depths, decide_all, lens_agrees
from m2r2core.trace import TokenStep

VERDICTS = ("right", "late", "premature")


def oracle_depth(step: TokenStep, stream: str, n_layers: int) -> int:
    """The first depth from which the stream's lens agrees and keeps agreeing (N if never)."""
    agrees = lens_agrees(step, stream)
    depth = len(agrees)
    while depth > 1 and agrees[depth - 1]:
        depth -= 1
    if depth == len(agrees):  # the deepest depth disagrees: the stream never settles
        return n_layers
    return min(depth, n_layers)


@dataclass(frozen=True)
class GapRow:
    """One token against the oracle."""

    position: int
    text: str
    oracle: int
    depth: int
    """The rule's exit depth (N when it never fired)."""
    verdict: str
    wasted: int
    """Layers run beyond the oracle (late tokens; 0 otherwise)."""


def gap_rows(steps: tuple[TokenStep, ...], decisions: list[Decision], stream: str,
             n_layers: int) -> list[GapRow]:
    """Every token's oracle depth, exit depth and verdict."""
    rows = []
    for step, decision in zip(steps, decisions, strict=True):
        oracle = oracle_depth(step, stream, n_layers)
        if not decision.agrees:
            verdict, wasted = "premature", 0
        elif decision.depth > oracle:
            verdict, wasted = "late", decision.depth - oracle
        else:
            verdict, wasted = "right", 0
        rows.append(GapRow(step.position, step.text, oracle, decision.depth, verdict, wasted))
    return rows


def gap_summary(rows: list[GapRow], n_layers: int) -> dict:
    """Counts and shares of each verdict, mean layers wasted per token, mean oracle depth."""
    n = max(1, len(rows))
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    return {"tokens": len(rows), **counts, **{f"{v}_share": counts[v] / n for v in VERDICTS},
            "wasted_per_token": sum(r.wasted for r in rows) / n,
            "mean_oracle_depth": float(np.mean([r.oracle for r in rows])) if rows
            else float(n_layers),
            "mean_exit_depth": float(np.mean([r.depth for r in rows])) if rows
            else float(n_layers)}


def gap_sweep(steps: tuple[TokenStep, ...], stream: str, rule: str, min_layer: int,
              n_layers: int, thresholds: np.ndarray | None = None,
              depths: tuple[int, ...] = ()) -> list[dict]:
    """gap_summary at each threshold (default: 21 from 0 to 1): layers wasted against tokens
    lost as the threshold moves.
    """
    grid = np.linspace(0.0, 1.0, 21) if thresholds is None else thresholds
    out = []
    for t in grid:
        decisions = decide_all(steps, stream, rule, float(t), min_layer, n_layers, depths)
        out.append({"threshold": float(t)}
                   | gap_summary(gap_rows(steps, decisions, stream, n_layers), n_layers))
    return out


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram of one rule on one stream."""

    bins: tuple[float, ...]
    """The bin edges (n + 1)."""
    confidence: tuple[float | None, ...]
    """Mean score in each bin (None when empty)."""
    accuracy: tuple[float | None, ...]
    """How often the lens was right in each bin."""
    counts: tuple[int, ...]
    ece: float
    """Expected calibration error over every (token, depth)."""
    ece_by_depth: dict[int, float]
    """The same, per depth."""


def reliability(steps: tuple[TokenStep, ...], stream: str, rule: str, min_layer: int,
                n_layers: int, n_bins: int = 10, depths: tuple[int, ...] = ()) -> Reliability:
    """The rule's scores against how often exiting there was right, at the depths it checks
    (from min_layer on, or the named `depths`).
    """
    scores, right, seen_at = [], [], []
    for step in steps:
        values = step.rule_scores.of(stream, rule)
        agrees = lens_agrees(step, stream)
        last = len(values) if stream == "fast" else min(len(values), n_layers - 1)
        for depth in checked_depths(min_layer, last, depths):
            if depth < len(agrees):
                scores.append(float(values[depth - 1]))
                right.append(bool(agrees[depth]))
                seen_at.append(depth)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    s, r, d = np.clip(np.array(scores, float), 0, 1), np.array(right, float), np.array(seen_at)
    ece, conf, acc, counts = _calibration(s, r, edges)
    by_depth = {int(x): _calibration(s[d == x], r[d == x], edges)[0] for x in np.unique(d)}
    return Reliability(tuple(edges.tolist()), conf, acc, counts, ece, by_depth)


def _calibration(scores: np.ndarray, right: np.ndarray, edges: np.ndarray) -> tuple:
    """(ECE, per-bin confidence, per-bin accuracy, per-bin counts)."""
    index = np.clip(np.digitize(scores, edges[1:-1]), 0, len(edges) - 2)
    conf, acc, counts, ece = [], [], [], 0.0
    for b in range(len(edges) - 1):
        mask = index == b
        n = int(mask.sum())
        counts.append(n)
        if n == 0:
            conf.append(None)
            acc.append(None)
            continue
        c, a = float(scores[mask].mean()), float(right[mask].mean())
        conf.append(c)
        acc.append(a)
        ece += n / max(1, len(scores)) * abs(a - c)
    return ece, tuple(conf), tuple(acc), tuple(counts)
