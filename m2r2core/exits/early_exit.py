"""Dynamic-compute decoding: per token, run a stream block by block and emit from the first depth
the exit rule accepts.

On the fast stream (M2R2) each block runs two rows in one call: the token's slow row (whose keys
and values later tokens need) and its fast row (adapters on, reading the slow cache, writing
nothing). On the slow stream (plain early exit) only the slow row runs. Either way, the weights
are read once per block for all rows, which is what costs time on a memory-bound CPU.

Exited tokens lack slow keys/values above their exit depth. `kv_fill='jit'` (default, DEED-style)
computes them just in time, batched as extra rows with the next token that goes deeper;
`kv_fill='copy'` (CALM-style) fills every remaining layer at once from the exit state's
key/value projections.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from m2r2core.config import DecodeConfig
from m2r2core.errors import require
from m2r2core.exits.routers import ExitRule, RouterBundle, TokenScorer
from m2r2core.runtime import hf_compat, narrow
from m2r2core.runtime.decode import forward
from m2r2core.runtime.hf_compat import DecoderParts
from m2r2core.runtime.loop import DecodeRun
from m2r2core.runtime.sampling import sample_next
from m2r2core.runtime.state import DecodeState
from m2r2core.stream.accel import Accelerator
from m2r2core.stream.blocks import block_rows, keys_values, visible
from m2r2core.stream.tuned_lens import TunedLens
from m2r2core.trace import TokenStep

KV_FILLS = ("jit", "copy")
NARROW_MODES = narrow.MODES


@dataclass(frozen=True)
class ExitConfig:
    """An exit rule plus how exited tokens' missing keys/values are filled."""

    rule: ExitRule = ExitRule()
    kv_fill: str = "jit"
    narrow: str = "off"
    """How a block call over a few rows (a token's slow and fast rows, filled rows) multiplies
    them by each weight: 'on' as `weight @ rows.T` (runtime/narrow.py, which makes the
    verification pass of speculative decoding 1.3x cheaper on an AVX2 CPU in fp32), 'off' as
    transformers' own `rows @ weight.T`, 'auto' whichever times faster on this machine. Off by
    default: in the exit decoder, whose blocks are called one at a time with work between them, it
    measured no faster (exit_eval, session 34). Float32 rounding apart, the same."""

    def validate(self, max_depth: int) -> None:
        """Raise ConfigError on an out-of-range field."""
        self.rule.validate(max_depth)
        require(self.kv_fill in KV_FILLS, "kv_fill", self.kv_fill, f"one of {KV_FILLS}")
        require(self.narrow in NARROW_MODES, "narrow", self.narrow, f"one of {NARROW_MODES}")


@dataclass
class _Pending:
    """A position whose slow stream stopped short of the last block."""

    position: int
    depth: int
    hidden: torch.Tensor
    """(1, 1, H) its slow state at `depth`."""


