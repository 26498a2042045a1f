"""Lossless self-speculative decoding: a cheap stream drafts, the unmodified model verifies.

Each round:

1. **Draft.** From the last emitted token, the draft stream runs the first `draft_layer` blocks
   for one position and reads a token off the LM head (the full head, or a frequency-ranked
   sub-vocabulary); it repeats for up to `max_draft` tokens, stopping early when the draft's
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

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from m2r2core.config import DecodeConfig
from m2r2core.errors import UnsupportedModel, require
from m2r2core.exits.routers import LEARNED, RULES, ExitRule, RouterBundle, TokenScorer
from m2r2core.runtime import hf_compat
from m2r2core.runtime.decode import DecodeState, forward
from m2r2core.runtime.hf_compat import DecoderParts
from m2r2core.runtime.sampling import filtered_probs, make_generator, sample_next
from m2r2core.spec.medusa import MedusaHeads
from m2r2core.stream.accel import Accelerator, block_rows, keys_values

STREAMS = ("fast", "slow", "medusa")
DRAFT_VOCABS = ("full", "sub")
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
    'medusa': Medusa-style heads on the model's final state (the peer)."""
    max_draft: int = 4
    """K, the longest draft chain per verification."""
    min_confidence: float = 0.0
    """Adaptive length: stop the chain once a draft's top-1 probability is below this (0: off)."""
    draft_vocab: str = "full"
    """'full' LM head, or 'sub': the routers' frequency-ranked sub-vocabulary (cheaper; a token
    outside it can never be drafted, but verification stays exact)."""
    draft_rule: str = "fixed"
    """'fixed': every draft exits at draft_layer. An exit rule ('arla', 'mlp', 'confidence',
    ...): the rule, on the draft stream, picks each draft's depth per token, the first depth from
    min_draft_layer where its score reaches draft_threshold (draft_layer is then the deepest)."""
    draft_threshold: float = 0.9
    min_draft_layer: int = 2

    def validate(self, n_layers: int, fast_depth: int | None, medusa_heads: int | None = None
                 ) -> None:
        """Raise ConfigError on an out-of-range field.

        Args:
            n_layers: the model's depth N.
            fast_depth: the deepest block with accelerator adapters (None: no adapters loaded).
            medusa_heads: how many Medusa heads are loaded (None: none).
        """
        require(self.stream in STREAMS, "stream", self.stream, f"one of {STREAMS}")
        require(self.stream != "fast" or fast_depth is not None, "stream", self.stream,
                "'slow' here: no accelerator adapters are loaded for this model")
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
        require(self.draft_rule in DRAFT_RULES, "draft_rule", self.draft_rule,
                f"one of {DRAFT_RULES}")
        if self.draft_rule != "fixed":
            require(self.stream != "medusa", "draft_rule", self.draft_rule,
                    "'fixed' for Medusa heads (they have no depth to choose)")
            require(0.0 <= self.draft_threshold <= 1.0, "draft_threshold",
                    self.draft_threshold, "0 to 1")
            require(isinstance(self.min_draft_layer, int)
                    and 1 <= self.min_draft_layer <= self.draft_layer, "min_draft_layer",
                    self.min_draft_layer, f"1..draft_layer ({self.draft_layer})")


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


