"""The token strip: generated text as tokens coloured by the layer where the logit lens locked
in on the final prediction, with a hover tooltip per token."""

from __future__ import annotations

import html

import plotly.colors

from analysis.velocity import lock_in_layer
from app import palette
from m2r2core.trace import TokenStep


def token_strip_html(steps: list[TokenStep] | tuple[TokenStep, ...], n_layers: int) -> str:
    """HTML spans, one per token; traced tokens are coloured by their lock-in layer."""
    spans = []
    for step in steps:
        text = html.escape(step.text).replace("\n", "⏎<br>") or "∅"
        if step.traced:
            layer = lock_in_layer(step)
            colour = plotly.colors.sample_colorscale(palette.LAYER_SCALE, layer / n_layers)[0]
            tip = (f"token {step.position}: {step.text!r} · p={step.token_prob:.2f} · "
                   f"locks in at layer {layer}/{n_layers} · {step.latency_ms:.0f} ms")
            style = f"background:{colour};color:{'#000' if layer > n_layers * 0.55 else '#fff'}"
        else:
            tip, style = f"token {step.position}: {step.text!r}", "background:#eee"
        spans.append(f'<span title="{html.escape(tip)}" style="{style};padding:1px 2px;'
                     f'margin:1px;border-radius:3px;font-family:monospace">{text}</span>')
    return ('<div data-testid="m2r2-token-strip" style="line-height:1.9">'
            + "".join(spans) + "</div>")
