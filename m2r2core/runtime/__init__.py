"""A plain transformer runtime: model loading, prompts, sampling, the logit lens and the
engine's own decode loop. It knows nothing of M2R2 (no adapters, routers or experts).
"""
