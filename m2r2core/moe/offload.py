"""Decoding an MoE model whose experts live in a slow tier, with ahead-of-time expert loading.

`OffloadEngine` wraps an Engine holding a Mixtral-format model and exports every expert to the
expert store once. A run (`OffloadRun`, on the loop skeleton of runtime/loop.py) installs, for
each of its forward passes, `OffloadedExperts` modules that take their weights from the run's
fast tier (moe/experts.py), waiting when they are not there. After each block the predictor
(moe/prefetch.py) names the experts of the next layers and the cache fetches them while compute
goes on.

Without a run in progress the swapped module calls the model's own experts module: that is the
reference "every expert resident" run, against which every offloaded output is compared. The
original weights therefore stay in memory: the fast-tier budget is modelled (only weights that
went through the loader compute in an offloaded run), not enforced by the operating system.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from m2r2core import artifacts
from m2r2core.config import DecodeConfig
from m2r2core.engine import Engine
from m2r2core.errors import ConfigError, UnsupportedModel
from m2r2core.moe.channel import bandwidth
from m2r2core.moe.experts import ExpertCache, check_queue, check_reads, check_tier
from m2r2core.moe.prefetch import (
    PREDICTORS,
    MoeParts,
    Predictor,
    RouteAccelerator,
    check_margin_gap,
    make_predictor,
    recall_by_distance,
)
from m2r2core.moe.store import ExpertStore, store_dir  # noqa: F401  (store_dir: public here too)
from m2r2core.runtime import prompt
from m2r2core.runtime.decode import forward
from m2r2core.runtime.loop import DecodeRun
from m2r2core.runtime.sampling import sample_next
from m2r2core.runtime.state import DecodeState
from m2r2core.trace import Event, OffloadToken

MOE_MODEL_TYPES = ("mixtral", "qwen2_moe")


@dataclass(frozen=True)
class OffloadConfig:
    """How experts are held and predicted in one run."""

    capacity: int = 80
    """Experts the fast tier holds (resident or in flight)."""
    bandwidth: str = "ufs"
    predictor: str = "m2r2"
    lookahead: int = 2
    """D: predictions after block l are for layers l+1 … l+D."""
    margin: int = 0
    """Experts predicted per layer beyond the top-k."""
    policy: str = "predicted"
    warm: bool = True
    """Start with the fast tier filled by the first layers' experts (else empty)."""
    queue: str = "deadline"
    """How prefetches wait on the storage channel (moe/channel.py QUEUES): earliest-needed
    first, or in the order predicted (`fifo`)."""
    margin_gap: float | None = None
    """Name a margin expert only where the router hesitates (moe/prefetch.py MARGIN_GAP);
    None: every margin expert."""
    reads: str = "thread"
    """Who reads a loaded expert's bytes (moe/experts.py READS): a reader thread as the load is
    queued, or the compute thread at the expert's first use."""

    def validate(self, total: int, n_layers: int, n_experts: int, top_k: int) -> None:
        """ConfigError naming the field and its allowed range (total: experts in the model)."""
        check_tier(self.capacity, total, top_k, self.policy)
        check_queue(self.queue)
        bandwidth(self.bandwidth)
        if self.predictor not in PREDICTORS:
            raise ConfigError(f"Unknown predictor '{self.predictor}'; choose one of "
                              f"{', '.join(PREDICTORS)}.")
        if not 1 <= self.lookahead <= n_layers - 1:
            raise ConfigError(f"Lookahead {self.lookahead} is out of range; choose 1 to "
                              f"{n_layers - 1} layers.")
        if not 0 <= self.margin <= n_experts - top_k:
            raise ConfigError(f"Margin {self.margin} is out of range; choose 0 to "
                              f"{n_experts - top_k}.")
        check_margin_gap(self.margin_gap)
        check_reads(self.reads)


class OffloadedExperts(nn.Module):
    """Stands in for a layer's experts module during one forward pass of one run: weights come
    from that run's fast tier, and the experts used are recorded in that run's routes.
    """

    def __init__(self, original: nn.Module, layer: int, owner: OffloadRun) -> None:
        """Wrap the model's own experts module of `layer` for the run `owner`."""
        super().__init__()
        self.original = original
        self.layer = layer
        self.owner = owner
        self.num_experts = original.num_experts
        self.act_fn = original.act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Mixtral's expert computation, op for op, with weights from the fast tier."""
        hit = sorted(set(top_k_index.flatten().tolist()))
        self.owner.routes_now[self.layer] = tuple(hit)
        cache = self.owner.cache
        if cache is None:
            return self.original(hidden_states, top_k_index, top_k_weights)
        cache.request(self.layer, hit)
        final_hidden_states = torch.zeros_like(hidden_states)
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        for expert_idx in hit:
            weights = cache.acquire(self.layer, expert_idx)
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate, up = nn.functional.linear(current_state, weights["gate_up_proj"]).chunk(2, -1)
            current = self.act_fn(gate) * up
            current = nn.functional.linear(current, weights["down_proj"])
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
            cache.release(self.layer, expert_idx)
        return final_hidden_states


