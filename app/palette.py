"""One palette for every chart: layer depth always has the same scale, and agreement, speed and
alignment always have the same colours."""

LAYER_SCALE = "Viridis"
"""Depth: layer 0 dark purple → layer N yellow."""
SPEED_SCALE = "Magma"
ALIGNMENT_SCALE = "RdBu"
AGREEMENT_SCALE = [[0.0, "#d9d9d9"], [1.0, "#1a9850"]]
AGREE = "#1a9850"
DISAGREE = "#d9d9d9"
SLOW_STREAM = "#1f77b4"
FAST_STREAM = "#d62728"
TUNED_STREAM = "#2ca02c"
"""The slow stream read through the tuned lens."""
STREAM_COLOURS = {"slow": SLOW_STREAM, "fast": FAST_STREAM, "tuned": TUNED_STREAM}
BAND_ALPHA = 0.18
