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
HEATMAP_LENS = "heatmap_lens"
HEATMAP_QUANTITY = "heatmap_quantity"
SELECTED_TOKEN = "selected_token"
PROJECTION_TOKENS = "projection_tokens"
PROJECTION_METHOD = "projection_method"


# widget keys of exits.py
EXIT_DL_CSV = "exit_dl_csv"
EXIT_DL_BREAK_EVEN = "exit_dl_break_even"
EXIT_DL_JSON = "exit_dl_json"
EXIT_BUNDLE = "exit_bundle"
EXIT_LEDGER = "exit_ledger"
EXIT_TARGET = "exit_target"
EXIT_ORACLE_MAP = "exit_oracle_map"
EXIT_ORACLE_SWEEP = "exit_oracle_sweep"
EXIT_RELIABILITY = "exit_reliability"
EXIT_EXPLAIN = "exit_explain"
EXIT_GENERATE = "exit_generate"
EXIT_GEN = "exit_gen"
"""Prefix of the generation's rule controls: exit_gen_rule, _stream, _thr, _min, _fill,
_narrow."""
EXIT_AB = ("ab_A", "ab_B")
"""Prefixes of the two A/B settings' controls: ab_A_stream, _rule, _thr, _min."""


def keyed(prefix: str, field: str) -> str:
    """The key of one control of a group of controls named by a prefix."""
    return f"{prefix}_{field}"

EXIT_HEATMAP = "exit_heatmap"
EXIT_HIST = "exit_hist"
EXIT_PARETO = "exit_pareto"
EXIT_PARETO_SESSION = "exit_pareto_session"
EXIT_RE_DEPTHS = "exit_re_depths"
EXIT_RE_MIN = "exit_re_min"
EXIT_RE_RULE = "exit_re_rule"
EXIT_RE_STREAM = "exit_re_stream"
EXIT_RE_THR = "exit_re_thr"
EXIT_TRAJ = "exit_traj"
EXIT_WRONG = "exit_wrong"

# widget keys of experts.py
EXPERTS_BANDWIDTH = "experts_bandwidth"
EXPERTS_CAPACITY = "experts_capacity"
EXPERTS_DL_CSV = "experts_dl_csv"
EXPERTS_DL_JSON = "experts_dl_json"
EXPERTS_BUNDLE = "experts_bundle"
EXPERTS_BUILD = "experts_build"
EXPERTS_GANTT = "experts_gantt"
EXPERTS_GENERATE = "experts_generate"
EXPERTS_HITS = "experts_hits"
EXPERTS_LOOKAHEAD = "experts_lookahead"
EXPERTS_MARGIN = "experts_margin"
EXPERTS_MARGIN_GAP = "experts_margin_gap"
EXPERTS_READS = "experts_reads"
EXPERTS_POLICY = "experts_policy"
EXPERTS_PREDICTOR = "experts_predictor"
EXPERTS_QUEUE = "experts_queue"
EXPERTS_RANGE = "experts_range"
EXPERTS_RECALL_REPORT = "experts_recall_report"
EXPERTS_RECALL_RUN = "experts_recall_run"
EXPERTS_RESIDENCY = "experts_residency"
EXPERTS_SWEEP_BW = "experts_sweep_bw"
EXPERTS_SWEEP_CAPACITY = "experts_sweep_capacity"
EXPERTS_SWEEP_HITS = "experts_sweep_hits"
EXPERTS_TOKEN = "experts_token"

# widget keys of residuals.py
DOWNLOAD_CHARTS = "download_charts"
DOWNLOAD_TRACE = "download_trace"
DOWNLOAD_BUNDLE = "download_bundle"
HEATMAP = "heatmap"
LENS_TABLE = "lens_table"
LENS_TRAJECTORY = "lens_trajectory"
PROFILE_ALIGNMENT = "profile_alignment"
PROFILE_SPEED = "profile_speed"
PROJECTION = "projection"
STREAMS_AGREEMENT = "streams_agreement"
STREAMS_ALIGNMENT = "streams_alignment"
STREAMS_MATRIX = "streams_matrix"

# widget keys of speculative.py
SPEC_ACCEPT_HIST = "spec_accept_hist"
SPEC_ACCEPT_POS = "spec_accept_pos"
SPEC_CMP_N = "spec_cmp_n"
SPEC_CMP_SET = "spec_cmp_set"
SPEC_CMP_TOKENS = "spec_cmp_tokens"
SPEC_COMPARE = "spec_compare"
SPEC_CONF = "spec_conf"
SPEC_DL_CMP = "spec_dl_cmp"
SPEC_DL_CSV = "spec_dl_csv"
SPEC_DL_JSON = "spec_dl_json"
SPEC_BUNDLE = "spec_bundle"
SPEC_AB_STREAM = "spec_ab_stream"
SPEC_AB_LAYER = "spec_ab_layer"
SPEC_AB_K = "spec_ab_k"
SPEC_AB_RUN = "spec_ab_run"
SPEC_AB_RESULT = "spec_ab_result"
SPEC_LEDGER = "spec_ledger"
SPEC_TARGET = "spec_target"
SPEC_GENERATE = "spec_generate"
SPEC_K = "spec_k"
SPEC_LAYER = "spec_layer"
SPEC_METHODS_LIVE = "spec_methods_live"
SPEC_METHODS_REPORT = "spec_methods_report"
SPEC_REPORT_KIND = "spec_report_kind"
SPEC_RATE = "spec_rate"
SPEC_RULE = "spec_rule"
SPEC_RULE_MIN = "spec_rule_min"
SPEC_RULE_THR = "spec_rule_thr"
SPEC_SAMPLING = "spec_sampling"
SPEC_STREAM = "spec_stream"
SPEC_TIMELINE = "spec_timeline"
SPEC_VOCAB = "spec_vocab"
SPEC_WEIGHTS = "spec_weights"
SPEC_NARROW = "spec_narrow"


def result() -> RunResult | None:
    """This session's last run, or None."""
    return st.session_state.get(RESULT)


def store_result(run: RunResult) -> None:
    """Keep a finished run (replacing the previous one only on success)."""
    st.session_state[RESULT] = run
    st.session_state[TRACE] = run.trace
    st.session_state.pop(SELECTED_TOKEN, None)
    st.session_state.pop(PROJECTION_TOKENS, None)

# widget keys of training.py
TRAIN_BY_DEPTH = "train_by_depth"
TRAIN_OVER_STEPS = "train_over_steps"
TRAIN_LOSS = "train_loss"
TRAIN_SCALING = "train_scaling"
TRAIN_CARD = "train_card"
TRAIN_DOWNLOAD = "train_download"

# Exit debugger: calibration with a guarantee
CAL_RUN = "cal_run"
CAL_RESULT = "cal_result"
CAL_CACHE = "cal_cache"
CAL_RULE = "cal_rule"
CAL_STREAM = "cal_stream"
CAL_METRIC = "cal_metric"
CAL_MIN = "cal_min"
CAL_LEVEL = "cal_level"
CAL_DELTA = "cal_delta"
CAL_N = "cal_n"
CAL_HELD = "cal_held"
CAL_TOKENS = "cal_tokens"
CAL_SETS = "cal_sets"
TRAIN_VARIANTS = "train_variants"
TRAIN_GAP = "train_gap"
TRAIN_GAP_DL = "train_gap_dl"
TRAIN_READS_LIKE = "train_reads_like"
TRAIN_READS_LIKE_DL = "train_reads_like_dl"
