"""Streamlit's internal test ids in one place: they change between Streamlit versions."""

APP = "[data-testid='stApp']"
APP_IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
PLOTLY_CHART = "stPlotlyChart"
EXCEPTION = "stException"
ERROR = "stAlertContentError"
TEXT_AREA = "stTextArea"
NUMBER_INPUT = "stNumberInput"
TOKEN_STRIP = "m2r2-token-strip"  # our own component
EXIT_STRIP = "m2r2-exit-strip"  # our own component
SPEC_STRIP = "m2r2-spec-strip"  # our own component
EXPERT_STRIP = "m2r2-expert-strip"  # our own component
