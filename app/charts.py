"""Pure figure builders: records in, plotly Figure out. No Streamlit calls, no tensor math."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from analysis.projection import TrajectoryProjection
from analysis.velocity import LayerMatrix, LayerProfile, LensRow
from app import palette

HEATMAP_STYLE = {
    "relative_speed": dict(title="Relative speed ‖h_l − h_(l−1)‖ / ‖h_(l−1)‖ per token and layer",
                           colorbar="relative speed (ratio, log scale)", scale=palette.SPEED_SCALE,
                           zmin=None, zmax=None, fmt=".3f", log=True),
    "cosine_to_final": dict(title="Alignment cos(h_l, h_N) with the token's final state",
                            colorbar="cosine (−1…1)", scale=palette.ALIGNMENT_SCALE,
                            zmin=-1.0, zmax=1.0, fmt=".3f"),
    "lens_agrees": dict(title="Logit lens at layer l already predicts the final token",
                        colorbar="agrees (0/1)", scale=palette.AGREEMENT_SCALE,
                        zmin=0.0, zmax=1.0, fmt=".0f"),
    "lens_entropy": dict(title="Logit-lens entropy per token and layer",
                         colorbar="entropy (nats)", scale="Cividis", zmin=0.0, zmax=None,
                         fmt=".2f"),
}


def token_labels(tokens: tuple[str, ...]) -> list[str]:
    """Unique, readable row labels: position and visible token text."""
    return [f"{i:>3} {visible(t)}" for i, t in enumerate(tokens)]


def visible(text: str) -> str:
    """Token text with whitespace made visible."""
    return repr(text)[1:-1].replace(" ", "␣") or "∅"


def token_layer_heatmap(matrix: LayerMatrix) -> go.Figure:
    """Tokens × layers heat map of one quantity; hover shows token, layer, value and lens top."""
    style = HEATMAP_STYLE[matrix.quantity]
    labels = token_labels(matrix.tokens)
    custom = np.empty((len(labels), len(matrix.layers), 3), dtype=object)  # 3-D for plotly 6+
    for row, (label, tops) in enumerate(zip(labels, matrix.lens_top)):
        for col, top in enumerate(tops):
            custom[row, col] = (label, top, f"{matrix.values[row, col]:{style['fmt']}}")
    z, colorbar = matrix.values, {"title": {"text": style["colorbar"]}}
    if style.get("log"):  # layer 1 moves ~10x more than the rest: colour by decades
        z = np.log10(np.maximum(matrix.values, 1e-6))
        ticks = [t for t in range(-4, 3) if z.size and z.min() - 1 < t < z.max() + 1]
        colorbar |= {"tickvals": ticks, "ticktext": [f"{10.0 ** t:g}" for t in ticks]}
    zmax = style["zmax"]
    if zmax is None and z.size:
        zmax = float(np.percentile(z, 99.5))
    fig = go.Figure(go.Heatmap(
        z=z, x=list(matrix.layers), y=labels, customdata=custom, colorbar=colorbar,
        colorscale=style["scale"], zmin=style["zmin"], zmax=zmax,
        hovertemplate=("token %{customdata[0]}<br>layer %{x}<br>value %{customdata[2]}"
                       f"<br>{matrix.lens} lens: %{{customdata[1]}}<extra></extra>"),
    ))
    title = style["title"]
    if matrix.lens == "tuned":
        title = title.replace("Logit lens", "Tuned lens").replace("Logit-lens", "Tuned-lens")
    fig.update_layout(
        title={"text": title},
        xaxis={"title": {"text": "layer (0 = embedding, N = last block)"}, "dtick": 2},
        yaxis={"title": {"text": "generated token"}, "autorange": "reversed"},
        height=max(320, min(1400, 90 + 16 * len(labels))),
        margin={"l": 10, "r": 10, "t": 50, "b": 40},
    )
    return fig


def layer_profile_figure(profile: LayerProfile, title: str, y_title: str,
                         log_y: bool = False) -> go.Figure:
    """Median over tokens per layer with the interquartile band."""
    layers = list(profile.layers)
    fig = go.Figure([
        go.Scatter(x=layers + layers[::-1], y=list(profile.q75) + list(profile.q25)[::-1],
                   fill="toself", line={"width": 0}, hoverinfo="skip",
                   fillcolor=_rgba(palette.SLOW_STREAM, palette.BAND_ALPHA),
                   name="25–75% of tokens"),
        go.Scatter(x=layers, y=list(profile.median), mode="lines+markers", name="median token",
                   line={"color": palette.SLOW_STREAM},
                   customdata=np.stack([profile.q25, profile.q75], axis=-1),
                   hovertemplate=("layer %{x}<br>median %{y:.3f}<br>IQR %{customdata[0]:.3f}"
                                  "–%{customdata[1]:.3f}<extra></extra>")),
    ])
    fig.update_layout(title={"text": title}, xaxis={"title": {"text": "layer"}},
                      yaxis={"title": {"text": y_title}, "type": "log" if log_y else "linear"},
                      height=340, margin={"l": 10, "r": 10, "t": 50, "b": 40},
                      legend={"orientation": "h", "y": -0.25})
    return fig


def projection_figure(projection: TrajectoryProjection, tokens: tuple[str, ...]) -> go.Figure:
    """A path per token from layer 0 to N in the projected plane, markers coloured by depth."""
    n_layers = projection.coords.shape[1] - 1
    fig = go.Figure()
    for row, index in enumerate(projection.token_indices):
        xy = projection.coords[row]
        label = f"{index} {visible(tokens[index])}"
        fig.add_trace(go.Scatter(
            x=xy[:, 0], y=xy[:, 1], mode="lines+markers", name=label,
            line={"width": 1.5},
            marker={"color": list(range(n_layers + 1)), "colorscale": palette.LAYER_SCALE,
                    "cmin": 0, "cmax": n_layers, "size": 7,
                    "colorbar": {"title": {"text": "layer (index)"}} if row == 0 else None,
                    "showscale": row == 0},
            customdata=[[label, layer] for layer in range(n_layers + 1)],
            hovertemplate="token %{customdata[0]}<br>layer %{customdata[1]}<extra></extra>",
        ))
    fig.update_layout(
        title={"text": f"Residual trajectories ({projection.method.upper()} of unit-norm states)"},
        xaxis={"title": {"text": f"{projection.method} 1 (a.u.)"}},
        yaxis={"title": {"text": f"{projection.method} 2 (a.u.)"}},
        height=480, margin={"l": 10, "r": 10, "t": 50, "b": 40},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def lens_trajectory_figure(rows: tuple[LensRow, ...], token: str) -> go.Figure:
    """One token across depth: the lens top-1 probability, alignment and agreement markers."""
    layers = [row.layer for row in rows]
    top1 = [row.top_probs[0] for row in rows]
    fig = go.Figure([
        go.Scatter(x=layers, y=[row.cosine_to_final for row in rows], mode="lines",
                   name="cos(h_l, h_N)", line={"color": palette.SLOW_STREAM},
                   hovertemplate="layer %{x}<br>cosine %{y:.3f}<extra></extra>"),
        go.Scatter(x=layers, y=top1, mode="lines+markers", name="lens top-1 probability",
                   line={"color": "#7f7f7f", "dash": "dot"},
                   marker={"color": [palette.AGREE if r.agrees else palette.DISAGREE
                                     for r in rows], "size": 9,
                           "line": {"width": 1, "color": "#555"}},
                   customdata=[[visible(r.top_tokens[0]), "yes" if r.agrees else "no"]
                               for r in rows],
                   hovertemplate=("layer %{x}<br>lens top-1 %{customdata[0]} (p=%{y:.3f})"
                                  "<br>agrees with final: %{customdata[1]}<extra></extra>")),
    ])
    fig.update_layout(title={"text": f"How the prediction of {visible(token)} forms across depth"},
                      xaxis={"title": {"text": "layer"}},
                      yaxis={"title": {"text": "value (cosine or probability)"},
                             "range": [-0.05, 1.05]},
                      height=340, margin={"l": 10, "r": 10, "t": 50, "b": 40},
                      legend={"orientation": "h", "y": -0.25})
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def ledger_figure(time_ms: dict[str, float], plain_ms: float, tokens: int,
                  method: str = "speculative") -> go.Figure:
    """Where the decoding time went, beside what plain decoding of as many tokens costs."""
    colours = {"drafting": "#d62728", "verification": "#1f77b4", "the rest": "#7f7f7f",
               "blocks": "#1f77b4", "exit checks": "#d62728", "head": "#9467bd",
               "kv fill": "#ff7f0e"}
    fig = go.Figure()
    for part, ms in time_ms.items():
        fig.add_trace(go.Bar(y=[method], x=[ms], name=part, orientation="h",
                             marker={"color": colours.get(part, "#bcbd22")},
                             hovertemplate=f"{part}: %{{x:.0f}} ms<extra></extra>"))
    fig.add_trace(go.Bar(y=["plain"], x=[plain_ms * tokens], name="plain decoding",
                         orientation="h", marker={"color": "#2ca02c"},
                         hovertemplate="plain decoding of as many tokens: %{x:.0f} ms"
                                       "<extra></extra>"))
    fig.update_layout(barmode="stack", title={"text": "Where the time went"},
                      xaxis={"title": {"text": "ms (tokens after the first)"}}, height=230,
                      margin={"l": 90, "r": 20, "t": 50, "b": 40},
                      legend={"orientation": "h", "y": -0.35})
    return fig
