"""The one decoding skeleton every strategy shares: prefill, timing, stopping and locking.

A strategy (plain decoding, early exit, speculative decoding, offloaded MoE decoding) subclasses
`DecodeRun` and implements two calls: `prefill`, which runs the prompt and emits the first
token(s), and `step`, which feeds what was emitted last and emits the next. Each returns its record
and the tokens it emitted; the skeleton does the rest, the same way for every strategy:

- **Locking.** Each call runs under the engine lock (`guard`), never across a `yield`: a consumer
  that stops reading keeps no other run waiting.
- **Timing.** Each record is stamped with the wall-clock time of its own call (`stamp`); the time
  a consumer spends between records is not counted, so a slow page does not make the engine look
  slow. `prefill_ms` is the first call, `decode_ms` the sum of the others.
- **Stopping.** The run ends after the first EOS or once `max_new_tokens` tokens are out
  (`stop_reason` says which; 'stopped' while it is unfinished or was abandoned).

Per-run state lives in the `DecodeState` the skeleton creates for the run (the KV cache, the
sampling generator, and whatever the strategy carries from one step to the next).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Generic, TypeVar

import torch

from m2r2core.config import DecodeConfig
from m2r2core.runtime import hf_compat
from m2r2core.runtime.hf_compat import DecoderParts
from m2r2core.runtime.sampling import make_generator
from m2r2core.runtime.state import DecodeState

Record = TypeVar("Record")


class DecodeRun(Generic[Record]):
    """A generation over one prompt; iterate it to receive the strategy's records.

    After iteration (and during it): `token_ids` (every emitted id), `stop_reason`, `prefill_ms`,
    `decode_ms`.
    """

    def __init__(self, parts: DecoderParts, prompt_ids: list[int], cfg: DecodeConfig,
                 eos_ids: frozenset[int], lock) -> None:
        """Prepare a run; nothing is computed until iteration."""
        self.parts, self.cfg, self.eos_ids, self.lock = parts, cfg, eos_ids, lock
        self.device = parts.embed_tokens.weight.device
        self.prompt = torch.tensor([prompt_ids], device=self.device)
        self.token_ids: list[int] = []
        self.stop_reason = "stopped"
        self.prefill_ms = 0.0
        self.decode_ms = 0.0

    # -- what a strategy implements ---------------------------------------------------------

    def prefill(self, state: DecodeState) -> tuple[Record, tuple[int, ...]]:
        """Run the prompt (`self.prompt`); return the first record and the tokens it emitted."""
        raise NotImplementedError

    def step(self, state: DecodeState, index: int) -> tuple[Record, tuple[int, ...]]:
        """Feed what was emitted last (`self.token_ids`); return record `index` and its tokens (at
        most `self.remaining`, cut after an EOS).
        """
        raise NotImplementedError

    def stamp(self, record: Record, ms: float) -> Record:
        """The record with its measured time filled in (default: unchanged)."""
        return record

    def guard(self):
        """What each call runs under: the engine lock (an offloaded run adds its experts)."""
        return self.lock

    # -- the skeleton -------------------------------------------------------------------------

    @property
    def remaining(self) -> int:
        """How many more tokens the budget allows."""
        return self.cfg.max_new_tokens - len(self.token_ids)

    def __iter__(self) -> Iterator[Record]:
        """Prefill, then one step per record until EOS or the budget."""
        state = DecodeState(hf_compat.new_cache(self.parts),
                            make_generator(self.cfg.sampling, self.device))
        index = 0
        while True:
            start = time.perf_counter()
            with self.guard(), torch.inference_mode():
                record, emitted = self.prefill(state) if index == 0 else self.step(state, index)
            ms = (time.perf_counter() - start) * 1000.0
            if index == 0:
                self.prefill_ms = ms
            else:
                self.decode_ms += ms
            self.token_ids.extend(emitted)
            yield self.stamp(record, ms)
            if self.token_ids[-1] in self.eos_ids or self.remaining <= 0:
                self.stop_reason = "eos" if self.token_ids[-1] in self.eos_ids else "max_new_tokens"
                return
            index += 1


def cut(tokens: list[int], eos_ids: frozenset[int], remaining: int) -> list[int]:
    """Tokens up to and including the first EOS, at most `remaining` of them."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:i + 1][:remaining]
    return tokens[:remaining]
