"""Early exit: exit-rule routers (ARLA and the baselines) and the early-exit decoding step."""
