"""Side-by-side runs on one prompt: the plain model against a method (early exit, speculative
decoding, offloaded MoE decoding with a predictor), same prompt, settings, dtype and threads, one
after the other in one process. Each returns the record a page keeps and downloads;
`on_token(kind, count, run)` reports progress after every token ('plain', 'exit', 'trace',
'spec', 'reference', 'baseline', 'offload') so a page can draw it live.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from analysis import speculation
from m2r2core.config import DecodeConfig
from m2r2core.engine import Engine, RunResult
from m2r2core.exits.early_exit import ExitConfig
from m2r2core.exits.routers import ExitRule
from m2r2core.moe.channel import UNRECORDED_QUEUE
from m2r2core.moe.offload import OffloadConfig, OffloadEngine
from m2r2core.spec.speculative import SpecConfig
from m2r2core.trace import Event, RunTrace, SpecRound, TokenStep, from_dict, to_dict

Progress = Callable[[str, int, object], None]


def _quiet(kind: str, count: int, run: object) -> None:
    del kind, count, run


@dataclass
class ExitComparison:
    """One prompt decoded by the full model and with early exit, plus a traced full run whose
    recorded trajectories let every threshold be re-decided without regenerating.
    """

    rule: ExitConfig
    traced: RunResult
    """The full model's run with both streams and every rule's scores recorded."""
    exit_steps: list[TokenStep]
    exit_ms: float
    """Early-exit decoding time per token (after the first)."""
    plain_ms: float
    """The full model's decoding time per token, same prompt and settings."""
    exit_text: str
    plain_text: str
    costs: dict = field(default_factory=dict)
    """Where early exit's decoding time went (ExitLoop.costs, with block_calls)."""

    @property
    def speedup(self) -> float:
        """Measured speedup of early exit over the full model."""
        return self.plain_ms / self.exit_ms if self.exit_ms else 1.0

    def to_dict(self) -> dict:
        """JSON-ready values (the raw residual capture, if any, is not kept)."""
        return dict(rule=dataclasses.asdict(self.rule),
                    traced=json.loads(self.traced.trace.to_json()),
                    exit_steps=[to_dict(s) for s in self.exit_steps], exit_ms=self.exit_ms,
                    plain_ms=self.plain_ms, exit_text=self.exit_text, plain_text=self.plain_text,
                    costs=self.costs)

    @classmethod
    def from_dict(cls, data: dict) -> ExitComparison:
        """Rebuild from `to_dict` output (KeyError/TypeError/ValueError on a damaged one)."""
        rule = dict(data["rule"])
        return cls(ExitConfig(ExitRule(**rule.pop("rule")), **rule),
                   RunResult(RunTrace.from_json(json.dumps(data["traced"])), None),
                   [from_dict(TokenStep, s) for s in data["exit_steps"]], float(data["exit_ms"]),
                   float(data["plain_ms"]), str(data["exit_text"]), str(data["plain_text"]),
                   dict(data.get("costs", {})))


def share_of_gain(speedup: float, oracle: float | None) -> float | None:
    """(speedup − 1) ÷ (oracle's speedup − 1): how much of the oracle's gain a setting reached;
    None when there is no oracle or it gained nothing.
    """
    return (speedup - 1.0) / (oracle - 1.0) if oracle is not None and oracle > 1.0 else None


def compare_exit(engine: Engine, text: str, cfg: DecodeConfig, exit_cfg: ExitConfig,
                 on_token: Progress = _quiet) -> ExitComparison:
    """The full model, then early exit, then a traced full run, on one prompt."""
    plain_cfg = cfg.replace(trace=False)
    plain = engine.generate(text, plain_cfg)
    exiting = engine.generate_exits(text, plain_cfg, exit_cfg)
    for step in plain:
        on_token("plain", step.position + 1, plain)
    for step in exiting:
        on_token("exit", step.position + 1, exiting)
    traced = engine.generate(text, cfg.replace(trace=True))
    for step in traced:
        on_token("trace", step.position + 1, traced)
    costs = exiting.loop.ledger_costs
    return ExitComparison(exit_cfg, traced.result, list(exiting.steps), exiting.ms_per_token,
                          plain.ms_per_token, exiting.result.trace.completion,
                          plain.result.trace.completion, costs)


