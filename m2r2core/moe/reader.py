"""The fast tier's memory and the thread that fills it.

One buffer per fast-tier slot is allocated once; a background reader thread reads an expert's
real bytes into its slot's buffer as soon as its load is queued (on CUDA: into pinned host
memory, then a copy on a side stream). Compute waits only for the modelled end of a load
(moe/channel.py), and for the bytes should the reader ever lag behind it, so the 2-core host pays
for a read once instead of waking a loader thread at the end of every load.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from m2r2core.moe.channel import Key
from m2r2core.moe.store import ExpertStore


class ExpertReader:
    """Buffers of the fast tier and the reader thread.

    `claim(key)` is called by the thread, once per queued key, to get the slot to fill (None when
    the load was cancelled or evicted before its turn, or is already read); the slot's `buffer`
    names the buffer, and the thread sets its `tensors` (or `error`) and then its `read` event.
    """

    def __init__(self, store: ExpertStore, capacity: int, device: torch.device,
                 claim: Callable[[Key], object]) -> None:
        """Allocate `capacity` buffers and start the thread."""
        self.store, self.claim = store, claim
        self.buffers = [torch.empty(store.expert_bytes, dtype=torch.uint8, device=device)
                      for _ in range(capacity)]
        """The fast tier's memory: one buffer per slot, allocated once; loads read into them."""
        self._pool_np = [b.numpy() for b in self.buffers] if device.type == "cpu" else []
        self._views: dict[tuple[int, tuple], dict[str, torch.Tensor]] = {}
        """(buffer, layout) → the tensors of an expert with that layout in that buffer, made
        once: experts of one model share a layout, so a load needs no tensor op at all."""
        self.free = list(range(capacity))
        """Buffers no slot holds."""
        self._staging = None if device.type == "cpu" else torch.empty(
            store.expert_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        """Off CPU, files are read into (pinned) host memory, then copied to the device."""
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        """Keys to read (C-level blocking: the idle reader costs the GIL nothing)."""
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="expert-loader", daemon=True)
        self._thread.start()

    def submit(self, key: Key) -> None:
        """Read this expert's bytes as soon as the thread gets to it."""
        self._queue.put(key)

    def fill(self, key: Key, index: int) -> dict[str, torch.Tensor]:
        """Read an expert's file into buffer `index`; its tensors, as views of the buffer."""
        target = self.buffers[index]
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

    def close(self) -> None:
        """Stop the thread after the read in progress."""
        self._stop = True
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        """Read queued experts' bytes into their buffers, in the order they were queued."""
        while True:
            key = self._queue.get()
            if self._stop:
                return
            slot = self.claim(key)
            if slot is None:
                continue
            try:
                slot.tensors = self.fill(key, slot.buffer)
            except Exception as exc:  # surfaced to the compute thread by ExpertCache.acquire
                slot.error = exc
            slot.read.set()
