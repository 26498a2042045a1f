"""Speculative decoding: draft proposers (the fast/slow draft stream, Medusa heads) and the
verify-accept loop.
"""
