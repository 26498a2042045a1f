"""Choosing the next token: greedy, or temperature / top-k / top-p sampling with an explicit
torch.Generator, so that one session's seed never changes another's draws.
"""

from __future__ import annotations

import torch

from m2r2core.config import SamplingConfig


def make_generator(cfg: SamplingConfig, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the config; one per run."""
    return torch.Generator(device=device).manual_seed(cfg.seed)


def filtered_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution sampling draws from: temperature, then top-k, then top-p (nucleus).

    Args:
        logits: (V,) float32 final logits.

    Returns:
        (V,) probabilities summing to 1, zero outside the kept set.
    """
    scores = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(scores, min(cfg.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= cfg.top_p, 0.0)  # keep the top token
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> int:
    """Pick the next token id from (V,) logits; greedy when temperature is 0."""
    if cfg.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(filtered_probs(logits, cfg), 1, generator=gen))
