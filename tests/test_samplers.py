"""Stage-2 batch orders: functions of (seed, epoch) only; the labelled batch of every step (--labelled-batch)."""
from __future__ import annotations

import pytest

from featcache.samplers import EpochSampler, LabelledBatchSampler


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    s = EpochSampler(10, seed=5)
    s.set_epoch(2)
    order = list(s)
    assert sorted(order) == list(range(10))
    again = EpochSampler(10, seed=5)
    again.set_epoch(2)
    assert list(again) == order
    again.set_epoch(3)
    assert list(again) != order


def epoch_batches(sampler: LabelledBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_every_batch_adds_its_labelled_items_to_the_epochs_order():
    n, batch, per_batch, group = 23, 5, 3, 4
    sampler = LabelledBatchSampler(n, batch, per_batch, group, seed=1)
    assert len(sampler) == 5 and sampler.batch_size == 8, "steps are those of the 23 items alone; full batch 5 + 3"
    assert LabelledBatchSampler.labelled_items(n, batch, per_batch) == 15
    plain = EpochSampler(n, seed=1)
    plain.set_epoch(2)
    batches = epoch_batches(sampler, 2)
    main = [i for b in batches for i in b if i < n]
    assert main == list(plain), "the epoch's items come in EpochSampler's order, each once"
    assert [len([i for i in b if i >= n]) for b in batches] == [3] * 5
    assert [len([i for i in b if i < n]) for b in batches] == [5, 5, 5, 5, 3]
    stream = [i - n for b in batches for i in b if i >= n]
    assert stream == sorted(stream, key=lambda r: r // group), "pass by pass"
    passes = [[r % group for r in stream[p:p + group]] for p in range(0, 12, group)]  # the 3 full passes of 15
    assert all(sorted(x) == [0, 1, 2, 3] for x in passes), "each pass holds every labelled sample once"
    assert len({tuple(x) for x in passes}) > 1, "each pass is shuffled on its own"
    assert [r // group for r in stream[12:]] == [3, 3, 3], "the last pass is cut at the epoch's 15 items"


def test_the_labelled_order_is_a_function_of_seed_and_epoch():
    a, b = LabelledBatchSampler(30, 4, 2, 5, seed=0), LabelledBatchSampler(30, 4, 2, 5, seed=0)
    assert epoch_batches(a, 3) == epoch_batches(b, 3)
    assert epoch_batches(a, 4) != epoch_batches(b, 3)
    assert epoch_batches(LabelledBatchSampler(30, 4, 2, 5, seed=1), 3) != epoch_batches(b, 3)


def test_sizes_must_be_positive():
    with pytest.raises(ValueError, match="per_batch=0"):
        LabelledBatchSampler(10, 4, 0, 2)
