"""Calibrating an exit threshold with a guarantee, on real early-exit decoding.

`python -m analysis.calibrate --rule confidence --stream fast --level 0.9 --delta 0.1 ...`

The user picks a rule, a stream, a quality measure against the full model's own output (ROUGE-L, or
token agreement: the share of positions where the early-exit output has the full model's token), a
level (quality at least this, on average) and a confidence 1 − δ. The procedure is **Learn-then-
Test with fixed-sequence testing** (Angelopoulos et al. 2021, as CALM uses it): with loss L = 1 −
quality per prompt and ε = 1 − level, the thresholds are tested from the most conservative (1.0:
nothing exits) to the most aggressive; the null hypothesis "the risk E[L] at this threshold exceeds
ε" is rejected when its Hoeffding p-value exp(−n·kl(mean L ‖ ε)) (for mean L < ε; the relative-
entropy form of Hoeffding's inequality, the first term of the Hoeffding–Bentkus p-value) is at most
δ, and testing stops at the first threshold not rejected. The chosen threshold is the last one
rejected: with probability at least 1 − δ over the calibration prompts, its risk on prompts from
the same distribution is at most ε. Fixed-sequence testing needs no multiple-testing correction
because the order is fixed before seeing the data; the Hoeffding bound holds for any loss in [0,
1]. It needs enough prompts: at zero loss n prompts certify a level of at most δ^(1/n) (30 prompts:
0.926 at δ = 0.1).

The guarantee is about real early-exit decoding, where an exit changes every later token's
context: every tested threshold decodes every calibration prompt for real (results cached per
prompt and setting). The chosen threshold is then checked on held-out prompts, again by real
decoding. `splits` repeats the split of a prompt pool at random (decoding each prompt and
threshold once), to measure how often the guarantee held against the δ promised.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from analysis.exits import decide_all, rouge_l, summary
from analysis.prompts import Prompt, load_prompts
from m2r2core.config import DecodeConfig, EngineConfig
from m2r2core.engine import Engine, environment
from m2r2core.exits.early_exit import ExitConfig
from m2r2core.exits.routers import RULES, ExitRule

METRICS = ("rouge", "agreement")
GRID = (1.0, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
"""Thresholds from the most conservative to the most aggressive (the fixed sequence)."""


def quality(metric: str, tokens: list[int], full_tokens: list[int], text: str, full_text: str
            ) -> float:
    """ROUGE-L against the full model's output, or the share of its positions matched."""
    if metric == "rouge":
        return rouge_l(text, full_text)
    same = sum(a == b for a, b in zip(tokens, full_tokens, strict=False))
    return same / max(len(tokens), len(full_tokens), 1)


def hoeffding_p(losses: list[float], epsilon: float) -> float:
    """p-value of "risk > ε" given losses in [0, 1]: exp(−n·kl(mean ‖ ε)), Hoeffding's bound in
    its relative-entropy form (1 when the mean is not below ε).
    """
    n = len(losses)
    mean = sum(losses) / n if n else 1.0
    if not n or mean >= epsilon:
        return 1.0
    kl = (mean * math.log(mean / epsilon) if mean > 0 else 0.0) + (
        (1 - mean) * math.log((1 - mean) / (1 - epsilon)))
    return math.exp(-n * kl)


def best_level(n: int, delta: float) -> float:
    """The highest level n prompts can certify at confidence 1 − δ, even with zero loss."""
    return delta ** (1 / n) if n else 0.0


@dataclass
class Outcome:
    """One prompt decoded by the full model or early exit at one threshold."""

    tokens: list[int]
    text: str
    ms_per_token: float
    mean_depth: float


