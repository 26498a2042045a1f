"""Cached resources: one engine per process (shared, read-only), derived tables per run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import streamlit as st

from analysis.projection import TrajectoryProjection, project_trajectories
from m2r2core.config import DEFAULT_MODEL, EngineConfig
from m2r2core.engine import Engine
from m2r2core.trace import ResidualCapture


def default_model() -> str:
    """The model the sidebar starts with: $M2R2_MODEL_DIR, else the packaged SmolLM2."""
    return os.environ.get("M2R2_MODEL_DIR", DEFAULT_MODEL)


@st.cache_resource(max_entries=1, show_spinner="Loading model… (the first start converts "
                   "the packaged SmolLM2, about 30 s)")
def get_engine(model: str, dtype: str, threads: int) -> Engine:
    """The engine for a model, dtype and thread count; read-only after this call, shared by all
    sessions (torch's thread count is process-wide, like the engine)."""
    return Engine.load(EngineConfig(model=model, dtype=dtype, threads=threads))


def cpu_cores() -> int:
    """Cores this process may use: the default and the maximum of the threads control."""
    return max(1, len(os.sched_getaffinity(0)))


@st.cache_data(max_entries=16, show_spinner="Projecting trajectories…")
def projection(run_id: str, _capture: ResidualCapture, token_indices: tuple[int, ...],
               method: str, seed: int) -> TrajectoryProjection:
    """Seeded 2-D projection of the selected tokens' trajectories, cached per run and choice."""
    return project_trajectories(_capture, list(token_indices), method=method, seed=seed)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@st.cache_data(max_entries=4)
def _read_report(path: str, mtime: float) -> dict | None:
    del mtime  # part of the cache key only: a rewritten report is read again
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def benchmark_report(name: str) -> dict | None:
    """A committed JSON report under benchmarks/, or None when missing or unreadable."""
    path = BENCHMARKS / name
    if not path.is_file():
        return None
    return _read_report(str(path), path.stat().st_mtime)


def engine_or_error() -> Engine | None:
    """The engine for the sidebar's settings, or None after showing why it could not load."""
    from app import state

    model = st.session_state.get(state.MODEL) or default_model()
    dtype = st.session_state.get(state.DTYPE) or "bfloat16"
    threads = int(st.session_state.get(state.THREADS) or cpu_cores())
    return load_or_error("model", get_engine, model, dtype, threads)


def load_or_error(what: str, loader, *args):
    """loader(*args), or None after showing why `what` could not be loaded (never a
    traceback)."""
    from m2r2core.errors import M2R2Error

    try:
        return loader(*args)
    except M2R2Error as exc:
        st.error(f"The {what} could not be loaded. {exc}")
    except Exception as exc:  # noqa: BLE001 — a traceback must never reach the page
        st.error(f"The {what} could not be loaded: {type(exc).__name__}: {exc}")
    return None


def page_start(title: str, intro: str, choices: str) -> Engine | None:
    """A page's title, its plain explanation, the choices behind it (folded), and the engine;
    None after showing why the engine could not load."""
    st.title(title)
    st.markdown(intro)
    with st.expander("What exactly is computed"):
        st.markdown(choices)
    return engine_or_error()
