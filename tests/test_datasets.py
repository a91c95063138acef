"""Stage-2 datasets: view policies, deterministic order, replay + fingerprint checks, labels, evaluation folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from featcache.testing.images import make_image_folder, random_image
from featcache.testing.caches import make_cache

from featcache.sources import open_source, source_from_manifest
from featcache.datasets import (CachedViewDataset, EvalDataset, ReplayDriftError, choose_view,
                               environment_drift, labelled_mask)
from featcache.errors import ConfigError, DecodeError
from featcache.stores.base import open_reader
from featcache.views import Recipe, fingerprint


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    data = make_image_folder(root / "data", classes=3, per_class=3)
    (data / "class_1" / "img_9.png").write_bytes(b"not an image")  # skipped at extraction: its views are invalid
    _, path = make_cache(root, views=3, shots=None, skip_corrupt=True, teacher_kwargs={"depth": 2}, layers=[0, 1])
    return {"root": root, "data": data, "cache": path}


def dataset(cache, **kw) -> CachedViewDataset:
    reader = open_reader(cache["cache"])
    m = reader.manifest
    args = dict(targets=["block_1", "logits"], fingerprint_checks=0)
    args.update(kw)
    return CachedViewDataset(reader, source_from_manifest(m), Recipe.from_dict(m["views"]["recipe"]), **args)


def test_cycle_policy_uses_every_valid_view_once_per_cycle():
    valid = [3, 4, 5]
    for sample in range(6):
        seen = [choose_view("cycle", valid, epoch, sample, seed=0) for epoch in range(6)]
        assert sorted(seen[:3]) == valid and seen[3:] == seen[:3]
    firsts = {choose_view("cycle", valid, 0, s, seed=0) for s in range(20)}
    assert len(firsts) > 1, "samples should start at different views"


def test_random_policy_is_a_function_of_seed_epoch_and_sample():
    valid = [0, 1, 2, 3]
    draws = [choose_view("random", valid, e, 7, seed=1) for e in range(40)]
    assert draws == [choose_view("random", valid, e, 7, seed=1) for e in range(40)]
    assert set(draws) == set(valid)
    with pytest.raises(ValueError, match="cycle, random"):
        choose_view("sometimes", valid, 0, 0, 0)


def test_label_shots_keeps_the_first_samples_of_each_class():
    keep = labelled_mask([0, 0, 0, 1, 1, 2], label_shots=2)
    assert keep.tolist() == [True, True, False, True, True, True]
    assert labelled_mask([0, 1], None).all()


def test_items_replay_the_stored_view_with_its_targets(cache):
    ds = dataset(cache, label_shots=1)
    reader = open_reader(cache["cache"])
    records = reader.records()
    assert len(records["valid"]) == 30 and records["valid"].sum() == 27
    assert len(ds) == 9, "the corrupt image's sample has no valid view and is dropped"
    for epoch in range(2):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            row = item["row"]
            assert records["valid"][row] == 1 and row // 3 == item["sample"]
            assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 32, 32)
            assert fingerprint(item["image"]) == int(records["fingerprint"][row])
            stored = reader.read_row(row, ["logits"])["logits"]
            assert np.array_equal(item["targets"]["logits"].numpy(), stored)
    labels = [ds[i]["label"] for i in range(len(ds))]
    assert labels.count(-1) == len(ds) - 3 and sorted(x for x in labels if x >= 0) == [0, 1, 2]


def test_labelled_only_repeats_the_labelled_samples_to_a_full_epoch_with_the_next_view_each_pass(cache):
    everything, only = dataset(cache, label_shots=1), dataset(cache, label_shots=1, labelled_only=True)
    assert len(only) == len(everything) == 9, "an epoch keeps its length, so a run keeps its steps"
    labelled = {everything[i]["sample"] for i in range(len(everything)) if everything[i]["label"] >= 0}
    items = [only[i] for i in range(len(only))]
    assert {it["sample"] for it in items} == labelled and all(it["label"] >= 0 for it in items)
    assert only.passes == 3
    for sample in labelled:  # 3 passes over 3 valid views (cycle policy): each pass takes the next view
        rows = [it["row"] for it in items if it["sample"] == sample]
        assert len(rows) == 3 and len(set(rows)) == 3
    only.set_epoch(1)
    assert only.row_of(0) == choose_view("cycle", only.rows_of(0), 1 * 3 + 0, int(only.samples[0]), seed=0)
    with pytest.raises(ConfigError, match="no sample of the cache is labelled"):
        dataset(cache, label_shots=0, labelled_only=True)


def test_the_labelled_stream_serves_labelled_samples_pass_by_pass_with_labelled_only_views(cache):
    ds, only = dataset(cache, label_shots=1, labelled_items=7), dataset(cache, label_shots=1, labelled_only=True)
    assert len(ds) == 9 + 7 and ds.epoch_items == 9
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        only.set_epoch(epoch)
        stream = [ds[9 + r] for r in range(7)]  # 3 labelled samples: passes of 3, 3 and 1 items
        assert all(it["label"] >= 0 for it in stream)
        assert [it["sample"] for it in stream[:3]] == [it["sample"] for it in stream[3:6]]
        assert len({it["sample"] for it in stream[:3]}) == 3
        for r, it in enumerate(stream):  # pass p of epoch e takes the view of epoch e * passes + p, as --labelled-only
            position = int(ds.labelled_positions[r % 3])
            view_epoch = epoch * 3 + r // 3
            assert it["row"] == choose_view("cycle", ds.rows_of(position), view_epoch, it["sample"], seed=0)
        assert {it["row"] for it in stream[:6]} <= {only[i]["row"] for i in range(len(only))}
    with pytest.raises(ConfigError, match="--labelled-batch: no sample of the cache is labelled"):
        dataset(cache, label_shots=0, labelled_items=2)
    with pytest.raises(ValueError, match="labelled_only already serves"):
        dataset(cache, label_shots=1, labelled_only=True, labelled_items=2)


def test_online_items_carry_no_targets(cache):
    item = dataset(cache, with_targets=False)[0]
    assert "targets" not in item and item["image"].shape == (3, 32, 32)


def test_an_image_changed_on_disk_stops_training_with_the_file_named(cache, tmp_path):
    import shutil

    data = tmp_path / "copy"
    shutil.copytree(cache["data"], data)
    random_image(np.random.default_rng(99), (40, 48)).save(data / "class_0" / "img_0.png")
    reader = open_reader(cache["cache"])
    m = reader.manifest
    ds = CachedViewDataset(reader, source_from_manifest(m, root=data), Recipe.from_dict(m["views"]["recipe"]), [],
                           fingerprint_checks=100)
    with pytest.raises(ReplayDriftError, match=r"img_0\.png.*changed on disk"):
        for i in range(len(ds)):
            ds[i]
    ds.fingerprint_checks = 0
    ds.set_epoch(0)
    ds[0]  # unchecked items replay without complaint


def test_eval_dataset_center_crops_and_maps_labels_by_class_name(tmp_path):
    val = make_image_folder(tmp_path / "val", classes=2, per_class=1, size=(50, 40))
    ds = EvalDataset(open_source(val), 32, ["class_9", "class_1", "class_0"])
    items = [ds[i] for i in range(len(ds))]
    assert [it["label"] for it in items] == [2, 1]
    assert items[0]["image"].shape == (3, 32, 32) and items[0]["image"].dtype == torch.uint8
    assert torch.equal(items[0]["image"], ds[0]["image"])
    with pytest.raises(ValueError, match="class_1"):
        EvalDataset(open_source(val), 32, ["class_0"])


# ------------------------------------------------------------------------------------------- replay drift (issue 10)


def _changed_copy(cache, tmp_path, relpath="class_2/img_1.png"):
    """A copy of the cache's images with one file replaced by another picture."""
    import shutil

    data = tmp_path / "copy"
    shutil.copytree(cache["data"], data)
    random_image(np.random.default_rng(99), (40, 48)).save(data / relpath)
    return data


