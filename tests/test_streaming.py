"""Streaming a wds cache for training: seeded shard order, equal disjoint slices per node x worker, and the same
(sample, view) pairs and targets as random access in every epoch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from featcache.build import use_stream
from featcache.config import TrainConfig
from featcache.datasets import CachedViewDataset
from featcache.errors import ConfigError
from featcache.sources import source_from_manifest
from featcache.stores import open_reader
from featcache.streaming import StreamedViews, consumer_slice, epoch_order
from featcache.testing.caches import make_cache
from featcache.views import Recipe


def test_epoch_order_is_seeded_per_epoch_and_keeps_shards_together():
    units = np.repeat(np.arange(5), 4)  # 20 items, 4 per shard
    a, b = epoch_order(units, 5, seed=1, epoch=0), epoch_order(units, 5, seed=1, epoch=1)
    assert sorted(a.tolist()) == list(range(20)) and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, epoch_order(units, 5, seed=1, epoch=0))
    runs = [units[i] for i in a[::4]]  # shard by shard: each shard's 4 items are consecutive
    assert all(len(set(units[a[i:i + 4]])) == 1 for i in range(0, 20, 4)) and len(set(runs)) == 5


@pytest.mark.parametrize("items, consumers", [(20, 3), (7, 7), (100, 8)])
def test_consumer_slices_are_equal_disjoint_and_drop_less_than_one_per_consumer(items, consumers):
    order = np.random.default_rng(0).permutation(items)
    slices = [consumer_slice(order, c, consumers) for c in range(consumers)]
    assert len({len(s) for s in slices}) == 1
    got = np.concatenate(slices)
    assert len(set(got.tolist())) == len(got) and items - len(got) < consumers


def test_more_consumers_than_items_is_refused():
    with pytest.raises(ConfigError, match="cannot be streamed to 5 consumers"):
        consumer_slice(np.arange(4), 0, 5)


@pytest.fixture(scope="module")
def wds_dataset(tmp_path_factory):
    _, path = make_cache(tmp_path_factory.mktemp("stream"), format="wds", shard_size=3)
    reader = open_reader(path)
    m = reader.manifest
    return CachedViewDataset(reader, source_from_manifest(m), Recipe.from_dict(m["views"]["recipe"]), ["logits"],
                             seed=5)


@pytest.mark.parametrize("world_size, workers", [(1, 1), (2, 1), (2, 3)])
def test_a_stream_epoch_holds_the_pairs_and_targets_of_random_access(wds_dataset, world_size, workers):
    ds = wds_dataset
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        expected = {int(ds.samples[i]): ds.row_of(i) for i in range(len(ds))}
        seen, per_consumer = {}, []
        for rank in range(world_size):
            stream = StreamedViews(ds, batch_size=2, rank=rank, world_size=world_size, workers=workers, seed=5)
            stream.set_epoch(epoch)
            for worker in range(workers):
                items = stream.items(rank * workers + worker)
                per_consumer.append(len(items))
                for item in stream._stream(items):
                    assert item["sample"] not in seen  # no two consumers take the same item
                    seen[item["sample"]] = item["row"]
                    assert item["row"] == expected[item["sample"]]  # the view policy's choice for this epoch
                    assert torch.equal(item["targets"]["logits"], ds[list(ds.samples).index(item["sample"])]
                                       ["targets"]["logits"])
        assert len(set(per_consumer)) == 1 and len(ds) - len(seen) < world_size * workers


def test_batches_per_rank_are_what_len_says(wds_dataset):
    stream = StreamedViews(wds_dataset, batch_size=4, rank=1, world_size=2, workers=1, seed=5)
    stream.set_epoch(0)
    batches = list(stream)
    assert len(batches) == len(stream) == 1 and batches[0]["image"].shape[0] == len(wds_dataset) // 2


def test_stream_is_on_by_default_only_for_remote_wds(wds_dataset, tmp_path):
    cfg = TrainConfig(cache="c", out=str(tmp_path / "run"))
    assert use_stream(cfg, wds_dataset.reader) is False
    assert use_stream(TrainConfig(cache="c", stream=True), wds_dataset.reader) is True
    with pytest.raises(ConfigError, match="--grad-accum 2"):
        use_stream(TrainConfig(cache="c", stream=True, grad_accum=2), wds_dataset.reader)
    for flag, kw in (("--labelled-only", {"labelled_only": True}), ("--labelled-batch", {"labelled_batch": 4})):
        with pytest.raises(ConfigError, match=f"cannot serve the labelled samples on their own; pass --no-stream "
                                              f"with {flag}"):
            use_stream(TrainConfig(cache="c", stream=True, label_shots=1, **kw), wds_dataset.reader)
