"""Figures of the oracle gap and of a rule's calibration: records in, plotly out."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from analysis.exits import lens_agrees
from analysis.oracle import GapRow, Reliability
from app import palette
from app.charts import token_labels
from m2r2core.trace import TokenStep

VERDICT_COLOURS = {"right": palette.AGREE, "late": "#ff7f0e", "premature": "#d62728"}


def gap_heatmap(steps: tuple[TokenStep, ...], rows: list[GapRow], stream: str) -> go.Figure:
    """Tokens x depths: where the stream's lens agrees with the full model (green), each
    token's oracle depth (◆) and the rule's exit depth (× coloured by its verdict)."""
    agrees = [lens_agrees(s, stream) for s in steps]
    width = max((len(a) for a in agrees), default=0)
    z = np.full((len(steps), width), np.nan)
    for i, a in enumerate(agrees):
        z[i, :len(a)] = np.array(a, dtype=float)
    labels = token_labels(tuple(s.text for s in steps))
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(width)), y=labels, zmin=0, zmax=1, showscale=False,
        colorscale=palette.AGREEMENT_SCALE,
        hovertemplate="token %{y}<br>depth %{x}<br>lens agrees %{z:.0f}<extra></extra>"))
    fig.add_trace(go.Scatter(
        x=[r.oracle for r in rows], y=labels, mode="markers", name="oracle depth",
        marker={"symbol": "diamond-open", "size": 11, "color": "black"},
        hovertemplate="token %{y}<br>oracle depth %{x}<extra></extra>"))
    for verdict, colour in VERDICT_COLOURS.items():
        picked = [(r, label) for r, label in zip(rows, labels, strict=True)
                  if r.verdict == verdict]
        fig.add_trace(go.Scatter(
            x=[r.depth for r, _ in picked], y=[label for _, label in picked], mode="markers",
            name=f"exit: {verdict}", marker={"symbol": "x", "size": 10, "color": colour},
            customdata=[[r.oracle, r.wasted] for r, _ in picked],
            hovertemplate=("token %{y}<br>rule exits at %{x}<br>oracle %{customdata[0]}"
                           f"<br>{verdict}, %{{customdata[1]}} layers wasted<extra></extra>")))
    fig.update_layout(
        title={"text": f"Oracle against the rule, {stream} stream"},
        xaxis={"title": {"text": "depth"}, "dtick": 2},
        yaxis={"title": {"text": "generated token"}, "autorange": "reversed"},
        height=max(320, min(1200, 100 + 16 * len(labels))),
        margin={"l": 10, "r": 10, "t": 50, "b": 40}, legend={"orientation": "h", "y": -0.12})
    return fig


def gap_sweep_figure(sweep: list[dict], threshold: float) -> go.Figure:
    """Layers wasted per token against the share of tokens lost, one point per threshold."""
    fig = go.Figure(go.Scatter(
        x=[p["premature_share"] for p in sweep], y=[p["wasted_per_token"] for p in sweep],
        mode="lines+markers", name="thresholds", line={"color": palette.SLOW_STREAM},
        customdata=[[p["threshold"], p["mean_exit_depth"]] for p in sweep],
        hovertemplate=("threshold %{customdata[0]:.2f}<br>tokens lost %{x:.1%}<br>layers "
                       "wasted per token %{y:.2f}<br>mean exit depth %{customdata[1]:.1f}"
                       "<extra></extra>")))
    here = min(sweep, key=lambda p: abs(p["threshold"] - threshold))
    fig.add_trace(go.Scatter(
        x=[here["premature_share"]], y=[here["wasted_per_token"]], mode="markers",
        name=f"threshold {threshold:.2f}", marker={"symbol": "star", "size": 16,
                                                   "color": "#d62728"},
        hovertemplate="this threshold<br>tokens lost %{x:.1%}<br>layers wasted %{y:.2f}"
                      "<extra></extra>"))
    fig.update_layout(title={"text": "Layers wasted against tokens lost"},
                      xaxis={"title": {"text": "tokens lost (premature exits)"},
                             "tickformat": ".0%"},
                      yaxis={"title": {"text": "layers wasted per token (late exits)"}},
                      height=340, margin={"l": 60, "r": 20, "t": 50, "b": 40})
    return fig


def reliability_figure(rel: Reliability, label: str) -> go.Figure:
    """Each score bin's mean score against how often the lens was right there."""
    centres = [(a + b) / 2 for a, b in zip(rel.bins[:-1], rel.bins[1:], strict=True)]
    keep = [i for i, c in enumerate(rel.confidence) if c is not None]
    fig = go.Figure([
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated",
                   line={"color": "#999999", "dash": "dot"}, hoverinfo="skip"),
        go.Bar(x=[centres[i] for i in keep], y=[rel.accuracy[i] for i in keep],
               width=1 / len(centres) * 0.9, name="how often right", opacity=0.6,
               marker={"color": palette.AGREE},
               customdata=[[rel.confidence[i], rel.counts[i]] for i in keep],
               hovertemplate=("scores around %{x:.2f} (mean %{customdata[0]:.2f})<br>right "
                              "%{y:.1%} of %{customdata[1]} token-depths<extra></extra>")),
    ])
    fig.update_layout(title={"text": f"Reliability of {label}: ECE {rel.ece:.3f}"},
                      xaxis={"title": {"text": "rule score"}, "range": [0, 1]},
                      yaxis={"title": {"text": "lens right there"}, "range": [0, 1],
                             "tickformat": ".0%"},
                      height=340, margin={"l": 60, "r": 20, "t": 50, "b": 40})
    return fig
