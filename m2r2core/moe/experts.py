"""The fast tier: a bounded set of experts, resident or in flight, in front of the slow tier.

The parts, one room each: the slow tier (moe/store.py), the storage channel's clock
(moe/channel.py), the fast tier's buffers and reader thread (moe/reader.py), the eviction
policies (moe/eviction.py), and here the cache that ties them together: what is resident, what is
pinned by the layer computing, what a predictor expects. Every load, hit, miss, stall and eviction
is recorded with timestamps (`ExpertCache.events`), which the Expert Loading page draws.

Prediction only changes *when* an expert arrives, never which weights compute: the weights in the
fast tier are the bytes of the slow tier, so outputs equal the model run with every expert resident.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from m2r2core.errors import ConfigError
from m2r2core.moe.channel import QUEUES, Bandwidth, Key, StorageChannel
from m2r2core.moe.eviction import POLICIES, POLICY_CLASSES, next_use
from m2r2core.moe.reader import ExpertReader
from m2r2core.moe.store import ExpertStore
from m2r2core.trace import Event


@dataclass
class _Slot:
    tensors: dict[str, torch.Tensor] | None = None
    """Views of its buffer, set by the loader once the bytes are there."""
    read: threading.Event = field(default_factory=threading.Event)
    """The loader has read its bytes (or failed to)."""
    ready: bool = False
    """Its modelled load has finished: it is resident (the compute thread's view)."""
    cause: str = "demand"
    used: bool = False
    last_use: float = 0.0
    uses: int = 0
    loading: bool = False
    """The loader has started reading its bytes."""
    error: Exception | None = None
    buffer: int = -1
    """Which of the fast tier's preallocated buffers holds (or will hold) its bytes."""
    queued_at: float = 0.0
    seconds: float = 0.0
    """When it joined the storage channel's queue, and its modelled load time (s)."""
    start: float | None = None
    """When the channel started its modelled load (perf_counter s); None while queued."""
    demand: bool = False
    spare: bool = False
    """A prefetch beyond its prediction's top-k (a margin guess): under the `deadline` order it
    waits behind every top-k prefetch."""


READS = ("thread", "compute")
"""Who reads a loaded expert's bytes into its buffer. `thread`: a reader thread, as soon as the
load is queued (on a host with a free core the read overlaps compute; on a busy 2-core host every
load, wrong guesses too, also costs the compute thread a thread switch). `compute`: the compute
thread, when it first uses an expert whose modelled load has ended, as a DMA engine would leave it
(a guess never used is never read, so wrong guesses cost only storage-channel time and a slot;
each used load costs one read on the critical path). The channel's clock is the same in both."""


def check_reads(reads: str) -> None:
    """ConfigError unless `reads` is one of READS."""
    if reads not in READS:
        raise ConfigError(f"Unknown reads '{reads}'; choose one of {', '.join(READS)}.")


def check_queue(queue: str) -> None:
    """ConfigError unless `queue` is a prefetch order of the storage channel."""
    if queue not in QUEUES:
        raise ConfigError(f"Unknown prefetch queue order '{queue}'; choose one of "
                          f"{', '.join(QUEUES)}.")


def check_tier(capacity: int, total: int, top_k: int, policy: str) -> None:
    """ConfigError unless a fast tier of `capacity` experts (of `total`) can hold one layer's
    top-k experts and `policy` is an eviction policy.
    """
    if not isinstance(capacity, int) or capacity < top_k:
        raise ConfigError(f"A fast tier of {capacity} experts cannot hold one layer's "
                          f"top-{top_k} experts; the minimum capacity is {top_k}.")
    if capacity > total:
        raise ConfigError(f"Capacity {capacity} exceeds the {total} experts of the model; "
                          f"the most is {total} (everything resident).")
    if policy not in POLICIES:
        raise ConfigError(f"Unknown eviction policy '{policy}'; choose one of "
                          f"{', '.join(POLICIES)}.")


class ExpertCache:  # over 150 lines: one lock guards slots, pins, queue and clock together
    """The fast tier: at most `capacity` experts resident or in flight.

    `acquire` returns an expert's weights, waiting (a stall) when it is not resident; `prefetch`
    queues a load ahead of time; `request` queues a layer's demand loads. Loads are timed by the
    storage channel (moe/channel.py) and their bytes read by the reader (moe/reader.py); the
    eviction policy (moe/eviction.py) picks what leaves.
    """

    def __init__(self, store: ExpertStore, capacity: int, bw: Bandwidth, policy: str,
                 top_k: int, device: torch.device = torch.device("cpu"),
                 queue: str = "deadline", reads: str = "thread") -> None:
        """ConfigError when the tier cannot hold one layer's experts, or the policy, the
        queue order (channel.QUEUES) or the reads (READS) are unknown.
        """
        check_tier(capacity, len(store.files), top_k, policy)
        check_queue(queue)
        check_reads(reads)
        self.store, self.capacity, self.bw, self.policy = store, capacity, bw, policy
        self.queue, self.top_k, self.reads = queue, top_k, reads
        self._order = self._deadline if queue == "deadline" else None
        """The channel's sort key for prefetches (None: in the order predicted)."""
        self.eviction = POLICY_CLASSES[policy]()
        self.n_layers = store.n_layers
        self.device = device
        self.slots: OrderedDict[Key, _Slot] = OrderedDict()
        self.pinned: set[Key] = set()
        self.predicted: dict[Key, int] = {}
        """Expert → the token for which a predictor last expected it (the `predicted` policy
        keeps these)."""
        self.predicted_layers: dict[int, int] = {}
        """Layer → the token for which a predictor last named its experts."""
        self.events: list[Event] = []
        self.token = 0
        self.layer = 0
        """The token and layer computing now (set by the runtime)."""
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self.channel = StorageChannel(self.slots, self.t0)
        self.reader = ExpertReader(store, capacity, device, self._claim)
        self.bytes_loaded = 0
        self.peak = 0
        """The most experts ever resident or in flight at once (never above capacity)."""

    # -- the compute side ---------------------------------------------------------------------

    def now_ms(self) -> float:
        """Milliseconds since the run started."""
        return (time.perf_counter() - self.t0) * 1000.0

    def warm(self, experts: list[Key]) -> None:
        """Make experts resident at once, without modelled time (the state before a run)."""
        for key in experts[: self.capacity]:
            slot = _Slot(cause="warm", buffer=self.reader.free.pop(), ready=True)
            slot.tensors = self.reader.fill(key, slot.buffer)
            slot.read.set()
            self.slots[key] = slot

    def request(self, layer: int, experts: list[int]) -> None:
        """Queue demand loads for the missing experts of a layer about to compute (as many as
        the tier holds at once; a prefill that needs more gets the rest as earlier ones are
        released).
        """
        with self._lock:
            self._advance()
            first = experts[: self.capacity]
            self.pinned = {(layer, e) for e in first}
            if self._order is not None:  # this layer's wrong guesses: nothing waits on them
                self._drop_queued(layer, set(experts))
            for e in first:
                key = (layer, e)
                if key not in self.slots:
                    self._reserve(key, "demand")
                elif self.channel.queued(key):
                    # a prefetch still queued is needed now: it jumps the queue
                    self.channel.promote(key)

    def acquire(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """The weights of a resident expert, waiting for its load if needed (recorded as a
        stall).
        """
        key = (layer, expert)
        with self._lock:
            self._advance()
            slot = self.slots.get(key)
            self.pinned.add(key)
            if slot is None:  # beyond what request() could hold, or never requested
                slot = self._reserve(key, "demand")
            ready = slot.ready
        now = self.now_ms()
        self.events.append(Event("hit" if ready else "miss", self.token, layer, expert, now, now,
                                 slot.cause))
        if not ready:
            self._wait(key, slot)
            self.events.append(Event("stall", self.token, layer, expert, now, self.now_ms(),
                                     slot.cause))
        if slot.tensors is None and self.reads == "compute":
            self._read_now(key, slot)  # pinned above: nothing else touches its buffer
        elif slot.tensors is None:
            slot.read.wait()  # the reader lags behind the modelled clock (not seen so far)
        if slot.error is not None:
            raise slot.error
        with self._lock:
            slot.used, slot.uses, slot.last_use = True, slot.uses + 1, time.perf_counter()
            self.slots.move_to_end(key)
        return slot.tensors

    def _read_now(self, key: Key, slot: _Slot) -> None:
        """Read a resident expert's bytes in this thread (`compute` reads)."""
        try:
            slot.tensors = self.reader.fill(key, slot.buffer)
        except Exception as exc:  # raised by acquire, as a reader thread's failure is
            slot.error = exc
        slot.read.set()

    def release(self, layer: int, expert: int) -> None:
        """The layer is done with this expert: it may be evicted again."""
        with self._lock:
            self.pinned.discard((layer, expert))

    def prefetch(self, layer: int, experts: list[int], distance: int) -> None:
        """Queue ahead-of-time loads of predicted experts that are neither resident nor in
        flight; skipped when only pinned (or, under `predicted` and `ahead`, only experts
        expected as soon) experts could make room.

        A prediction for a layer supersedes the earlier, farther one: the layer's queued
        prefetches that it no longer names are cancelled before they take the storage channel.
        """
        with self._lock:
            self._advance()
            self.predicted_layers[layer] = self.token
            self._drop_queued(layer, set(experts))
            for rank, e in enumerate(experts):
                key = (layer, e)
                self.predicted[key] = self.token
                spare = rank >= self.top_k
                slot = self.slots.get(key)
                if slot is not None:
                    if (self._order is not None and slot.spare != spare
                            and self.channel.queued(key)):  # re-ranked: it changes its place
                        slot.spare = spare
                        self.channel.drop(key)
                        self.channel.schedule(key, demand=False, deadline=self._order)
                    continue
                if len(self.slots) >= self.capacity:
                    victim = self._victim(for_prefetch=True, need=key)
                    if victim is None:
                        continue
                    self._evict(victim)
                self._reserve(key, "prefetch", spare)
                now = self.now_ms()
                self.events.append(Event("prefetch", self.token, layer, e, now, now,
                                         str(distance)))

    def close(self) -> None:
        """Stop the loader thread (after its reads in progress), recording the loads that have
        ended by now.
        """
        with self._lock:
            self._advance()
        self.reader.close()

    def resident(self) -> list[Key]:
        """Experts resident now (not in flight)."""
        with self._lock:
            self._advance()
            return [k for k, s in self.slots.items() if s.ready]

    # -- the storage channel (caller holds the lock) ------------------------------------------

    def _advance(self) -> None:
        """Move the channel's clock to now; loads that ended are resident (a 'load' event each)."""
        for key, start, end in self.channel.advance():
            self.bytes_loaded += self.store.files[key]["bytes"]
            self.events.append(Event("load", self.token, key[0], key[1],
                                     (start - self.t0) * 1000.0, (end - self.t0) * 1000.0,
                                     self.slots[key].cause))

    def _wait(self, key: Key, slot: _Slot) -> None:
        """Block (lock released) until `slot`'s modelled load has ended."""
        while True:
            with self._lock:
                self._advance()
                if slot.ready or key not in self.slots:
                    return
                left = self.channel.end_of(key) - time.perf_counter()
            if left > 0:
                time.sleep(left)

    def _drop_queued(self, layer: int, keep: set[int]) -> None:
        """Cancel `layer`'s queued prefetches of experts not in `keep` (nor pinned), and forget
        that they were predicted for this token (caller holds the lock).
        """
        for key in [k for k in self.channel.queue if self.channel.queued(k)
                    and k[0] == layer and k[1] not in keep and k not in self.pinned]:
            if self._cancel(key) and self.predicted.get(key) == self.token:
                del self.predicted[key]

    def _cancel(self, key: Key) -> bool:
        """Drop a queued load that has not started on the channel (nor is being read right
        now); False when it cannot be dropped.
        """
        slot = self.slots[key]
        if slot.start is not None or (slot.loading and not slot.read.is_set()):
            return False
        self.slots.pop(key)
        self.channel.drop(key)
        self.reader.free.append(slot.buffer)
        now = self.now_ms()
        self.events.append(Event("cancel", self.token, key[0], key[1], now, now, slot.cause))
        return True

    # -- eviction -----------------------------------------------------------------------------

    def _reserve(self, key: Key, cause: str, spare: bool = False) -> _Slot:
        """Take a slot for a load and queue it, evicting if the tier is full (caller holds the
        lock).

        A demand load that finds no resident expert to evict cancels a queued prefetch, or
        else waits (lock released) for the load in flight to land.
        """
        while len(self.slots) >= self.capacity:
            victim = self._victim(for_prefetch=cause == "prefetch", need=key)
            if victim is not None:
                self._evict(victim)
                continue
            if cause == "prefetch":
                raise RuntimeError("prefetch() checks for a victim first")
            queued = [k for k in reversed(self.channel.queue)
                      if self.slots[k].start is None and k not in self.pinned]
            if any(self._cancel(k) for k in queued[:1]):
                continue
            reading = [s for s in self.slots.values()  # only a reader thread lags behind
                       if s.ready and s.tensors is None and s.error is None
                       ] if self.reads == "thread" else []
            if not self.channel.queue and not reading:
                raise ConfigError(f"The fast tier of {self.capacity} experts is full of experts "
                                  "in use; raise the capacity.")
            queue = self.channel.queue
            left = self.channel.end_of(queue[0]) - time.perf_counter() if queue else 0.0
            self._lock.release()
            try:
                if left > 0:
                    time.sleep(left)
                elif reading:  # the modelled load is over, the real read not yet
                    reading[0].read.wait()
            finally:
                self._lock.acquire()
            self._advance()
        nbytes = self.store.files[key]["bytes"]
        slot = _Slot(cause=cause, buffer=self.reader.free.pop(), queued_at=time.perf_counter(),
                     seconds=self.bw.seconds(nbytes), spare=spare)
        self.slots[key] = slot
        self.peak = max(self.peak, len(self.slots))
        self.channel.schedule(key, demand=cause == "demand", deadline=self._order)
        if self.reads == "thread":
            self.reader.submit(key)
        return slot

    def _deadline(self, key: Key) -> tuple[bool, int]:
        """A queued prefetch's place under `deadline`: margin guesses after top-k ones, then
        layers until `key`'s layer computes next (a layer already passed: the next token's).
        """
        return self.slots[key].spare, (key[0] - self.layer) % self.n_layers

    def next_use(self, key: Key) -> int:
        """The `ahead` policy's estimate of when an expert is next used, in layers from now."""
        return next_use(self, key)

    def uses(self, key: Key) -> tuple[int, float]:
        """(how often, when last) an expert in the tier was used (the `lfu` policy's key)."""
        slot = self.slots[key]
        return slot.uses, slot.last_use

    def _victim(self, for_prefetch: bool, need: Key | None = None
                ) -> Key | None:
        """Which resident expert leaves to make room for `need`; None when none may (the
        eviction policy decides, moe/eviction.py).
        """
        unread = self.reads == "compute"  # an unread slot: no reader thread holds its buffer
        candidates = (k for k, s in self.slots.items() if s.ready and k not in self.pinned
                      and (s.tensors is not None or unread))
        return self.eviction.victim(self, candidates, for_prefetch, need)

    def _evict(self, key: Key) -> None:
        slot = self.slots.pop(key)
        self.reader.free.append(slot.buffer)
        now = self.now_ms()
        self.events.append(Event("evict", self.token, key[0], key[1], now, now, slot.cause))
        if slot.cause == "prefetch" and not slot.used:
            self.events.append(Event("wasted", self.token, key[0], key[1], now, now))

    def _claim(self, key: Key) -> _Slot | None:
        """The reader thread's turn for `key`: its slot, unless cancelled, evicted or read."""
        with self._lock:
            slot = self.slots.get(key)
            if slot is None or slot.loading:
                return None
            slot.loading = True
            return slot