class ExitLoop(DecodeRun[TokenStep]):
    """Early-exit decoding over a prompt; iterate it to receive TokenStep records.

    After iteration: `stop_reason`, `prefill_ms`, `decode_ms` (runtime/loop.py), and
    `rows.blocks_run` counts block calls (a block call over several rows counts once).
    """

    def __init__(self, parts: DecoderParts, accel: Accelerator | None, routers: RouterBundle,
                 prompt_ids: list[int], cfg: DecodeConfig, exit_cfg: ExitConfig,
                 eos_ids: frozenset[int], token_text, lock, tuned: TunedLens | None = None
                 ) -> None:
        """Prepare a run; nothing is computed until iteration. `tuned`: the tuned lens, which
        the 'tuned' stream reads the slow states through (the token is read through it too).
        """
        super().__init__(parts, prompt_ids, cfg, eos_ids, lock)
        fast = exit_cfg.rule.stream == "fast"
        require(not fast or accel is not None, "stream", "fast",
                "'slow' here: no accelerator adapters are loaded for this model")
        require(exit_cfg.rule.stream != "tuned" or tuned is not None, "stream", "tuned",
                "'slow' here: no tuned lens is loaded (train one with `python -m "
                "m2r2core.train lens`)")
        self.tuned = tuned if exit_cfg.rule.stream == "tuned" else None
        self.accel, self.routers = accel if fast else None, routers
        self.max_depth = accel.max_depth if fast else parts.n_layers
        exit_cfg.validate(self.max_depth)
        self.exit_cfg, self.rule, self.token_text = exit_cfg, exit_cfg.rule, token_text
        self.narrow = narrow.wanted(exit_cfg.narrow, narrow.verified_modules(parts))
        self.rows = BlockRows(parts, self.accel)
        self.costs = {"blocks_ms": 0.0, "checks_ms": 0.0, "head_ms": 0.0, "fill_ms": 0.0,
                      "checks": 0}
        """Where the decoding steps' time went (prefill excluded): block calls (just-in-time
        filling rides in them), exit checks, the head and sampling, copy filling; with
        `rows.blocks_run` the speedup ledger (analysis/ledger.py) reads them."""

    @property
    def ledger_costs(self) -> dict:
        """`costs` with the block calls and decoding time: what analysis/ledger.exit_ledger
        reads.
        """
        return self.costs | {"block_calls": self.rows.blocks_run, "decode_ms": self.decode_ms}

    def prefill(self, state: DecodeState) -> tuple[TokenStep, tuple[int, ...]]:
        """The prompt runs the full model; the first token is never an exit."""
        logits = forward(self.parts, self.prompt, state, keep_states=False).logits
        state.carry = []  # positions whose slow stream stopped short of the last block
        token_id = sample_next(logits, self.cfg.sampling, state.generator)
        return TokenStep(position=0, token_id=token_id, text=self.token_text(token_id),
                         token_prob=float(torch.softmax(logits, -1)[token_id]),
                         exit_layer=self.parts.n_layers, source="full", latency_ms=0.0,
                         forward_ms=0.0, trace_ms=0.0), (token_id,)

    def stamp(self, record: TokenStep, ms: float) -> TokenStep:
        """An exit step is one call: its latency is its forward time."""
        return dataclasses.replace(record, latency_ms=ms, forward_ms=ms)

    def step(self, state: DecodeState, index: int) -> tuple[TokenStep, tuple[int, ...]]:
        """Feed the previous token; emit the next one from its exit depth."""
        parts, t, fast, pending = self.parts, state.position, self.accel is not None, state.carry
        hidden = parts.embed_tokens(torch.tensor([self.token_ids[-1:]], device=self.device))
        lowest = min([p.position for p in pending], default=t)
        positions = torch.arange(lowest, t + 1, device=self.device)
        rotary = parts.rotary_emb(hidden, positions[None])
        me = _Pending(t, 0, hidden)
        pending.append(me)
        fast_hidden = hidden if fast and self.accel.first == 0 else None
        scorer = TokenScorer(self.routers, self.rule, self.max_depth, parts)
        if not fast or self.accel.first == 0:
            scorer.start(hidden[0, 0])
        with narrow.narrow_products(narrow.verified_modules(parts), self.narrow):
            exit_state, exit_depth, source, scores = self._walk(state, pending, me, fast_hidden,
                                                                scorer, rotary, lowest)
        if exit_state is None:
            exit_state = me.hidden
        started = time.perf_counter()
        if self.exit_cfg.kv_fill == "copy" and exit_depth < parts.n_layers:
            # a tuned-lens exit's keys/values come from the slow state, not its translation
            self.rows.copy_fill(pending, me.hidden if self.tuned is not None else exit_state,
                                state)
        pending[:] = [p for p in pending if p.depth < parts.n_layers]
        state.position += 1
        headed = time.perf_counter()
        logits = parts.lm_head(parts.norm(exit_state))[0, -1].float()
        token_id = sample_next(logits, self.cfg.sampling, state.generator)
        self.costs["fill_ms"] += (headed - started) * 1000.0
        self.costs["head_ms"] += (time.perf_counter() - headed) * 1000.0
        return TokenStep(
            position=index, token_id=token_id, text=self.token_text(token_id),
            token_prob=float(torch.softmax(logits, -1)[token_id]), exit_layer=exit_depth,
            source=source, latency_ms=0.0, forward_ms=0.0, trace_ms=0.0,
            stream=self.rule.stream if source == "exit" else "slow",
            exit_scores=tuple(scores), check_from=self.rule.min_layer), (token_id,)

    def _walk(self, state: DecodeState, pending: list[_Pending], me: _Pending,
              fast_hidden: torch.Tensor | None, scorer: TokenScorer, rotary, lowest: int
              ) -> tuple[torch.Tensor | None, int, str, list[float]]:
        """The token's walk up the blocks until the rule accepts a depth: (exit state or None,
        exit depth, source, the rule's scores).
        """
        parts, fast = self.parts, self.accel is not None
        scores, exit_state, exit_depth, source = [], None, parts.n_layers, "fallback"
        # past the rule's last check depth nothing reads the fast row or the scorer again
        last_check = max(self.rule.depths, default=parts.n_layers)
        for layer in range(parts.n_layers):
            rows = [p for p in pending if p.depth == layer]
            run_fast = (fast_hidden is not None and layer < last_check
                        and self.accel.block(layer) is not None)
            started = time.perf_counter()
            fast_out = self.rows.run(layer, rows, fast_hidden if run_fast else None, state,
                                     rotary, lowest)
            checked = time.perf_counter()
            self.costs["blocks_ms"] += (checked - started) * 1000.0
            depth = layer + 1
            if run_fast:
                fast_hidden = fast_out
            elif fast and self.accel.first == depth:
                fast_hidden = me.hidden  # branch point reached
                scorer.start(me.hidden[0, 0])
            candidate = (self._candidate(depth, fast_hidden if run_fast else None, me.hidden)
                         if depth <= last_check else None)
            if candidate is not None:
                decide = self.rule.decides(depth)
                score = scorer.step(candidate[0, 0], depth, decide)
                self.costs["checks_ms"] += (time.perf_counter() - checked) * 1000.0
                self.costs["checks"] += decide
                if decide:
                    scores.append(score)
                    if score >= self.rule.threshold:
                        exit_state, exit_depth, source = candidate, depth, "exit"
                        break
        return exit_state, exit_depth, source, scores

    def _candidate(self, depth: int, fast_row: torch.Tensor | None, slow_row: torch.Tensor
                   ) -> torch.Tensor | None:
        """The state the rule reads at `depth`: the fast row on the fast stream, the slow row on
        the slow one, its tuned-lens translation on the tuned one; None below the branch point
        of the fast stream and at the last block (which always emits).
        """
        if depth >= self.parts.n_layers:
            return None
        if self.accel is not None:
            return fast_row
        return self.tuned.translate(depth, slow_row) if self.tuned is not None else slow_row


