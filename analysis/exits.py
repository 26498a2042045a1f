"""Exit decisions re-made on recorded trajectories, and the measures the debugger and the
evaluation report: exit depth, agreement with the full model, ROUGE-L, lens agreement by layer,
and the fast-vs-slow cosine matrix.

A traced run records every rule's score at every depth of both streams (TokenStep.rule_scores)
plus each depth's logit-lens top-1, so a threshold can be re-decided without regenerating: the
token exits at the first depth >= min_layer whose score reaches the threshold and would have
become that depth's lens top-1 (teacher-forced: the context is the full model's own output).
A rule may also be checked only at named depths (ExitRule.depths): `depths` below, empty for
every depth from min_layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from m2r2core.trace import ResidualCapture, TokenStep


@dataclass(frozen=True)
class Decision:
    """What one token would have done under a rule."""

    depth: int
    """Exit depth (N when the rule never fired: the full model)."""
    token_id: int
    agrees: bool
    """The exit token equals the full model's token."""
    exited: bool


def lens_top1(step: TokenStep, stream: str, depth: int) -> int | None:
    """The token a stream's lens reads at a depth: the slow stream's logit lens, the fast
    stream's, or the slow stream through the tuned lens (None where it was not traced).
    """
    if stream == "slow":
        return step.lens_top_ids[depth][0]
    record = step.fast if stream == "fast" else step.tuned
    return record.lens_top1[depth] if record is not None else None


def lens_agrees(step: TokenStep, stream: str) -> tuple[bool, ...]:
    """Whether the stream's lens top-1 equals the full model's token, at depths 0..D."""
    if stream == "slow":
        return step.lens_agrees
    record = step.fast if stream == "fast" else step.tuned
    return record.lens_agrees if record is not None else ()


def config_key(config: dict) -> tuple[str, str, tuple[int, ...]]:
    """An exit_eval setting's (stream, rule, check depths); reports from before check depths
    existed have none.
    """
    return config["stream"], config["rule"], tuple(config.get("depths") or ())


def setting_label(rule: str, depths) -> str:
    """A rule's name with its check depths when it has them: 'mlp' or 'mlp@8,12,15,17'."""
    return f"{rule}@{','.join(str(d) for d in depths)}" if depths else rule


def checked_depths(min_layer: int, last: int, depths: tuple[int, ...] = ()) -> list[int]:
    """The depths a rule decides at, up to the stream's `last` checked depth: every depth from
    min_layer, or only the named `depths` from min_layer on.
    """
    every = range(max(1, min_layer), last + 1)
    return [d for d in every if d in depths] if depths else list(every)


def decide(step: TokenStep, stream: str, rule: str, threshold: float, min_layer: int,
           n_layers: int, depths: tuple[int, ...] = ()) -> Decision:
    """Re-decide one traced token's exit."""
    scores = step.rule_scores.of(stream, rule)
    if not scores:
        return Decision(n_layers, step.token_id, True, False)
    last = len(scores) if stream == "fast" else min(len(scores), n_layers - 1)
    for depth in checked_depths(min_layer, last, depths):
        if scores[depth - 1] >= threshold:
            token = lens_top1(step, stream, depth)
            return Decision(depth, token, token == step.token_id, True)
    return Decision(n_layers, step.token_id, True, False)


def decide_all(steps: tuple[TokenStep, ...], stream: str, rule: str, threshold: float,
               min_layer: int, n_layers: int, depths: tuple[int, ...] = ()) -> list[Decision]:
    """Decisions for every traced token (untraced tokens count as full-depth)."""
    return [decide(s, stream, rule, threshold, min_layer, n_layers, depths) for s in steps]


def summary(decisions: list[Decision], n_layers: int) -> dict:
    """Mean exit depth, agreement, exit rate and the layer-count speedup bound N / mean depth."""
    if not decisions:
        return {"mean_depth": float(n_layers), "agreement": 1.0, "exit_rate": 0.0,
                "layer_ratio": 1.0}
    depth = float(np.mean([d.depth for d in decisions]))
    return {"mean_depth": depth,
            "agreement": float(np.mean([d.agrees for d in decisions])),
            "exit_rate": float(np.mean([d.exited for d in decisions])),
            "layer_ratio": n_layers / depth}


def threshold_sweep(steps: tuple[TokenStep, ...], stream: str, rule: str, min_layer: int,
                    n_layers: int, thresholds: np.ndarray | None = None,
                    depths: tuple[int, ...] = ()) -> list[dict]:
    """summary() at each threshold (default: 21 from 0 to 1)."""
    grid = np.linspace(0.0, 1.0, 21) if thresholds is None else thresholds
    return [{"threshold": float(t)} | summary(
        decide_all(steps, stream, rule, float(t), min_layer, n_layers, depths), n_layers)
        for t in grid]


