"""Figures of the Speculative Decoding page: SpecRound records and benchmark reports in, plotly
(or HTML) out."""

from __future__ import annotations

import html

import plotly.graph_objects as go

from app import palette
from app.charts import visible
from m2r2core.trace import SpecRound

ACCEPTED = "#1a9850"
REJECTED = "#d73027"
CORRECTION = "#fdae61"
BONUS = "#74add1"
PREFILL = "#bdbdbd"
DRAFT_BAR = palette.FAST_STREAM
VERIFY_BAR = palette.SLOW_STREAM


def _span(text: str, tip: str, background: str, struck: bool = False) -> str:
    body = html.escape(text).replace("\n", "⏎<br>") or "∅"
    if struck:
        body = f"<s>{body}</s>"
    colour = "#b00" if struck else "#000"
    return (f'<span title="{html.escape(tip)}" style="background:{background};color:{colour};'
            f'padding:1px 2px;margin:1px;border-radius:3px;font-family:monospace">{body}</span>')


def round_strip_html(rounds: list[SpecRound], marked: set[int] = frozenset()) -> str:
    """The generation, round by round: accepted drafts green, the model's own token orange (a
    correction) or blue (a bonus after every draft passed), refused drafts struck through;
    tokens at `marked` positions (an A/B difference) underlined in red."""
    spans = []
    for r in rounds:
        timing = f"round {r.index}: draft {r.draft_ms:.1f} ms, verify {r.verify_ms:.1f} ms"
        if r.index == 0:
            spans.append(_span(r.emitted_texts[0], f"from the prompt's prefill · {timing}",
                               PREFILL))
            continue
        for i, text in enumerate(r.emitted_texts):
            differs = r.position + i in marked
            note = " · differs from the other setting" if differs else ""
            if i < r.accepted:
                tip = (f"draft {i + 1} accepted (draft probability {r.draft_probs[i]:.2f}) · "
                       f"{timing}{note}")
                span = _span(text, tip, ACCEPTED)
            else:
                kind = "correction" if r.correction else "bonus"
                span = _span(text, f"the model's own token ({kind}) · {timing}{note}",
                             CORRECTION if r.correction else BONUS)
            spans.append(f'<span style="border-bottom:3px solid #d62728">{span}</span>'
                         if differs else span)
        for i in range(r.accepted, len(r.drafts)):
            tip = (f"draft {i + 1} refused (draft probability {r.draft_probs[i]:.2f}) · "
                   f"{timing}")
            spans.append(_span(r.draft_texts[i], tip, "#fbe3e1", struck=True))
        spans.append('<span style="color:#999">|</span>')
    return ('<div data-testid="m2r2-spec-strip" style="line-height:1.9">' + "".join(spans)
            + "</div>")


def acceptance_by_position(rates: dict[str, list[float | None]]) -> go.Figure:
    """Acceptance rate of the i-th draft of a chain, one bar group per run or method."""
    fig = go.Figure()
    for name, values in rates.items():
        xs = [i + 1 for i, v in enumerate(values) if v is not None]
        fig.add_trace(go.Bar(x=xs, y=[v for v in values if v is not None], name=name,
                             hovertemplate=f"{name}<br>draft position %{{x}}<br>acceptance "
                                           "%{y:.1%}<extra></extra>"))
    fig.update_layout(title={"text": "Acceptance by draft position"},
                      xaxis={"title": {"text": "position in the draft chain"}, "dtick": 1},
                      yaxis={"title": {"text": "accepted / drafted"}, "range": [0, 1]},
                      height=340, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def accepted_histogram(lengths: list[int], max_draft: int) -> go.Figure:
    """How many drafts each verification accepted."""
    counts = [lengths.count(k) for k in range(max_draft + 1)]
    fig = go.Figure(go.Bar(x=list(range(max_draft + 1)), y=counts, marker={"color": ACCEPTED},
                           hovertemplate="%{y} verifications accepted %{x} drafts"
                                         "<extra></extra>"))
    fig.update_layout(title={"text": "Accepted drafts per verification"},
                      xaxis={"title": {"text": "accepted drafts"}, "dtick": 1},
                      yaxis={"title": {"text": "verifications"}},
                      height=340, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def step_timeline(rounds: list[SpecRound]) -> go.Figure:
    """Each round as two stacked horizontal spans on a time axis: drafting, then verifying."""
    fig = go.Figure()
    start = 0.0
    rows = [r for r in rounds if r.index > 0]
    draft_x, verify_x, base_d, base_v, labels, tips = [], [], [], [], [], []
    for r in rows:
        base_d.append(start)
        draft_x.append(r.draft_ms)
        base_v.append(start + r.draft_ms)
        verify_x.append(r.verify_ms)
        start += r.draft_ms + r.verify_ms
        labels.append(r.index)
        tips.append(f"{len(r.drafts)} drafted, {r.accepted} accepted → "
                    f"{visible(''.join(r.emitted_texts))}")
    for name, x, base, colour in (("draft", draft_x, base_d, DRAFT_BAR),
                                  ("verify", verify_x, base_v, VERIFY_BAR)):
        fig.add_trace(go.Bar(
            y=labels, x=x, base=base, orientation="h", name=name, marker={"color": colour},
            customdata=tips,
            hovertemplate=f"round %{{y}} · {name} %{{x:.1f}} ms<br>%{{customdata}}"
                          "<extra></extra>"))
    fig.update_layout(title={"text": "Step timeline: drafting (red) and verification (blue)"},
                      barmode="overlay", xaxis={"title": {"text": "decoding time (ms)"}},
                      yaxis={"title": {"text": "round"}, "autorange": "reversed"},
                      height=max(300, 14 * len(rows) + 120),
                      margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def running_rate_figure(spec: list[tuple[int, float]], plain: list[tuple[int, float]]
                        ) -> go.Figure:
    """Tokens/s so far, speculative against plain decoding, both measured this session."""
    fig = go.Figure()
    for name, points, colour in (("speculative", spec, DRAFT_BAR),
                                 ("plain decoding", plain, VERIFY_BAR)):
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points],
                                 mode="lines", name=name, line={"color": colour},
                                 hovertemplate=f"{name}<br>%{{x}} tokens · %{{y:.1f}} tok/s"
                                               "<extra></extra>"))
    fig.update_layout(title={"text": "Running tokens/s"},
                      xaxis={"title": {"text": "tokens generated"}},
                      yaxis={"title": {"text": "tokens/s (decoding, prefill excluded)"}},
                      height=340, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def methods_figure(summary: dict) -> go.Figure:
    """Median speedup against transformers `generate`, one bar per method."""
    methods = list(summary)
    speed = [summary[m]["median_speedup_vs_hf_generate"] for m in methods]
    tips = [f"{summary[m]['median_tokens_per_s']:.1f} tok/s · identical "
            f"{summary[m]['identical']}/{summary[m]['prompts']}" for m in methods]
    colours = [ACCEPTED if s >= 1 else REJECTED for s in speed]
    fig = go.Figure(go.Bar(x=methods, y=speed, marker={"color": colours}, customdata=tips,
                           hovertemplate="%{x}<br>x%{y:.2f} vs generate<br>%{customdata}"
                                         "<extra></extra>"))
    fig.add_hline(y=1.0, line={"dash": "dot", "color": "#555"})
    fig.update_layout(title={"text": "Median speedup over transformers generate (greedy)"},
                      yaxis={"title": {"text": "speedup (x)"}}, height=360,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig

