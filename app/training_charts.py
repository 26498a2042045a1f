"""Figures of the Training page: what the committed trained files say, plotted (records in,
plotly out)."""

from __future__ import annotations

import plotly.colors
import plotly.graph_objects as go

from analysis.training_report import GapSlice, ReadsLike, ScalingFit, TrainingReport
from app import palette

DEPTH_COLOURS = plotly.colors.qualitative.D3


def agreement_by_depth(report: TrainingReport) -> go.Figure:
    """Held-out logit-lens agreement with the final token at every depth, fast vs slow."""
    fig = go.Figure()
    colours = palette.STREAM_COLOURS
    for stream, values in report.held_out_by_depth().items():
        depths = list(range(1, len(values) + 1))
        fig.add_trace(go.Scatter(
            x=depths, y=values, mode="lines+markers", name=f"{stream} stream",
            line={"color": colours.get(stream)},
            hovertemplate=(f"{stream} stream<br>depth %{{x}}<br>agreement %{{y:.3f}}"
                           "<extra></extra>")))
    fig.update_layout(
        title={"text": "Held-out agreement with the full model's token, by depth"},
        xaxis={"title": {"text": "depth (layers run)"}},
        yaxis={"title": {"text": "logit-lens top-1 = final top-1 (share of tokens)"},
               "range": [0, 1]},
        height=380, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def reads_like_figure(rows: dict[str, list[ReadsLike]], rate: float, n_layers: int
                      ) -> go.Figure:
    """For every depth of the fast stream (and the tuned lens), the slow layer whose logit lens
    agrees with the final token as often (`TrainingReport.reads_like` by stream): the rate the
    stream achieved, against the r·d the method aims at and the slow stream's own d."""
    fig = go.Figure()
    longest = 0
    for stream, found in rows.items():
        placed = [r for r in found if r.slow_layer is not None]
        if not placed:
            continue
        longest = max(longest, max(r.depth for r in placed))
        fig.add_trace(go.Scatter(
            x=[r.depth for r in placed], y=[r.slow_layer for r in placed], mode="lines+markers",
            name="fast stream" if stream == "fast" else "tuned lens (slow states)",
            line={"color": palette.STREAM_COLOURS[stream]},
            customdata=[[r.agreement, r.rate()] for r in placed],
            hovertemplate=(f"{stream}<br>depth %{{x}}<br>agreement %{{customdata[0]:.3f}}"
                           "<br>reads like slow layer %{y:.1f}<br>achieved rate "
                           "%{customdata[1]:.2f}<extra></extra>")))
    depths = list(range(1, longest + 1))
    fig.add_trace(go.Scatter(
        x=depths, y=[min(n_layers, rate * d) for d in depths], mode="lines",
        name=f"the method's aim: slow layer r·d (r = {rate:g})",
        line={"color": "grey", "dash": "dash"},
        hovertemplate="depth %{x}: aim slow layer %{y:g}<extra></extra>"))
    fig.add_trace(go.Scatter(
        x=depths, y=depths, mode="lines", name="slow stream itself (logit lens)",
        line={"color": palette.STREAM_COLOURS["slow"], "dash": "dot"},
        hovertemplate="depth %{x}: slow layer %{y}<extra></extra>"))
    fig.update_layout(
        title={"text": "Which slow layer each depth reads like (held-out agreement matched)"},
        xaxis={"title": {"text": "depth (layers run)"}},
        yaxis={"title": {"text": "slow layer with the same logit-lens agreement"},
               "range": [0, n_layers]},
        height=380, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def agreement_over_steps(report: TrainingReport, depths: tuple[int, ...]) -> go.Figure:
    """The fast stream's dev agreement at chosen depths over training steps."""
    fig = go.Figure()
    for colour, (depth, points) in zip(DEPTH_COLOURS, report.agreement_curve(depths).items(),
                                       strict=False):
        fig.add_trace(go.Scatter(
            x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
            name=f"depth {depth}", line={"color": colour},
            hovertemplate=(f"depth {depth}<br>step %{{x}}<br>dev agreement %{{y:.3f}}"
                           "<extra></extra>")))
    fig.update_layout(
        title={"text": "Fast-stream dev agreement over training steps"},
        xaxis={"title": {"text": "training step"}},
        yaxis={"title": {"text": "dev agreement (share of tokens)"}},
        height=360, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def scaling_figure(fits: list[ScalingFit], target: float) -> go.Figure:
    """Test agreement of every committed adapter state against its training tokens (log scale),
    each depth's log-linear fit extended to where it meets the target."""
    fig = go.Figure()
    for colour, fit in zip(DEPTH_COLOURS, fits, strict=False):
        tokens = [p[0] for p in fit.points]
        fig.add_trace(go.Scatter(
            x=tokens, y=[p[1] for p in fit.points], mode="markers", name=f"depth {fit.depth}",
            marker={"color": colour, "size": 9},
            hovertemplate=(f"depth {fit.depth}<br>%{{x:,}} training tokens<br>test agreement "
                           "%{y:.3f}<extra></extra>")))
        reach = fit.tokens_for(target)
        end = min(reach, 1e12) if reach else max(tokens) * 100
        xs = [min(tokens) * 0.8 * (end / (min(tokens) * 0.8)) ** (i / 40) for i in range(41)]
        fig.add_trace(go.Scatter(
            x=xs, y=[fit.at(x) for x in xs], mode="lines", name=f"depth {fit.depth}: fit",
            line={"color": colour, "dash": "dash"},
            hovertemplate=(f"depth {fit.depth} fit<br>%{{x:,.3s}} tokens<br>agreement "
                           "%{y:.3f}<extra></extra>")))
    fig.add_hline(y=target, line={"color": "grey", "dash": "dot"},
                  annotation_text=f"target {target:g}")
    fig.update_layout(
        title={"text": "Held-out agreement against training tokens, and where the trend points"},
        xaxis={"title": {"text": "training tokens (every run that led to the state)"},
               "type": "log"},
        yaxis={"title": {"text": "test agreement (share of tokens)"}, "range": [0, 1]},
        height=380, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def loss_over_steps(report: TrainingReport) -> go.Figure:
    """The training loss (cosine terms + weighted KL) over steps."""
    rows = [r for r in report.steps if "loss" in r]
    fig = go.Figure(go.Scatter(
        x=[r["step"] for r in rows], y=[r["loss"] for r in rows], mode="lines",
        line={"color": palette.FAST_STREAM}, name="loss",
        customdata=[[r.get("tokens", 0)] for r in rows],
        hovertemplate="step %{x}<br>loss %{y:.3f}<br>tokens seen %{customdata[0]:,}"
                      "<extra></extra>"))
    fig.update_layout(
        title={"text": "Training loss"}, xaxis={"title": {"text": "training step"}},
        yaxis={"title": {"text": "loss (sum of 1 - cos terms + λ KL, nats)"}},
        height=320, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def gap_figure(slices: list[GapSlice]) -> go.Figure:
    """The fast stream's agreement by depth on answers it trained on (dashed) against held-out
    answers of the same kinds (solid), one colour per source."""
    fig = go.Figure()
    colours = {}
    for item in slices:
        colour = colours.setdefault(item.source, DEPTH_COLOURS[len(colours) % len(DEPTH_COLOURS)])
        depths = list(range(item.first_depth, item.first_depth + len(item.agreement)))
        fig.add_trace(go.Scatter(
            x=depths, y=list(item.agreement), mode="lines+markers", name=item.label,
            line={"color": colour, "dash": "solid" if item.held_out else "dash"},
            hovertemplate=(f"{item.label}<br>fast depth %{{x}}<br>agreement %{{y:.3f}}"
                           f"<br>{item.samples} answers<extra></extra>")))
    fig.update_layout(
        title={"text": "What the adapters fit, and what carries over to new answers"},
        xaxis={"title": {"text": "fast depth"}},
        yaxis={"title": {"text": "fast-stream top-1 = final top-1 (share of tokens)"},
               "range": [0, 1]},
        height=380, margin={"l": 60, "r": 20, "t": 50, "b": 40})
    return fig


def variants_figure(rows: list[dict]) -> go.Figure:
    """Dev agreement at depths 8 and 15 of each adapter variant, trained on an equal budget."""
    fig = go.Figure()
    for depth, colour in ((8, DEPTH_COLOURS[0]), (15, DEPTH_COLOURS[1])):
        fig.add_trace(go.Bar(
            x=[r["variant"] for r in rows], y=[r[f"dev agreement d{depth}"] for r in rows],
            name=f"depth {depth}", marker={"color": colour},
            customdata=[[r["changes"], r["tokens"]] for r in rows],
            hovertemplate=(f"%{{x}} (%{{customdata[0]}})<br>depth {depth}: %{{y:.3f}}"
                           "<br>%{customdata[1]} training tokens<extra></extra>")))
    fig.update_layout(barmode="group", title={"text": "Design variants on an equal budget"},
                      yaxis={"title": {"text": "dev agreement with the full model"}},
                      height=340, margin={"l": 60, "r": 20, "t": 50, "b": 40})
    return fig
