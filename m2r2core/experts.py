"""Expert memory tiers: a slow, disk-backed home for every expert and a bounded fast tier.

On CPU the slow tier is a folder of safetensors files, one per expert, read by a background loader
thread under a bandwidth model (bytes per second plus a per-load latency; presets below), so a load
takes the time it would on that storage and overlaps with compute. On CUDA the same loader copies
from pinned host memory to the device on a side stream. The fast tier holds at most `capacity`
experts; the eviction policy picks what leaves. Every load, hit, miss, stall and eviction is
recorded with timestamps (`ExpertCache.events`), which the Expert Loading page draws.

Prediction only changes *when* an expert arrives, never which weights compute: the weights in the
fast tier are the bytes of the slow tier, so outputs equal the model run with every expert resident.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from m2r2core.errors import AssetMissing, ConfigError

MANIFEST = "experts.json"


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

POLICIES = ("lru", "lfu", "predicted")
"""Eviction policies. `predicted` keeps the experts a predictor expects in this token's later
layers and those the last two tokens used, and evicts the rest by LRU; a prefetch under it
never evicts those (it is skipped instead)."""


def bandwidth(name: str) -> Bandwidth:
    """A preset by name, or ConfigError listing the presets."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown bandwidth preset '{name}'; choose one of "
                          f"{', '.join(PRESETS)}.")
    return PRESETS[name]


@dataclass(frozen=True)
class Event:
    """One timed thing that happened to an expert or a layer (times in ms from the run start)."""

    kind: str
    """'compute' (a layer), 'load' (the loader), 'stall' (compute waiting), 'hit', 'miss',
    'evict', 'prefetch' (a prediction queued), 'wasted' (a prefetched expert evicted unused),
    'cancel' (a queued prefetch dropped to make room for a demand load)."""
    token: int
    layer: int
    expert: int
    start_ms: float
    end_ms: float
    cause: str = ""
    """For loads: 'demand' or 'prefetch'; for prefetches: the lookahead distance."""


