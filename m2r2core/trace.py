"""Typed records the engine emits and the UI renders, for all four run types: one TokenStep per
generated token of a plain or early-exit run (with the accelerated stream's FastStats when it
was traced), one SpecRound per draft-and-verify round, one OffloadToken per token of an
offloaded MoE run and an Event per timed thing in the expert tiers; one RunTrace per plain or
early-exit generation, and a ResidualCapture holding the raw hidden states (numpy) for views that
need vectors (projections). Records hold only Python scalars, strings, tuples and (for
rule_scores) a read-only dict of tuples (RuleScores), so that they serialise to JSON (`to_dict`,
`from_dict`), download from the UI and diff in tests.

Layer axis convention: index 0 is the embedding output h_0, index l the output of block l, index N
the last block's output (before the final norm). The statistics of a generated token describe the
residual trajectory *that produced it*: the stream at the position before the token, whose final
state the LM head read to choose it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 4
"""3: the accelerated stream's per-depth statistics moved from seven fast_* fields of TokenStep
into one FastStats record; 4: TokenStep.tuned, the slow stream read through the tuned lens
(older traces still open)."""


@dataclass(frozen=True)
class FastStats:
    """Per-depth statistics of the fast stream h^f_0..h^f_D, measured against the slow final
    state (each a (D+1,) tuple).
    """

    residual_norm: tuple[float, ...]
    relative_speed: tuple[float, ...]
    cosine_to_final: tuple[float, ...]
    """cos(h^f_d, h^s_N): alignment with the slow stream's final state."""
    lens_entropy: tuple[float, ...]
    lens_top1: tuple[int, ...]
    lens_top1_prob: tuple[float, ...]
    lens_agrees: tuple[bool, ...]
    """argmax p^f_d == argmax p^s_N."""


class RuleScores(dict):
    """Every exit rule's scores along a token's trajectories, keyed 'stream/rule' (e.g.
    'fast/arla': one score per depth 1..D): a dict (so it serialises as one) that refuses to
    change after it is made; values are tuples of floats.
    """

    def __init__(self, items=()) -> None:
        """From a mapping or (key, scores) pairs; scores become tuples of floats."""
        pairs = items.items() if isinstance(items, dict) else items
        super().__init__((str(k), tuple(float(x) for x in v)) for k, v in pairs)

    def of(self, stream: str, rule: str) -> tuple[float, ...]:
        """The scores of one rule on one stream; () when they were not recorded."""
        return self.get(f"{stream}/{rule}", ())

    def _refuse(self, *_args, **_kwargs):
        raise TypeError("rule scores are a record of a run; they cannot be changed")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse
    __ior__ = _refuse

    def __reduce__(self):
        """Pickle (Streamlit's session copies) through the pairs, not item assignment."""
        return (RuleScores, (tuple(self.items()),))


