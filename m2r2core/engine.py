"""The Engine: a loaded model, read-only after loading, that runs traced generations.

`Engine.generate(...)` returns a Generation to iterate (records stream as they happen);
`Engine.run(...)` collects one into a RunTrace and its ResidualCapture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from m2r2core import artifacts
from m2r2core.config import DecodeConfig, EngineConfig
from m2r2core.exits.early_exit import ExitConfig, ExitLoop
from m2r2core.exits.routers import LEARNED, ROUTER_FILE, RouterBundle, load_routers
from m2r2core.exits.tracer import FastStreamTracer
from m2r2core.runtime import hf_compat, lens, narrow, prompt
from m2r2core.runtime.decode import TokenLoop
from m2r2core.runtime.environment import environment  # noqa: F401  (also the engine's name)
from m2r2core.runtime.model import LoadedModel, ModelInfo, load
from m2r2core.spec.medusa import HEADS_FILE, load_heads
from m2r2core.spec.proposers import Proposer
from m2r2core.spec.speculative import SpecConfig, SpecLoop, make_proposer
from m2r2core.stream.accel import WEIGHTS_NAME as ACCEL_WEIGHTS
from m2r2core.stream.accel import AdapterError, find_trained, load_accelerator
from m2r2core.stream.tuned_lens import LENS_FILE, load_tuned_lens
from m2r2core.trace import ResidualCapture, RunTrace, SpecRound, TokenStep


@dataclass(frozen=True)
class RunResult:
    """A finished generation: its trace, and the raw residuals when they were captured."""

    trace: RunTrace
    capture: ResidualCapture | None


@dataclass(frozen=True)
class Capabilities:
    """What a loaded engine can do, for pages and CLIs to ask instead of probing internals."""

    n_layers: int
    streams: tuple[str, ...]
    """Residual streams with exit rules: 'fast' (with adapters), 'slow', 'tuned' (with a tuned
    lens)."""
    fast_depth: int | None
    """The deepest fast depth (None without adapters)."""
    n_fast: int
    """How many fast depths there are (0 without adapters)."""
    rate: float | None
    """The accelerated stream's rate r (None without adapters)."""
    draft_streams: tuple[str, ...]
    """What can draft for speculative decoding: 'fast', 'slow', 'tuned', 'medusa'."""
    medusa_heads: int | None
    sub_vocab: bool
    """Whether trained routers brought a sub-vocabulary (draft_vocab='sub')."""
    learned_rules: dict[str, tuple[str, ...]]
    """Per stream, the learned exit rules (ARLA, MLP) that were trained."""
    accel_note: str
    medusa_note: str
    tuned_note: str = ""

    def max_depth(self, stream: str) -> int:
        """The deepest depth an exit rule can look at on a stream."""
        return self.fast_depth if stream == "fast" and self.fast_depth else self.n_layers

    def has_rule(self, rule: str, stream: str) -> bool:
        """Whether `rule` can score `stream` (heuristic rules always can)."""
        return rule not in LEARNED or rule in self.learned_rules.get(stream, ())

    @classmethod
    def of(cls, engine: Engine) -> Capabilities:
        """What `engine` can do with the trained files it has loaded."""
        accel = engine.accel
        tuned = ("tuned",) if engine.tuned_lens is not None else ()
        nets = engine.routers.nets
        learned = {stream: tuple(rule for rule in LEARNED if f"{rule}/{stream}" in nets)
                   for stream in ("fast", "slow")}
        return cls(
            n_layers=engine.parts.n_layers,
            streams=(("fast",) if accel is not None else ()) + ("slow",) + tuned,
            fast_depth=accel.max_depth if accel is not None else None,
            n_fast=accel.n_fast if accel is not None else 0,
            rate=accel.config.rate if accel is not None else None,
            draft_streams=(("fast",) if accel is not None else ()) + ("slow",) + tuned
            + (("medusa",) if engine.medusa is not None else ()),
            medusa_heads=engine.medusa.n_heads if engine.medusa is not None else None,
            sub_vocab=engine.routers.card is not None, learned_rules=learned,
            accel_note=engine.accel_note, medusa_note=engine.medusa_note,
            tuned_note=engine.tuned_note)


