"""Stage-2 training read as a stream of whole WebDataset shards (``featcache train --stream``).

Random access (:class:`~featcache.datasets.CachedViewDataset` + :class:`~featcache.samplers.EpochSampler`) reads
one tar member per target per item; on object storage that is a round trip per item. A stream reads each shard
front to back instead (a few large GETs), the way WebDataset is meant to be read from object storage. What an epoch
holds and in which order (every rule depends on ``(seed, epoch)`` only, never on timing):

* **Which view of each sample** (the view policy): exactly the ``(sample, view)`` pairs random access uses in the
  same epoch, :func:`featcache.datasets.choose_view` under ``--view-policy``. A sample's item is read from the shard
  holding its chosen row; its other stored views are read past, not decoded.
* **Order**: shards in the order ``default_rng([seed, epoch]).permutation(num_units)``; within a shard, its items
  in the order ``default_rng([seed, epoch, unit])``. Shuffling is per shard, not global as with random access.
* **Split over node x worker**: that epoch's item sequence is cut into ``world_size x workers`` equal contiguous
  slices, consumer ``rank * workers + worker`` takes slice number ``rank * workers + worker``; so a consumer reads
  whole shards except at most two at its slice's ends, and no two consumers take the same item.
* **Equal steps per rank**: every slice holds ``floor(items / consumers)`` items; the remainder (fewer items than
  consumers) is dropped for that epoch, from the end of the sequence, so different items drop in different epochs.
  Each worker batches its own slice (the last batch of a slice may be short), so every rank runs
  ``workers x ceil(slice / batch_size)`` batches.

The loader of a stream is not given to ``accelerator.prepare`` (it is already split by rank; preparing it would
split it a second time, silently): batches are moved to the device by :class:`DeviceLoader`.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from .datasets import CachedViewDataset
from .errors import ConfigError


def epoch_order(units_of_items: np.ndarray, num_units: int, seed: int, epoch: int) -> np.ndarray:
    """Items in stream order for ``epoch``: shards in a seeded order, each shard's items in a seeded order."""
    by_unit = np.argsort(units_of_items, kind="stable")  # items grouped by shard, in item order within each
    counts = np.bincount(units_of_items, minlength=num_units)
    starts = np.cumsum(counts) - counts
    order = []
    for unit in np.random.default_rng([seed, epoch]).permutation(num_units):
        items = by_unit[starts[unit]:starts[unit] + counts[unit]]
        order.append(items[np.random.default_rng([seed, epoch, int(unit)]).permutation(len(items))])
    return np.concatenate(order) if order else np.zeros(0, dtype=np.int64)


def consumer_slice(order: np.ndarray, consumer: int, consumers: int) -> np.ndarray:
    """Consumer ``consumer``'s items: the ``consumer``-th of ``consumers`` equal contiguous slices of ``order``.

    Raises:
        ConfigError: when there are fewer items than consumers (a slice would be empty).
    """
    share = len(order) // consumers
    if share == 0:
        raise ConfigError(f"{len(order)} items cannot be streamed to {consumers} consumers (nodes x loader workers); "
                          "use fewer --workers or processes, or --no-stream")
    return order[consumer * share:(consumer + 1) * share]


class StreamedViews(IterableDataset):
    """The items of a :class:`CachedViewDataset` over a wds cache, streamed shard by shard in batches (module
    docstring: the rules). Set the epoch with :meth:`set_epoch` before iterating."""

    def __init__(self, dataset: CachedViewDataset, batch_size: int, rank: int, world_size: int, workers: int,
                 seed: int) -> None:
        if not hasattr(dataset.reader, "stream_rows"):
            fmt = dataset.reader.manifest["storage"]["format"]
            raise ConfigError(f"--stream reads the tar shards of a wds cache; this cache is {fmt}: train without "
                              "--stream, or convert it (`featcache convert SRC DST --format wds`)")
        if dataset.fresh_views:
            raise ConfigError("--stream reads cached views; --fresh-views draws new ones: pass --no-stream")
        self.dataset, self.batch_size = dataset, batch_size
        self.rank, self.world_size, self.workers, self.seed = rank, world_size, max(workers, 1), seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(epoch)

    def slice_len(self) -> int:
        return len(self.dataset) // (self.world_size * self.workers)

    def __len__(self) -> int:
        """Batches this rank runs per epoch (every rank the same)."""
        return self.workers * math.ceil(self.slice_len() / self.batch_size)

    def items(self, consumer: int) -> np.ndarray:
        """Consumer ``consumer``'s items for the current epoch, in stream order."""
        ds = self.dataset
        rows = np.asarray([ds.row_of(i) for i in range(len(ds))], dtype=np.int64)
        units = rows // ds.reader.manifest.shard_size
        order = epoch_order(units, ds.reader.manifest.num_units, self.seed, self.epoch)
        return consumer_slice(order, consumer, self.world_size * self.workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        items = self.items(self.rank * self.workers + worker)
        for batch in _batched(self._stream(items), self.batch_size):
            yield default_collate(batch)

    def _stream(self, items: np.ndarray) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        shard_size = ds.reader.manifest.shard_size
        rows = {int(i): ds.row_of(int(i)) for i in items}
        for unit, run in itertools.groupby(items.tolist(), key=lambda i: rows[i] // shard_size):
            run = list(run)
            wanted = {rows[i] for i in run}
            stored = dict(ds.reader.stream_rows(unit, ds.stored, wanted)) if ds.stored else {}
            for index in run:
                yield ds.item(index, rows[index], stored.get(rows[index]) if ds.stored else None)


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


class DeviceLoader:
    """A stream's DataLoader as the training loop uses a prepared one: batches on ``device``, ``set_epoch``,
    ``len``, and :meth:`skip` for a resume mid-epoch (the skipped batches are read and dropped)."""

    def __init__(self, loader: DataLoader, device: torch.device, skip_batches: int = 0) -> None:
        self.loader, self.device, self.skip_batches = loader, device, skip_batches

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.dataset.set_epoch(epoch)

    def skip(self, batches: int) -> "DeviceLoader":
        return DeviceLoader(self.loader, self.device, batches)

    def __iter__(self) -> Iterator[Any]:
        from accelerate.utils import send_to_device

        for batch in itertools.islice(self.loader, self.skip_batches, None):
            yield send_to_device(batch, self.device, non_blocking=True)
