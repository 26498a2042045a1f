"""Mixture-of-Experts: MoEfication of a dense model, the expert store and its storage channel,
the fast-tier cache and its eviction policies, route predictors, and offloaded decoding.
"""