def moe_parts(engine: Engine) -> MoeParts:
    """Routers and norms of an MoE model; UnsupportedModel for a dense one."""
    config = engine.parts.config
    if config.model_type not in MOE_MODEL_TYPES:
        raise UnsupportedModel(
            f"Expert loading needs a Mixture-of-Experts model (Mixtral or Qwen2-MoE format); "
            f"'{engine.info.name}' is a dense {config.model_type} model. Build the MoE with: "
            f"python -m m2r2core.train.moe build")
    layers = engine.parts.layers
    n_experts = getattr(config, "num_local_experts", None) or config.num_experts
    return MoeParts(routers=tuple(layer.mlp.gate.weight if hasattr(layer.mlp, "experts")
                                  else None for layer in layers),
                    norms=tuple(layer.post_attention_layernorm for layer in layers),
                    top_k=config.num_experts_per_tok, n_experts=n_experts)


class OffloadEngine:
    """An MoE Engine whose experts are served from a slow tier through a bounded fast tier."""

    def __init__(self, engine: Engine, store: Path | None = None,
                 accelerator: RouteAccelerator | None = None, accel_note: str = "",
                 trained: tuple[str, str] = ("none", "")) -> None:
        """Export the expert store if needed. The shared model is left as it is: a run installs
        its OffloadedExperts for each forward pass and removes them in `finally` (`installed`).

        Raises UnsupportedModel for a dense model, AssetMissing for a broken store.
        """
        self.engine = engine
        self.moe = moe_parts(engine)
        self.accel = accelerator.to(engine.model.dtype) if accelerator is not None else None
        self.accel_note = accel_note
        self.trained_fingerprint, self.trained_label = trained
        """A digest of the route accelerator's bytes and where it came from (bundles)."""
        folder = Path(store) if store is not None else store_dir(engine)
        if not (folder / "experts.json").is_file():
            ExpertStore.export(self._weights(), folder, self.moe.n_layers, self.moe.n_experts)
        self.store = ExpertStore(folder)
        if set(self.store.files) != set(self.expert_keys()):
            raise ConfigError(f"The expert store at {folder} does not hold this model's "
                              f"{len(self.expert_keys())} experts.")

    @contextlib.contextmanager
    def installed(self, run: OffloadRun) -> Iterator[None]:
        """Serve every MoE layer's experts through `run`'s fast tier for the duration (hold the
        engine lock around it); the model's own modules are back in place afterwards, whatever
        happened.
        """
        layers = self.engine.parts.layers
        if run.wrappers is None:  # made once per run, installed for each of its passes
            run.wrappers = {i: OffloadedExperts(layers[i].mlp.experts, i, run)
                            for i in range(self.moe.n_layers) if self.moe.is_moe(i)}
        try:
            for index, wrapper in run.wrappers.items():
                layers[index].mlp.experts = wrapper
            yield
        finally:
            for index, wrapper in run.wrappers.items():
                layers[index].mlp.experts = wrapper.original

    def expert_keys(self) -> list[tuple[int, int]]:
        """(layer, expert) of every routed expert, in layer order."""
        return [(layer, e) for layer in range(self.moe.n_layers) if self.moe.is_moe(layer)
                for e in range(self.moe.n_experts)]

    def _weights(self) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
        out = {}
        for index, e in self.expert_keys():
            experts = self.engine.parts.layers[index].mlp.experts
            experts = getattr(experts, "original", experts)
            out[(index, e)] = {"gate_up_proj": experts.gate_up_proj[e].detach(),
                               "down_proj": experts.down_proj[e].detach()}
        return out

    @property
    def total_experts(self) -> int:
        """Routed experts in the model (the ones that live in the slow tier)."""
        return len(self.expert_keys())

    def generate(self, text: str | bytes, cfg: DecodeConfig, offload: OffloadConfig | None,
                 reference: list[list[tuple[int, ...]]] | None = None) -> OffloadRun:
        """Start a run; iterate it for OffloadToken records. `offload=None` is the reference run
        with every expert resident (no loads, no predictor).
        """
        if offload is not None:
            offload.validate(self.total_experts, self.moe.n_layers, self.moe.n_experts,
                             self.moe.top_k)
        clean = prompt.validate_text(text)
        ids = self.engine._encode_clean(clean, cfg)
        return OffloadRun(self, ids, cfg, offload, reference)


class OffloadRun(DecodeRun[OffloadToken]):
    """One generation through the expert tiers. After iteration: tokens (the records),
    token_ids, events, predictions, routes, stop_reason, prefill_ms, decode_ms.
    """

    def __init__(self, owner: OffloadEngine, ids: list[int], cfg: DecodeConfig,
                 offload: OffloadConfig | None, reference) -> None:
        """Prepare; nothing runs until iteration."""
        engine = owner.engine
        super().__init__(engine.parts, ids, cfg, engine.eos_ids, engine._lock)
        self.owner, self.offload, self.reference = owner, offload, reference
        self.tokens: list[OffloadToken] = []
        self.events: list[Event] = []
        self.predictions: list[tuple[int, int, int, list[int]]] = []
        self.routes: list[list[tuple[int, ...]]] = []
        self.bytes_loaded = 0
        self.peak_occupancy = 0
        self.predictor: Predictor | None = None
        self.cache: ExpertCache | None = None
        """This run's fast tier while it runs (None for the all-resident reference run)."""
        self.routes_now: dict[int, tuple[int, ...]] = {}
        """The experts each layer used in the forward pass under way."""
        self.wrappers: dict[int, OffloadedExperts] | None = None
        """Per MoE layer, the experts module serving this run (OffloadEngine.installed)."""
        self._seen = 0  # cache events already counted into a token
        self._layer_start = 0.0

    def __iter__(self) -> Iterator[OffloadToken]:
        """Open this run's fast tier, decode (runtime/loop.py), then close the tier and keep its
        events, whether the run ended or was abandoned.
        """
        owner, offload = self.owner, self.offload
        cache = None
        if offload is not None:
            cache = ExpertCache(owner.store, offload.capacity, bandwidth(offload.bandwidth),
                                offload.policy, owner.moe.top_k, owner.engine.device,
                                offload.queue, offload.reads)
            try:
                if offload.warm:
                    cache.warm(owner.expert_keys())
                self.predictor = make_predictor(
                    offload.predictor, owner.moe, offload.lookahead, offload.margin,
                    owner.accel, self.reference, offload.margin_gap)
            except BaseException:
                cache.close()
                raise
            self.predictor.routes = self.routes
        self.cache = cache
        try:
            for record in super().__iter__():
                self.tokens.append(record)
                yield record
        finally:
            self.cache = None
            if cache is not None:
                cache.close()
                self.events = sorted(cache.events, key=lambda e: e.start_ms)
                self.bytes_loaded = cache.bytes_loaded
                self.peak_occupancy = cache.peak

    def guard(self):
        """The engine lock, with this run's experts installed in the model (for one call)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.lock)
        stack.enter_context(self.owner.installed(self))
        return stack

    def prefill(self, state: DecodeState) -> tuple[OffloadToken, tuple[int, ...]]:
        """The prompt's forward pass through the tiers, and the first token."""
        return self._emit(self.prompt, state, 0)

    def step(self, state: DecodeState, index: int) -> tuple[OffloadToken, tuple[int, ...]]:
        """The last token's forward pass through the tiers, and the next token."""
        return self._emit(torch.tensor([self.token_ids[-1:]], device=self.device), state, index)

    def stamp(self, record: OffloadToken, ms: float) -> OffloadToken:
        """A token's latency: its forward pass (stalls included) and sampling."""
        return dataclasses.replace(record, latency_ms=ms)

    def _emit(self, ids: torch.Tensor, state: DecodeState, position: int
              ) -> tuple[OffloadToken, tuple[int, ...]]:
        cache, number = self.cache, len(self.routes)
        self.routes_now = {}
        if cache is not None:
            cache.token, cache.layer = number, 0
            self._layer_start = cache.now_ms()
        out = forward(self.parts, ids, state, False,
                      after_layer=None if cache is None else self._after_layer(cache, number))
        self.routes.append([self.routes_now.get(i, ()) for i in range(self.owner.moe.n_layers)])
        token_id = sample_next(out.logits, self.cfg.sampling, state.generator)
        stall = hits = misses = 0
        if cache is not None:
            for event in cache.events[self._seen:]:
                if event.token != number:
                    continue
                if event.kind == "stall":
                    stall += event.end_ms - event.start_ms
                hits += event.kind == "hit"
                misses += event.kind == "miss"
            self._seen = len(cache.events)
        return OffloadToken(position, token_id, self.owner.engine.token_text(token_id), 0.0,
                            stall, hits, misses, tuple(self.routes[-1])), (token_id,)

    def _after_layer(self, cache: ExpertCache, number: int):
        """After each block: record its compute span and prefetch what the predictor names."""
        def after_layer(index: int, hidden: torch.Tensor) -> None:
            now = cache.now_ms()
            cache.events.append(Event("compute", number, index, -1, self._layer_start, now))
            for target, experts in self.predictor.predict(number, index, hidden[0, -1]).items():
                self.predictions.append((number, index, target, experts))
                cache.prefetch(target, experts, target - index)
            self._layer_start = cache.now_ms()
            cache.layer = index + 1
        return after_layer

    def run(self) -> OffloadRun:
        """Generate to the end."""
        for _ in self:
            pass
        return self

    def summary(self) -> dict:
        """Decode-phase figures: tok/s, stall per token, hit rate, recall by distance."""
        decode = self.tokens[1:]
        n = len(decode)
        hits = sum(t.hits for t in decode)
        misses = sum(t.misses for t in decode)
        recall = {}
        if self.predictor is not None and self.offload.predictor != "none":
            decode_predictions = [p for p in self.predictions if p[0] >= 1]
            recall = recall_by_distance(decode_predictions, self.routes,
                                        self.offload.lookahead)
        loads = [e for e in self.events if e.kind == "load" and e.token >= 1]
        wasted = [e for e in self.events if e.kind == "wasted" and e.token >= 1]
        return dict(
            new_tokens=len(self.tokens), decode_tokens=n,
            decode_ms=round(self.decode_ms, 2), prefill_ms=round(self.prefill_ms, 2),
            tok_per_s=round(n / (self.decode_ms / 1000.0), 3) if n and self.decode_ms else None,
            stall_ms_per_token=round(sum(t.stall_ms for t in decode) / n, 3) if n else None,
            hit_rate=round(hits / (hits + misses), 4) if hits + misses else None,
            loads_per_token=round(len(loads) / n, 3) if n else None,
            wasted_per_token=round(len(wasted) / n, 3) if n else None,
            recall_by_distance={str(d): round(r, 4) for d, r in recall.items()},
        )


