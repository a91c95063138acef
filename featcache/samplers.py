"""Batch orders of stage 2: pure functions of ``(seed, epoch)``, so a resumed run replays the same batches.

Hand-rolled because torch's ``RandomSampler`` draws from a generator whose state would have to be saved mid-epoch;
here the order of an epoch is computed from its number, set with ``set_epoch`` before the epoch starts. Accelerate
shards either sampler over processes by whole batches (``BatchSamplerShard``) and skips the batches a resumed run
has done (``skip_first_batches``).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

#: Mixed into the seed of the labelled stream's order, so that it is not the main order's prefix.
_LABELLED_STREAM = 0x1AB


def epoch_order(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of an epoch's items: a function of ``(seed, epoch)`` only."""
    return np.random.default_rng([seed, epoch]).permutation(num_items)


class EpochSampler(Sampler[int]):
    """A shuffled order of ``num_items`` items that depends on ``(seed, epoch)`` only."""

    def __init__(self, num_items: int, seed: int = 0):
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.num_items, self.seed, self.epoch).tolist())


class LabelledBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` items of the epoch's shuffled order plus ``per_batch`` items of a labelled stream.

    FixMatch's batch composition (Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
    Confidence", NeurIPS 2020; official code ``google-research/fixmatch``): every step sees a labelled batch next to
    the unlabelled one, so a run with a few labels per class meets its labels in every step instead of in about one
    batch per epoch. Items ``0 .. num_items - 1`` are the epoch's items over all samples (each once, shuffled, as
    :class:`EpochSampler` orders them); items ``num_items ..`` are the labelled stream, whose item ``num_items + r``
    is pass ``r // group`` over the ``group`` labelled samples (the dataset maps them,
    :meth:`featcache.datasets.CachedViewDataset.locate`). Each pass is shuffled on its own, so no labelled sample
    comes back before every other one has been seen in that pass.

    The number of batches, hence of optimizer steps, is that of the epoch's items alone: ``ceil(num_items /
    batch_size)``; the labelled stream holds ``per_batch`` items for each of them (:meth:`labelled_items`).
    """

    def __init__(self, num_items: int, batch_size: int, per_batch: int, group: int, seed: int = 0):
        if min(num_items, batch_size, per_batch, group) < 1:
            raise ValueError(f"LabelledBatchSampler needs positive sizes, got num_items={num_items}, "
                             f"batch_size={batch_size}, per_batch={per_batch}, group={group}")
        self.num_items, self.per_batch, self.group, self.seed = num_items, per_batch, group, seed
        self.batch_size = batch_size + per_batch  # what Accelerate's BatchSamplerShard reads as a full batch
        self.drop_last = False
        self.epoch = 0
        self._epoch_batch = batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.num_items // self._epoch_batch)

    @staticmethod
    def labelled_items(num_items: int, batch_size: int, per_batch: int) -> int:
        """Items of the labelled stream in one epoch: ``per_batch`` for each of its batches."""
        return -(-num_items // batch_size) * per_batch

    def labelled_order(self) -> np.ndarray:
        """The labelled stream's items of this epoch, pass by pass, each pass shuffled."""
        count = len(self) * self.per_batch
        rng = np.random.default_rng([self.seed, self.epoch, _LABELLED_STREAM])
        passes = -(-count // self.group)
        order = np.concatenate([p * self.group + rng.permutation(self.group) for p in range(passes)])
        return self.num_items + order[:count]

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.num_items, self.seed, self.epoch)  # EpochSampler's order, batch by batch
        labelled = self.labelled_order()
        b, m = self._epoch_batch, self.per_batch
        for j in range(len(self)):
            yield order[j * b:(j + 1) * b].tolist() + labelled[j * m:(j + 1) * m].tolist()
