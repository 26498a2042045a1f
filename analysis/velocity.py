"""Residual dynamics over a trace: tokens × layers matrices and per-layer summaries (median and
spread) of relative speed, alignment to the final state and logit-lens agreement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m2r2core.trace import RunTrace, TokenStep

QUANTITIES = {
    "relative_speed": "relative speed ‖h_l − h_{l−1}‖ / ‖h_{l−1}‖",
    "cosine_to_final": "cosine to final state cos(h_l, h_N)",
    "lens_agrees": "logit-lens top-1 = final top-1",
    "lens_entropy": "logit-lens entropy (nats)",
    "residual_norm": "residual norm ‖h_l‖",
}


@dataclass(frozen=True)
class LayerMatrix:
    """A quantity over generated tokens × layers, with what hover needs."""

    quantity: str
    values: np.ndarray
    """(T, L) float values; L is N+1 (layers 0..N) or N for relative speed (layers 1..N)."""
    layers: tuple[int, ...]
    """The layer index of each column."""
    tokens: tuple[str, ...]
    """Display text of each generated token (row)."""
    lens_top: tuple[tuple[str, ...], ...]
    """(T, L) the lens's top tokens of each cell, formatted for hover."""
    lens: str = "logit"
    """Which lens read the layers: 'logit' or 'tuned' (the tuned lens, TokenStep.tuned)."""


@dataclass(frozen=True)
class LayerProfile:
    """Per-layer median and interquartile range of a quantity over the generated tokens."""

    quantity: str
    layers: tuple[int, ...]
    median: tuple[float, ...]
    q25: tuple[float, ...]
    q75: tuple[float, ...]
    mean: tuple[float, ...]
    """For 0/1 quantities such as agreement, the fraction of tokens."""


def traced_steps(trace: RunTrace) -> tuple[TokenStep, ...]:
    """The steps that carry per-layer statistics."""
    return tuple(step for step in trace.steps if step.traced)


def _values(trace: RunTrace, quantity: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """(T, L) values of one quantity over the traced tokens, and the layer of each column."""
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; choose from {sorted(QUANTITIES)}")
    steps = traced_steps(trace)
    values = np.array([getattr(step, quantity) for step in steps], dtype=float)
    offset = 1 if quantity == "relative_speed" else 0
    n_cols = values.shape[1] if values.size else 0
    return values.reshape(len(steps), n_cols), tuple(range(offset, offset + n_cols))


LENSES = {"logit": "logit lens", "tuned": "tuned lens"}
LENS_QUANTITIES = ("lens_agrees", "lens_entropy")
"""The quantities a lens reads (the others are properties of the states themselves)."""


def has_tuned(trace: RunTrace) -> bool:
    """Whether the trace recorded the tuned-lens reading of its layers."""
    return any(step.tuned is not None for step in traced_steps(trace))


def layer_matrix(trace: RunTrace, quantity: str, lens: str = "logit",
                 token_text=None) -> LayerMatrix:
    """Stack one per-layer quantity of every traced token into a (T, L) matrix, with hover text.

    With lens='tuned', the lens quantities are read from the tuned-lens record of each token
    (hover: its top-1 and probability; `token_text` turns ids into text, else ids are shown).
    """
    if lens == "tuned" and quantity in LENS_QUANTITIES:
        return _tuned_matrix(trace, quantity, token_text or str)
    values, layers = _values(trace, quantity)
    steps = traced_steps(trace)
    lens_top = tuple(tuple(_format_top(step, layer) for layer in layers) for step in steps)
    return LayerMatrix(quantity, values, layers, tuple(step.text for step in steps), lens_top)


def _tuned_matrix(trace: RunTrace, quantity: str, token_text) -> LayerMatrix:
    steps = tuple(s for s in traced_steps(trace) if s.tuned is not None)
    if not steps:
        raise ValueError("this trace has no tuned-lens reading (no tuned lens was loaded)")
    values = np.array([getattr(s.tuned, quantity) for s in steps], dtype=float)
    top = tuple(tuple(f"{token_text(t)!r} {p:.2f}" for t, p in zip(s.tuned.lens_top1,
                                                                  s.tuned.lens_top1_prob,
                                                                  strict=True))
                for s in steps)
    return LayerMatrix(quantity, values, tuple(range(values.shape[1])),
                       tuple(s.text for s in steps), top, "tuned")


def _format_top(step: TokenStep, layer: int, k: int = 3) -> str:
    pairs = zip(step.lens_top_tokens[layer][:k], step.lens_top_probs[layer][:k])
    return " · ".join(f"{token!r} {prob:.2f}" for token, prob in pairs)


def layer_profile(trace: RunTrace, quantity: str) -> LayerProfile:
    """Median and quartiles per layer of a quantity over the traced tokens."""
    values, layers = _values(trace, quantity)  # no hover text: profiles do not show it
    if not values.size:
        return LayerProfile(quantity, (), (), (), (), ())
    q25, median, q75 = np.percentile(values, [25, 50, 75], axis=0)
    return LayerProfile(quantity, layers, tuple(median), tuple(q25), tuple(q75),
                        tuple(values.mean(axis=0)))


def lock_in_layer(step: TokenStep) -> int:
    """The first layer from which the logit lens agrees with the final top-1 at every deeper
    layer: where the token's prediction 'locks in' (N when only the last layer agrees).
    """
    layer = len(step.lens_agrees) - 1
    while layer > 0 and step.lens_agrees[layer - 1]:
        layer -= 1
    return layer


@dataclass(frozen=True)
class LensRow:
    """One row of a token's logit-lens table: what the model would say at that depth."""

    layer: int
    top_tokens: tuple[str, ...]
    top_probs: tuple[float, ...]
    entropy: float
    agrees: bool
    cosine_to_final: float
    relative_speed: float | None


def lens_table(step: TokenStep) -> tuple[LensRow, ...]:
    """The logit lens of one generated token across layers 0..N."""
    return tuple(
        LensRow(
            layer=layer,
            top_tokens=step.lens_top_tokens[layer],
            top_probs=step.lens_top_probs[layer],
            entropy=step.lens_entropy[layer],
            agrees=step.lens_agrees[layer],
            cosine_to_final=step.cosine_to_final[layer],
            relative_speed=step.relative_speed[layer - 1] if layer else None,
        )
        for layer in range(len(step.lens_agrees))
    )
