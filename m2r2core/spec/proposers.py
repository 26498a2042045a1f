"""Who proposes draft tokens: one small interface, several proposers (the seam transformers'
`generation/candidate_generator.py` has between candidate generation and acceptance).

A proposer gets a DraftContext (the tokens emitted so far, the final normalised state that chose
the last one, the decode state whose slow cache it may read but never write, and a budget) and
returns a Draft: the tokens, the draft distribution of each (None when greedy) and its
probability, and the depth each exited at. Proposers here:

- StreamProposer: the draft stream, the first `draft_layer` blocks of the model itself, with the
  accelerator adapters on (M2R2's fast stream) or off (LayerSkip-style slow drafting); a fixed
  exit depth or one an exit rule picks per token.
- MedusaProposer: Medusa-style heads that guess the next K tokens at once from the final state.
- ReplayProposer: proposes a given continuation (a reference the tests know, or prompt lookup's
  kind of guess); its drafts are point masses, so sampling acceptance stays exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from m2r2core.config import SamplingConfig
from m2r2core.exits.routers import ExitRule, RouterBundle, TokenScorer
from m2r2core.runtime import hf_compat
from m2r2core.runtime.hf_compat import DecoderParts
from m2r2core.runtime.int8 import int8_block
from m2r2core.runtime.sampling import filtered_probs
from m2r2core.runtime.state import DecodeState
from m2r2core.spec.medusa import MedusaHeads
from m2r2core.stream.accel import Accelerator
from m2r2core.stream.blocks import block_rows, keys_values
from m2r2core.stream.tuned_lens import TunedLens


@dataclass(frozen=True)
class DraftContext:
    """What a proposer may read to propose the next drafts."""

    tokens: list[int]
    """Every token emitted so far; the drafts continue after tokens[-1]."""
    normed: torch.Tensor | None
    """(H,) the final normalised state whose logits chose tokens[-1]."""
    state: DecodeState
    """The slow cache (read only) and the sampling generator."""
    budget: int
    """The most drafts this round may have."""


@dataclass
class Draft:
    """A proposed chain of tokens."""

    tokens: list[int] = field(default_factory=list)
    dists: list[torch.Tensor | None] = field(default_factory=list)
    """Each draft's distribution over the full vocabulary (None when greedy)."""
    probs: list[float] = field(default_factory=list)
    """Each draft's probability under its draft distribution."""
    depths: list[int] = field(default_factory=list)
    """The depth each draft exited at (empty where the proposer has no depth)."""


DraftHead = Callable[[torch.Tensor], torch.Tensor]
"""Reads draft logits off a normalised state: (..., H) -> (..., V') over the draft vocabulary."""


class Proposer:
    """Proposes draft tokens; the verifier (spec/verify.py) decides which to keep."""

    def propose(self, ctx: DraftContext) -> Draft:
        """Up to ctx.budget drafts continuing ctx.tokens."""
        raise NotImplementedError


class DraftPicker:
    """Reads a draft token off draft logits and grows the chain: greedy top-1 or a sample from
    the filtered draft distribution; adaptive length stops the chain after a draft whose top-1
    probability is below `min_confidence`. That draft is still kept: it is already paid for,
    and one more row in the verification costs far less than a draft, so only the drafts after
    it are saved.
    """

    def __init__(self, sampling: SamplingConfig, sub_vocab: torch.Tensor | None, vocab: int,
                 min_confidence: float, eos_ids: frozenset[int]) -> None:
        """Pick over the full vocabulary, or over `sub_vocab` (ids of the draft head's rows)."""
        self.sampling, self.sub_vocab, self.vocab = sampling, sub_vocab, vocab
        self.min_confidence, self.eos_ids = min_confidence, eos_ids

    def extend(self, draft: Draft, logits: torch.Tensor, gen: torch.Generator,
               depth: int | None = None) -> bool:
        """Append the draft the (V',) logits choose; True once the chain is done (the draft is
        unconfident under adaptive length, or an EOS).
        """
        token, q, prob, top1 = self._choose(logits, gen)
        draft.tokens.append(token)
        draft.dists.append(q)
        draft.probs.append(prob)
        if depth is not None:
            draft.depths.append(depth)
        return top1 < self.min_confidence or token in self.eos_ids

    def _choose(self, logits: torch.Tensor, gen: torch.Generator
                ) -> tuple[int, torch.Tensor | None, float, float]:
        """(token id, its draft distribution over the full vocabulary or None when greedy, its
        draft probability, the draft's top-1 probability).
        """
        if self.sampling.greedy:
            probs = torch.softmax(logits, -1)
            top = int(probs.argmax())
            prob = float(probs[top])
            token = top if self.sub_vocab is None else int(self.sub_vocab[top])
            return token, None, prob, prob
        sub = filtered_probs(logits, self.sampling)
        q = sub if self.sub_vocab is None else torch.zeros(
            self.vocab, device=sub.device).index_copy_(0, self.sub_vocab, sub)
        token = int(torch.multinomial(q, 1, generator=gen))
        return token, q, float(q[token]), float(sub.max())