def _on(cache, data, **kw) -> CachedViewDataset:
    reader = open_reader(cache["cache"])
    m = reader.manifest
    return CachedViewDataset(reader, source_from_manifest(m, root=data), Recipe.from_dict(m["views"]["recipe"]), [],
                             **kw)


def _train_options() -> set[str]:
    import dataclasses

    from featcache.config import TrainConfig

    return {"--" + f.metadata.get("option", f.name).replace("_", "-") for f in dataclasses.fields(TrainConfig)}


def _options_in(message: str) -> set[str]:
    import re

    return set(re.findall(r"--[a-z][a-z-]+", message))


def test_every_replayed_item_is_checked_by_default(cache, tmp_path):
    data = _changed_copy(cache, tmp_path)
    ds = _on(cache, data)
    index = next(i for i in range(len(ds)) if ds.source.items[ds.samples[i]].relpath == "class_2/img_1.png")
    for epoch in range(3):  # whichever view the epoch uses, and whatever a sample would have drawn
        ds.set_epoch(epoch)
        assert ds.checked is None
        with pytest.raises(ReplayDriftError) as info:
            ds[index]
        message = str(info.value)
        assert str(data / "class_2" / "img_1.png") in message and f"cache row {ds.row_of(index)}" in message
        assert "Likely cause: the image file changed on disk" in message and "\n" not in message
        assert _options_in(message) <= _train_options(), "the message suggests options train lacks"
    for i in range(len(ds)):
        if i != index:
            ds[i]  # the unchanged files replay exactly