class ExpertStore:
    """The slow tier: one safetensors file per expert, with a manifest of sizes and checksums."""

    def __init__(self, folder: Path) -> None:
        """Open an exported store; AssetMissing when the folder or its manifest is missing."""
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise AssetMissing(f"No expert store at {self.folder} ({MANIFEST} is missing).")
        try:
            data = json.loads(manifest.read_text())
            self.n_layers, self.n_experts = int(data["n_layers"]), int(data["n_experts"])
            self.files: dict[tuple[int, int], dict] = {
                (r["layer"], r["expert"]): r for r in data["files"]}
            self.names: tuple[str, ...] = tuple(data["tensors"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AssetMissing(f"The expert manifest {manifest} is corrupt ({exc}).") from exc
        self.expert_bytes = max(r["bytes"] for r in self.files.values())
        self._verified: set[tuple[int, int]] = set()
        """Experts whose file matched its checksum once (a file is hashed on its first read;
        hashing on every read would steal a core from compute on a 2-core machine)."""

    def path(self, layer: int, expert: int) -> Path:
        """The file of one expert."""
        return self.folder / self.files[(layer, expert)]["file"]

    def read(self, layer: int, expert: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Read one expert's tensors, checked; AssetMissing names the file if it is bad."""
        record = self.files[(layer, expert)]
        path = self.folder / record["file"]
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise AssetMissing(f"Expert file {path} (layer {layer}, expert {expert}) is missing "
                               f"or unreadable ({exc}).") from exc
        if (layer, expert) not in self._verified \
                and hashlib.sha256(raw).hexdigest() != record["sha256"]:
            raise AssetMissing(f"Expert file {path} (layer {layer}, expert {expert}) is corrupt: "
                               "its checksum does not match the store's manifest. Re-export "
                               "the store.")
        try:
            from safetensors.torch import load

            tensors = load(raw)
        except (SafetensorError, RuntimeError, ValueError) as exc:
            raise AssetMissing(f"Expert file {path} is corrupt ({exc}).") from exc
        self._verified.add((layer, expert))
        return {k: v.to(device) for k, v in tensors.items()}

    @staticmethod
    def export(weights: dict[tuple[int, int], dict[str, torch.Tensor]], folder: Path,
               n_layers: int, n_experts: int) -> ExpertStore:
        """Write every expert to its own file and the manifest last (so a half export never
        opens).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)
        files, names = [], None
        for (layer, expert), tensors in sorted(weights.items()):
            name = f"layer{layer:03d}_expert{expert:03d}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
            raw = (folder / name).read_bytes()
            nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
            files.append(dict(layer=layer, expert=expert, file=name, bytes=nbytes,
                              sha256=hashlib.sha256(raw).hexdigest()))
            names = sorted(tensors)
        (folder / MANIFEST).write_text(json.dumps(dict(
            n_layers=n_layers, n_experts=n_experts, tensors=names, files=files)))
        return ExpertStore(folder)

    def check(self) -> None:
        """Verify every expert file now (missing or corrupt → AssetMissing naming it)."""
        self._verified.clear()
        for (layer, expert) in self.files:
            self.read(layer, expert, torch.device("cpu"))


@dataclass
class _Slot:
    tensors: dict[str, torch.Tensor] | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    cause: str = "demand"
    used: bool = False
    last_use: float = 0.0
    uses: int = 0
    last_token: int = -10
    """The forward pass that last computed with it."""
    loading: bool = False
    """The loader has started reading it (it can no longer be cancelled)."""
    error: Exception | None = None


class ExpertCache:
    """The fast tier: at most `capacity` experts resident or in flight, filled by one loader thread.

    `acquire` returns an expert's weights, waiting (a stall) when it is not resident; `prefetch`
    queues a load ahead of time. Demand loads jump the queue of prefetches, but never interrupt the
    load in flight (one storage channel).
    """

    def __init__(self, store: ExpertStore, capacity: int, bw: Bandwidth, policy: str,
                 top_k: int, device: torch.device = torch.device("cpu")) -> None:
        """Raises ConfigError when capacity < top_k (one layer's experts must fit) or the policy
        is unknown.
        """
        total = len(store.files)
        if capacity < top_k:
            raise ConfigError(f"A fast tier of {capacity} experts cannot hold one layer's "
                              f"top-{top_k} experts; the minimum capacity is {top_k}.")
        if capacity > total:
            raise ConfigError(f"Capacity {capacity} exceeds the {total} experts of the model; "
                              f"the most is {total} (everything resident).")
        if policy not in POLICIES:
            raise ConfigError(f"Unknown eviction policy '{policy}'; choose one of "
                              f"{', '.join(POLICIES)}.")
        self.store, self.capacity, self.bw, self.policy = store, capacity, bw, policy
        self.device = device
        self.slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()
        self.pinned: set[tuple[int, int]] = set()
        self.predicted: dict[tuple[int, int], int] = {}
        """Expert → the token for which a predictor last expected it (the `predicted` policy
        keeps these)."""
        self.events: list[Event] = []
        self.token = 0
        self.layer = 0
        """The token and layer computing now (set by the runtime)."""
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._demand: queue.SimpleQueue = queue.SimpleQueue()
        self._prefetch: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Semaphore(0)
        self._stop = False
        self.bytes_loaded = 0
        self.peak = 0
        """The most experts ever resident or in flight at once (never above capacity)."""
        self._loader = threading.Thread(target=self._run, name="expert-loader", daemon=True)
        self._loader.start()

    # -- the compute side ---------------------------------------------------------------------

    def now_ms(self) -> float:
        """Milliseconds since the run started."""
        return (time.perf_counter() - self.t0) * 1000.0

    def warm(self, experts: list[tuple[int, int]]) -> None:
        """Make experts resident at once, without modelled time (the state before a run)."""
        for key in experts[: self.capacity]:
            slot = _Slot(self.store.read(*key, self.device), cause="warm")
            slot.ready.set()
            self.slots[key] = slot

    def request(self, layer: int, experts: list[int]) -> None:
        """Queue demand loads for the missing experts of a layer about to compute (as many as
        the tier holds at once; a prefill that needs more gets the rest as earlier ones are
        released).
        """
        with self._lock:
            first = experts[: self.capacity]
            self.pinned = {(layer, e) for e in first}
            for e in first:
                if (layer, e) not in self.slots:
                    self._reserve((layer, e), "demand")
                    self._demand.put((layer, e))
                    self._wake.release()

    def acquire(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """The weights of a resident expert, waiting for its load if needed (recorded as a
        stall).
        """
        key = (layer, expert)
        with self._lock:
            slot = self.slots.get(key)
            self.pinned.add(key)
            if slot is None:  # beyond what request() could hold, or never requested
                slot = self._reserve(key, "demand")
                self._demand.put(key)
                self._wake.release()
        now = self.now_ms()
        ready = slot.ready.is_set()
        self.events.append(Event("hit" if ready else "miss", self.token, layer, expert, now, now,
                                 slot.cause))
        if not ready:
            slot.ready.wait()
            self.events.append(Event("stall", self.token, layer, expert, now, self.now_ms(),
                                     slot.cause))
        if slot.error is not None:
            raise slot.error
        with self._lock:
            slot.used, slot.uses, slot.last_use = True, slot.uses + 1, time.perf_counter()
            slot.last_token = self.token
            self.slots.move_to_end(key)
        return slot.tensors

    def release(self, layer: int, expert: int) -> None:
        """The layer is done with this expert: it may be evicted again."""
        with self._lock:
            self.pinned.discard((layer, expert))

    def prefetch(self, layer: int, experts: list[int], distance: int) -> None:
        """Queue ahead-of-time loads of predicted experts that are neither resident nor in
        flight; skipped when only pinned (or, under `predicted`, only predicted) experts could
        make room.
        """
        with self._lock:
            for e in experts:
                key = (layer, e)
                self.predicted[key] = self.token
                if key in self.slots:
                    continue
                if len(self.slots) >= self.capacity and self._victim(for_prefetch=True) is None:
                    continue
                self._reserve(key, "prefetch")
                now = self.now_ms()
                self.events.append(Event("prefetch", self.token, layer, e, now, now,
                                         str(distance)))
                self._prefetch.put(key)
                self._wake.release()

    def close(self) -> None:
        """Stop the loader thread."""
        self._stop = True
        self._wake.release()
        self._loader.join(timeout=5)

    def resident(self) -> list[tuple[int, int]]:
        """Experts resident now (not in flight)."""
        with self._lock:
            return [k for k, s in self.slots.items() if s.ready.is_set()]

    # -- eviction -----------------------------------------------------------------------------

    def _reserve(self, key: tuple[int, int], cause: str) -> _Slot:
        """Take a slot for a load, evicting if the tier is full (caller holds the lock).

        A demand load that finds no resident expert to evict cancels a queued prefetch, or
        else waits (lock released) for the load in flight to land.
        """
        while len(self.slots) >= self.capacity:
            victim = self._victim(for_prefetch=cause == "prefetch")
            if victim is not None:
                self._evict(victim)
                continue
            if cause == "prefetch":
                raise RuntimeError("prefetch() checks for a victim first")
            queued = [k for k, s in self.slots.items()
                      if not s.ready.is_set() and not s.loading and k not in self.pinned]
            if queued:
                dropped = self.slots.pop(queued[-1])
                now = self.now_ms()
                self.events.append(Event("cancel", self.token, queued[-1][0], queued[-1][1],
                                         now, now, dropped.cause))
                continue
            loading = [s for k, s in self.slots.items() if s.loading and not s.ready.is_set()]
            if not loading:
                raise ConfigError(f"The fast tier of {self.capacity} experts is full of experts "
                                  "in use; raise the capacity.")
            self._lock.release()
            try:
                loading[0].ready.wait()
            finally:
                self._lock.acquire()
        slot = _Slot(cause=cause)
        self.slots[key] = slot
        self.peak = max(self.peak, len(self.slots))
        return slot

    def _victim(self, for_prefetch: bool) -> tuple[int, int] | None:
        candidates = [k for k, s in self.slots.items()
                      if s.ready.is_set() and k not in self.pinned]
        if not candidates:
            return None
        if self.policy == "lfu":
            return min(candidates, key=lambda k: (self.slots[k].uses, self.slots[k].last_use))
        if self.policy == "predicted":
            # Keep what a predictor expects in this token's later layers, and the working set
            # of the last two tokens (routing repeats from token to token); evict by LRU among
            # the rest. A prefetch that finds nothing else to evict is not made.
            token, layer, predicted = self.token, self.layer, self.predicted
            expected = {k for k in candidates if k[0] > layer and predicted.get(k) == token}
            for k in candidates:  # slots are in LRU order: the first cold one is the LRU one
                if k not in expected and self.slots[k].last_token < token - 1:
                    return k
            if for_prefetch:
                return None
            return next((k for k in candidates if k not in expected), candidates[0])
        return candidates[0]  # lru: OrderedDict keeps least recent first

    def _evict(self, key: tuple[int, int]) -> None:
        slot = self.slots.pop(key)
        now = self.now_ms()
        self.events.append(Event("evict", self.token, key[0], key[1], now, now, slot.cause))
        if slot.cause == "prefetch" and not slot.used:
            self.events.append(Event("wasted", self.token, key[0], key[1], now, now))

    # -- the loader thread --------------------------------------------------------------------

    def _next(self) -> tuple[tuple[int, int], str] | None:
        for q, cause in ((self._demand, "demand"), (self._prefetch, "prefetch")):
            try:
                return q.get_nowait(), cause
            except queue.Empty:
                continue
        return None

    def _run(self) -> None:
        while True:
            self._wake.acquire()
            if self._stop:
                return
            item = self._next()
            if item is None:
                continue
            key, _ = item
            with self._lock:
                slot = self.slots.get(key)
                if slot is None or slot.ready.is_set() or slot.loading:
                    continue  # cancelled before its turn, or already there
                slot.loading = True
            start = time.perf_counter()
            try:
                tensors = self.store.read(*key, self.device)
            except Exception as exc:  # surfaced to the compute thread by acquire()
                slot.error = exc
                slot.ready.set()
                continue
            nbytes = self.store.files[key]["bytes"]
            finish = start + self.bw.seconds(nbytes)
            while (left := finish - time.perf_counter()) > 0:
                time.sleep(left)
            slot.tensors = tensors
            self.bytes_loaded += nbytes
            self.events.append(Event("load", self.token, key[0], key[1],
                                     (start - self.t0) * 1000.0, self.now_ms(), slot.cause))
            slot.ready.set()