class StreamProposer(Proposer):
    """The draft stream: blocks 0..draft_layer-1 for one position at a time, adapters on (fast)
    or off (slow). A draft row reads the slow cache of earlier positions plus the draft rows
    before it; the drafts' own keys/values live in a side buffer and never reach the slow cache.
    With an exit rule, each draft leaves at the first depth from the rule's min_layer where its
    score reaches the threshold; deeper draft rows then read the shallower ones' keys/values
    made from their exit states (CALM-style copy-up).
    """

    def __init__(self, parts: DecoderParts, accel: Accelerator | None, draft_layer: int,
                 head: DraftHead, picker: DraftPicker,
                 rule: ExitRule | None = None, routers: RouterBundle | None = None,
                 tuned: TunedLens | None = None, merge: bool = False,
                 int8: bool = False) -> None:
        """Draft through `draft_layer` blocks; read tokens through `head`, and through the tuned
        lens first when one is given (the 'tuned' stream). merge: run the adapters folded into
        the blocks' weights (stream.blocks.merged_block). int8: the draft blocks' projections
        in weight-only int8 (runtime/int8.py).
        """
        self.parts, self.picker, self.head = parts, picker, head
        self.rule, self.routers, self.tuned = rule, routers, tuned
        self.device = parts.embed_tokens.weight.device
        self.blocks = [hf_compat.block_parts(parts, i) for i in range(draft_layer)]
        """The plain blocks: copy-up keys/values are made without adapters."""
        adapted = [accel is not None and accel.block(i) is not None for i in range(draft_layer)]
        self.draft_blocks = self.blocks
        """The blocks draft rows run: with merge, the adapters folded into their weights."""
        self.adapters = [None] * draft_layer
        """Per block, the fused adapters added on top of draft_blocks (none when merged)."""
        if merge:
            self.draft_blocks = [accel.merged_block(i, bp) if on else bp
                                 for i, (bp, on) in enumerate(zip(self.blocks, adapted,
                                                                  strict=True))]
        else:
            self.adapters = [accel.inference_block(i) if on else None
                             for i, on in enumerate(adapted)]
        if int8:
            self.draft_blocks = [int8_block(bp) for bp in self.draft_blocks]

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Draft:
        """Up to ctx.budget drafts from the draft stream."""
        parts, state = self.parts, ctx.state
        side = _SideCache(len(self.blocks))
        draft = Draft()
        exits: list[torch.Tensor] = []  # each draft row's exit state, for copy-up keys/values
        token = ctx.tokens[-1]
        for i in range(ctx.budget):
            hidden = parts.embed_tokens(torch.tensor([[token]], device=self.device))
            position = torch.tensor([[state.position + i]], device=self.device)
            cos, sin = parts.rotary_emb(hidden, position)
            hidden, depth = self._walk(hidden, cos, sin, i, exits, side, state)
            exits.append(hidden)
            read = hidden if self.tuned is None else self.tuned.translate(depth, hidden)
            logits = self.head(parts.norm(read)[0, -1]).float()
            if self.picker.extend(draft, logits, state.generator, depth):
                break
            token = draft.tokens[-1]
        return draft

    def _walk(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, i: int,
              exits: list[torch.Tensor], side: _SideCache, state: DecodeState
              ) -> tuple[torch.Tensor, int]:
        """Draft row i through the draft blocks, until its exit; (exit state, exit depth)."""
        scorer = None
        if self.rule is not None:
            scorer = TokenScorer(self.routers, self.rule, len(self.blocks), self.parts)
            scorer.start(hidden[0, -1])
        for layer, bp in enumerate(self.blocks):
            if side.length(layer) < i:  # earlier drafts exited below this block: copy them up
                self._copy_up(bp, layer, exits[side.length(layer):],
                              state.position + side.length(layer), side)
            past_k, past_v = side.extend_past(layer, *hf_compat.cached_keys_values(state.cache,
                                                                                   layer))
            adapters = self.adapters[layer]
            hidden, k, v = block_rows(self.draft_blocks[layer], adapters, hidden, cos, sin,
                                      past_k, past_v, None, int(adapters is not None),
                                      exact=False)
            side.append(layer, k, v)
            if scorer is not None and layer + 1 < len(self.blocks):
                decide = self.rule.decides(layer + 1)
                seen = hidden if self.tuned is None else self.tuned.translate(layer + 1, hidden)
                score = scorer.step(seen[0, -1], layer + 1, decide)
                if decide and score >= self.rule.threshold:
                    return hidden, layer + 1
        return hidden, len(self.blocks)

    def _copy_up(self, bp, layer: int, states: list[torch.Tensor], first_position: int,
                 side: _SideCache) -> None:
        """Keys/values at `layer` for draft rows that exited below it, made from their exit
        states (no adapters), so a deeper draft row can attend to every earlier one.
        """
        hidden = torch.cat(states, dim=1)  # (1, m, H)
        positions = torch.arange(first_position, first_position + hidden.shape[1],
                                 device=hidden.device)[None]
        cos, sin = self.parts.rotary_emb(hidden, positions)
        side.append(layer, *keys_values(bp, hidden, cos, sin))


