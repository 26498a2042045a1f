"""Verification and acceptance: the unmodified model scores `[last token] + drafts` in one pass
over the slow cache, the longest acceptable prefix is kept with one token of the model's own,
and the cache is cropped back to it.

Greedy: a draft is accepted while it equals the model's argmax; the model's own next token
follows (a correction where a draft was refused, a bonus where all passed). Sampling:
speculative rejection sampling (accept draft x with probability min(1, p(x)/q(x)), else draw
from norm(max(0, p - q))), so every emitted token is distributed exactly as the model's own
(filtered) distribution (Leviathan et al. 2023, Algorithm 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from m2r2core.config import SamplingConfig
from m2r2core.runtime import hf_compat
from m2r2core.runtime.decode import forward
from m2r2core.runtime.hf_compat import DecoderParts
from m2r2core.runtime.narrow import narrow_products, verified_modules
from m2r2core.runtime.sampling import filtered_probs
from m2r2core.runtime.state import DecodeState


@dataclass(frozen=True)
class Verdict:
    """What verification decided."""

    accepted: int
    """How many drafts (a prefix) the model accepted."""
    own: int
    """The model's own token after the accepted prefix."""
    normed: torch.Tensor
    """(H,) the final normalised state whose logits chose `own` (Medusa heads read it)."""


@torch.inference_mode()
def verify(parts: DecoderParts, state: DecodeState, last: int, drafts: list[int],
           dists: list[torch.Tensor | None], sampling: SamplingConfig,
           narrow: bool = False) -> Verdict:
    """Score `[last] + drafts` with the full model, accept, and crop the cache to the accepted
    prefix (the model's own token is not yet in the cache; it is fed next round). With `narrow`,
    the pass multiplies its few rows as `weight @ rows.T` (runtime/narrow.py).
    """
    before = state.position
    device = parts.embed_tokens.weight.device
    ids = torch.tensor([[last, *drafts]], device=device)
    with narrow_products(verified_modules(parts), narrow):
        out = forward(parts, ids, state, keep_states=False, all_positions=True)
    accepted, own = accept(drafts, dists, out.logits, sampling, state.generator)
    hf_compat.crop_cache(state.cache, before + 1 + accepted)
    state.position = before + 1 + accepted
    return Verdict(accepted, own, out.normed[accepted])


def accept(drafts: list[int], dists: list[torch.Tensor | None], logits: torch.Tensor,
           sampling: SamplingConfig, gen: torch.Generator) -> tuple[int, int]:
    """(accepted prefix length, the model's own next token after it).

    Args:
        logits: (len(drafts) + 1, V) the model's logits after `last` and after each draft.
        dists: each draft's distribution over the full vocabulary (unused when greedy).
    """
    if sampling.greedy:
        targets = logits.argmax(-1).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
            accepted += 1
        return accepted, targets[accepted]
    for j, token in enumerate(drafts):
        p = filtered_probs(logits[j], sampling)
        q = dists[j]
        ratio = float(p[token] / q[token])
        if float(torch.rand((), generator=gen)) < min(1.0, ratio):
            continue
        residual = torch.clamp(p - q, min=0.0)
        total = float(residual.sum())
        residual = residual / total if total > 0 else p
        return j, int(torch.multinomial(residual, 1, generator=gen))
    p = filtered_probs(logits[len(drafts)], sampling)
    return len(drafts), int(torch.multinomial(p, 1, generator=gen))
