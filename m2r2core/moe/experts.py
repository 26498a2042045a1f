"""Expert memory tiers: a slow, disk-backed home for every expert and a bounded fast tier.

On CPU the slow tier is a folder of safetensors files, one per expert. Loads go through one
modelled storage channel (bytes per second plus a per-load latency; presets below): each takes the
time it would on that storage, one after the other, while compute goes on, and an expert is
resident once its load has ended. A background reader thread reads the real bytes into the fast
tier's buffers as soon as a load is queued; on CUDA it copies from pinned host memory to the device
on a side stream. The fast tier holds at most `capacity` experts; the eviction policy picks what
leaves. Every load, hit, miss, stall and eviction is
recorded with timestamps (`ExpertCache.events`), which the Expert Loading page draws.

Prediction only changes *when* an expert arrives, never which weights compute: the weights in the
fast tier are the bytes of the slow tier, so outputs equal the model run with every expert resident.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from m2r2core.errors import AssetMissing, ConfigError
from m2r2core.moe.eviction import POLICIES, POLICY_CLASSES, next_use
from m2r2core.trace import Event

MANIFEST = "experts.json"
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
           "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


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

"""Eviction policies. `predicted` keeps the experts a predictor expects in this token's later
layers and evicts the rest by LRU; a prefetch under it never evicts those (it is skipped
instead). `ahead` is a Belady estimate with the layers as the clock: decoding visits layers
1 … N, token after token, so each resident expert's next use is estimated from its layer's
distance ahead, and the expert needed last leaves first (see `ExpertCache.next_use`)."""


def bandwidth(name: str) -> Bandwidth:
    """A preset by name, or ConfigError listing the presets."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown bandwidth preset '{name}'; choose one of "
                          f"{', '.join(PRESETS)}.")
    return PRESETS[name]