def test_fingerprint_checks_samples_a_seeded_subset(cache):
    ds = dataset(cache, fingerprint_checks=3)
    first = ds.checked
    assert len(first) == 3 and first <= set(range(len(ds)))
    ds.set_epoch(1)
    assert len(ds.checked) == 3 and ds.checked != first
    ds.set_epoch(0)
    assert ds.checked == first
    assert dataset(cache, fingerprint_checks=0).checked == set()
    assert dataset(cache, fingerprint_checks=len(ds) + 5).checked is None
    with pytest.raises(ConfigError, match="--fingerprint-checks"):
        dataset(cache, fingerprint_checks=-1)


def test_drift_after_a_library_change_names_the_versions(cache, tmp_path):
    ds = _on(cache, _changed_copy(cache, tmp_path))
    ds.drift = environment_drift({"torch": "0.0.1", "numpy": np.__version__})
    with pytest.raises(ReplayDriftError, match=r"libraries that resample the view changed \(torch 0\.0\.1 at "):
        for i in range(len(ds)):
            ds[i]


def test_an_image_that_no_longer_decodes_names_the_row_not_extract_options(cache, tmp_path):
    data = _changed_copy(cache, tmp_path)
    (data / "class_0" / "img_2.png").write_bytes(b"")
    ds = _on(cache, data)
    index = next(i for i in range(len(ds)) if ds.source.items[ds.samples[i]].relpath == "class_0/img_2.png")
    with pytest.raises(DecodeError) as info:
        ds[index]
    message = str(info.value)
    assert "img_2.png: the file is empty" in message and f"cache row {ds.row_of(index)}" in message
    assert _options_in(message) <= _train_options() and "--skip-corrupt" not in message


@pytest.mark.parametrize("fault", ["drift", "decode"])
def test_errors_raised_in_a_dataloader_worker_reach_the_caller_as_one_line(cache, tmp_path, fault):
    from torch.utils.data import DataLoader

    data = _changed_copy(cache, tmp_path)
    if fault == "decode":
        (data / "class_2" / "img_1.png").write_bytes(b"")
    expected = ReplayDriftError if fault == "drift" else DecodeError
    try:
        for _ in DataLoader(_on(cache, data), batch_size=4, num_workers=1):
            pass
    except expected as err:  # not pytest.raises: its traceback would keep the loader's worker alive
        message = str(err)
    else:
        pytest.fail(f"no {expected.__name__}")
    assert "\n" not in message and "Traceback" not in message and "worker" not in message
    assert "class_2/img_1.png" in message and "cache row" in message


@pytest.mark.slow
@pytest.mark.usefixtures("clean_accelerate")
def test_train_stops_on_drift_with_one_line(cache, tmp_path):
    import json

    from click.testing import CliRunner

    from featcache.cli import main

    data = _changed_copy(cache, tmp_path)
    result = CliRunner().invoke(main, [
        "train", "--cache", cache["cache"], "--data", str(data), "--out", str(tmp_path / "run"), "--method", "kd",
        "--student", "deit_tiny", "--student-kwargs", json.dumps({"depth": 1}), "--no-pretrained", "--img-size",
        "32", "--epochs", "1", "--batch-size", "4", "--workers", "1"])
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "Traceback" not in result.output, result.output
    assert error[0].startswith("Error: replayed view of sample") and "class_2/img_1.png" in error[0]


def test_eval_folder_decode_errors_name_the_val_fix(tmp_path):
    val = make_image_folder(tmp_path / "val", classes=1, per_class=2)
    (val / "class_0" / "img_1.png").write_bytes(b"")
    ds = EvalDataset(open_source(val), 32, ["class_0"])
    with pytest.raises(DecodeError, match=r"img_1\.png: the file is empty.*--val folder") as info:
        ds[1]
    assert "--skip-corrupt" not in str(info.value)


def test_keep_decoded_decodes_each_image_once_and_replays_the_same_views(cache):
    plain, kept = dataset(cache, label_shots=1), dataset(cache, label_shots=1, keep_decoded=True)
    loads = []
    load = kept.source.load
    kept.source.load = lambda i: loads.append(i) or load(i)
    for epoch in range(2):
        plain.set_epoch(epoch)
        kept.set_epoch(epoch)
        for i in range(len(kept)):
            a, b = plain[i], kept[i]
            assert a["row"] == b["row"] and torch.equal(a["image"], b["image"])
    assert sorted(loads) == sorted(set(kept.samples)), "every source image decoded once over two epochs"
    import pickle

    assert len(kept.decoded) == len(set(kept.samples))
    kept.source.load = load  # the counting stand-in is not picklable
    shipped = pickle.loads(pickle.dumps(kept))  # what a DataLoader worker receives: no decoded images
    assert shipped.decoded == {} and torch.equal(shipped[0]["image"], kept[0]["image"])
