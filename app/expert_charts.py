"""Figures of the Expert Loading page: event tables and benchmark reports in, plotly (or HTML)
out. No tensor math: everything drawn comes from the run's event log or a committed report."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from app.charts import visible

COLOURS = {
    "compute": "#9ecae1", "demand": "#d73027", "prefetch": "#1a9850", "stall": "#b2182b",
    "hit": "#1a9850", "miss": "#d73027", "evict": "#636363", "wasted": "#fdae61",
    "cancel": "#bdbdbd", "warm": "#756bb1",
}
PREDICTOR_COLOURS = {"m2r2": "#d62728", "pregate": "#1f77b4", "previous": "#ff7f0e",
                     "oracle": "#2ca02c", "none": "#7f7f7f"}


def gantt(rows: pd.DataFrame, n_layers: int, token_texts: dict[int, str]) -> go.Figure:
    """Lanes: the loader on top, then one per layer. Bars: layer compute (blue), loads (red on
    demand, green ahead of time), stalls (dark red, over the compute bar). Markers: hits,
    misses, prefetch requests; hover names token, layer, expert and timing."""
    fig = go.Figure()
    lanes = ["loader"] + [f"L{i}" for i in range(n_layers)]

    def bars(frame: pd.DataFrame, name: str, colour: str, width: float) -> None:
        if frame.empty:
            return
        tips = [f"{name} · token {t} ({html.escape(visible(token_texts.get(t, '')))}) · "
                f"layer {lay}{'' if ex < 0 else f' · expert {ex}'} · {d:.2f} ms"
                for t, lay, ex, d in zip(frame["token"], frame["layer"], frame["expert"],
                                         frame["duration_ms"])]
        fig.add_trace(go.Bar(
            y=frame["lane"], x=frame["duration_ms"].clip(lower=0.02), base=frame["start_ms"],
            orientation="h", name=name, marker_color=colour, width=width, hovertext=tips,
            hoverinfo="text", customdata=np.stack([frame["token"], frame["layer"],
                                                   frame["expert"]], 1)))

    bars(rows[rows["kind"] == "compute"], "compute", COLOURS["compute"], 0.8)
    loads = rows[rows["kind"] == "load"]
    bars(loads[loads["cause"] == "demand"], "load on demand", COLOURS["demand"], 0.8)
    bars(loads[loads["cause"] == "prefetch"], "load ahead of time", COLOURS["prefetch"], 0.8)
    bars(rows[rows["kind"] == "stall"], "stall", COLOURS["stall"], 0.4)
    for kind, symbol in (("hit", "circle"), ("miss", "x"), ("prefetch", "triangle-right")):
        marks = rows[rows["kind"] == kind]
        if marks.empty:
            continue
        lane = marks["lane"] if kind != "prefetch" else ["loader"] * len(marks)
        fig.add_trace(go.Scatter(
            x=marks["start_ms"], y=lane, mode="markers", name=kind,
            marker=dict(symbol=symbol, size=7, color=COLOURS[kind]),
            customdata=np.stack([marks["token"], marks["layer"], marks["expert"]], 1),
            hovertemplate=(f"{kind} · token %{{customdata[0]}} · layer %{{customdata[1]}} · "
                           "expert %{customdata[2]} · %{x:.2f} ms<extra></extra>")))
    fig.update_layout(
        barmode="overlay", height=max(360, 18 * len(lanes)), margin=dict(l=10, r=10, t=30,
                                                                          b=40),
        xaxis_title="time since the run started (ms)", legend=dict(orientation="h", y=1.04),
        yaxis=dict(categoryorder="array", categoryarray=list(reversed(lanes)), title=""))
    return fig


def residency_heatmap(state: np.ndarray, used: tuple[tuple[int, ...], ...],
                      hits: dict[tuple[int, int], str], token_label: str) -> go.Figure:
    """Layers × experts: resident (dark), in flight (mid), absent (light) when the token's pass
    started; the experts it used are marked ● (hit) or ✕ (miss)."""
    n_layers, n_experts = state.shape
    text = [["" for _ in range(n_experts)] for _ in range(n_layers)]
    for layer, experts in enumerate(used):
        for e in experts:
            text[layer][e] = "●" if hits.get((layer, e)) == "hit" else "✕"
    names = {1.0: "resident", 0.5: "in flight", 0.0: "absent"}
    hover = [[f"layer {i} · expert {j} · "
              f"{'dense layer' if np.isnan(state[i, j]) else names.get(state[i, j], '')}"
              f"{' · used: ' + ('hit' if text[i][j] == '●' else 'miss') if text[i][j] else ''}"
              for j in range(n_experts)] for i in range(n_layers)]
    fig = go.Figure(go.Heatmap(
        z=state, x=[f"E{j}" for j in range(n_experts)], y=[f"L{i}" for i in range(n_layers)],
        zmin=0, zmax=1, colorscale=[[0, "#f7fbff"], [0.5, "#fdae61"], [1, "#08519c"]],
        text=text, texttemplate="%{text}", hovertext=hover, hoverinfo="text",
        colorbar=dict(title="resident", tickvals=[0, 0.5, 1],
                      ticktext=["absent", "in flight", "resident"])))
    fig.update_layout(title=f"Fast tier when {token_label} started", height=520,
                      margin=dict(l=10, r=10, t=40, b=10), yaxis=dict(autorange="reversed"))
    return fig


def hits_heatmap(matrix: np.ndarray, tokens: list[str], routes: list) -> go.Figure:
    """Tokens × layers: share of the experts each layer needed that were already resident;
    hover lists the experts the token used there."""
    n_tokens, n_layers = matrix.shape
    hover = [[f"token {t} ({html.escape(visible(tokens[t]))}) · layer {layer} · experts "
              f"{list(routes[t][layer]) if t < len(routes) else []} · hit share "
              f"{'' if np.isnan(matrix[t, layer]) else f'{matrix[t, layer]:.2f}'}"
              for layer in range(n_layers)] for t in range(n_tokens)]
    fig = go.Figure(go.Heatmap(
        z=matrix.T, x=list(range(n_tokens)), y=[f"L{i}" for i in range(n_layers)],
        zmin=0, zmax=1, colorscale=[[0, "#d73027"], [0.5, "#fee08b"], [1, "#1a9850"]],
        hovertext=np.array(hover, dtype=object).T, hoverinfo="text",
        colorbar=dict(title="hit share")))
    fig.update_layout(height=460, xaxis_title="forward pass (0 = the prompt)",
                      margin=dict(l=10, r=10, t=20, b=40), yaxis=dict(autorange="reversed"))
    return fig


def recall_figure(recalls: dict[str, dict[str, float]]) -> go.Figure:
    """Prediction recall by lookahead distance, one line per predictor."""
    fig = go.Figure()
    for name, by_distance in recalls.items():
        if not by_distance:
            continue
        xs = sorted(int(d) for d in by_distance)
        fig.add_trace(go.Scatter(
            x=xs, y=[by_distance[str(d)] for d in xs], mode="lines+markers", name=name,
            line=dict(color=PREDICTOR_COLOURS.get(name.split(" ")[0], "#333")),
            hovertemplate=f"{name} · %{{x}} layers ahead · recall %{{y:.3f}}<extra></extra>"))
    fig.update_layout(xaxis_title="lookahead distance (layers ahead)",
                      yaxis_title="recall of the experts used", yaxis_range=[0, 1.02], height=340,
                      margin=dict(l=10, r=10, t=20, b=40), xaxis=dict(dtick=1))
    return fig


def sweep_figure(summary: dict, axis: str, metric: str, fixed: dict) -> go.Figure:
    """A benchmark sweep: `metric` against capacity or bandwidth, one line per predictor."""
    rows = [v for k, v in summary.items() if isinstance(v, dict) and "predictor" in v
            and all(v[f] == x for f, x in fixed.items())]
    fig = go.Figure()
    for predictor in sorted({r["predictor"] for r in rows}):
        mine = [r for r in rows if r["predictor"] == predictor]
        if axis == "bandwidth":
            mine.sort(key=lambda r: r.get("bandwidth_bytes_per_s", 0))
        else:
            mine.sort(key=lambda r: r[axis])
        if len(mine) < 2:
            continue
        fig.add_trace(go.Scatter(
            x=[str(r[axis]) if axis == "bandwidth" else r[axis] for r in mine],
            y=[r[metric] for r in mine], mode="lines+markers",
            name=f"{predictor} ({mine[0]['policy']})",
            line=dict(color=PREDICTOR_COLOURS.get(predictor, "#333")),
            hovertemplate=(f"{predictor} · {axis} %{{x}} · {metric.replace('_', ' ')} "
                           "%{y:.3f}<extra></extra>")))
    fig.update_layout(xaxis_title=axis, yaxis_title=metric.replace("_", " "), height=320,
                      margin=dict(l=10, r=10, t=20, b=40))
    return fig


def token_strip_html(texts: list[str], stalls: list[float], misses: list[int]) -> str:
    """The generated text, each token shaded by how long its pass waited for experts."""
    top = max(stalls) if stalls and max(stalls) > 0 else 1.0
    spans = []
    for text, stall, miss in zip(texts, stalls, misses):
        alpha = 0.08 + 0.8 * stall / top
        body = html.escape(text).replace("\n", "⏎<br>") or "∅"
        spans.append(f'<span title="waited {stall:.1f} ms for {miss} missing experts" '
                     f'style="background:rgba(215,48,39,{alpha:.2f});padding:1px 2px;margin:1px;'
                     f'border-radius:3px;font-family:monospace">{body}</span>')
    return ('<div data-testid="m2r2-expert-strip" style="line-height:1.9">' + "".join(spans)
            + "</div>")
