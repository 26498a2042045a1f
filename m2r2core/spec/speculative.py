"""Lossless self-speculative decoding: a cheap stream drafts, the unmodified model verifies.

Each round is propose (spec/proposers.py) -> verify -> accept -> crop (spec/verify.py) -> record:

1. **Draft.** From the last emitted token, the draft stream runs the first `draft_layer` blocks
   for one position and reads a token off the LM head (the full head, or a frequency-ranked
   sub-vocabulary); it repeats for up to `max_draft` tokens, stopping early after a draft whose
   top-1 probability falls below `min_confidence` (adaptive length). On the fast stream (M2R2)
   the accelerator adapters are on; on the slow stream (LayerSkip-style) they are off. A draft
   row reads the slow cache of earlier positions plus the draft rows before it; the drafts' own
   keys/values live in a side buffer and never reach the slow cache.
2. **Verify.** The model itself (transformers' blocks, as `decode.forward`) runs
   `[last token] + drafts` in one pass over the slow cache.
3. **Accept.** Greedy: the longest prefix where each draft equals the model's argmax, plus the
   model's own next token (a correction where a draft was refused, a bonus where all passed).
   Sampling: speculative rejection sampling (accept draft x with probability
   min(1, p(x)/q(x)), else draw from norm(max(0, p - q))), so every token is distributed exactly
   as the model's own (filtered) distribution. The cache is cropped to the accepted prefix.

`stream="medusa"` is the Medusa-style peer (spec/medusa.py): no draft stream at all; K heads read
the model's final state at the position that produced the last token and guess the next K
tokens at once (a chain: each head's top-1, no tree). Verification and acceptance are the same.

Greedy output equals plain greedy decoding token for token, up to floating-point near-ties
between a multi-row verification and single-row steps (tests prove identity in fp32).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from m2r2core.config import DecodeConfig
from m2r2core.errors import UnsupportedModel, require
from m2r2core.exits.routers import LEARNED, RULES, ExitRule, RouterBundle
from m2r2core.runtime import narrow
from m2r2core.runtime.decode import forward
from m2r2core.runtime.hf_compat import DecoderParts
from m2r2core.runtime.int8 import int8_head
from m2r2core.runtime.loop import DecodeRun, cut
from m2r2core.runtime.sampling import sample_next
from m2r2core.runtime.state import DecodeState
from m2r2core.spec.medusa import MedusaHeads
from m2r2core.spec.proposers import (
    DraftContext,
    DraftPicker,
    MedusaProposer,
    Proposer,
    StreamProposer,
)
from m2r2core.spec.verify import verify
from m2r2core.stream.accel import Accelerator
from m2r2core.stream.tuned_lens import TunedLens
from m2r2core.trace import SpecRound

STREAMS = ("fast", "slow", "tuned", "medusa")
DRAFT_VOCABS = ("full", "sub")
DRAFT_WEIGHTS = ("model", "int8")
NARROW_MODES = narrow.MODES
MAX_DRAFT_LIMIT = 16
DRAFT_RULES = ("fixed", *RULES)


@dataclass(frozen=True)
class SpecConfig:
    """How drafts are made. Every field is a choice the method leaves open."""

    draft_layer: int = 8
    """Depth the draft stream exits at (1..fast blocks on the fast stream, 1..N-1 on the slow;
    unused by 'medusa')."""
    stream: str = "fast"
    """'fast': M2R2 accelerated stream (adapters on); 'slow': plain early-exit drafting;
    'tuned': the slow stream's draft-layer state read through the tuned lens (the distance-based
    baseline); 'medusa': Medusa-style heads on the model's final state (the peer)."""
    max_draft: int = 4
    """K, the longest draft chain per verification."""
    min_confidence: float = 0.0
    """Adaptive length: stop the chain after a draft whose top-1 probability is below this (that
    draft is still verified: it is already paid for; 0: off, always draft K)."""
    draft_vocab: str = "full"
    """'full' LM head, or 'sub': the routers' frequency-ranked sub-vocabulary (cheaper; a token
    outside it can never be drafted, but verification stays exact)."""
    draft_rule: str = "fixed"
    """'fixed': every draft exits at draft_layer. An exit rule ('arla', 'mlp', 'confidence',
    ...): the rule, on the draft stream, picks each draft's depth per token, the first depth from
    min_draft_layer where its score reaches draft_threshold (draft_layer is then the deepest)."""
    draft_threshold: float = 0.9
    min_draft_layer: int = 2
    merge_adapters: bool = True
    """On the fast stream: draft through blocks with the adapters folded into their weights
    (one matmul per projection), or add the low-rank deltas to each projection as the traced
    stream does (False). The drafts differ only by rounding; verification keeps the output."""
    draft_weights: str = "int8"
    """'int8': the draft blocks' projections and the draft head in weight-only int8, one scale
    per output channel (runtime/int8.py); 'model': in the model's dtype. Decoding at batch 1 is
    bound by reading weights, so an int8 draft costs about half of a bf16 one (measured: 0.15
    against 0.25 of a decoding step at depth 8); int8 drafts may differ from model-dtype ones
    where the top two tokens are close, and verification (always in the model's own weights)
    keeps the output exact either way."""
    narrow_verify: str = "auto"
    """How verification multiplies its 2–8 rows by each weight: 'on' as `weight @ rows.T`
    (runtime/narrow.py: on an AVX2 CPU in float32, verifying one draft costs 1.27 `generate` steps
    instead of 1.6; on an AVX-512/AMX Xeon it doubles the cost instead), 'off' as transformers' own
    `rows @ weight.T`, 'auto' whichever times faster on this machine (runtime/narrow.py's `measure`,
    once per process; off on an accelerator). The two differ by float32 rounding only; greedy output
    stays `generate`'s (tests prove it)."""

    def validate(self, n_layers: int, fast_depth: int | None, medusa_heads: int | None = None,
                 tuned: bool = False) -> None:
        """Raise ConfigError on an out-of-range field.

        Args:
            n_layers: the model's depth N.
            fast_depth: the deepest block with accelerator adapters (None: no adapters loaded).
            medusa_heads: how many Medusa heads are loaded (None: none).
            tuned: whether a tuned lens is loaded.
        """
        require(self.stream in STREAMS, "stream", self.stream, f"one of {STREAMS}")
        require(self.stream != "fast" or fast_depth is not None, "stream", self.stream,
                "'slow' here: no accelerator adapters are loaded for this model")
        require(self.stream != "tuned" or tuned, "stream", self.stream,
                "'fast' or 'slow' here: no tuned lens is loaded for this model (train one with "
                "`python -m m2r2core.train lens`)")
        require(self.stream != "medusa" or medusa_heads is not None, "stream", self.stream,
                "'fast' or 'slow' here: no Medusa heads are loaded for this model (train them "
                "with `python -m m2r2core.train medusa`)")
        if self.stream != "medusa":
            deepest = fast_depth if self.stream == "fast" else n_layers - 1
            require(isinstance(self.draft_layer, int) and 1 <= self.draft_layer <= deepest,
                    "draft_layer", self.draft_layer, f"1..{deepest} on the {self.stream} stream")
        longest = MAX_DRAFT_LIMIT if self.stream != "medusa" else medusa_heads
        require(isinstance(self.max_draft, int) and 1 <= self.max_draft <= longest,
                "max_draft", self.max_draft,
                f"1..{longest}" + (" (one draft per Medusa head)" if self.stream == "medusa"
                                   else ""))
        require(0.0 <= self.min_confidence < 1.0, "min_confidence", self.min_confidence,
                "0 (off) to below 1")
        require(self.draft_vocab in DRAFT_VOCABS, "draft_vocab", self.draft_vocab,
                f"one of {DRAFT_VOCABS}")
        require(self.draft_weights in DRAFT_WEIGHTS, "draft_weights", self.draft_weights,
                f"one of {DRAFT_WEIGHTS}")
        require(self.draft_rule in DRAFT_RULES, "draft_rule", self.draft_rule,
                f"one of {DRAFT_RULES}")
        require(self.narrow_verify in NARROW_MODES, "narrow_verify", self.narrow_verify,
                f"one of {NARROW_MODES}")
        if self.draft_rule != "fixed":
            require(self.stream != "medusa", "draft_rule", self.draft_rule,
                    "'fixed' for Medusa heads (they have no depth to choose)")
            require(0.0 <= self.draft_threshold <= 1.0, "draft_threshold",
                    self.draft_threshold, "0 to 1")
            require(isinstance(self.min_draft_layer, int)
                    and 1 <= self.min_draft_layer <= self.draft_layer, "min_draft_layer",
                    self.min_draft_layer, f"1..draft_layer ({self.draft_layer})")


