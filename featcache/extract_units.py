"""Stage 1's per-unit pipeline: loader batches regrouped into whole units, one teacher forward per unit, the targets'
copies to the host overlapped with the next forward, and the unit encoded and written by a background thread.

:mod:`featcache.extract` plans the work (manifest, units to do, ranks); :mod:`featcache.verify` reuses
:func:`compute_targets` to recompute stored views.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from .errors import DecodeError
from .manifest import Manifest
from .stores import StoreWriter
from .stores.encodings import encode_with
from .stores.precision import check_storable
from .teachers import Teacher
from .views import normalize


def iter_units(loader: DataLoader, manifest: Manifest, skip_corrupt: bool, pin: bool = False
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Regroup loader batches into whole units: yields ``(unit, columns)`` once all of a unit's rows are in; ``pin``:
    the unit's uint8 views land in page-locked memory, so their copy to the GPU runs without blocking."""
    pending: dict[int, list[dict[str, Any]]] = {}
    for batch in loader:
        for j in range(len(batch["row"])):
            item = {k: v[j] for k, v in batch.items()}
            if item["error"] and not skip_corrupt:  # before its unit is written: the cache never holds it
                raise DecodeError(item["path"], item["error"], item["relpath"])
            unit = int(item["row"]) // manifest.shard_size
            pending.setdefault(unit, []).append(item)
            if len(pending[unit]) == len(manifest.unit_rows(unit)):
                yield unit, _columns(sorted(pending.pop(unit), key=lambda it: int(it["row"])), pin)


def _columns(items: list[dict[str, Any]], pin: bool = False) -> dict[str, Any]:
    first = items[0]["image"]
    images = torch.empty((len(items), *first.shape), dtype=first.dtype, pin_memory=pin)
    out: dict[str, Any] = {"image": torch.stack([it["image"] for it in items], out=images)}
    for key in ("row", "sample", "view", "label", "seed", "fingerprint", "valid"):
        out[key] = np.asarray([int(it[key]) for it in items])
    out["params"] = np.stack([np.asarray(it["params"], dtype=np.float64) for it in items])
    out["skipped"] = sorted({str(it["relpath"]) for it in items if int(it["valid"]) == 0})
    return out


class HostTargets:
    """Teacher targets on their way to the host. On CUDA the device-to-host copies go to page-locked buffers on a
    side stream without blocking, so the next unit's forward runs while they complete; :meth:`numpy` waits for them
    (the writer thread calls it). On the CPU the targets are already there."""

    def __init__(self, out: dict[str, torch.Tensor], device: torch.device) -> None:
        self.event = None
        if device.type != "cuda":
            self.host = {name: v.float() for name, v in out.items()}
            return
        compute, copy = torch.cuda.current_stream(device), _copy_stream(device)
        copy.wait_stream(compute)  # the copies start once the forward that made the targets is done
        with torch.cuda.stream(copy):
            self.host = {}
            for name, v in out.items():
                v.record_stream(copy)  # the allocator must not reuse v's memory before the copy ran
                self.host[name] = torch.empty(v.shape, dtype=torch.float32, pin_memory=True)
                self.host[name].copy_(v.float(), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(copy)

    def numpy(self) -> dict[str, np.ndarray]:
        """The targets as float32 numpy arrays, once their copies are complete."""
        if self.event is not None:
            self.event.synchronize()
        return {name: v.numpy() for name, v in self.host.items()}


_COPY_STREAMS: dict[torch.device, Any] = {}


def _copy_stream(device: torch.device) -> Any:
    """One side stream per device for the device-to-host copies (streams are cheap but not free to create)."""
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def launch_targets(teacher: Teacher, images: torch.Tensor, manifest: Manifest, device: torch.device) -> HostTargets:
    """Queue the teacher forward for uint8 views and the copies of its targets to the host; returns at once on CUDA.

    The views cross to the device as uint8 (a quarter of float32's bytes, without blocking when they are pinned)
    and are normalised there.
    """
    norm = manifest["normalization"]
    x = normalize(images.to(device, non_blocking=True), norm["mean"], norm["std"])
    return HostTargets(teacher.targets(x, manifest.layers), device)


def compute_targets(teacher: Teacher, images: torch.Tensor, manifest: Manifest, device: torch.device
                    ) -> dict[str, np.ndarray]:
    """Teacher targets (float32 numpy) for uint8 views, in one forward pass."""
    return launch_targets(teacher, images, manifest, device).numpy()


def write_unit(writer: StoreWriter, manifest: Manifest, unit: int, cols: dict[str, Any],
               targets: dict[str, np.ndarray] | HostTargets) -> None:
    """Zero the targets of skipped views, encode, and hand the unit to the writer."""
    targets = targets.numpy() if isinstance(targets, HostTargets) else targets
    invalid = cols["valid"] == 0
    for value in targets.values():
        value[invalid] = 0
    check_storable(targets, manifest["storage"]["dtype"])  # before encoding: fp16 range, finiteness
    records = {k: cols[k] for k in ("sample", "view", "label", "seed", "params", "fingerprint", "valid")}
    writer.write_unit(unit, encode_with(targets, manifest), records, skipped=cols["skipped"])


def extract_units(writer: StoreWriter, teacher: Teacher, loader: DataLoader, device: torch.device,
                  skip_corrupt: bool = False, total: int | None = None, progress: bool = True) -> None:
    """Teacher forward per unit, then encode + write + mark it.

    One background thread writes: unit u is copied to the host (on CUDA), encoded, written and fsynced while the
    teacher runs on unit u + 1. At most one write is in flight and each is awaited before the next is submitted, so
    units are marked in order and a write error surfaces at once.
    """
    from tqdm import tqdm

    manifest = writer.manifest
    with tqdm(total=total, unit="img", desc="extract", disable=not progress, dynamic_ncols=True) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="featcache-writer") as pool:
        pending: Future | None = None
        for unit, cols in iter_units(loader, manifest, skip_corrupt, pin=device.type == "cuda"):
            targets = launch_targets(teacher, cols["image"], manifest, device)
            if pending is not None:
                pending.result()
            pending = pool.submit(write_unit, writer, manifest, unit, cols, targets)
            pending.add_done_callback(lambda f, n=len(cols["row"]): bar.update(n) if f.exception() is None else None)
        if pending is not None:
            pending.result()


def collate_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Columns as plain lists (regrouping into units happens in the main process anyway), except the images:
    stacked in the worker, so a batch crosses the process boundary as one shared-memory tensor, not one per view
    (per-view tensors cost ~1.7 ms each in file-descriptor passing, ~15 % of extraction time at 64 px on CPU)."""
    columns: dict[str, Any] = {k: [it[k] for it in items] for k in items[0]}
    columns["image"] = torch.stack(columns["image"])
    return columns
