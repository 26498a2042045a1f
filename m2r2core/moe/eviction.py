"""Eviction policies of the fast expert tier: which resident expert leaves to make room.

Each policy is an object with one question to answer, `victim`, asked by the cache
(moe/experts.py) with the experts that may leave (resident, loaded, not pinned), least recently
used first, as a lazy iterable: a policy that stops at the first fit (LRU, `predicted`) never
looks at the rest of a tier of dozens of experts, which it would otherwise do at every load. A
prefetch asks with `for_prefetch` and the expert it wants to load; a policy may answer None (no
prefetch then: a prefetch never forces out what is needed sooner).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

Key = tuple[int, int]
"""(layer, expert)."""


class TierState(Protocol):
    """What a policy may read of the cache."""

    token: int
    layer: int
    predicted: dict[Key, int]
    predicted_layers: dict[int, int]
    n_layers: int

    def uses(self, key: Key) -> tuple[int, float]:
        """(how often, when last) the expert was used."""


class EvictionPolicy:
    """Base class: least recently used."""

    name = "lru"

    def victim(self, tier: TierState, candidates: Iterable[Key], for_prefetch: bool,
               need: Key | None) -> Key | None:
        """The expert to evict, or None when none may leave."""
        return next(iter(candidates), None)


class LeastFrequentlyUsed(EvictionPolicy):
    """The expert used least often (ties: least recently)."""

    name = "lfu"

    def victim(self, tier: TierState, candidates: Iterable[Key], for_prefetch: bool,
               need: Key | None) -> Key | None:
        """See EvictionPolicy."""
        return min(candidates, key=tier.uses, default=None)


class KeepPredicted(EvictionPolicy):
    """LRU among the experts no predictor expects in this token's later layers; a prefetch that
    finds nothing else to evict is not made.
    """

    name = "predicted"

    def victim(self, tier: TierState, candidates: Iterable[Key], for_prefetch: bool,
               need: Key | None) -> Key | None:
        """See EvictionPolicy."""
        first = None
        for key in candidates:  # least recently used first
            if key[0] <= tier.layer or tier.predicted.get(key) != tier.token:
                return key
            first = first or key
        return None if for_prefetch else first


def next_use(tier: TierState, key: Key) -> int:
    """The `ahead` policy's estimate of when an expert is next used, in layers from now.

    An expert of a later layer of this token is expected this token (d = its layer minus the
    current one) when a predictor named it, or when no prediction for its layer has been made yet
    (it may be routed to again, as about half of a layer's experts are from one token to the
    next); otherwise, or when its layer is already behind, its next chance is the next token
    (d + N). Without a predictor this keeps the same band of layers resident token after token
    instead of cycling every expert through the tier, which is what LRU does when a token needs
    more experts than the tier holds.
    """
    layer, now, token = key[0], tier.layer, tier.token
    ahead = layer - now
    if layer > now and (tier.predicted.get(key) == token
                        or tier.predicted_layers.get(layer) != token):
        return ahead
    return ahead + tier.n_layers


class Ahead(EvictionPolicy):
    """A Belady estimate with the layers as the clock: the expert whose next use (`next_use`)
    comes last leaves first (ties: least recently used); a prefetch of `need` evicts only an
    expert expected after `need` itself.
    """

    name = "ahead"

    def victim(self, tier: TierState, candidates: Iterable[Key], for_prefetch: bool,
               need: Key | None) -> Key | None:
        """See EvictionPolicy."""
        best = max(candidates, key=lambda k: next_use(tier, k), default=None)  # first of ties
        if best is None:
            return None
        if for_prefetch and need is not None and next_use(tier, best) <= need[0] - tier.layer:
            return None
        return best


POLICY_CLASSES = {p.name: p for p in (EvictionPolicy, LeastFrequentlyUsed, KeepPredicted, Ahead)}
POLICIES = tuple(POLICY_CLASSES)
"""The eviction choices, by name: lru, lfu, predicted, ahead."""
