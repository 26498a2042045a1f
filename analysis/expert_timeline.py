"""Tables the Expert Loading page draws, derived from an offloaded run's event log: the Gantt rows
of a token range, the fast tier's contents at a token, and per-token, per-layer hits.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd

from m2r2core.trace import Event

GANTT_KINDS = ("compute", "load", "stall")
MARK_KINDS = ("hit", "miss", "prefetch", "evict", "wasted", "cancel")


def events_frame(events: list[Event]) -> pd.DataFrame:
    """All events as a table (one row each; times in ms from the run start)."""
    frame = pd.DataFrame([asdict(e) for e in events],
                         columns=["kind", "token", "layer", "expert", "start_ms", "end_ms",
                                  "cause"])
    frame["duration_ms"] = frame["end_ms"] - frame["start_ms"]
    return frame


def gantt_rows(events: list[Event], first: int, last: int) -> pd.DataFrame:
    """Spans and marks of tokens first..last (forward-pass numbers; 0 is the prompt), with the
    lane each belongs to: 'loader' for loads, 'L<i>' for layer i's compute and stalls.
    """
    frame = events_frame(events)
    frame = frame[(frame["token"] >= first) & (frame["token"] <= last)].copy()
    frame["lane"] = np.where(frame["kind"] == "load", "loader",
                             "L" + frame["layer"].astype(str))
    return frame.reset_index(drop=True)


def residency_at(events: list[Event], token: int, n_layers: int, n_experts: int,
                 warm: list[tuple[int, int]]) -> np.ndarray:
    """(layers, experts) state of the fast tier when forward pass `token` starts:
    1 resident, 0.5 queued or in flight, 0 absent, NaN for a dense layer's row.
    """
    state = np.zeros((n_layers, n_experts))
    for layer, expert in warm:
        state[layer, expert] = 1.0
    start = _start_of(events, token)
    for e in sorted(events, key=lambda e: (e.end_ms, e.kind != "evict")):
        if e.kind == "load" and e.end_ms <= start:
            state[e.layer, e.expert] = 1.0
        elif e.kind in ("evict", "cancel") and e.end_ms <= start:
            state[e.layer, e.expert] = 0.0
        elif e.kind == "prefetch" and e.start_ms <= start and state[e.layer, e.expert] == 0:
            state[e.layer, e.expert] = 0.5
    return state


def _start_of(events: list[Event], token: int) -> float:
    starts = [e.start_ms for e in events if e.token == token and e.kind == "compute"]
    return min(starts) if starts else float("inf")


def hits_by_layer(events: list[Event], n_tokens: int, n_layers: int) -> np.ndarray:
    """(tokens, layers) share of each layer's experts that were resident when needed (NaN where
    the layer routed nothing, e.g. a dense layer).
    """
    hits = np.zeros((n_tokens, n_layers))
    total = np.zeros((n_tokens, n_layers))
    for e in events:
        if e.kind in ("hit", "miss") and e.token < n_tokens:
            total[e.token, e.layer] += 1
            hits[e.token, e.layer] += e.kind == "hit"
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hits / np.maximum(total, 1), np.nan)