@dataclass(frozen=True)
class TokenStep:
    """One generated token and the per-layer statistics of the residual stream that produced it.

    Per-layer tuples are empty when the run was not traced.
    """

    position: int
    """Index in the continuation (0 = first generated token)."""
    token_id: int
    text: str
    token_prob: float
    """Probability of this token under the model's final distribution (temperature 1)."""
    exit_layer: int
    """Layer the token was emitted from; N means the full model (no early exit)."""
    source: str
    """'full' for a plain decoding step, 'exit' for an early exit, 'fallback' when an exit rule
    never fired and the token ran the full model."""
    latency_ms: float
    """Wall-clock time of this token: forward pass, sampling and tracing."""
    forward_ms: float
    trace_ms: float
    residual_norm: tuple[float, ...] = ()
    """(N+1,) ‖h_l‖."""
    relative_speed: tuple[float, ...] = ()
    """(N,) ‖h_l − h_{l−1}‖ / ‖h_{l−1}‖ for l = 1..N."""
    cosine_to_final: tuple[float, ...] = ()
    """(N+1,) cos(h_l, h_N)."""
    lens_entropy: tuple[float, ...] = ()
    """(N+1,) entropy of the logit lens softmax(W_U LN_f(h_l)) in nats."""
    lens_top_ids: tuple[tuple[int, ...], ...] = ()
    """(N+1, k) logit-lens top-k token ids, most probable first."""
    lens_top_tokens: tuple[tuple[str, ...], ...] = ()
    """(N+1, k) their text."""
    lens_top_probs: tuple[tuple[float, ...], ...] = ()
    """(N+1, k) their probabilities."""
    lens_agrees: tuple[bool, ...] = ()
    """(N+1,) logit-lens top-1 at layer l equals the final top-1."""
    stream: str = "slow"
    """The residual stream the token was read from: 'slow', 'fast' (accelerated) or 'tuned' (the
    slow stream through the tuned lens)."""
    exit_scores: tuple[float, ...] = ()
    """Early exit only: the exit rule's score at depths check_from, check_from+1, ..."""
    check_from: int = 0
    """Depth of the first entry of exit_scores."""
    fast: FastStats | None = None
    """The accelerated stream of the same position, d = 0 (branch state) .. D; None when it was
    not traced."""
    tuned: FastStats | None = None
    """The slow stream read through the tuned lens, layers 0..N (0 and N as the logit lens reads
    them); None without a tuned lens."""
    rule_scores: RuleScores = field(default_factory=lambda: RuleScores())
    """{'fast/arla': (D,) scores at depths 1..D, 'slow/confidence': (N,) ...}: every exit
    rule's score along both trajectories, so thresholds can be re-decided without regenerating."""

    def __post_init__(self) -> None:
        """Keep rule_scores read-only whatever mapping it was given."""
        if not isinstance(self.rule_scores, RuleScores):
            object.__setattr__(self, "rule_scores", RuleScores(self.rule_scores))

    @property
    def traced(self) -> bool:
        """True when the per-layer statistics were recorded."""
        return bool(self.residual_norm)


@dataclass(frozen=True)
class RunTrace:
    """Everything one generation did, in a form that serialises to JSON and re-opens for replay."""

    run_id: str
    created: str
    mode: str
    prompt: str
    """The user's text."""
    prompt_token_count: int
    model: dict
    """ModelInfo as a dict (name, sizes, dtype, device, fingerprint)."""
    config: dict
    """DecodeConfig as a dict, seed included."""
    environment: dict
    """Versions of python, torch and transformers; torch threads."""
    steps: tuple[TokenStep, ...]
    stop_reason: str
    """'eos', 'max_new_tokens' or 'stopped'."""
    prefill_ms: float
    decode_ms: float
    n_layers: int
    completion: str
    """The continuation decoded as a whole, special tokens skipped."""
    schema_version: int = SCHEMA_VERSION

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Generated token ids in order."""
        return tuple(step.token_id for step in self.steps)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of decoding wall-clock, prefill included."""
        total = (self.prefill_ms + self.decode_ms) / 1000.0
        return len(self.steps) / total if total > 0 else 0.0

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> RunTrace:
        """Rebuild a RunTrace from `to_json` output."""
        data = json.loads(text)
        # Versions 2 and 4 only added fields with defaults; version 3 nests the fast_* fields
        # (_step_from_dict moves them), so older traces still open.
        if data.get("schema_version") not in (1, 2, 3, SCHEMA_VERSION):
            raise ValueError(
                f"trace schema {data.get('schema_version')} is not {SCHEMA_VERSION}; "
                "re-run the generation with this version of the app"
            )
        data["steps"] = tuple(_step_from_dict(step) for step in data["steps"])
        data["schema_version"] = SCHEMA_VERSION
        return cls(**data)


FAST_FIELDS = ("residual_norm", "relative_speed", "cosine_to_final", "lens_entropy",
               "lens_top1", "lens_top1_prob", "lens_agrees")


