"""A row of metrics, and the speedup-ledger panel the Exit and Speculative pages share."""

from __future__ import annotations

import streamlit as st


def metric_row(items: list[tuple]) -> None:
    """One column per (label, value) or (label, value, help) item."""
    for column, item in zip(st.columns(len(items)), items, strict=True):
        label, value, *rest = item
        column.metric(label, value, help=rest[0] if rest else None)


def ledger_panel(caption: str, book, costs: list[tuple[str, str]], figure, chart_key: str,
                 target_key: str) -> float:
    """The ledger's explanation, predicted and measured speedups, its unit costs and where the
    time went; returns the target speedup the user asks about."""
    st.caption(caption)
    metric_row([("Predicted speedup", f"{book.predicted_speedup:.2f}x"),
                ("Measured speedup", f"{book.measured_speedup:.2f}x"), *costs])
    st.plotly_chart(figure, key=chart_key)
    return st.number_input("What would this setting need for a speedup of", 0.1, 10.0, 1.5, 0.1,
                           key=target_key, format="%.1f")
