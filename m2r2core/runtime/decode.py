"""The engine's own decoding loop: it walks the decoder blocks itself, layer by layer, over a KV
cache, so that later slices can exit early, run a second residual stream and verify drafts.

Greedy output is token-identical to transformers' `generate(do_sample=False)` (tests prove it).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from m2r2core.config import DecodeConfig
from m2r2core.runtime import hf_compat
from m2r2core.runtime.hf_compat import DecoderParts
from m2r2core.runtime.lens import lens_logits, trajectory_stats
from m2r2core.runtime.loop import DecodeRun
from m2r2core.runtime.sampling import sample_next
from m2r2core.runtime.state import DecodeState
from m2r2core.trace import TokenStep


@dataclass(frozen=True)
class ForwardOutput:
    """What one forward pass over new positions returns."""

    logits: torch.Tensor
    """(V,) float32 logits of the last new position ((T, V) of every new one, with
    all_positions)."""
    states: torch.Tensor | None
    """(N+1, H) residual states h_0..h_N of the last new position, when asked for."""
    all_logits: torch.Tensor | None
    """(N+1, V) logit lens of those states, when the head was fused (see lens.py)."""
    normed: torch.Tensor | None = None
    """The final normalised states the logits were read from ((H,), or (T, H) with
    all_positions); None on the fused-head path. Medusa heads draft from them."""


def forward(parts: DecoderParts, ids: torch.Tensor, state: DecodeState, keep_states: bool,
            fused_head: bool = False, all_positions: bool = False, after_layer=None
            ) -> ForwardOutput:
    """Run new positions through every block, appending their keys/values to the cache.

    Args:
        ids: (1, T) token ids of the new positions.
        keep_states: also return the last position's residual after every block.
        fused_head: with keep_states, apply the LM head to all N+1 states in one call (only
            where `lens.fused_head_is_exact` proved the last row bit-identical).
        all_positions: return the logits of every new position (verifying drafts).
        after_layer: called as after_layer(index, hidden) after every block (expert
            prefetching reads the residual there).
    """
    with torch.inference_mode():
        hidden = parts.embed_tokens(ids)  # (1, T, H)
        positions = torch.arange(state.position, state.position + ids.shape[1],
                                  device=ids.device)[None]  # (1, T)
        masks = hf_compat.attention_masks(parts, hidden, state.cache, positions)
        rotary = parts.rotary_emb(hidden, positions)
        states = [hidden[0, -1]] if keep_states else None
        for index in range(parts.n_layers):
            mask = masks[parts.layer_types[index]]
            hidden = hf_compat.call_layer(parts, index, hidden, mask, rotary, positions,
                                          state.cache)
            if after_layer is not None:
                after_layer(index, hidden)
            if keep_states:
                states.append(hidden[0, -1])
        stacked = torch.stack(states) if keep_states else None  # (N+1, H)
        all_logits = lens_logits(parts, stacked) if keep_states and fused_head else None
        normed = None
        if all_positions:
            normed3 = parts.norm(hidden)  # (1, T, H)
            logits = parts.lm_head(normed3)[0].float()  # (T, V)
            normed = normed3[0]
        elif all_logits is not None:
            logits = all_logits[-1].float()  # (V,)
        else:
            normed3 = parts.norm(hidden[:, -1:])  # (1, 1, H)
            logits = parts.lm_head(normed3)[0, -1].float()  # (V,)
            normed = normed3[0, -1]
    state.position += ids.shape[1]
    return ForwardOutput(logits, stacked, all_logits, normed)


class StepTracer:
    """What a plain decoding step may record beyond the slow stream (exits/tracer.py traces the
    accelerated stream). The loop calls `after_forward` inside its lock, right after each forward
    pass, and passes what it returned to `fields` when it records that step.
    """

    rows: list[np.ndarray]
    """Per-step arrays kept for the residual capture (empty unless the tracer keeps them)."""

    def after_forward(self, out: ForwardOutput, cache, position: int) -> object:
        """Compute what must be read while the cache holds exactly this step's positions."""
        raise NotImplementedError

    def fields(self, out: ForwardOutput, traced: object) -> dict:
        """Extra TokenStep fields of the step whose forward pass returned `traced`."""
        raise NotImplementedError


class TokenLoop(DecodeRun[TokenStep]):
    """Plain autoregressive decoding over a prompt; iterate it to receive TokenStep records.

    After iteration: `stop_reason`, `prefill_ms`, `decode_ms` (runtime/loop.py) and
    `capture_rows` are set.
    """

    def __init__(self, parts: DecoderParts, prompt_ids: list[int], cfg: DecodeConfig,
                 eos_ids: frozenset[int], token_text, lock, fused_head: bool = False,
                 tracer: StepTracer | None = None) -> None:
        """Prepare a run; nothing is computed until iteration.

        With a `tracer` (used only when cfg.trace) every step also records what it traces,
        e.g. the accelerated stream and every exit rule's scores (exits/tracer.py).
        """
        super().__init__(parts, prompt_ids, cfg, eos_ids, lock)
        self.tracer = tracer if cfg.trace else None
        self.fused_head, self.token_text = fused_head, token_text
        self.capture_rows: list[np.ndarray] = []

    def prefill(self, state: DecodeState) -> tuple[TokenStep, tuple[int, ...]]:
        """The prompt's forward pass and the first token."""
        return self._emit(self.prompt, state, 0)

    def step(self, state: DecodeState, index: int) -> tuple[TokenStep, tuple[int, ...]]:
        """The last token's forward pass and the next token."""
        return self._emit(torch.tensor([self.token_ids[-1:]], device=self.device), state, index)

    def stamp(self, record: TokenStep, ms: float) -> TokenStep:
        """Forward pass, sampling and tracing: the token's latency."""
        return dataclasses.replace(record, latency_ms=ms)

    def _emit(self, ids: torch.Tensor, state: DecodeState, position: int
              ) -> tuple[TokenStep, tuple[int, ...]]:
        start = time.perf_counter()
        out = forward(self.parts, ids, state, self.cfg.trace, self.fused_head)
        traced = None
        if self.tracer is not None:
            traced = self.tracer.after_forward(out, state.cache, state.position - 1)
        forward_ms = (time.perf_counter() - start) * 1000.0
        token_id = sample_next(out.logits, self.cfg.sampling, state.generator)
        return self._record(position, token_id, out, traced, forward_ms), (token_id,)

    def _record(self, position: int, token_id: int, out: ForwardOutput, traced: object,
                forward_ms: float) -> TokenStep:
        trace_start = time.perf_counter()
        fields = {}
        if out.states is not None:
            stats = trajectory_stats(self.parts, out.states, out.logits, self.cfg.lens_top_k,
                                     out.all_logits)
            fields = vars(stats) | {"lens_top_tokens": tuple(
                tuple(self.token_text(i) for i in row) for row in stats.lens_top_ids)}
            if self.cfg.capture_residuals:
                self.capture_rows.append(out.states.float().cpu().numpy())
            if self.tracer is not None:
                fields |= self.tracer.fields(out, traced)
        trace_ms = (time.perf_counter() - trace_start) * 1000.0
        token_prob = float(torch.softmax(out.logits, -1)[token_id])
        return TokenStep(
            position=position, token_id=token_id, text=self.token_text(token_id),
            token_prob=token_prob, exit_layer=self.parts.n_layers, source="full",
            latency_ms=0.0, forward_ms=forward_ms, trace_ms=trace_ms, **fields,
        )