class ExpertStore:
    """The slow tier: one safetensors file per expert, with a manifest of sizes and checksums."""

    def __init__(self, folder: Path) -> None:
        """Open an exported store; AssetMissing when the folder or its manifest is missing."""
        self._fds: dict[tuple[int, int], int] = {}
        """Expert files opened once and kept open for their later reads."""
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
        self._layouts: dict[tuple[int, int], tuple] = {}
        """Experts whose file matched its checksum once, with their header's layout (a file is
        hashed on its first read; hashing on every read would steal a core from compute on a
        2-core machine)."""

    def path(self, layer: int, expert: int) -> Path:
        """The file of one expert."""
        return self.folder / self.files[(layer, expert)]["file"]

    def read(self, layer: int, expert: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Read one expert's tensors into new memory, checked; AssetMissing names a bad file."""
        record = self.files[(layer, expert)]
        buffer = torch.empty(record["bytes"], dtype=torch.uint8)
        return {k: v.to(device) for k, v in self.read_into(layer, expert, buffer).items()}

    def read_into(self, layer: int, expert: int, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Read one expert's tensor bytes into `buffer` (flat uint8, CPU) and return views of it.

        AssetMissing names a missing or corrupt file.
        """
        self.read_raw(layer, expert, buffer.numpy())
        return self.views(layer, expert, buffer)

    def read_raw(self, layer: int, expert: int, target: np.ndarray) -> tuple:
        """Read one expert's tensor bytes into `target` (flat uint8); its views' layout.

        The first read of a file checks its checksum and parses its header; later reads are one
        `preadv` from a file kept open straight into the buffer (no allocation, no parsing, no
        tensor op), as a serving engine reads into a fixed slot of its fast tier: the loader
        thread then holds the GIL for a few microseconds per load, and the compute thread keeps
        running. AssetMissing names a missing or corrupt file.
        """
        key = (layer, expert)
        layout = self._layouts.get(key)
        try:
            if layout is None:
                path = self.path(layer, expert)
                raw = path.read_bytes()
                layout = self._check(key, path, raw)
                offset, nbytes = layout[0]
                target[:nbytes] = np.frombuffer(raw, np.uint8, nbytes, offset)
                return layout[1]
            offset, nbytes = layout[0]
            fd = self._fds.get(key)
            if fd is None:
                fd = self._fds[key] = os.open(self.path(layer, expert), os.O_RDONLY)
            got = os.preadv(fd, [target[:nbytes]], offset)
        except OSError as exc:
            raise AssetMissing(f"Expert file {self.path(layer, expert)} (layer {layer}, expert "
                               f"{expert}) is missing or unreadable ({exc}).") from exc
        if got != nbytes:
            raise AssetMissing(f"Expert file {self.path(layer, expert)} (layer {layer}, expert "
                               f"{expert}) is truncated ({got} of {nbytes} bytes).")
        return layout[1]

    def layout_views(self, spec: tuple, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors laid out by `spec` (from read_raw) as views of a buffer."""
        return {name: buffer[start:end].view(dtype).view(shape)
                for name, dtype, shape, start, end in spec}

    def close(self) -> None:
        """Close the expert files kept open."""
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __del__(self) -> None:
        """Close the files kept open."""
        self.close()

    def views(self, layer: int, expert: int, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """An expert's tensors as views of a buffer holding its bytes (after one read)."""
        return self.layout_views(self._layouts[(layer, expert)][1], buffer)

    def _check(self, key: tuple[int, int], path: Path, raw: bytes) -> tuple:
        """Checksum and header of a file's first read → ((data offset, data bytes), views)."""
        layer, expert = key
        if hashlib.sha256(raw).hexdigest() != self.files[key]["sha256"]:
            raise AssetMissing(f"Expert file {path} (layer {layer}, expert {expert}) is corrupt: "
                               "its checksum does not match the store's manifest. Re-export "
                               "the store.")
        try:
            size = struct.unpack("<Q", raw[:8])[0]
            header = json.loads(raw[8: 8 + size])
            views = tuple((name, _DTYPES[item["dtype"]], tuple(item["shape"]),
                           *item["data_offsets"])
                          for name, item in sorted(header.items()) if name != "__metadata__")
        except (struct.error, ValueError, KeyError, TypeError) as exc:
            raise AssetMissing(f"Expert file {path} is corrupt ({exc}).") from exc
        nbytes = len(raw) - 8 - size
        if not views or max(v[4] for v in views) > nbytes or nbytes != self.files[key]["bytes"]:
            raise AssetMissing(f"Expert file {path} is corrupt (its header does not match its "
                               "size).")
        self._layouts[key] = ((8 + size, nbytes), views)
        return self._layouts[key]

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
        self._layouts.clear()
        self.close()
        for (layer, expert) in self.files:
            self.read(layer, expert, torch.device("cpu"))


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


class ExpertCache:
    """The fast tier: at most `capacity` experts resident or in flight, filled through one
    modelled storage channel.

    `acquire` returns an expert's weights, waiting (a stall) when it is not resident; `prefetch`
    queues a load ahead of time. Demand loads jump the queue of prefetches, but never interrupt the
    load in flight (one storage channel).

    The channel is a clock, not a sleeping thread: each load takes `bw.seconds(bytes)` on it, one
    after the other in queue order, and an expert is resident once its modelled load has ended.
    A background loader thread reads the real bytes into the fast tier as soon as a load is
    queued (on CUDA: into pinned memory, then a copy on a side stream); compute waits only for
    the modelled end (and for the bytes, should the reader ever lag behind it). So storage time
    overlaps with compute as a DMA engine's would, and the 2-core host pays for a read only once,
    instead of waking a loader thread at the end of every load.
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
        self.eviction = POLICY_CLASSES[policy]()
        self.n_layers = store.n_layers
        self.device = device
        self.slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()
        self.pinned: set[tuple[int, int]] = set()
        self.predicted: dict[tuple[int, int], int] = {}
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
        self._plan: list[tuple[int, int]] = []
        """The storage channel: loads not yet finished, in channel order (the head may be in
        flight)."""
        self._channel_free = self.t0
        """When the channel finished its last load (perf_counter s)."""
        self._reads: queue.SimpleQueue = queue.SimpleQueue()
        """Loads for the reader thread (C-level blocking: the idle reader costs the GIL
        nothing)."""
        self._stop = False
        self.bytes_loaded = 0
        self.peak = 0
        """The most experts ever resident or in flight at once (never above capacity)."""
        self._pool = [torch.empty(store.expert_bytes, dtype=torch.uint8, device=device)
                      for _ in range(capacity)]
        """The fast tier's memory: one buffer per slot, allocated once; loads read into them."""
        self._pool_np = [b.numpy() for b in self._pool] if device.type == "cpu" else []
        self._views: dict[tuple[int, tuple], dict[str, torch.Tensor]] = {}
        """(buffer, layout) → the tensors of an expert with that layout in that buffer, made
        once: experts of one model share a layout, so a load needs no tensor op at all."""
        self._free = list(range(capacity))
        self._staging = None if device.type == "cpu" else torch.empty(
            store.expert_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        """Off CPU, files are read into (pinned) host memory, then copied to the device."""
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._loader = threading.Thread(target=self._run, name="expert-loader", daemon=True)
        self._loader.start()

    # -- the compute side ---------------------------------------------------------------------

    def now_ms(self) -> float:
        """Milliseconds since the run started."""
        return (time.perf_counter() - self.t0) * 1000.0

    def warm(self, experts: list[tuple[int, int]]) -> None:
        """Make experts resident at once, without modelled time (the state before a run)."""
        for key in experts[: self.capacity]:
            slot = _Slot(cause="warm", buffer=self._free.pop(), ready=True)
            slot.tensors = self._fill(key, slot.buffer)
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
            for e in first:
                key = (layer, e)
                if key not in self.slots:
                    self._reserve(key, "demand")
                elif self._queued_prefetch(key):
                    # a prefetch still queued is needed now: it jumps the queue
                    self._plan.remove(key)
                    self._schedule(key, demand=True)

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
        if slot.tensors is None:
            slot.read.wait()  # the reader lags behind the modelled clock (not seen so far)
        if slot.error is not None:
            raise slot.error
        with self._lock:
            slot.used, slot.uses, slot.last_use = True, slot.uses + 1, time.perf_counter()
            self.slots.move_to_end(key)
        return slot.tensors

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
            wanted = set(experts)
            for key in [k for k in self._plan if self._queued_prefetch(k)
                        and k[0] == layer and k[1] not in wanted and k not in self.pinned]:
                if not self._cancel(key):
                    continue
                if self.predicted.get(key) == self.token:
                    del self.predicted[key]
            for e in experts:
                key = (layer, e)
                self.predicted[key] = self.token
                if key in self.slots:
                    continue
                if len(self.slots) >= self.capacity:
                    victim = self._victim(for_prefetch=True, need=key)
                    if victim is None:
                        continue
                    self._evict(victim)
                self._reserve(key, "prefetch")
                now = self.now_ms()
                self.events.append(Event("prefetch", self.token, layer, e, now, now,
                                         str(distance)))

    def close(self) -> None:
        """Stop the loader thread (after its reads in progress), recording the loads that have
        ended by now.
        """
        with self._lock:
            self._advance()
        self._stop = True
        self._reads.put(None)
        self._loader.join(timeout=5)

    def resident(self) -> list[tuple[int, int]]:
        """Experts resident now (not in flight)."""
        with self._lock:
            self._advance()
            return [k for k, s in self.slots.items() if s.ready]

    # -- the storage channel (caller holds the lock) ------------------------------------------

    def _queued_prefetch(self, key: tuple[int, int]) -> bool:
        """A prefetch waiting on the channel, not yet started (a newer prediction may cancel
        it; a demand for it moves it forward).
        """
        slot = self.slots.get(key)
        return slot is not None and not slot.ready and slot.start is None and not slot.demand

    def _schedule(self, key: tuple[int, int], demand: bool) -> None:
        """Queue a load on the channel: a demand one after the load in flight and earlier
        demands, a prefetch at the end.
        """
        slot = self.slots[key]
        slot.demand = slot.demand or demand
        index = len(self._plan)
        if demand:
            index = 0
            for k in self._plan:
                queued = self.slots[k]
                if queued.start is None and not queued.demand:
                    break
                index += 1
        self._plan.insert(index, key)

    def _advance(self) -> None:
        """Move the channel's clock to now: start queued loads whose turn has come and finish
        those whose modelled time is over (they become resident; a 'load' event each).
        """
        now = time.perf_counter()
        plan = self._plan
        while plan:
            slot = self.slots[plan[0]]
            if slot.start is None:
                start = max(self._channel_free, slot.queued_at)
                if start > now:
                    return
                slot.start = start
            end = slot.start + slot.seconds
            if end > now:
                return
            key = plan.pop(0)
            self._channel_free = end
            slot.ready = True
            self.bytes_loaded += self.store.files[key]["bytes"]
            self.events.append(Event("load", self.token, key[0], key[1],
                                     (slot.start - self.t0) * 1000.0, (end - self.t0) * 1000.0,
                                     slot.cause))

    def _end_of(self, key: tuple[int, int]) -> float:
        """When the channel will finish loading `key`, as things are queued now."""
        t = self._channel_free
        for k in self._plan:
            slot = self.slots[k]
            start = slot.start if slot.start is not None else max(t, slot.queued_at)
            t = start + slot.seconds
            if k == key:
                return t
        return t

    def _wait(self, key: tuple[int, int], slot: _Slot) -> None:
        """Block (lock released) until `slot`'s modelled load has ended."""
        while True:
            with self._lock:
                self._advance()
                if slot.ready or key not in self.slots:
                    return
                left = self._end_of(key) - time.perf_counter()
            if left > 0:
                time.sleep(left)

    def _cancel(self, key: tuple[int, int]) -> bool:
        """Drop a queued load that has not started on the channel (nor is being read right
        now); False when it cannot be dropped.
        """
        slot = self.slots[key]
        if slot.start is not None or (slot.loading and not slot.read.is_set()):
            return False
        self.slots.pop(key)
        self._plan.remove(key)
        self._free.append(slot.buffer)
        now = self.now_ms()
        self.events.append(Event("cancel", self.token, key[0], key[1], now, now, slot.cause))
        return True

    # -- eviction -----------------------------------------------------------------------------

    def _reserve(self, key: tuple[int, int], cause: str) -> _Slot:
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
            queued = [k for k in reversed(self._plan)
                      if self.slots[k].start is None and k not in self.pinned]
            if any(self._cancel(k) for k in queued[:1]):
                continue
            reading = [s for k, s in self.slots.items()
                       if s.ready and s.tensors is None and s.error is None]
            if not self._plan and not reading:
                raise ConfigError(f"The fast tier of {self.capacity} experts is full of experts "
                                  "in use; raise the capacity.")
            left = self._end_of(self._plan[0]) - time.perf_counter() if self._plan else 0.0
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
        slot = _Slot(cause=cause, buffer=self._free.pop(), queued_at=time.perf_counter(),
                     seconds=self.bw.seconds(nbytes))
        self.slots[key] = slot
        self.peak = max(self.peak, len(self.slots))
        self._schedule(key, demand=cause == "demand")
        self._reads.put(key)
        return slot

    def next_use(self, key: tuple[int, int]) -> int:
        """The `ahead` policy's estimate of when an expert is next used, in layers from now."""
        return next_use(self, key)

    def uses(self, key: tuple[int, int]) -> tuple[int, float]:
        """(how often, when last) an expert in the tier was used (the `lfu` policy's key)."""
        slot = self.slots[key]
        return slot.uses, slot.last_use

    def _victim(self, for_prefetch: bool, need: tuple[int, int] | None = None
                ) -> tuple[int, int] | None:
        """Which resident expert leaves to make room for `need`; None when none may (the
        eviction policy decides, moe/eviction.py).
        """
        candidates = [k for k, s in self.slots.items()
                      if s.ready and s.tensors is not None and k not in self.pinned]
        return self.eviction.victim(self, candidates, for_prefetch, need)

    def _evict(self, key: tuple[int, int]) -> None:
        slot = self.slots.pop(key)
        self._free.append(slot.buffer)
        now = self.now_ms()
        self.events.append(Event("evict", self.token, key[0], key[1], now, now, slot.cause))
        if slot.cause == "prefetch" and not slot.used:
            self.events.append(Event("wasted", self.token, key[0], key[1], now, now))

    # -- the reader thread --------------------------------------------------------------------

    def _fill(self, key: tuple[int, int], index: int) -> dict[str, torch.Tensor]:
        """Read an expert's file into buffer `index` of the fast tier; its tensors, as views."""
        target = self._pool[index]
        if self._staging is None:
            spec = self.store.read_raw(*key, self._pool_np[index])
            views = self._views.get((index, spec))
            if views is None:
                views = self._views[(index, spec)] = self.store.layout_views(spec, target)
            return views
        self.store.read_into(*key, self._staging)
        nbytes = self.store.files[key]["bytes"]
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                target[:nbytes].copy_(self._staging[:nbytes], non_blocking=True)
            self._stream.synchronize()
        else:
            target[:nbytes].copy_(self._staging[:nbytes])
        return self.store.views(*key, target)

    def _run(self) -> None:
        """Read queued experts' bytes into their buffers, in the order they were queued."""
        while True:
            key = self._reads.get()
            if self._stop:
                return
            with self._lock:
                slot = self.slots.get(key)
                if slot is None or slot.loading:
                    continue  # cancelled (or evicted) before its turn, or already read
                slot.loading = True
            try:
                slot.tensors = self._fill(key, slot.buffer)
            except Exception as exc:  # surfaced to the compute thread by acquire()
                slot.error = exc
            slot.read.set()
