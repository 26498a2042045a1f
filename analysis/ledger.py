"""Speedup ledgers: where a run's time went, the speedup its own measured quantities predict, and
what it would need to reach a target (the break-even predictor).

**Speculative decoding.** With a plain decoding step costing T (measured on the same prompt), a
round that drafts k tokens at c_d·T each and verifies them in one pass of c_v·T emits a + 1
tokens (a accepted drafts plus the model's own). Over a run:

    predicted speedup = E[a + 1] / (E[k]·c_d + c_v)

with every quantity the run's own mean. The measured speedup also pays what the formula leaves
out (bookkeeping between rounds: sampling, the record, cache crops), so the two differ by that
overhead. To reach a target speedup S the run needs E[a] = S·(E[k]·c_d + c_v) − 1 accepted drafts
per round; with a per-draft acceptance α that does not depend on position (the usual
simplification; the page shows the measured acceptance by position beside it), a chain of k drafts
keeps E[a] = α(1 − α^k)/(1 − α) of them, solved for α by bisection.

**Early exit.** A token that leaves at depth d costs d block calls at c_b·T each (the fast row
and just-in-time filling ride in the same calls), its exit checks at c_c·T each, the head at c_h·T
and copy filling at c_f·T. From the run's exit distribution:

    predicted speedup = 1 / (E[d]·c_b + E[checks]·c_c + c_h + c_f)

and a target S needs the mean exit depth d* that solves d*·c_b + (d* − m + 1)·c_c + c_h + c_f = 1/S
(checks grow with depth from the minimum layer m).
"""

from __future__ import annotations

from dataclasses import dataclass

from m2r2core.trace import SpecRound, TokenStep


@dataclass(frozen=True)
class SpecLedger:
    """One speculative run against plain decoding of the same prompt."""

    plain_ms: float
    """T: one plain decoding step."""
    spec_ms: float
    """Measured speculative ms per token (after the first)."""
    rounds: int
    mean_drafted: float
    """E[k]: drafts per round."""
    mean_accepted: float
    """E[a]: accepted drafts per round."""
    draft_cost: float
    """c_d: one draft as a fraction of T."""
    verify_cost: float
    """c_v: one verification as a fraction of T."""
    time_ms: dict
    """Where the decoding time went: drafting, verification, the rest."""

    @property
    def measured_speedup(self) -> float:
        """Plain ms per token over speculative ms per token."""
        return self.plain_ms / self.spec_ms if self.spec_ms else 1.0

    @property
    def predicted_speedup(self) -> float:
        """E[a + 1] / (E[k]·c_d + c_v)."""
        cost = self.mean_drafted * self.draft_cost + self.verify_cost
        return (self.mean_accepted + 1.0) / cost if cost else 1.0

    def needed_accepted(self, target: float) -> float:
        """E[a] per round this setting needs for `target` speedup, at its measured costs."""
        return target * (self.mean_drafted * self.draft_cost + self.verify_cost) - 1.0

    def needed_acceptance(self, target: float, k: int) -> float | None:
        """The per-draft acceptance α a chain of k drafts needs for `target` (None: even α = 1
        cannot reach it at these costs).
        """
        return acceptance_for(self.needed_accepted(target), k)


def expected_accepted(alpha: float, k: int) -> float:
    """E[a] of a chain of k drafts each accepted with probability α (independently)."""
    return sum(alpha ** i for i in range(1, k + 1))


def acceptance_for(accepted: float, k: int) -> float | None:
    """The α with expected_accepted(α, k) = accepted (0 if none is needed, None if > k)."""
    if accepted <= 0:
        return 0.0
    if accepted > k:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if expected_accepted(mid, k) < accepted else (low, mid)
    return (low + high) / 2