class Decoder:
    """Real decoding with a cache: the full model once per prompt, early exit once per prompt
    and threshold.
    """

    def __init__(self, engine: Engine, rule: str, stream: str, min_layer: int,
                 max_new_tokens: int, kv_fill: str = "jit") -> None:
        """Decode with this rule, stream and minimum layer, greedy, `max_new_tokens` each."""
        self.engine, self.rule, self.stream, self.min_layer = engine, rule, stream, min_layer
        self.kv_fill = kv_fill
        self.cfg = DecodeConfig(max_new_tokens=max_new_tokens, trace=False)
        self.cache: dict[tuple[str, float | None], Outcome] = {}

    def full(self, prompt: Prompt) -> Outcome:
        """The full model's output for a prompt."""
        return self._get(prompt, None)

    def exit(self, prompt: Prompt, threshold: float) -> Outcome:
        """Early exit's output at a threshold."""
        return self._get(prompt, threshold)

    def _get(self, prompt: Prompt, threshold: float | None) -> Outcome:
        key = (prompt.id, threshold)
        if key not in self.cache:
            engine = self.engine
            gen = (engine.generate(prompt.text, self.cfg) if threshold is None else
                   engine.generate_exits(prompt.text, self.cfg, ExitConfig(ExitRule(
                       self.rule, self.stream, threshold, self.min_layer), self.kv_fill)))
            steps = list(gen)
            tokens = [s.token_id for s in steps]
            depths = [s.exit_layer for s in steps[1:]] or [engine.parts.n_layers]
            self.cache[key] = Outcome(tokens, engine.tokenizer.decode(
                tokens, skip_special_tokens=True), gen.ms_per_token, statistics.mean(depths))
        return self.cache[key]

    def loss(self, prompt: Prompt, threshold: float, metric: str) -> float:
        """1 − quality of early exit at a threshold against the full model, on one prompt."""
        full, mine = self.full(prompt), self.exit(prompt, threshold)
        return 1.0 - quality(metric, mine.tokens, full.tokens, mine.text, full.text)


@dataclass
class Calibration:
    """What Learn-then-Test found on the calibration prompts, and the held-out check."""

    rule: str
    stream: str
    metric: str
    level: float
    delta: float
    threshold: float | None
    """The most aggressive threshold whose risk was certified (None: not even the first)."""
    tested: list[dict] = field(default_factory=list)
    """Each threshold tested in order: its mean loss, p-value, rejected or not."""
    calibration_speedup: float | None = None
    mean_exit_depth: float | None = None
    heldout_risk: float | None = None
    heldout_speedup: float | None = None
    held: bool | None = None
    """Whether the held-out risk stayed within ε."""


def learn_then_test(decoder: Decoder, prompts: list[Prompt], metric: str, level: float,
                    delta: float, grid: tuple[float, ...] = GRID,
                    progress: Callable[[str], None] | None = None) -> Calibration:
    """Fixed-sequence testing over the grid on `prompts` (see the module docstring)."""
    epsilon = 1.0 - level
    result = Calibration(decoder.rule, decoder.stream, metric, level, delta, None)
    for threshold in grid:
        losses = []
        for prompt in prompts:
            if progress:
                progress(f"threshold {threshold:g}: {prompt.id}")
            losses.append(decoder.loss(prompt, threshold, metric))
        p = hoeffding_p(losses, epsilon)
        rejected = p <= delta
        result.tested.append({"threshold": threshold, "risk": sum(losses) / len(losses),
                              "p_value": p, "certified": rejected})
        if not rejected:
            break
        result.threshold = threshold
    if result.threshold is not None:
        result.calibration_speedup = _speedup(decoder, prompts, result.threshold)
        result.mean_exit_depth = statistics.mean(
            decoder.exit(p, result.threshold).mean_depth for p in prompts)
    return result


def check_heldout(decoder: Decoder, result: Calibration, prompts: list[Prompt]) -> Calibration:
    """Decode the held-out prompts at the chosen threshold; did the risk stay within ε?"""
    if result.threshold is None or not prompts:
        return result
    losses = [decoder.loss(p, result.threshold, result.metric) for p in prompts]
    result.heldout_risk = sum(losses) / len(losses)
    result.heldout_speedup = _speedup(decoder, prompts, result.threshold)
    result.held = result.heldout_risk <= 1.0 - result.level
    return result


