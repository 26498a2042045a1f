"""The slow tier: a folder of safetensors files, one per expert, with a manifest of sizes and
checksums. Each file is checked once, on its first read; later reads go straight into a fast-tier
buffer (moe/reader.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from m2r2core.errors import AssetMissing
from m2r2core.runtime.model import default_cache_dir

MANIFEST = "experts.json"
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
           "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


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


def store_dir(engine) -> Path:
    """Where this model's expert store lives in the model cache: named by the model's
    fingerprint and by a digest of its experts' weights, so that two MoEs that differ only in
    their experts (the MoEfication and its distillation) never share a store.
    """
    return default_cache_dir() / (f"expert-store-{engine.info.fingerprint[:12]}-"
                                  f"{experts_digest(engine)}-{engine.info.dtype}")


def experts_digest(engine) -> str:
    """A short hash of a sample of every MoE layer's expert weights (first rows of each)."""
    sha = hashlib.sha256()
    for layer in engine.parts.layers:
        experts = getattr(layer.mlp, "experts", None)
        experts = getattr(experts, "original", experts)
        if experts is None or not hasattr(experts, "gate_up_proj"):
            continue
        for name in ("gate_up_proj", "down_proj"):
            rows = getattr(experts, name)[:, :4].detach().to("cpu", torch.float32)
            sha.update(rows.numpy().tobytes())
    return sha.hexdigest()[:8]