def spec_ledger(rounds: list[SpecRound], plain_ms: float, spec_ms: float) -> SpecLedger:
    """The ledger of a speculative run (its rounds, prefill excluded) against plain decoding."""
    verified = [r for r in rounds if r.index > 0]
    n = max(1, len(verified))
    drafted = sum(len(r.drafts) for r in verified)
    draft_ms = sum(r.draft_ms for r in verified)
    verify_ms = sum(r.verify_ms for r in verified)
    tokens = sum(len(r.emitted) for r in verified)
    total = spec_ms * tokens
    return SpecLedger(
        plain_ms=plain_ms, spec_ms=spec_ms, rounds=len(verified),
        mean_drafted=drafted / n, mean_accepted=sum(r.accepted for r in verified) / n,
        draft_cost=(draft_ms / drafted) / plain_ms if drafted and plain_ms else 0.0,
        verify_cost=(verify_ms / n) / plain_ms if plain_ms else 0.0,
        time_ms={"drafting": draft_ms, "verification": verify_ms,
                 "the rest": max(0.0, total - draft_ms - verify_ms)})


@dataclass(frozen=True)
class ExitLedger:
    """One early-exit run against the full model on the same prompt."""

    plain_ms: float
    """T: one full-model decoding step."""
    exit_ms: float
    """Measured early-exit ms per token (after the first)."""
    tokens: int
    mean_depth: float
    """E[d]: the exit distribution's mean depth (N for tokens that never left)."""
    checks_per_token: float
    block_cost: float
    check_cost: float
    head_cost: float
    fill_cost: float
    min_layer: int
    time_ms: dict
    depths: tuple[int, ...] = ()
    """The rule's check depths (ExitRule.depths; empty: every depth from min_layer)."""

    @property
    def measured_speedup(self) -> float:
        """Full-model ms per token over early-exit ms per token."""
        return self.plain_ms / self.exit_ms if self.exit_ms else 1.0

    @property
    def predicted_speedup(self) -> float:
        """1 / (E[d]·c_b + E[checks]·c_c + c_h + c_f)."""
        cost = (self.mean_depth * self.block_cost + self.checks_per_token * self.check_cost
                + self.head_cost + self.fill_cost)
        return 1.0 / cost if cost else 1.0

    def predict(self, depths: list[int], checks: list[int]) -> float:
        """The speedup another exit distribution would give at this run's unit costs (A/B of
        re-decided settings): per token its depth and its number of exit checks.
        """
        n = max(1, len(depths))
        cost = (sum(depths) / n * self.block_cost + sum(checks) / n * self.check_cost
                + self.head_cost + self.fill_cost)
        return 1.0 / cost if cost else 1.0

    def needed_depth(self, target: float) -> float | None:
        """The mean exit depth a `target` speedup needs at these costs (None: out of reach even
        at depth 1).
        """
        budget = 1.0 / target - self.head_cost - self.fill_cost
        if self.depths:  # checks at named depths: this run's number of them per token
            budget -= self.checks_per_token * self.check_cost
            depth = budget / self.block_cost if self.block_cost else 0
            return depth if depth >= 1 else None
        per_depth = self.block_cost + self.check_cost
        depth = (budget + (self.min_layer - 1) * self.check_cost) / per_depth if per_depth else 0
        return depth if depth >= 1 else None


def exit_ledger(steps: list[TokenStep], costs: dict, plain_ms: float, exit_ms: float,
                min_layer: int, depths: tuple[int, ...] = ()) -> ExitLedger:
    """The ledger of an early-exit run (its TokenSteps, ExitLoop.costs) against the full model."""
    decoded = [s for s in steps if s.position > 0]
    n = max(1, len(decoded))
    calls = max(1, costs.get("block_calls", 0))
    checks = costs.get("checks", 0)
    parts = {"blocks": costs.get("blocks_ms", 0.0), "exit checks": costs.get("checks_ms", 0.0),
             "head": costs.get("head_ms", 0.0), "kv fill": costs.get("fill_ms", 0.0)}
    total = costs.get("decode_ms", exit_ms * n)
    per = plain_ms if plain_ms else 1.0
    return ExitLedger(
        plain_ms=plain_ms, exit_ms=exit_ms, tokens=len(decoded),
        mean_depth=sum(s.exit_layer for s in decoded) / n, checks_per_token=checks / n,
        block_cost=parts["blocks"] / calls / per,
        check_cost=parts["exit checks"] / max(1, checks) / per,
        head_cost=parts["head"] / n / per, fill_cost=parts["kv fill"] / n / per,
        min_layer=min_layer, depths=tuple(depths),
        time_ms=parts | {"the rest": max(0.0, total - sum(parts.values()))})