def teacher_forced_gap(decoder: Decoder, prompts: list[Prompt], threshold: float) -> dict:
    """Token agreement with the full model at one threshold, re-decided on the full model's
    recorded trajectories (teacher-forced, what the debugger's slider shows) and by real
    early-exit decoding (where each exit changes the later context), averaged over prompts.
    """
    engine = decoder.engine
    n = engine.parts.n_layers
    cfg = DecodeConfig(max_new_tokens=decoder.cfg.max_new_tokens, capture_residuals=False)
    forced, real = [], []
    for prompt in prompts:
        steps = engine.run(prompt.text, cfg).trace.steps[1:]
        decisions = decide_all(steps, decoder.stream, decoder.rule, threshold,
                               decoder.min_layer, n)
        forced.append(summary(decisions, n)["agreement"])
        full, mine = decoder.full(prompt), decoder.exit(prompt, threshold)
        real.append(quality("agreement", mine.tokens, full.tokens, mine.text, full.text))
    return {"threshold": threshold, "teacher_forced_agreement": statistics.mean(forced),
            "real_agreement": statistics.mean(real)}


def _speedup(decoder: Decoder, prompts: list[Prompt], threshold: float) -> float:
    """Median over prompts of full-model ms/token over early-exit ms/token."""
    return statistics.median(decoder.full(p).ms_per_token / max(1e-9, decoder.exit(
        p, threshold).ms_per_token) for p in prompts)


def splits(decoder: Decoder, pool: list[Prompt], n_calib: int, n_splits: int, metric: str,
           level: float, delta: float, seed: int = 0, progress=None) -> dict:
    """Learn-then-Test on `n_splits` random calibration/held-out splits of one prompt pool."""
    rng = random.Random(seed)
    runs = []
    for index in range(n_splits):
        shuffled = pool[:]
        rng.shuffle(shuffled)
        calib, held = shuffled[:n_calib], shuffled[n_calib:]
        result = check_heldout(decoder, learn_then_test(decoder, calib, metric, level, delta,
                                                        progress=progress), held)
        runs.append(asdict(result))
        if progress:
            progress(f"split {index + 1}/{n_splits} done")
    decided = [r for r in runs if r["held"] is not None]
    return {"splits": n_splits, "certified": len(decided),
            "held": sum(r["held"] for r in decided),
            "held_rate": sum(r["held"] for r in decided) / len(decided) if decided else None,
            "promised": 1 - delta,
            "median_heldout_speedup": statistics.median(r["heldout_speedup"] for r in decided)
            if decided else None, "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point: one calibration (and its held-out check), or --splits random splits."""
    p = argparse.ArgumentParser(prog="python -m analysis.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rule", default="confidence", choices=RULES)
    p.add_argument("--stream", default="fast", choices=["fast", "slow", "tuned"])
    p.add_argument("--min-layer", type=int, default=4)
    p.add_argument("--metric", default="rouge", choices=METRICS)
    p.add_argument("--level", type=float, default=0.9, help="quality at least this, on average")
    p.add_argument("--delta", type=float, default=0.1, help="the guarantee holds w.p. 1 - delta")
    p.add_argument("--prompts", nargs="+", default=["koala", "selfinstruct", "vicuna",
                                                     "mt-bench"])
    p.add_argument("--pool", type=int, default=60, help="prompts drawn from the sets")
    p.add_argument("--calib", type=int, default=30, help="calibration prompts per split")
    p.add_argument("--splits", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/calibration.json"))
    args = p.parse_args(argv)
    if not 0 < args.level < 1 or not 0 < args.delta < 1:
        p.error("--level and --delta must be between 0 and 1")
    if not 0 < args.calib < args.pool:
        p.error("--calib must be at least 1 and below --pool (the rest is held out)")
    engine = Engine.load(EngineConfig(dtype=args.dtype, threads=args.threads))
    every = [q for name in args.prompts for q in load_prompts(name)]
    pool = random.Random(args.seed).sample(every, min(args.pool, len(every)))
    decoder = Decoder(engine, args.rule, args.stream, args.min_layer, args.max_new_tokens)
    report = splits(decoder, pool, args.calib, args.splits, args.metric, args.level, args.delta,
                    args.seed, lambda what: print(what, file=sys.stderr))
    report |= {"command": " ".join(["python -m analysis.calibrate"] + (argv or sys.argv[1:])),
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "environment": environment(), "adapters": engine.accel_note,
               "decoded_runs": len(decoder.cache)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    return report


if __name__ == "__main__":
    main()
