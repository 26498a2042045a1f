"""Why a learned router let a token exit, by captum's Integrated Gradients.

Integrated Gradients (Sundararajan et al. 2017) attributes the router's probability at the exit
depth to two inputs:

- the prompt and earlier tokens: IG on the input embeddings, through the slow stream's keys and
  values and the fast stream up to the exit depth (the router's input is a function of them);
- the trajectory: IG on the normed states at depths 1..d that the router reads.

Only the learned rules (ARLA, MLP) have gradients worth explaining; the threshold rules read one
number of the current state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from captum.attr import IntegratedGradients

from m2r2core.exits.routers import LEARNED, RouterBundle
from m2r2core.runtime import hf_compat
from m2r2core.runtime.hf_compat import DecoderParts
from m2r2core.stream.accel import Accelerator
from m2r2core.stream.blocks import block_rows, keys_values, visible


@dataclass(frozen=True)
class Attribution:
    """Per-token and per-depth attributions of one exit decision."""

    tokens: tuple[str, ...]
    token_scores: tuple[float, ...]
    """IG attribution of each context token (summed over the embedding), signed."""
    depth_scores: tuple[float, ...]
    """IG attribution of each depth 1..d of the trajectory, signed."""
    probability: float
    """The router's probability at the exit depth for the real input."""
    convergence_delta: float
    """Captum's completeness check for the token attribution (small is good)."""


def _router_prob(bundle: RouterBundle, parts: DecoderParts, rule: str, stream: str,
                 normed: torch.Tensor) -> torch.Tensor:
    """(B,) router probability at the last depth of (B, d, H) normed states."""
    net = bundle.net(rule, stream)
    depths = torch.arange(1, normed.shape[1] + 1)
    lens = bundle.check.features(normed.to(parts.lm_head.weight.dtype))
    logits, _ = net(normed, lens, depths)
    return torch.sigmoid(logits[:, -1])


def _trajectory(parts: DecoderParts, accel: Accelerator | None, stream: str, embeds: torch.Tensor,
                depth: int) -> torch.Tensor:
    """(B, d, H) normed states at depths 1..depth of the last position, differentiable."""
    steps = embeds.shape[1]
    positions = torch.arange(steps)[None].expand(embeds.shape[0], -1)
    cos, sin = parts.rotary_emb(embeds, positions)
    pos = torch.arange(steps)
    slow, hidden = [embeds], embeds
    n_slow = depth if stream == "slow" else min(depth, accel.first + accel.n_fast)
    for index in range(n_slow):
        bp = hf_compat.block_parts(parts, index)
        hidden, _, _ = block_rows(bp, None, hidden, cos, sin, None, None,
                                  visible(pos, pos, bp.sliding_window), n_fast=0)
        slow.append(hidden)
    if stream == "slow":
        return parts.norm(torch.stack([s[:, -1] for s in slow[1:depth + 1]], dim=1))
    states, fast = [], slow[accel.first][:, -1:]
    for index in range(accel.first, depth):
        bp = hf_compat.block_parts(parts, index)
        past_k, past_v = keys_values(bp, slow[index][:, :-1], cos[:, :-1], sin[:, :-1])
        mask = torch.cat([visible(pos[-1:], pos[:-1], bp.sliding_window),
                          torch.ones(1, 1, dtype=torch.bool)], dim=1)
        fast, _, _ = block_rows(bp, accel.block(index), fast, cos[:, -1:], sin[:, -1:],
                                past_k, past_v, mask, n_fast=1)
        states.append(fast[:, 0])
    return parts.norm(torch.stack(states, dim=1))


def explain_exit(parts: DecoderParts, accel: Accelerator | None, bundle: RouterBundle,
                 token_text: Callable[[int], str], context_ids: list[int], stream: str,
                 rule: str, depth: int, n_steps: int = 8) -> Attribution:
    """Attribute the router's probability at `depth` for the token after `context_ids`.

    Args:
        context_ids: the prompt and generated tokens before the explained one (the last id is
            the input at the position that produced it).
        depth: the exit depth to explain (1-based).
        n_steps: Integrated Gradients steps (each is one forward and backward pass).
    """
    if rule not in LEARNED:
        raise ValueError(f"attributions explain learned routers ({', '.join(LEARNED)}); "
                         f"'{rule}' reads one number of the current state")
    ids = torch.tensor([context_ids])
    with torch.no_grad():
        embeds = parts.embed_tokens(ids).detach()
        normed = _trajectory(parts, accel, stream, embeds, depth).detach()
    with torch.enable_grad():
        def by_depth(x: torch.Tensor) -> torch.Tensor:
            return _router_prob(bundle, parts, rule, stream, x)

        depth_attr = IntegratedGradients(by_depth).attribute(
            normed.float(), baselines=torch.zeros_like(normed.float()), n_steps=n_steps)

        def by_token(x: torch.Tensor) -> torch.Tensor:
            states = _trajectory(parts, accel, stream, x.to(embeds.dtype), depth)
            return _router_prob(bundle, parts, rule, stream, states.float())

        token_attr, delta = IntegratedGradients(by_token).attribute(
            embeds.float(), baselines=torch.zeros_like(embeds.float()), n_steps=n_steps,
            internal_batch_size=1, return_convergence_delta=True)
        probability = float(by_depth(normed.float())[0].detach())
    return Attribution(
        tokens=tuple(token_text(i) for i in context_ids),
        token_scores=tuple(token_attr[0].sum(-1).tolist()),
        depth_scores=tuple(depth_attr[0].sum(-1).tolist()),
        probability=probability, convergence_delta=float(delta.abs().max()))
