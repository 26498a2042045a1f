"""The storage channel between the slow tier and the fast tier, as a clock.

Loads go through one modelled channel (bytes per second plus a per-load latency; presets below):
each takes the time it would on that storage, one after the other in queue order, and an expert
is resident once its modelled load has ended. Demand loads jump the queue of prefetches but never
interrupt the load in flight; prefetches queue in arrival order (`fifo`) or by how soon their
layer computes (`deadline`, earliest first: see QUEUES). The channel is a clock, not a
sleeping thread: `advance` moves it to now, so storage time overlaps with compute as a DMA
engine's would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from m2r2core.errors import ConfigError

Key = tuple[int, int]
"""(layer, expert)."""


@dataclass(frozen=True)
class Bandwidth:
    """A storage model: how long reading `n` bytes takes."""

    name: str
    bytes_per_s: float
    latency_s: float
    label: str

    def seconds(self, n_bytes: int) -> float:
        """Modelled time of one load of n_bytes."""
        return self.latency_s + n_bytes / self.bytes_per_s


PRESETS = {b.name: b for b in (
    Bandwidth("emmc", 0.25e9, 200e-6, "phone eMMC flash, 250 MB/s, 200 µs per read"),
    Bandwidth("ufs", 0.5e9, 100e-6, "phone UFS flash, 500 MB/s, 100 µs per read"),
    Bandwidth("sata-ssd", 0.5e9, 60e-6, "SATA SSD, 500 MB/s, 60 µs per read"),
    Bandwidth("nvme", 3.0e9, 20e-6, "laptop NVMe, 3 GB/s, 20 µs per read"),
    Bandwidth("pcie4", 25e9, 10e-6, "PCIe 4.0 x16 host→GPU, 25 GB/s, 10 µs per copy"),
)}
"""Bandwidth presets. `ufs` is the flash-like default of the benchmarks."""

QUEUES = ("deadline", "fifo")
"""How prefetches are ordered on the channel. `deadline`: a prediction for the next layer goes
ahead of queued ones for later layers (with a lookahead above 1, a later layer's prefetches are
often still queued when the next layer's arrive), and a margin's extra guesses wait behind every
top-k guess. `fifo`: in the order predicted (the engine before session 29)."""
UNRECORDED_QUEUE = "fifo"
"""The order of a report or bundle that does not name one (they were made before the choice)."""


def bandwidth(name: str) -> Bandwidth:
    """A preset by name, or ConfigError listing the presets."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown bandwidth preset '{name}'; choose one of "
                          f"{', '.join(PRESETS)}.")
    return PRESETS[name]


class StorageChannel:
    """Queued loads in channel order (the head may be in flight) and when the channel is free.

    It reads and writes the timing fields of the cache's slots (`queued_at`, `seconds`, `start`,
    `demand`, `ready`); the caller holds the cache's lock.
    """

    def __init__(self, slots: dict, t0: float) -> None:
        """Clock the loads of `slots` (the cache's own mapping), starting at `t0`."""
        self.slots = slots
        self.queue: list[Key] = []
        self.free_at = t0
        """When the channel finished its last load (perf_counter s)."""

    def queued(self, key: Key) -> bool:
        """A prefetch waiting on the channel, not yet started (a newer prediction may cancel
        it; a demand for it moves it forward).
        """
        slot = self.slots.get(key)
        return slot is not None and not slot.ready and slot.start is None and not slot.demand

    def schedule(self, key: Key, demand: bool, deadline: Callable[[Key], Any] | None = None
                 ) -> None:
        """Queue a load: a demand one after the load in flight and earlier demands; a prefetch
        at the end, or with `deadline` (a sort key: how soon an expert is needed) before the
        first queued prefetch that is needed later (earliest deadline first; ties keep their
        order).
        """
        slot = self.slots[key]
        slot.demand = slot.demand or demand
        index = len(self.queue)
        if demand:
            index = 0
            for k in self.queue:
                queued = self.slots[k]
                if queued.start is None and not queued.demand:
                    break
                index += 1
        elif deadline is not None:
            mine = deadline(key)
            for i, k in enumerate(self.queue):
                queued = self.slots[k]
                if queued.start is None and not queued.demand and deadline(k) > mine:
                    index = i
                    break
        self.queue.insert(index, key)

    def promote(self, key: Key) -> None:
        """A queued prefetch is needed now: it becomes a demand load."""
        self.queue.remove(key)
        self.schedule(key, demand=True)

    def advance(self) -> list[tuple[Key, float, float]]:
        """Move the clock to now: start queued loads whose turn has come and finish those whose
        modelled time is over (they become ready). Returns the finished loads as (key, start,
        end) in perf_counter seconds.
        """
        now = time.perf_counter()
        done = []
        while self.queue:
            slot = self.slots[self.queue[0]]
            if slot.start is None:
                start = max(self.free_at, slot.queued_at)
                if start > now:
                    break
                slot.start = start
            end = slot.start + slot.seconds
            if end > now:
                break
            key = self.queue.pop(0)
            self.free_at = end
            slot.ready = True
            done.append((key, slot.start, end))
        return done

    def end_of(self, key: Key) -> float:
        """When the channel will finish loading `key`, as things are queued now."""
        t = self.free_at
        for k in self.queue:
            slot = self.slots[k]
            start = slot.start if slot.start is not None else max(t, slot.queued_at)
            t = start + slot.seconds
            if k == key:
                return t
        return t

    def drop(self, key: Key) -> None:
        """Take a load that has not started off the queue."""
        self.queue.remove(key)