def _parser():
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m analysis.ledger", description=main.__doc__)
    p.add_argument("--prompts", default="mt-bench")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exit-rule", default="confidence")
    p.add_argument("--exit-stream", default="fast")
    p.add_argument("--exit-threshold", type=float, default=0.5)
    p.add_argument("--min-layer", type=int, default=4)
    p.add_argument("--spec-stream", default="fast")
    p.add_argument("--draft-layer", type=int, default=8)
    p.add_argument("--max-draft", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("benchmarks/ledger.json"))
    return p


def _one_prompt(engine, text: str, args) -> dict:
    """Both ledgers of one prompt: early exit and speculative decoding against plain."""
    from analysis import compare
    from m2r2core.config import DecodeConfig
    from m2r2core.exits.early_exit import ExitConfig
    from m2r2core.exits.routers import ExitRule
    from m2r2core.spec.speculative import SpecConfig

    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, trace=False)
    exit_cfg = ExitConfig(ExitRule(args.exit_rule, args.exit_stream, args.exit_threshold,
                                   args.min_layer))
    spec = SpecConfig(stream=args.spec_stream, draft_layer=args.draft_layer,
                      max_draft=args.max_draft,
                      draft_vocab="sub" if engine.routers.card else "full")
    ex = compare.compare_exit(engine, text, cfg.replace(trace=True, capture_residuals=False),
                              exit_cfg)
    book = exit_ledger(ex.exit_steps, ex.costs, ex.plain_ms, ex.exit_ms, args.min_layer)
    sp = compare.compare_spec(engine, text, cfg, spec, False)
    sbook = spec_ledger(sp.rounds, sp.plain_ms, sp.spec_ms)
    return {"exit": {"predicted": book.predicted_speedup, "measured": book.measured_speedup,
                     "mean_depth": book.mean_depth},
            "spec": {"predicted": sbook.predicted_speedup, "measured": sbook.measured_speedup,
                     "mean_accepted": sbook.mean_accepted, "draft_cost": sbook.draft_cost,
                     "verify_cost": sbook.verify_cost}}


def main(argv: list[str] | None = None) -> dict:
    """`python -m analysis.ledger`: predicted against measured speedup, per prompt, for an
    early-exit setting and a speculative setting, each against plain decoding of the prompt.
    """
    import json
    import statistics
    import sys

    from analysis.prompts import load_prompts
    from m2r2core.config import EngineConfig
    from m2r2core.engine import Engine, environment

    args = _parser().parse_args(argv)
    engine = Engine.load(EngineConfig(dtype=args.dtype, threads=args.threads))
    rows = []
    for prompt in load_prompts(args.prompts, args.limit):
        rows.append({"id": prompt.id} | _one_prompt(engine, prompt.text, args))
        print(prompt.id, rows[-1], file=sys.stderr)

    def median(kind: str, what) -> float:
        return statistics.median(what(r[kind]) for r in rows)

    report = {"command": " ".join(["python -m analysis.ledger"] + (argv or sys.argv[1:])),
              "args": {k: str(v) for k, v in vars(args).items()}, "environment": environment(),
              "adapters": engine.accel_note, "prompts": rows,
              "median_relative_error": {
                  k: median(k, lambda r: abs(r["predicted"] / r["measured"] - 1))
                  for k in ("exit", "spec")},
              "median_measured": {k: median(k, lambda r: r["measured"]) for k in ("exit", "spec")},
              "median_predicted": {k: median(k, lambda r: r["predicted"])
                                   for k in ("exit", "spec")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "prompts"}, indent=1))
    return report


if __name__ == "__main__":
    main()