def _step_from_dict(data: dict) -> TokenStep:
    data = dict(data)
    flat = {k: data.pop(f"fast_{k}") for k in FAST_FIELDS if f"fast_{k}" in data}  # schema 1-2
    if flat and flat.get("residual_norm"):
        data["fast"] = flat
    for name in ("fast", "tuned"):
        if data.get(name) is not None:
            data[name] = FastStats(**{k: tuple(v) for k, v in data[name].items()})
    data["rule_scores"] = RuleScores(data.get("rule_scores", {}))
    return TokenStep(**{k: _tuples(v) if isinstance(v, list) else v for k, v in data.items()})


def _tuples(value: object) -> object:
    """Lists (what JSON gives back for tuples) as tuples, nested ones too."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def to_dict(record: object) -> dict:
    """A record as plain JSON-ready values."""
    return dataclasses.asdict(record)


def from_dict(cls: type, data: dict) -> object:
    """Rebuild a record of `cls` from `to_dict` output (or its JSON round trip); TypeError names
    a field that does not belong.
    """
    if cls is TokenStep:
        return _step_from_dict(data)
    return cls(**{k: _tuples(v) for k, v in data.items()})


@dataclass(frozen=True)
class SpecRound:
    """One draft-and-verify round (round 0 is the prefill, which emits one token, no drafts)."""

    index: int
    position: int
    """Index in the continuation of the first token this round emitted."""
    drafts: tuple[int, ...]
    draft_texts: tuple[str, ...]
    draft_probs: tuple[float, ...]
    """Each draft's probability under the draft distribution."""
    accepted: int
    """How many drafts (a prefix) the model accepted."""
    emitted: tuple[int, ...]
    """Accepted drafts plus the model's own token (cut at EOS or the budget)."""
    emitted_texts: tuple[str, ...]
    correction: bool
    """The model's own token replaced a refused draft (False: a bonus after all passed)."""
    draft_ms: float
    verify_ms: float
    draft_depths: tuple[int, ...] = ()
    """The depth each draft exited at (all draft_layer unless a rule picks; empty for Medusa)."""


@dataclass(frozen=True)
class OffloadToken:
    """One generated token of an offloaded run."""

    position: int
    token_id: int
    text: str
    latency_ms: float
    """Wall time of the forward pass that produced this token (and its sampling)."""
    stall_ms: float
    hits: int
    misses: int
    routes: tuple[tuple[int, ...], ...]
    """Per layer, the experts the forward pass that produced this token used."""


@dataclass(frozen=True)
class Event:
    """One timed thing that happened to an expert or a layer (times in ms from the run start)."""

    kind: str
    """'compute' (a layer), 'load' (the loader), 'stall' (compute waiting), 'hit', 'miss',
    'evict', 'prefetch' (a prediction queued), 'wasted' (a prefetched expert evicted unused),
    'cancel' (a queued prefetch dropped to make room for a demand load)."""
    token: int
    layer: int
    expert: int
    start_ms: float
    end_ms: float
    cause: str = ""
    """For loads: 'demand' or 'prefetch'; for prefetches: the lookahead distance."""


@dataclass(frozen=True)
class ResidualCapture:
    """Raw residual states of the generated tokens, linked to a RunTrace by run id."""

    run_id: str
    hidden: np.ndarray = field(repr=False)
    """(T, N+1, H) float32: h_0..h_N of the position that produced each generated token."""
    fast: np.ndarray | None = field(default=None, repr=False)
    """(T, D+1, H) float32: the accelerated stream h^f_0..h^f_D of the same positions."""

    def __post_init__(self) -> None:
        """Check the array's rank and dtype."""
        if self.hidden.ndim != 3:
            raise ValueError(f"hidden must be (T, N+1, H); got shape {self.hidden.shape}")
        if self.hidden.dtype != np.float32:
            raise ValueError(f"hidden must be float32; got {self.hidden.dtype}")

    @property
    def n_tokens(self) -> int:
        """T, the number of generated tokens captured."""
        return int(self.hidden.shape[0])