def available_rules(steps: tuple[TokenStep, ...]) -> dict[str, list[str]]:
    """{stream: [rules]} recorded in these steps."""
    out: dict[str, list[str]] = {}
    for key in (steps[0].rule_scores if steps else {}):
        stream, rule = key.split("/")
        out.setdefault(stream, []).append(rule)
    return out


def lens_agreement_by_layer(steps: tuple[TokenStep, ...]) -> dict[str, list[float]]:
    """Fraction of tokens whose lens top-1 at each depth is the final top-1, per stream (the
    tuned stream read through the tuned lens).
    """
    out = {}
    slow = [s.lens_agrees for s in steps if s.lens_agrees]
    if slow:
        out["slow"] = np.mean(np.array(slow, dtype=float), axis=0).tolist()
    for stream in ("fast", "tuned"):
        rows = [getattr(s, stream).lens_agrees for s in steps if getattr(s, stream) is not None]
        if rows:
            out[stream] = np.mean(np.array(rows, dtype=float), axis=0).tolist()
    return out


def alignment_by_layer(steps: tuple[TokenStep, ...]) -> dict[str, list[float]]:
    """Median cos(h_d, h^s_N) per depth, per stream."""
    out = {}
    slow = [s.cosine_to_final for s in steps if s.cosine_to_final]
    if slow:
        out["slow"] = np.median(np.array(slow), axis=0).tolist()
    for stream in ("fast", "tuned"):
        rows = [getattr(s, stream).cosine_to_final for s in steps
                if getattr(s, stream) is not None]
        if rows:
            out[stream] = np.median(np.array(rows), axis=0).tolist()
    return out


def fast_slow_cosine(capture: ResidualCapture) -> np.ndarray:
    """(D+1, N+1) mean over tokens of cos(h^f_i, h^s_j): a ridge along j ~ r*i shows the rate."""
    if capture.fast is None:
        raise ValueError("this capture has no fast stream (no adapters were loaded)")
    fast = capture.fast / np.linalg.norm(capture.fast, axis=-1, keepdims=True).clip(1e-12)
    slow = capture.hidden / np.linalg.norm(capture.hidden, axis=-1, keepdims=True).clip(1e-12)
    return np.einsum("tih,tjh->ij", fast, slow) / fast.shape[0]


_WORD = re.compile(r"\w+", re.UNICODE)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (Lin 2004), by longest common subsequence."""
    a, b = _WORD.findall(candidate.lower()), _WORD.findall(reference.lower())
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def speedup_at_quality(points: list[dict], quality: float, key: str = "rouge_full") -> float:
    """Best measured speedup among a curve's points whose quality is at least `quality`,
    linearly interpolated to the crossing point; NaN if no point reaches it.
    """
    ordered = sorted(points, key=lambda p: p["speedup"])
    best = float("nan")
    for low, high in zip(ordered, ordered[1:], strict=False):
        if low[key] >= quality > high[key]:
            frac = (low[key] - quality) / (low[key] - high[key])
            best = max(best if best == best else 0.0,
                       low["speedup"] + frac * (high["speedup"] - low["speedup"]))
    for p in ordered:
        if p[key] >= quality:
            best = max(best if best == best else 0.0, p["speedup"])
    return best


def break_even_rows(configs: list[dict]) -> list[dict]:
    """One row per measured exit setting (exit_eval's configs) with its break-even line: quality,
    measured and predicted speedup, where tokens left, the unit costs as fractions of a
    full-model step, and the mean exit depth 1.0x would need at those costs (None: no depth is
    shallow enough). Settings measured before reports carried the line are left out.
    """
    rows = []
    for c in sorted(configs, key=lambda c: (*config_key(c), c["threshold"])):
        line = c.get("break_even")
        if not line:
            continue
        rows.append({"stream": c["stream"], "rule": c["rule"],
                     "checked_at": ",".join(map(str, config_key(c)[2])) or "every depth",
                     "threshold": c["threshold"],
                     "rouge_full": c["rouge_full"], "measured": line["measured"],
                     "predicted": line["predicted"], "mean_depth": line["mean_depth"],
                     "checks_per_token": line["checks_per_token"],
                     "block_cost": line["block_cost"], "check_cost": line["check_cost"],
                     "head_and_fill_cost": line["head_cost"] + line["fill_cost"],
                     "needed_depth_1x": line["needed_depth_1x"]})
    return rows


def checks_made(decisions: list[Decision], min_layer: int, last_depth: int,
                depths: tuple[int, ...] = ()) -> list[int]:
    """How many exit checks each re-decided token made: its checked depths up to its exit
    depth, or up to the stream's last checked depth when the rule never fired.
    """
    checked = checked_depths(min_layer, last_depth, depths)
    return [sum(1 for c in checked if c <= (d.depth if d.exited else last_depth))
            for d in decisions]


def first_difference(a: list[Decision], b: list[Decision]) -> int | None:
    """The first token where two settings exit at another depth or emit another token."""
    for index, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.depth != y.depth or x.token_id != y.token_id:
            return index
    return None