class Engine:
    """A model with its tokenizer and walkable parts. Safe to share across threads: per-run state
    lives in the run, and forward passes are serialised by a lock.
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        """Wrap an already loaded model."""
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.info: ModelInfo = loaded.info
        self.config = config
        self.parts = hf_compat.decoder_parts(self.model)
        self.device = next(self.model.parameters()).device
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.fused_head = lens.fused_head_is_exact(self.parts, self.model.dtype, self.device)
        self._lock = threading.Lock()
        # Decoding ids one by one costs ~50 us each and a traced token shows (N+1)*k of them:
        # decode the whole vocabulary once, in one batched call (~0.3 s).
        vocab = range(len(self.tokenizer))
        self._texts: list[str] = self.tokenizer.batch_decode([[i] for i in vocab])
        self.accel, self.accel_card = None, None
        self.trained_folder: Path | None = None
        """Where the loaded adapters and routers came from (their cards and training logs)."""
        self.trained_fingerprint = "none"
        """A digest of the loaded adapters', routers' and heads' bytes (bundles name it)."""
        self.medusa, self.medusa_card = None, None
        self.medusa_note = f"No trained Medusa heads for '{self.info.name}'."
        self.tuned_lens, self.tuned_card = None, None
        self.tuned_note = f"No tuned lens for '{self.info.name}'."
        self.routers = RouterBundle(self.parts, None, {})  # untrained rules, full check head
        self.accel_note = (f"No trained adapters for '{self.info.name}': only the slow "
                           "stream's untrained exit rules are available.")
        folder = find_trained(self.info.fingerprint)
        if folder is not None:
            try:
                self.load_trained(folder)
            except AdapterError as err:
                self.accel_note = str(err)

    @classmethod
    def load(cls, config: EngineConfig = EngineConfig()) -> Engine:
        """Load the model named by the config (the packaged default unless told otherwise)."""
        return cls(load(config), config)

    def capabilities(self) -> Capabilities:
        """What this engine can do with the trained files it has loaded."""
        return Capabilities.of(self)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model for work outside a run (attribution's backward passes): no forward
        pass of any run interleaves with it.
        """
        with self._lock:
            yield

    def token_text(self, token_id: int) -> str:
        """The text of one token id."""
        if 0 <= token_id < len(self._texts):
            return self._texts[token_id]
        return self.tokenizer.decode([token_id])  # ids past the tokenizer (padded vocabularies)

    def encode(self, text: str | bytes, cfg: DecodeConfig) -> list[int]:
        """Validate the prompt, apply the chat template and check it fits with the budget."""
        return self._encode_clean(prompt.validate_text(text), cfg)

    def _encode_clean(self, clean: str, cfg: DecodeConfig) -> list[int]:
        ids = prompt.encode(self.tokenizer, clean, cfg.use_chat_template, cfg.system_prompt)
        prompt.check_fits(len(ids), cfg.max_new_tokens, self.info.context_length)
        return ids

    def generate(self, text: str | bytes, cfg: DecodeConfig = DecodeConfig()) -> Generation:
        """Start a generation; iterate the result to receive TokenStep records as they happen."""
        clean = prompt.validate_text(text)
        ids = self._encode_clean(clean, cfg)
        tracer = None
        accel = self.accel if cfg.fast_stream else None
        if accel is not None or self.tuned_lens is not None:
            tracer = FastStreamTracer(self.parts, accel, self.routers, cfg.capture_residuals,
                                      self.tuned_lens)
        loop = TokenLoop(self.parts, ids, cfg, self.eos_ids, self.token_text, self._lock,
                         self.fused_head, tracer)
        extra = {"accel_rate": self.accel.config.rate} if self.accel is not None else {}
        return Generation(self, clean, ids, cfg, loop, extra=extra)

    def generate_exits(self, text: str | bytes, cfg: DecodeConfig = DecodeConfig(),
                       exit_cfg: ExitConfig = ExitConfig()) -> Generation:
        """Start an early-exit generation (exits/early_exit.py); iterate it for TokenSteps."""
        clean = prompt.validate_text(text)
        ids = self._encode_clean(clean, cfg)
        loop = ExitLoop(self.parts, self.accel, self.routers, ids, cfg, exit_cfg, self.eos_ids,
                        self.token_text, self._lock, self.tuned_lens)
        return Generation(self, clean, ids, cfg, loop, mode="early_exit",
                          extra={"exit": dataclasses.asdict(exit_cfg)})

    def speculate(self, text: str | bytes, cfg: DecodeConfig = DecodeConfig(),
                  spec: SpecConfig = SpecConfig(), proposer: Proposer | None = None
                  ) -> Speculation:
        """Start a self-speculative generation (m2r2core/spec/speculative.py); iterate it for
        SpecRound records. The drafts come from the proposer `spec` names, or from `proposer`
        (any spec/proposers.Proposer; `spec.max_draft` still bounds each round).
        """
        clean = prompt.validate_text(text)
        ids = self._encode_clean(clean, cfg)
        if proposer is None:
            sub_vocab = self.routers.check.token_ids if self.routers.card is not None else None
            proposer = make_proposer(self.parts, spec, cfg, self.eos_ids, self.accel, sub_vocab,
                                     self.medusa, self.routers, self.tuned_lens)
        loop = SpecLoop(self.parts, proposer, ids, cfg, self.eos_ids, self.token_text,
                        self._lock, spec.max_draft,
                        narrow.wanted(spec.narrow_verify, narrow.verified_modules(self.parts)))
        return Speculation(self, clean, ids, cfg, spec, loop)

    def load_trained(self, folder: str | Path) -> None:
        """Swap in adapters and routers from a folder (AdapterError if they do not fit; then
        the engine keeps what it had). Medusa heads in the folder load on their own: a problem
        with them is reported in `medusa_note` and leaves the adapters and routers loaded; so
        does a tuned lens (`tuned_note`).
        """
        folder = Path(folder)
        _load_optional(self, folder)
        accel, card = load_accelerator(folder, self.parts, self.info.name, self.info.fingerprint)
        if not accel.config.decodable:
            raise AdapterError(
                f"The adapters in {folder} are a training-study variant (blocks="
                f"'{accel.config.blocks}', kv='{accel.config.kv}'); decoding runs blocks='same' "
                "with the shared slow cache. Train that shape to decode with it.")
        routers = load_routers(folder, self.parts, self.info.name, self.info.fingerprint)
        self.accel, self.accel_card, self.routers = accel.to(self.model.dtype), card, routers
        self.accel_note = f"trained files in {folder.name}"
        self.trained_folder = folder
        self.trained_fingerprint = artifacts.digest(
            [folder / ACCEL_WEIGHTS, folder / ROUTER_FILE]
            + ([folder / HEADS_FILE] if self.medusa is not None else [])
            + ([folder / LENS_FILE] if self.tuned_lens is not None else []))

    @property
    def trained_label(self) -> str:
        """Where the loaded trained files came from, for messages."""
        return self.trained_folder.name if self.trained_folder is not None else ""

    def run(self, text: str | bytes, cfg: DecodeConfig = DecodeConfig()) -> RunResult:
        """Generate to the end and return the trace."""
        generation = self.generate(text, cfg)
        for _ in generation:
            pass
        return generation.result


class Generation:
    """One generation in progress. Iterate it; afterwards `result` holds the RunResult."""

    def __init__(self, engine: Engine, text: str, ids: list[int], cfg: DecodeConfig,
                 loop: TokenLoop | ExitLoop, mode: str = "baseline", extra: dict | None = None
                 ) -> None:
        """Bind a prepared loop to its engine and request."""
        self.engine, self.text, self.prompt_ids, self.cfg, self.loop = engine, text, ids, cfg, loop
        self.mode, self.extra = mode, extra or {}
        self.run_id = uuid.uuid4().hex[:12]
        self.steps: list[TokenStep] = []
        self._result: RunResult | None = None

    def __iter__(self) -> Iterator[TokenStep]:
        """Yield records as they are produced."""
        for step in self.loop:
            self.steps.append(step)
            yield step
        self._result = self._finish()

    @property
    def ms_per_token(self) -> float:
        """Decoding time per token so far, excluding the first (which the prefill produced)."""
        return self.loop.decode_ms / max(1, len(self.steps) - 1)

    @property
    def result(self) -> RunResult:
        """The finished RunResult (raises if iteration has not ended)."""
        if self._result is None:
            raise RuntimeError("the generation has not finished; iterate it first")
        return self._result

    def _finish(self) -> RunResult:
        engine, loop = self.engine, self.loop
        trace = RunTrace(
            run_id=self.run_id,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            mode=self.mode,
            prompt=self.text,
            prompt_token_count=len(self.prompt_ids),
            model=dataclasses.asdict(engine.info),
            config=dataclasses.asdict(self.cfg) | self.extra,
            environment=environment(),
            steps=tuple(self.steps),
            stop_reason=loop.stop_reason,
            prefill_ms=loop.prefill_ms,
            decode_ms=loop.decode_ms,
            n_layers=engine.parts.n_layers,
            completion=engine.tokenizer.decode(
                [s.token_id for s in self.steps], skip_special_tokens=True),
        )
        capture = None
        if getattr(loop, "capture_rows", None):
            tracer = getattr(loop, "tracer", None)
            fast = np.stack(tracer.rows) if tracer is not None and tracer.rows else None
            capture = ResidualCapture(self.run_id, np.stack(loop.capture_rows), fast)
        return RunResult(trace, capture)


class Speculation:
    """One self-speculative generation. Iterate it for SpecRound records; afterwards `tokens`,
    `completion`, `stop_reason`, `prefill_ms` and `decode_ms` describe the whole run.
    """

    def __init__(self, engine: Engine, text: str, ids: list[int], cfg: DecodeConfig,
                 spec: SpecConfig, loop: SpecLoop) -> None:
        """Bind a prepared loop to its engine and request."""
        self.engine, self.text, self.prompt_ids, self.cfg, self.spec = engine, text, ids, cfg, spec
        self.loop = loop
        self.rounds: list[SpecRound] = []

    def __iter__(self) -> Iterator[SpecRound]:
        """Yield rounds as they are produced."""
        for round_ in self.loop:
            self.rounds.append(round_)
            yield round_

    def run(self) -> Speculation:
        """Iterate to the end; return self."""
        for _ in self:
            pass
        return self

    @property
    def tokens(self) -> list[int]:
        """Generated token ids so far."""
        return [t for r in self.rounds for t in r.emitted]

    @property
    def completion(self) -> str:
        """The generated text so far."""
        return self.engine.tokenizer.decode(self.tokens, skip_special_tokens=True)

    @property
    def stop_reason(self) -> str:
        """'eos', 'max_new_tokens' or 'stopped' (not finished)."""
        return self.loop.stop_reason

    @property
    def prefill_ms(self) -> float:
        """Time of the prompt's forward pass (which also chose the first token)."""
        return self.loop.prefill_ms

    @property
    def decode_ms(self) -> float:
        """Drafting plus verification time of every round after the prefill."""
        return self.loop.decode_ms


def _load_optional(engine: Engine, folder: Path) -> None:
    """Medusa heads and the tuned lens from a trained folder, each on its own: a problem with
    one is reported in its note and loads nothing of it.
    """
    info, dtype = engine.info, engine.model.dtype
    heads, error = _attempt(lambda: load_heads(folder, engine.parts.config.hidden_size,
                                               info.name, info.fingerprint))
    if error or heads:
        engine.medusa, engine.medusa_card = (heads[0].to(dtype), heads[1]) if heads else (None,
                                                                                       None)
        engine.medusa_note = error or f"{heads[1].n_heads} Medusa heads from {folder.name}"
    lens, error = _attempt(lambda: load_tuned_lens(folder, engine.parts, info.name,
                                                   info.fingerprint))
    if error or lens:
        engine.tuned_lens, engine.tuned_card = (lens[0].to(dtype), lens[1]) if lens else (None,
                                                                                        None)
        engine.tuned_note = error or f"tuned lens (rank {lens[1].rank}) from {folder.name}"


def _attempt(load):
    """(what load() returned, None), or (None, the message) when it raised AdapterError."""
    try:
        return load(), None
    except AdapterError as err:
        return None, str(err)


def _eos_ids(model: torch.nn.Module, tokenizer: object) -> frozenset[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return frozenset(int(i) for i in ids if i is not None)