class SpecLoop(DecodeRun[SpecRound]):
    """Self-speculative decoding over a prompt; iterate it to receive SpecRound records.

    Each round reads as the method: propose (spec/proposers.py) -> verify, accept and crop
    (spec/verify.py) -> record. After iteration: `stop_reason`, `prefill_ms`, `decode_ms` and
    `token_ids` are set (runtime/loop.py).
    """

    def __init__(self, parts: DecoderParts, proposer: Proposer, prompt_ids: list[int],
                 cfg: DecodeConfig, eos_ids: frozenset[int], token_text, lock,
                 max_draft: int, narrow_verify: bool = False) -> None:
        """Prepare a run; nothing is computed until iteration.

        Args:
            narrow_verify: verify with narrow products (SpecConfig.narrow_verify, resolved).
        """
        if any(t != "full_attention" for t in parts.layer_types):
            raise UnsupportedModel(
                "Speculative decoding needs full-attention layers only: this model has "
                "sliding-window layers, whose cache cannot be cropped back after a refused draft.")
        super().__init__(parts, prompt_ids, cfg, eos_ids, lock)
        self.proposer, self.max_draft, self.token_text = proposer, max_draft, token_text
        self.narrow_verify = narrow_verify

    def prefill(self, state: DecodeState) -> tuple[SpecRound, tuple[int, ...]]:
        """The prompt's forward pass chooses the first token (round 0: no drafts)."""
        out = forward(self.parts, self.prompt, state, keep_states=False)
        first = sample_next(out.logits, self.cfg.sampling, state.generator)
        state.carry = out.normed  # the final state behind the last emitted token
        return SpecRound(0, 0, (), (), (), 0, (first,), (self.token_text(first),), False, 0.0,
                         0.0), (first,)

    def stamp(self, record: SpecRound, ms: float) -> SpecRound:
        """Round 0 is the prefill: its time is the verification's."""
        return dataclasses.replace(record, verify_ms=ms) if record.index == 0 else record

    def step(self, state: DecodeState, index: int) -> tuple[SpecRound, tuple[int, ...]]:
        """One round: propose, verify (accept and crop), record."""
        remaining = self.remaining
        start = time.perf_counter()
        # Never draft past the budget: the verification adds one token of its own.
        budget = min(self.max_draft, remaining - 1)
        draft = self.proposer.propose(DraftContext(list(self.token_ids), state.carry, state,
                                                   budget))
        drafted = time.perf_counter()
        verdict = verify(self.parts, state, self.token_ids[-1], draft.tokens, draft.dists,
                         self.cfg.sampling, self.narrow_verify)
        emitted = cut([*draft.tokens[:verdict.accepted], verdict.own], self.eos_ids, remaining)
        verified = time.perf_counter()
        state.carry = verdict.normed
        return SpecRound(
            index=index, position=len(self.token_ids), drafts=tuple(draft.tokens),
            draft_texts=tuple(self.token_text(t) for t in draft.tokens),
            draft_probs=tuple(draft.probs), accepted=verdict.accepted, emitted=tuple(emitted),
            emitted_texts=tuple(self.token_text(t) for t in emitted),
            correction=verdict.accepted < len(draft.tokens),
            draft_ms=(drafted - start) * 1000.0, verify_ms=(verified - drafted) * 1000.0,
            draft_depths=tuple(draft.depths)), tuple(emitted)


