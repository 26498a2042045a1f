"""Figures of the Exit Threshold debugger and the two-stream views: records in, plotly out."""

from __future__ import annotations

import html

import numpy as np
import plotly.colors
import plotly.graph_objects as go

from analysis.exits import Decision, config_key, lens_top1, setting_label
from app import palette
from app.charts import token_labels, visible
from m2r2core.exits.routers import RULE_LABELS
from m2r2core.trace import TokenStep

STREAM_DASH = {"fast": "solid", "slow": "dot", "tuned": "dash"}
RULE_COLOURS = dict(zip(RULE_LABELS, plotly.colors.qualitative.D3, strict=False))


def pareto_figure(configs: list[dict], current: dict | None = None,
                  x: str = "speedup", y: str = "rouge_full") -> go.Figure:
    """Quality against speed, one line per rule and stream; the current setting as a star."""
    fig = go.Figure()
    for stream, rule, depths in sorted({config_key(c) for c in configs}):
        pts = sorted((c for c in configs if config_key(c) == (stream, rule, depths)),
                     key=lambda c: c[x])
        label = setting_label(rule, depths)
        fig.add_trace(go.Scatter(
            x=[c[x] for c in pts], y=[c[y] for c in pts], mode="lines+markers",
            name=f"{label} · {stream}", line={"color": RULE_COLOURS.get(rule),
                                              "dash": STREAM_DASH[stream]},
            marker={"symbol": "diamond" if depths else "circle"},
            customdata=[[c["threshold"], c.get("mean_exit_layer", c.get("mean_depth", 0))]
                        for c in pts],
            hovertemplate=(f"{label} on the {stream} stream<br>threshold %{{customdata[0]:.3f}}"
                           f"<br>{x} %{{x:.2f}}<br>{y} %{{y:.3f}}<br>mean exit layer "
                           "%{customdata[1]:.1f}<extra></extra>")))
    if current:
        fig.add_trace(go.Scatter(
            x=[current[x]], y=[current[y]], mode="markers", name="current setting",
            marker={"symbol": "star", "size": 18, "color": "#111"},
            hovertemplate=f"current setting<br>{x} %{{x:.2f}}<br>{y} %{{y:.3f}}<extra></extra>"))
    fig.update_layout(
        title={"text": "Quality against speed for every exit rule (solid: fast stream, "
                       "dotted: slow stream, dashed: tuned lens; ◆: checked only at the named "
                       "depths)"},
        xaxis={"title": {"text": "speedup vs the full model" if x == "speedup"
                         else "layer ratio N / mean exit depth"}},
        yaxis={"title": {"text": "ROUGE-L vs the full model's output" if y == "rouge_full"
                         else "agreement with the full model (teacher-forced)"}},
        height=460, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def router_heatmap(steps: tuple[TokenStep, ...], stream: str, rule: str, threshold: float,
                   decisions: list[Decision]) -> go.Figure:
    """Tokens x depths of the rule's score, the threshold as a contour, exits as markers."""
    key = f"{stream}/{rule}"
    rows = [s.rule_scores[key] for s in steps]
    z = np.array(rows, dtype=float)
    depths = list(range(1, z.shape[1] + 1))
    labels = token_labels(tuple(s.text for s in steps))
    lens = [[lens_top1(s, stream, d) for d in depths] for s in steps]
    custom = np.empty(z.shape + (2,), dtype=object)
    for i, label in enumerate(labels):
        for j in range(z.shape[1]):
            custom[i, j] = (label, lens[i][j])
    fig = go.Figure(go.Heatmap(
        z=z, x=depths, y=labels, zmin=0, zmax=1, colorscale="Blues", customdata=custom,
        colorbar={"title": {"text": "score"}},
        hovertemplate=("token %{customdata[0]}<br>depth %{x}<br>score %{z:.3f}"
                       "<br>lens top-1 id %{customdata[1]}<extra></extra>")))
    fig.add_trace(go.Contour(
        z=z, x=depths, y=labels, contours={"start": threshold, "end": threshold, "size": 1,
                                           "coloring": "none"},
        line={"color": "#d62728", "width": 2}, showscale=False, hoverinfo="skip",
        name=f"threshold {threshold:.2f}"))
    exited = [(d.depth, labels[i]) for i, d in enumerate(decisions) if d.exited]
    if exited:
        fig.add_trace(go.Scatter(
            x=[e[0] for e in exited], y=[e[1] for e in exited], mode="markers",
            marker={"symbol": "x", "color": "#d62728", "size": 8}, name="exit",
            hovertemplate="exit at depth %{x}<extra></extra>"))
    fig.update_layout(
        title={"text": f"{RULE_LABELS[rule]} score per token and depth ({stream} stream); "
                       f"red line: threshold {threshold:.2f}"},
        xaxis={"title": {"text": "depth"}}, yaxis={"autorange": "reversed", "title": None},
        height=max(320, 16 * len(labels) + 120), margin={"l": 110, "r": 20, "t": 50, "b": 40},
        showlegend=False)
    return fig


def exit_histogram(decisions: list[Decision], n_layers: int) -> go.Figure:
    """How many tokens leave at each depth; the full-depth bar is the rule never firing."""
    depths = [d.depth for d in decisions]
    counts = np.bincount(depths, minlength=n_layers + 1)[1:]
    colours = [plotly.colors.sample_colorscale(palette.LAYER_SCALE, (i + 1) / n_layers)[0]
               for i in range(n_layers)]
    fig = go.Figure(go.Bar(x=list(range(1, n_layers + 1)), y=counts, marker_color=colours,
                           hovertemplate="depth %{x}: %{y} tokens<extra></extra>"))
    fig.update_layout(title={"text": "Exit depth histogram (depth N: no exit)"},
                      xaxis={"title": {"text": "exit depth"}},
                      yaxis={"title": {"text": "tokens"}}, height=300,
                      margin={"l": 50, "r": 20, "t": 50, "b": 40})
    return fig


def stream_curves(curves: dict[str, list[float]], title: str, y_title: str,
                  rate: float | None = None) -> go.Figure:
    """One curve per stream against depth; with a rate, the fast curve is also drawn at r*d."""
    fig = go.Figure()
    for stream, values in curves.items():
        colour = palette.STREAM_COLOURS.get(stream, palette.SLOW_STREAM)
        fig.add_trace(go.Scatter(
            x=list(range(len(values))), y=values, mode="lines+markers", name=f"{stream} stream",
            line={"color": colour},
            hovertemplate=f"{stream} stream<br>depth %{{x}}<br>%{{y:.3f}}<extra></extra>"))
        if stream == "fast" and rate:
            fig.add_trace(go.Scatter(
                x=[rate * d for d in range(len(values))], y=values, mode="lines",
                name=f"fast stream at depth × {rate:g}", line={"color": colour, "dash": "dot"},
                hovertemplate="fast depth %{x} / r<br>%{y:.3f}<extra></extra>"))
    fig.update_layout(title={"text": title}, xaxis={"title": {"text": "depth (blocks applied)"}},
                      yaxis={"title": {"text": y_title}}, height=340,
                      margin={"l": 60, "r": 20, "t": 50, "b": 40})
    return fig


def cosine_matrix_figure(matrix: np.ndarray, rate: float | None) -> go.Figure:
    """Mean cos(h^f_i, h^s_j) over tokens; the dotted line is j = r * i."""
    fig = go.Figure(go.Heatmap(
        z=matrix, x=list(range(matrix.shape[1])), y=list(range(matrix.shape[0])),
        colorscale=palette.ALIGNMENT_SCALE, zmin=-1, zmax=1,
        colorbar={"title": {"text": "cosine"}},
        hovertemplate="fast depth %{y}<br>slow depth %{x}<br>cos %{z:.3f}<extra></extra>"))
    if rate:
        i = np.arange(matrix.shape[0])
        fig.add_trace(go.Scatter(x=np.minimum(rate * i, matrix.shape[1] - 1), y=i, mode="lines",
                                 line={"color": "#111", "dash": "dot"}, name=f"j = {rate:g}·i",
                                 hoverinfo="skip"))
    fig.update_layout(title={"text": "Fast-vs-slow cosine over layer pairs"},
                      xaxis={"title": {"text": "slow depth j"}},
                      yaxis={"title": {"text": "fast depth i"}}, height=420,
                      margin={"l": 60, "r": 20, "t": 50, "b": 40}, showlegend=False)
    return fig


def exit_strip_html(steps, exit_layers: list[int], n_layers: int,
                    would_be: list[str | None] | None = None) -> str:
    """Tokens coloured by exit depth (light: early, dark: full depth). With `would_be`, a token
    whose early exit disagrees shows the exit's token struck through before the real one."""
    spans = []
    for i, (step, depth) in enumerate(zip(steps, exit_layers, strict=True)):
        colour = plotly.colors.sample_colorscale(palette.LAYER_SCALE, depth / n_layers)[0]
        text = html.escape(step.text).replace("\n", "⏎<br>") or "∅"
        wrong = would_be[i] if would_be else None
        tip = f"token {step.position}: {step.text!r} · exit depth {depth}/{n_layers}"
        if wrong is not None:
            tip += f" · early exit would say {wrong!r}"
            text = (f'<s style="color:#b00">{html.escape(visible(wrong))}</s> ' + text)
        fg = "#000" if depth > n_layers * 0.55 else "#fff"
        spans.append(f'<span title="{html.escape(tip)}" style="background:{colour};color:{fg};'
                     f'padding:1px 2px;margin:1px;border-radius:3px;font-family:monospace">'
                     f"{text}</span>")
    return ('<div data-testid="m2r2-exit-strip" style="line-height:1.9">' + "".join(spans)
            + "</div>")

