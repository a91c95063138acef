"""Streaming a wds cache: whole tar shards split over nodes x DataLoader workers, as a torch ``IterableDataset``.

Kept apart from :mod:`~featcache.stores.wds_store` so that opening a store does not import torch.
"""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import CacheError
from .base import StoreReader


def split_shards(shards: list[int], rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """Shards of one consumer (node ``rank`` x DataLoader ``worker``): every consumer gets a disjoint share.

    Raises:
        CacheError: when there are fewer shards than consumers (some would get nothing and training would
            silently see a different number of steps per process); extract with a smaller --shard-size.
    """
    consumers = world_size * num_workers
    if len(shards) < consumers:
        raise CacheError(f"{len(shards)} shards cannot feed {world_size} node(s) x {num_workers} worker(s); use fewer "
                         "workers or re-write the cache with a smaller --shard-size (`featcache convert`)")
    return shards[rank * num_workers + worker::consumers]


class WdsStream(IterableDataset):
    """Streams a wds cache; hand-rolled instead of ``webdataset.split_by_node``/``split_by_worker`` so that a
    shortage of shards fails loudly and only :data:`~featcache.stores.wds_store.DECODERS` ever decode a member."""

    def __init__(self, reader: StoreReader, names: list[str] | None, rank: int, world_size: int,
                 shuffle_shards: bool, seed: int):
        self.reader, self.names, self.rank, self.world_size = reader, names, rank, world_size
        self.shuffle_shards, self.seed, self.epoch = shuffle_shards, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the shard order (``shuffle_shards``) for ``epoch``, identically on every consumer."""
        self.epoch = epoch

    def shards(self) -> list[int]:
        """This consumer's shards for the current epoch."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = list(range(self.reader.manifest.num_units))
        if self.shuffle_shards:  # same order on every consumer, so the split stays disjoint
            random.Random(self.seed * 100003 + self.epoch).shuffle(shards)
        return split_shards(shards, self.rank, self.world_size, worker, workers)

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for unit in self.shards():
            yield from self.reader.iter_unit(unit, self.names)