def make_proposer(parts: DecoderParts, spec: SpecConfig, cfg: DecodeConfig,
                  eos_ids: frozenset[int], accel: Accelerator | None,
                  sub_vocab: torch.Tensor | None, medusa: MedusaHeads | None,
                  routers: RouterBundle | None, tuned: TunedLens | None = None) -> Proposer:
    """The proposer a SpecConfig names, validated against what is loaded (ConfigError, or
    AdapterError for an untrained learned draft rule).
    """
    spec.validate(parts.n_layers, accel.max_depth if accel is not None else None,
                  medusa.n_heads if medusa is not None else None, tuned is not None)
    require(spec.draft_vocab == "full" or sub_vocab is not None, "draft_vocab", "sub",
            "'full' here: no trained routers with a sub-vocabulary are loaded")
    weight = parts.lm_head.weight
    sub = sub_vocab.to(weight.device) if spec.draft_vocab == "sub" else None
    int8 = spec.draft_weights == "int8"
    if int8:
        head = int8_head(parts.lm_head, sub)
    else:
        head = functools.partial(F.linear, weight=weight if sub is None else weight[sub].clone())
    picker = DraftPicker(cfg.sampling, sub, weight.shape[0], spec.min_confidence, eos_ids)
    if spec.stream == "medusa":
        return MedusaProposer(medusa, head, picker)
    rule = None
    if spec.draft_rule != "fixed":
        require(routers is not None, "draft_rule", spec.draft_rule,
                "'fixed' here: no exit routers are loaded")
        rule = ExitRule(spec.draft_rule, spec.stream, spec.draft_threshold,
                        spec.min_draft_layer)
        if rule.rule in LEARNED:
            routers.net(rule.rule, rule.stream)  # AdapterError if untrained
    return StreamProposer(parts, accel if spec.stream == "fast" else None, spec.draft_layer,
                          head, picker, rule, routers,
                          tuned if spec.stream == "tuned" else None, spec.merge_adapters, int8)
