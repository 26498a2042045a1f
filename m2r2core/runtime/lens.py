"""Per-layer statistics of one position's residual trajectory: norms, relative speed, alignment
to the final state, and the logit lens p_l = softmax(W_U LN_f(h_l)) (nostalgebraist 2020).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from m2r2core.runtime.hf_compat import DecoderParts
from m2r2core.trace import FastStats


@dataclass(frozen=True)
class TrajectoryStats:
    """The statistics of `m2r2core.trace.TokenStep`, as plain Python values."""

    residual_norm: tuple[float, ...]
    relative_speed: tuple[float, ...]
    cosine_to_final: tuple[float, ...]
    lens_entropy: tuple[float, ...]
    lens_top_ids: tuple[tuple[int, ...], ...]
    lens_top_probs: tuple[tuple[float, ...], ...]
    lens_agrees: tuple[bool, ...]


def lens_logits(parts: DecoderParts, states: torch.Tensor) -> torch.Tensor:
    """Logit lens of a stack of residual states.

    Args:
        states: (L, H) residual states in the model's dtype.

    Returns:
        (L, V) logits W_U LN_f(h) in the model's dtype.
    """
    return parts.lm_head(parts.norm(states))


@torch.inference_mode()
def fused_head_is_exact(parts: DecoderParts, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the LM head of a (N+1)-row stack gives bit-identical last-row logits to the
    single-row call the decoder makes.

    When it does, a traced step reads W_U once for the lens and the model's own logits together
    (the head is memory-bound: a second read costs as much as the first). When it does not (fp32
    GEMM and GEMV kernels accumulate in different orders), tracing computes the lens separately,
    so that tracing can never change which token is chosen. Kernel choice depends on shapes and
    dtype, not on values, so one probe of the real shapes decides.
    """
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(parts.n_layers + 1, parts.lm_head.weight.shape[1], generator=gen)
    states = states.to(device, dtype)
    single = parts.lm_head(parts.norm(states[None, -1:]))[0, -1]
    return torch.equal(lens_logits(parts, states)[-1], single)


@torch.inference_mode()
def trajectory_stats(parts: DecoderParts, states: torch.Tensor, final_logits: torch.Tensor,
                     top_k: int, all_logits: torch.Tensor | None = None) -> TrajectoryStats:
    """Statistics of one trajectory h_0..h_N.

    Args:
        states: (N+1, H) residual states, layer 0 the embedding, layer N the last block's output.
        final_logits: (V,) float32, the model's own logits for this position (the lens at N).
        top_k: how many logit-lens tokens to keep per layer.
        all_logits: (N+1, V) lens logits of every layer when the decoder already computed them.
    """
    if all_logits is None:
        final = final_logits[None].to(states.dtype)
        all_logits = torch.cat([lens_logits(parts, states[:-1]), final])
    # Row N equals the model's own logits exactly (fused head, or the same values re-stacked).
    logits = all_logits.float()  # (N+1, V)
    # H = log S + m - (sum_v e_v z_v) / S with e = exp(z - m), S = sum e: one exp pass and the
    # weighted sum as a batched dot product, about a third of the memory traffic of
    # log_softmax -> exp -> multiply -> sum (the CPU is memory-bound here).
    peak = logits.amax(dim=-1, keepdim=True)  # (N+1, 1)
    weights = (logits - peak).exp_()  # (N+1, V)
    total = weights.sum(dim=-1, keepdim=True)  # (N+1, 1)
    lse = peak + total.log()  # (N+1, 1)
    weighted = torch.bmm(weights[:, None, :], logits[:, :, None]).view(-1, 1)  # (N+1, 1)
    entropy = (lse - weighted / total)[:, 0]  # (N+1,)
    top_logits, top_ids = torch.topk(logits, top_k, dim=-1)  # (N+1, k)
    top_probs = (top_logits - lse).exp()
    agrees = top_ids[:, 0] == top_ids[-1, 0]
    h = states.float()
    norms = h.norm(dim=-1)  # (N+1,)
    speed = (h[1:] - h[:-1]).norm(dim=-1) / norms[:-1].clamp_min(1e-12)  # (N,)
    cosine = torch.nn.functional.cosine_similarity(h, h[-1:], dim=-1)  # (N+1,)
    return TrajectoryStats(
        residual_norm=tuple(norms.tolist()),
        relative_speed=tuple(speed.tolist()),
        cosine_to_final=tuple(cosine.tolist()),
        lens_entropy=tuple(entropy.clamp_min(0.0).tolist()),
        lens_top_ids=tuple(map(tuple, top_ids.tolist())),
        lens_top_probs=tuple(map(tuple, top_probs.tolist())),
        lens_agrees=tuple(agrees.tolist()),
    )


@torch.inference_mode()
def fast_stats(parts: DecoderParts, fast: torch.Tensor, slow_final: torch.Tensor,
               final_top1: int) -> FastStats:
    """Statistics of one fast trajectory.

    Args:
        fast: (D+1, H) h^f_0 (the branch state) .. h^f_D.
        slow_final: (H,) h^s_N.
        final_top1: the full model's top-1 token at this position.
    """
    logp = torch.log_softmax(lens_logits(parts, fast).float(), dim=-1)  # (D+1, V)
    entropy = -(logp.exp() * logp).sum(-1)
    top_logp, top_ids = logp.max(dim=-1)
    h = fast.float()
    norms = h.norm(dim=-1)
    speed = (h[1:] - h[:-1]).norm(dim=-1) / norms[:-1].clamp_min(1e-12)
    cosine = torch.nn.functional.cosine_similarity(h, slow_final.float()[None], dim=-1)
    return FastStats(
        residual_norm=tuple(norms.tolist()), relative_speed=tuple(speed.tolist()),
        cosine_to_final=tuple(cosine.tolist()), lens_entropy=tuple(entropy.tolist()),
        lens_top1=tuple(top_ids.tolist()), lens_top1_prob=tuple(top_logp.exp().tolist()),
        lens_agrees=tuple((top_ids == final_top1).tolist()))