def load_moe(model: str | None = None, dtype: str = "bfloat16", threads: int = 0,
             progress=None, distilled: bool = True, device: str = "auto") -> OffloadEngine:
    """The default MoE (built from the committed MoEfication on first use; the distilled one
    when a distillation is committed and `distilled`) as an OffloadEngine, with its trained
    accelerator; `model` may name another Mixtral-format folder.
    """
    from m2r2core.config import EngineConfig
    from m2r2core.errors import M2R2Error
    from m2r2core.moe import distilled as distilled_mod
    from m2r2core.moe import moefy
    from m2r2core.moe.prefetch import ACCEL_FILE, load_route_accelerator

    folder = Path(model) if model else moefy.build(progress=progress, distilled=distilled)
    engine = Engine.load(EngineConfig(model=str(folder), dtype=dtype, threads=threads,
                                      device=device))
    accel, note = None, ""
    try:
        accel, card = load_route_accelerator(moefy.TRAINED_DIR, engine.info.fingerprint,
                                             engine.info.name)
        note = f"rank-{card.rank} accelerator trained on {card.tokens} tokens"
        if model is None and card.moe_files != moefy.files_digest(distilled=distilled):
            accel, note = None, ("the committed accelerator was trained for another build of "
                                 "this MoE (MoEfication or distillation); retrain it: "
                                 "python -m m2r2core.train.moe fit-accel")
    except M2R2Error as exc:
        note = f"no accelerator: {exc}"
    files = [moefy.TRAINED_DIR / ACCEL_FILE] if accel is not None else []
    if model is None and distilled and distilled_mod.exists(moefy.TRAINED_DIR):
        files.append(moefy.TRAINED_DIR / distilled_mod.WEIGHTS)  # bundles name the build too
    trained = (artifacts.digest(files), moefy.TRAINED_DIR.name) if files else ("none", "")
    return OffloadEngine(engine, accelerator=accel, accel_note=note, trained=trained)