class SpecLoop:
    """Self-speculative decoding over a prompt; iterate it to receive SpecRound records.

    After iteration: `stop_reason`, `prefill_ms`, `decode_ms` and `tokens` are set.
    """

    def __init__(self, parts: DecoderParts, accel: Accelerator | None,
                 sub_vocab: torch.Tensor | None, prompt_ids: list[int], cfg: DecodeConfig,
                 spec: SpecConfig, eos_ids: frozenset[int], token_text, lock,
                 device: torch.device, medusa: MedusaHeads | None = None,
                 routers: RouterBundle | None = None) -> None:
        """Prepare a run; nothing is computed until iteration."""
        if any(t != "full_attention" for t in parts.layer_types):
            raise UnsupportedModel(
                "Speculative decoding needs full-attention layers only: this model has "
                "sliding-window layers, whose cache cannot be cropped back after a refused draft.")
        fast_depth = accel.max_depth if accel is not None else None
        spec.validate(parts.n_layers, fast_depth,
                      medusa.n_heads if medusa is not None else None)
        require(spec.draft_vocab == "full" or sub_vocab is not None, "draft_vocab", "sub",
                "'full' here: no trained routers with a sub-vocabulary are loaded")
        self.parts, self.cfg, self.spec = parts, cfg, spec
        self.accel = accel if spec.stream == "fast" else None
        self.medusa = medusa if spec.stream == "medusa" else None
        self._normed: torch.Tensor | None = None  # final state behind the last token (Medusa)
        self.eos_ids, self.token_text, self.lock, self.device = eos_ids, token_text, lock, device
        self.prompt = torch.tensor([prompt_ids], device=device)
        depth = 0 if self.medusa is not None else spec.draft_layer
        self.blocks = [hf_compat.block_parts(parts, i) for i in range(depth)]
        self.adapters = [self.accel.inference_block(i) if self.accel is not None
                         and self.accel.block(i) is not None else None
                         for i in range(depth)]
        weight = parts.lm_head.weight
        self.rule = None
        if spec.draft_rule != "fixed":
            require(routers is not None, "draft_rule", spec.draft_rule,
                    "'fixed' here: no exit routers are loaded")
            self.rule = ExitRule(spec.draft_rule, "fast" if spec.stream == "fast" else "slow",
                                 spec.draft_threshold, spec.min_draft_layer)
            if self.rule.rule in LEARNED:
                routers.net(self.rule.rule, self.rule.stream)  # AdapterError if untrained
        self.routers = routers
        self._depths: list[int] = []  # this round's draft depths
        self.sub_vocab = sub_vocab.to(device) if spec.draft_vocab == "sub" else None
        self.draft_weight = weight if self.sub_vocab is None else weight[self.sub_vocab].clone()
        self.stop_reason = "stopped"
        self.prefill_ms = self.decode_ms = 0.0
        self.tokens: list[int] = []

    def __iter__(self) -> Iterator[SpecRound]:
        """Prefill with the full model, then draft-and-verify rounds until EOS or the budget."""
        cfg = self.cfg
        state = DecodeState(hf_compat.new_cache(self.parts),
                            make_generator(cfg.sampling, self.device))
        start = time.perf_counter()
        with self.lock:
            out = forward(self.parts, self.prompt, state, keep_states=False)
            first = sample_next(out.logits, cfg.sampling, state.generator)
            self._normed = out.normed
        self.prefill_ms = (time.perf_counter() - start) * 1000.0
        self.tokens = [first]
        yield SpecRound(0, 0, (), (), (), 0, (first,), (self.token_text(first),), False, 0.0,
                        self.prefill_ms)
        index = 0
        while not self._finished():
            index += 1
            remaining = cfg.max_new_tokens - len(self.tokens)
            with self.lock:
                round_ = self._round(index, state, remaining)
            self.decode_ms += round_.draft_ms + round_.verify_ms
            self.tokens.extend(round_.emitted)
            yield round_
        last = self.tokens[-1]
        self.stop_reason = "eos" if last in self.eos_ids else "max_new_tokens"

    def _finished(self) -> bool:
        return self.tokens[-1] in self.eos_ids or len(self.tokens) >= self.cfg.max_new_tokens

    @torch.inference_mode()
    def _round(self, index: int, state: DecodeState, remaining: int) -> SpecRound:
        start = time.perf_counter()
        last = self.tokens[-1]
        # Never draft past the budget: the verification adds one token of its own.
        self._depths = []
        drafts, q_dists, draft_probs = self._draft(last, state, min(self.spec.max_draft,
                                                                     remaining - 1))
        drafted = time.perf_counter()
        before = state.position
        ids = torch.tensor([[last, *drafts]], device=self.device)
        out = forward(self.parts, ids, state, keep_states=False, all_positions=True)
        accepted, own = self._accept(drafts, q_dists, out.logits, state.generator)
        self._normed = out.normed[accepted]  # the row whose logits chose `own`
        hf_compat.crop_cache(state.cache, before + 1 + accepted)
        state.position = before + 1 + accepted
        emitted = _cut([*drafts[:accepted], own], self.eos_ids, remaining)
        verified = time.perf_counter()
        return SpecRound(
            index=index, position=len(self.tokens), drafts=tuple(drafts),
            draft_texts=tuple(self.token_text(t) for t in drafts),
            draft_probs=tuple(draft_probs), accepted=accepted, emitted=tuple(emitted),
            emitted_texts=tuple(self.token_text(t) for t in emitted),
            correction=accepted < len(drafts),
            draft_ms=(drafted - start) * 1000.0, verify_ms=(verified - drafted) * 1000.0,
            draft_depths=tuple(self._depths[:len(drafts)]))

    def _draft(self, last: int, state: DecodeState, budget: int
               ) -> tuple[list[int], list[torch.Tensor | None], list[float]]:
        """Up to `budget` draft tokens from the draft stream; keys/values stay in a side buffer."""
        if self.medusa is not None:
            return self._draft_medusa(budget, state.generator)
        parts, cache, greedy = self.parts, state.cache, self.cfg.sampling.greedy
        side_k: list[torch.Tensor | None] = [None] * len(self.blocks)
        side_v: list[torch.Tensor | None] = [None] * len(self.blocks)
        drafts, dists, probs = [], [], []
        exits: list[torch.Tensor] = []  # each draft row's exit state, for copy-up keys/values
        token = last
        for i in range(budget):
            hidden = parts.embed_tokens(torch.tensor([[token]], device=self.device))
            position = torch.tensor([[state.position + i]], device=self.device)
            cos, sin = parts.rotary_emb(hidden, position)
            scorer = (TokenScorer(self.routers, self.rule, len(self.blocks), parts)
                      if self.rule is not None else None)
            if scorer is not None:
                scorer.start(hidden[0, -1])
            depth = len(self.blocks)
            for layer, bp in enumerate(self.blocks):
                have = 0 if side_k[layer] is None else side_k[layer].shape[2]
                if have < i:  # earlier drafts exited below this block: copy their exit states up
                    self._copy_up(bp, layer, exits[have:], state.position + have, side_k,
                                  side_v)
                past_k, past_v = hf_compat.cached_keys_values(cache, layer)
                if side_k[layer] is not None:
                    past_k = torch.cat([past_k, side_k[layer]], dim=2)
                    past_v = torch.cat([past_v, side_v[layer]], dim=2)
                adapters = self.adapters[layer]
                hidden, k, v = block_rows(bp, adapters, hidden, cos, sin, past_k, past_v, None,
                                          int(adapters is not None), exact=False)
                side_k[layer] = k if side_k[layer] is None else torch.cat([side_k[layer], k], 2)
                side_v[layer] = v if side_v[layer] is None else torch.cat([side_v[layer], v], 2)
                if scorer is not None and layer + 1 < len(self.blocks):
                    decide = layer + 1 >= self.rule.min_layer
                    score = scorer.step(hidden[0, -1], layer + 1, decide)
                    if decide and score >= self.rule.threshold:
                        depth = layer + 1
                        break
            exits.append(hidden)
            self._depths.append(depth)
            logits = torch.nn.functional.linear(parts.norm(hidden)[0, -1],
                                                self.draft_weight).float()
            choice = self._draft_choice(logits, greedy, state.generator)
            if self._extend(i, choice, drafts, dists, probs):
                break
        return drafts, dists, probs

    def _copy_up(self, bp, layer: int, states: list[torch.Tensor], first_position: int,
                 side_k: list, side_v: list) -> None:
        """Keys/values at `layer` for draft rows that exited below it, made from their exit
        states (no adapters), so a deeper draft row can attend to every earlier one.
        """
        hidden = torch.cat(states, dim=1)  # (1, m, H)
        positions = torch.arange(first_position, first_position + hidden.shape[1],
                                 device=self.device)[None]
        cos, sin = self.parts.rotary_emb(hidden, positions)
        k, v = keys_values(bp, hidden, cos, sin)
        side_k[layer] = k if side_k[layer] is None else torch.cat([side_k[layer], k], 2)
        side_v[layer] = v if side_v[layer] is None else torch.cat([side_v[layer], v], 2)

    def _draft_medusa(self, budget: int, gen: torch.Generator
                      ) -> tuple[list[int], list[torch.Tensor | None], list[float]]:
        """Up to `budget` drafts at once: each head's guess from the last token's final state."""
        inputs = self.medusa(self._normed)[:budget]  # (n, H)
        logits = torch.nn.functional.linear(inputs, self.draft_weight).float()  # (n, V')
        drafts, dists, probs = [], [], []
        for i in range(len(logits)):
            choice = self._draft_choice(logits[i], self.cfg.sampling.greedy, gen)
            if self._extend(i, choice, drafts, dists, probs):
                break
        return drafts, dists, probs

    def _extend(self, i: int, choice: tuple, drafts: list, dists: list, probs: list) -> bool:
        """Append draft i of a chain unless adaptive length stops it first (the first draft is
        always kept); True once the chain is done (stopped, or the draft is an EOS).
        """
        token, q, prob, top1 = choice
        if i and top1 < self.spec.min_confidence:
            return True
        drafts.append(token)
        dists.append(q)
        probs.append(prob)
        return token in self.eos_ids

    def _draft_choice(self, logits: torch.Tensor, greedy: bool, gen: torch.Generator
                      ) -> tuple[int, torch.Tensor | None, float, float]:
        """(token id, its draft distribution over the full vocabulary or None when greedy,
        its draft probability, the draft's top-1 probability).
        """
        if greedy:
            probs = torch.softmax(logits, -1)
            top = int(probs.argmax())
            prob = float(probs[top])
            token = top if self.sub_vocab is None else int(self.sub_vocab[top])
            return token, None, prob, prob
        sub = filtered_probs(logits, self.cfg.sampling)
        q = sub if self.sub_vocab is None else torch.zeros(
            self.parts.lm_head.weight.shape[0], device=sub.device).index_copy_(
                0, self.sub_vocab, sub)
        token = int(torch.multinomial(q, 1, generator=gen))
        return token, q, float(q[token]), float(sub.max())

    def _accept(self, drafts: list[int], q_dists: list[torch.Tensor | None],
                logits: torch.Tensor, gen: torch.Generator) -> tuple[int, int]:
        """(accepted prefix length, the model's own next token after it)."""
        if self.cfg.sampling.greedy:
            targets = logits.argmax(-1).tolist()
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
                accepted += 1
            return accepted, targets[accepted]
        for j, token in enumerate(drafts):
            p = filtered_probs(logits[j], self.cfg.sampling)
            q = q_dists[j]
            ratio = float(p[token] / q[token])
            if float(torch.rand((), generator=gen)) < min(1.0, ratio):
                continue
            residual = torch.clamp(p - q, min=0.0)
            total = float(residual.sum())
            residual = residual / total if total > 0 else p
            return j, int(torch.multinomial(residual, 1, generator=gen))
        p = filtered_probs(logits[len(drafts)], self.cfg.sampling)
        return len(drafts), int(torch.multinomial(p, 1, generator=gen))


def _cut(tokens: list[int], eos_ids: frozenset[int], remaining: int) -> list[int]:
    """Tokens up to and including the first EOS, at most `remaining` of them."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:i + 1][:remaining]
    return tokens[:remaining]