class _SideCache:
    """The draft rows' own keys/values per draft block, beside (never in) the slow cache."""

    def __init__(self, n_blocks: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_blocks
        self.values: list[torch.Tensor | None] = [None] * n_blocks

    def length(self, layer: int) -> int:
        """Draft rows with keys/values at this block."""
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def extend_past(self, layer: int, past_k: torch.Tensor, past_v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The slow cache's (B, heads, T, d) keys/values followed by the draft rows' own."""
        if self.keys[layer] is None:
            return past_k, past_v
        return (torch.cat([past_k, self.keys[layer]], dim=2),
                torch.cat([past_v, self.values[layer]], dim=2))

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add draft rows' keys/values at this block."""
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], 2)
            self.values[layer] = torch.cat([self.values[layer], v], 2)


class MedusaProposer(Proposer):
    """Medusa-style heads: from the final state that chose the last token, head k guesses the
    token k+1 positions ahead (a chain of each head's pick, no tree).
    """

    def __init__(self, heads: MedusaHeads, head: DraftHead, picker: DraftPicker) -> None:
        """Read the heads' outputs through `head`, the model's frozen LM head."""
        self.heads, self.head, self.picker = heads, head, picker

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Draft:
        """Up to ctx.budget drafts at once."""
        inputs = self.heads(ctx.normed)[:ctx.budget]  # (n, H)
        logits = self.head(inputs).float()  # (n, V')
        draft = Draft()
        for row in logits:
            if self.picker.extend(draft, row, ctx.state.generator):
                break
        return draft


class ReplayProposer(Proposer):
    """Proposes a fixed continuation: `continuation[j]` as the draft for generated token j. With
    the model's own greedy continuation every draft is accepted; with an edited one the verifier
    must refuse exactly the edited token. Drafts are point masses (q = 1 on the draft).
    """

    def __init__(self, continuation: list[int], vocab: int, greedy: bool = True) -> None:
        """Replay `continuation`; `vocab` sizes the point-mass distributions when sampling."""
        self.continuation, self.vocab, self.greedy = list(continuation), vocab, greedy

    def propose(self, ctx: DraftContext) -> Draft:
        """The next ctx.budget tokens of the continuation after the ones emitted so far."""
        start = len(ctx.tokens)
        tokens = self.continuation[start:start + ctx.budget]
        dists = [None if self.greedy else torch.zeros(self.vocab).index_fill_(0,
                 torch.tensor([t]), 1.0) for t in tokens]
        return Draft(tokens, dists, [1.0] * len(tokens))
