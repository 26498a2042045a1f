"""2-D projections of residual trajectories: every layer state of the chosen tokens is embedded
together (UMAP with a fixed random_state, or PCA), so each token draws a path from layer 0 to N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m2r2core.trace import ResidualCapture

METHODS = ("umap", "pca")


@dataclass(frozen=True)
class TrajectoryProjection:
    """Projected trajectories of selected tokens."""

    method: str
    token_indices: tuple[int, ...]
    coords: np.ndarray
    """(K, N+1, 2) position of token k's state after layer l."""


def project_trajectories(capture: ResidualCapture, token_indices: list[int], method: str = "umap",
                         seed: int = 0, n_neighbors: int = 15) -> TrajectoryProjection:
    """Embed the layer states of the selected tokens in 2-D.

    States are scaled to unit norm first: the residual norm grows with depth, and the direction
    (what the lens reads after the final norm) is what changes meaningfully.

    Args:
        capture: residuals of a run, hidden (T, N+1, H).
        token_indices: which generated tokens to draw (at least one).
        method: 'umap' (seeded, cosine metric) or 'pca'.
        seed: UMAP's random_state.
        n_neighbors: UMAP's neighbourhood size (clipped to the number of points).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    indices = sorted(set(token_indices))
    if not indices or min(indices) < 0 or max(indices) >= capture.n_tokens:
        raise ValueError(f"token indices must be within 0..{capture.n_tokens - 1}")
    states = capture.hidden[indices]  # (K, N+1, H)
    flat = states.reshape(-1, states.shape[-1])
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    if method == "pca" or len(flat) < 5:
        coords = _pca(flat)
    else:
        import umap  # slow to import (numba); only when asked

        reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(flat) - 1),
                            metric="cosine", random_state=seed, init="random")
        coords = reducer.fit_transform(flat)
    return TrajectoryProjection(method if len(flat) >= 5 else "pca", tuple(indices),
                                np.asarray(coords, dtype=float).reshape(*states.shape[:2], 2))


def _pca(flat: np.ndarray) -> np.ndarray:
    centred = flat - flat.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T
