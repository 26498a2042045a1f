"""Widgets that build config dataclasses. Every widget has a stable key."""

from __future__ import annotations

import streamlit as st

from app import state
from app.resources import cpu_cores, default_model
from m2r2core.config import DTYPES, DecodeConfig, SamplingConfig


def sidebar_settings() -> tuple[str, str, int]:
    """Model, dtype and seed, shared by every page."""
    st.sidebar.header("Model")
    model = st.sidebar.text_input(
        "Model", value=default_model(), key=state.MODEL,
        help="The packaged SmolLM2 (default), a local Hugging Face folder, or a hub name.")
    dtype = st.sidebar.selectbox(
        "Precision", DTYPES, key=state.DTYPE,
        help="bfloat16 is about 2x faster on this CPU; float32 is exact.")
    cores = cpu_cores()
    st.sidebar.number_input(
        "CPU threads", min_value=1, max_value=cores, value=cores, step=1, key=state.THREADS,
        help="torch threads, shared by every session of this server (the setting is "
             "process-wide). Benchmarks in BENCHMARKS.md use 2.")
    seed = st.sidebar.number_input("Seed", value=0, step=1, key=state.SEED,
                                   help="Used when sampling (temperature > 0).")
    return model.strip(), dtype, int(seed)


def decode_controls_or_error() -> tuple[str, DecodeConfig] | None:
    """The prompt and generation settings with the sidebar's seed, or None after showing why
    they are out of range."""
    from m2r2core.errors import M2R2Error

    try:
        return decode_controls(int(st.session_state.get(state.SEED, 0)))
    except M2R2Error as exc:
        st.error(str(exc))
        return None


def decode_controls(seed: int) -> tuple[str, DecodeConfig]:
    """The prompt and generation settings; raises ConfigError for out-of-range values."""
    text = st.text_area("Prompt", key=state.PROMPT, height=110,
                        placeholder="Ask something, e.g. Why is the sky blue?",
                        help="Sent as a user turn through the model's chat template.")
    cols = st.columns(3)
    budget = cols[0].number_input("Token budget", value=48, step=16, key=state.MAX_NEW_TOKENS,
                                  help="New tokens to generate (1–2048).")
    temperature = cols[1].slider("Temperature", 0.0, 2.0, 0.0, 0.05, key=state.TEMPERATURE,
                                 help="0 = greedy (deterministic).")
    top_p = cols[2].slider("Top-p", 0.05, 1.0, 1.0, 0.05, key=state.TOP_P,
                           help="Nucleus sampling mass; only used when temperature > 0.")
    sampling = SamplingConfig(temperature=float(temperature), top_p=float(top_p), seed=seed)
    return text, DecodeConfig(max_new_tokens=int(budget), sampling=sampling)