class BlockRows:
    """Runs one block over several rows in one call: the slow rows due at that layer (the
    current token's, and older exited tokens' catching up) and the current token's fast row.
    """

    def __init__(self, parts: DecoderParts, accel: Accelerator | None) -> None:
        """Bind the model's blocks (and the adapters, for the fast row)."""
        self.parts, self.accel = parts, accel
        self.device = parts.embed_tokens.weight.device
        self.blocks = [hf_compat.block_parts(parts, i) for i in range(parts.n_layers)]
        self.blocks_run = 0

    def run(self, layer: int, rows: list[_Pending], fast_hidden: torch.Tensor | None,
            state: DecodeState, rotary: tuple[torch.Tensor, torch.Tensor], lowest: int
            ) -> torch.Tensor | None:
        """One block call over the slow rows due at this layer (and the fast row, if any);
        the fast row's output (None without one). The slow rows advance in place.
        """
        if not rows and fast_hidden is None:
            return None
        cos_all, sin_all = rotary
        bp = self.blocks[layer]
        past_k, past_v = hf_compat.cached_keys_values(state.cache, layer)
        if (bp.sliding_window is None and len(rows) == 1 and rows[0].position == state.position):
            return self._run_current(layer, bp, rows[0], fast_hidden, past_k, past_v, state,
                                     cos_all, sin_all)
        stored = 0 if past_k is None else past_k.shape[2]
        first_row = rows[0].position if rows else state.position
        past_pos = torch.arange(first_row - stored, first_row, device=self.device)
        row_pos = torch.tensor([p.position for p in rows], device=self.device)
        slow_mask = torch.cat([visible(row_pos, past_pos, bp.sliding_window),
                               visible(row_pos, row_pos, bp.sliding_window)], dim=1)
        parts_h = [p.hidden for p in rows]
        index = [p.position - lowest for p in rows]
        n_fast = 0
        if fast_hidden is not None:
            t = torch.tensor([state.position], device=self.device)
            fast_mask = torch.cat([visible(t, past_pos, bp.sliding_window),
                                   visible(t, row_pos, bp.sliding_window, strict=True),
                                   torch.ones(1, 1, dtype=torch.bool, device=self.device)], 1)
            slow_mask = torch.cat([slow_mask, torch.zeros(len(rows), 1, dtype=torch.bool,
                                                          device=self.device)], dim=1)
            mask = torch.cat([slow_mask, fast_mask], dim=0)
            parts_h.append(fast_hidden)
            index.append(state.position - lowest)
            n_fast = 1
        else:
            mask = slow_mask
        hidden = torch.cat(parts_h, dim=1)
        cos, sin = cos_all[:, index], sin_all[:, index]
        adapters = self.accel.inference_block(layer, bp) if n_fast else None
        out, keys, values = block_rows(bp, adapters, hidden, cos, sin, past_k, past_v, mask,
                                       n_fast)
        self.blocks_run += 1
        if rows:
            n_slow = len(rows)
            hf_compat.append_keys_values(state.cache, layer, keys[:, :, :n_slow],
                                         values[:, :, :n_slow])
            for i, p in enumerate(rows):
                p.hidden, p.depth = out[:, i:i + 1], layer + 1
        return out[:, -1:] if n_fast else None

    def _run_current(self, layer: int, bp, row: _Pending, fast_hidden: torch.Tensor | None,
                     past_k, past_v, state: DecodeState, cos_all: torch.Tensor,
                     sin_all: torch.Tensor) -> torch.Tensor | None:
        """The common case, with fewer small ops: only the current token's slow row (plus its
        fast row) on a full-attention block; every past key is visible to both.
        """
        cos, sin = cos_all[:, -1:], sin_all[:, -1:]
        if fast_hidden is None:
            out, keys, values = block_rows(bp, None, row.hidden, cos, sin, past_k, past_v,
                                           None, 0)
        else:  # each row sees the past and its own key: the slow row's attention stays the
            # full model's, bit for bit
            out, keys, values = block_rows(
                bp, self.accel.inference_block(layer, bp), torch.cat([row.hidden, fast_hidden], 1),
                cos.expand(-1, 2, -1), sin.expand(-1, 2, -1), past_k, past_v, None, 1,
                own_keys=True)
        self.blocks_run += 1
        hf_compat.append_keys_values(state.cache, layer, keys[:, :, :1], values[:, :, :1])
        row.hidden, row.depth = out[:, :1], layer + 1
        return out[:, 1:] if fast_hidden is not None else None

    def copy_fill(self, pending: list[_Pending], exit_state: torch.Tensor,
                   state: DecodeState) -> None:
        """CALM-style: every pending position's missing layers get keys/values projected from
        the exit state (its own, for the exiting token; its last slow state, for older ones).
        """
        parts = self.parts
        for p in pending:
            source = exit_state if p.position == state.position else p.hidden
            pos = torch.tensor([[p.position]], device=self.device)
            cos, sin = parts.rotary_emb(source, pos)
            for layer in range(p.depth, parts.n_layers):
                k, v = keys_values(self.blocks[layer], source, cos, sin)
                hf_compat.append_keys_values(state.cache, layer, k, v)
            p.depth = parts.n_layers
