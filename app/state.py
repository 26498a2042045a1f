"""Session-state keys in one place, with typed accessors. Widget keys double as the handles that
AppTest and Playwright address."""

from __future__ import annotations

import streamlit as st

from m2r2core.engine import RunResult

# results of this session
RESULT = "result"
"""The last successful RunResult of this session (trace + residual capture)."""
TRACE = "trace"
"""Its RunTrace, kept separately so tests and downloads reach it directly."""

# widget keys
MODEL = "model"
DTYPE = "dtype"
THREADS = "threads"
SEED = "seed"
PROMPT = "prompt"
MAX_NEW_TOKENS = "max_new_tokens"
TEMPERATURE = "temperature"
TOP_P = "top_p"
GENERATE = "generate"
TRACE_UPLOAD = "trace_upload"
HEATMAP_QUANTITY = "heatmap_quantity"
SELECTED_TOKEN = "selected_token"
PROJECTION_TOKENS = "projection_tokens"
PROJECTION_METHOD = "projection_method"


def result() -> RunResult | None:
    """This session's last run, or None."""
    return st.session_state.get(RESULT)


def store_result(run: RunResult) -> None:
    """Keep a finished run (replacing the previous one only on success)."""
    st.session_state[RESULT] = run
    st.session_state[TRACE] = run.trace
    st.session_state.pop(SELECTED_TOKEN, None)
    st.session_state.pop(PROJECTION_TOKENS, None)
