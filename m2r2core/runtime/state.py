"""The state of one decoding run, created by the loop skeleton (runtime/loop.py) and never shared
between runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeState:
    """Per-run mutable state: the KV cache, the sampling generator, and what a strategy carries
    from one step to the next.
    """

    cache: object
    generator: torch.Generator
    position: int = 0
    """Absolute position of the next token to feed."""
    carry: object = None
    """The strategy's own per-run state: early exit keeps its positions still short of the last
    block; speculative decoding, the final state behind the last emitted token."""