@dataclass
class SpecComparison:
    """One prompt decoded plainly and speculatively."""

    spec: SpecConfig
    sampling: bool
    rounds: list[SpecRound]
    spec_ms: float
    """Speculative decoding time per token (after the first)."""
    plain_ms: float
    plain_rate: list[tuple[int, float]]
    """Plain decoding's running tokens/s after each token."""
    spec_tokens: list[int]
    plain_tokens: list[int]
    completion: str
    prompt: str = ""
    decode: dict = field(default_factory=dict)
    """The DecodeConfig both runs used, as a dict."""

    @property
    def speedup(self) -> float:
        """Measured speedup of speculative over plain decoding."""
        return self.plain_ms / self.spec_ms if self.spec_ms else 1.0

    @property
    def identical(self) -> bool:
        """Whether both runs produced the same tokens (greedy speculation must)."""
        return self.spec_tokens == self.plain_tokens

    def to_dict(self) -> dict:
        """JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SpecComparison:
        """Rebuild from `to_dict` output (KeyError/TypeError/ValueError on a damaged one)."""
        data = dict(data)
        data["spec"] = SpecConfig(**data["spec"])
        data["rounds"] = [from_dict(SpecRound, r) for r in data["rounds"]]
        data["plain_rate"] = [tuple(p) for p in data["plain_rate"]]
        return cls(**data)


def compare_spec(engine: Engine, text: str, cfg: DecodeConfig, spec: SpecConfig,
                 sampling: bool, on_token: Progress = _quiet) -> SpecComparison:
    """Plain decoding, then speculative decoding, on one prompt."""
    plain_cfg = cfg.replace(trace=False, capture_residuals=False)
    plain = engine.generate(text, plain_cfg)
    run = engine.speculate(text, plain_cfg, spec)
    for step in plain:
        on_token("plain", step.position + 1, plain)
    for _ in run:
        on_token("spec", len(run.tokens), run)
    decoded = max(1, len(run.tokens) - 1)
    latencies = [s.latency_ms for s in plain.steps[1:]]
    return SpecComparison(spec, sampling, list(run.rounds), run.decode_ms / decoded,
                          plain.ms_per_token, speculation.plain_running_rate(latencies),
                          run.tokens, [s.token_id for s in plain.steps], run.completion, text,
                          dataclasses.asdict(plain_cfg))


def spec_variant(engine: Engine, base: SpecComparison, spec: SpecConfig,
                 on_token: Progress = _quiet) -> SpecComparison:
    """Setting B of an A/B: the same prompt and decoding settings as `base` (setting A),
    speculated with `spec`; the plain-decoding figures are A's, so both share one baseline.
    """
    cfg = DecodeConfig.from_dict(base.decode) if base.decode else DecodeConfig()
    run = engine.speculate(base.prompt, cfg, spec)
    for _ in run:
        on_token("spec", len(run.tokens), run)
    decoded = max(1, len(run.tokens) - 1)
    return SpecComparison(spec, base.sampling, list(run.rounds), run.decode_ms / decoded,
                          base.plain_ms, base.plain_rate, run.tokens, base.plain_tokens,
                          run.completion, base.prompt, base.decode)


@dataclass
class ExpertComparison:
    """One prompt through the offloaded MoE: every expert resident (the reference output),
    on-demand LRU (the speed baseline) and the chosen setting, at the same capacity and storage.
    """

    offload: OffloadConfig
    texts: list[str]
    tokens: list[int]
    stalls: list[float]
    """Per generated token, ms its forward pass waited (OffloadToken.stall_ms)."""
    misses: list[int]
    events: list
    routes: list
    summary: dict
    baseline: dict
    identical: bool
    """The setting's output equals the all-resident reference's."""
    warm: list[tuple[int, int]]
    n_layers: int
    n_experts: int
    total: int
    top_k: int
    accel_note: str
    prompt: str = ""
    decode: dict = field(default_factory=dict)
    """The DecodeConfig the runs used, as a dict."""
    resident: dict = field(default_factory=dict)
    """The all-resident reference run's summary: the ceiling's numerator."""
    oracle: dict = field(default_factory=dict)
    """The oracle predictor at the same setting (the run itself when it is the oracle)."""

    def _against_baseline(self, run: dict) -> float | None:
        """On-demand LRU's decode time over `run`'s (None before `run` has one)."""
        ms = run.get("decode_ms")
        return self.baseline["decode_ms"] / ms if ms else None

    @property
    def speedup(self) -> float | None:
        """This setting against on-demand LRU."""
        return self._against_baseline(self.summary)

    @property
    def ceiling(self) -> float | None:
        """All resident over on-demand LRU: no predictor can pass it (beyond timing noise)."""
        return self._against_baseline(self.resident)

    @property
    def oracle_speedup(self) -> float | None:
        """The oracle against on-demand LRU."""
        return self._against_baseline(self.oracle)

    def bounds_passed(self) -> list[str]:
        """The bounds this one run's timings passed ("the ceiling", "the oracle"): each
        setting runs once here, so on a noisy CPU a setting can time faster than a bound it
        cannot pass in expectation.
        """
        speedup = self.speedup
        if speedup is None or self.offload.predictor == "oracle":  # the oracle is its own bound
            return []
        return [name for name, bound in (("the ceiling", self.ceiling),
                                         ("the oracle", self.oracle_speedup))
                if bound is not None and speedup > bound]

    @property
    def oracle_share(self) -> float | None:
        """(speedup − 1) ÷ (the oracle's speedup − 1): how much of the oracle's gain this
        setting reached; None when the oracle gained nothing.
        """
        if self.speedup is None or self.oracle_speedup is None:
            return None
        return share_of_gain(self.speedup, self.oracle_speedup)

    def to_dict(self) -> dict:
        """JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExpertComparison:
        """Rebuild from `to_dict` output (KeyError/TypeError/ValueError on a damaged one)."""
        data = dict(data)
        data["offload"] = OffloadConfig(**{"queue": UNRECORDED_QUEUE} | data["offload"])
        data["events"] = [Event(**e) for e in data["events"]]
        data["routes"] = [[tuple(r) for r in token] for token in data["routes"]]
        data["warm"] = [tuple(k) for k in data["warm"]]
        return cls(**data)


def compare_experts(moe: OffloadEngine, text: str, cfg: DecodeConfig, offload: OffloadConfig,
                    on_token: Progress = _quiet) -> ExpertComparison:
    """All resident, then on-demand LRU, then the setting, then the oracle at the same setting
    (unless the setting is the oracle), on one prompt.
    """
    reference = moe.generate(text, cfg, None)
    for token in reference:
        on_token("reference", token.position + 1, reference)
    base_cfg = OffloadConfig(offload.capacity, offload.bandwidth, "none", offload.lookahead,
                             offload.margin, "lru", reads=offload.reads)
    baseline = moe.generate(text, cfg, base_cfg, reference.routes)
    for token in baseline:
        on_token("baseline", token.position + 1, baseline)
    run = moe.generate(text, cfg, offload, reference.routes)
    for token in run:
        on_token("offload", token.position + 1, run)
    oracle = run
    if offload.predictor != "oracle":
        oracle = moe.generate(text, cfg, dataclasses.replace(offload, predictor="oracle"),
                              reference.routes)
        for token in oracle:
            on_token("oracle", token.position + 1, oracle)
    keys = moe.expert_keys()
    return ExpertComparison(
        offload=offload, texts=[t.text for t in run.tokens], tokens=run.token_ids,
        stalls=[t.stall_ms for t in run.tokens], misses=[t.misses for t in run.tokens],
        events=run.events, routes=run.routes, summary=run.summary(),
        baseline=baseline.summary(), identical=run.token_ids == reference.token_ids,
        warm=keys[: offload.capacity] if offload.warm else [], n_layers=moe.moe.n_layers,
        n_experts=moe.moe.n_experts, total=len(keys), top_k=moe.moe.top_k,
        accel_note=moe.accel_note, prompt=text, decode=dataclasses.asdict(cfg),
        resident=reference.summary(), oracle=oracle.summary())
