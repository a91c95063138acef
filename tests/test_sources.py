"""Tests for featcache.sources: folder/wds discovery, subsets, safety, decode errors, manifest round-trip, pickling."""
import io
import json
import pickle
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from featcache.testing.images import make_image_folder, make_wds_shards, random_image
from PIL import Image, ImageFile

from featcache.sources import (ImageDecodeError, SourceItem, file_list_sha256, open_source, select_subset,
                            source_from_manifest, source_manifest_entry)
from featcache.errors import CacheError


def _pil_tensor(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png_bytes(seed=0):
    buf = io.BytesIO()
    random_image(np.random.default_rng(seed), (12, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_discovery(tmp_path):
    root = make_image_folder(tmp_path / "imgs", classes=3, per_class=4, size=(40, 48))
    (root / "class_1" / "notes.txt").write_text("not an image")
    (root / "class_2" / "extra").mkdir()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(root / "class_2" / "extra" / "UPPER.JPEG")
    (root / ".hidden").mkdir()
    src = open_source(root)
    assert src.kind == "folder" and src.classes == ["class_0", "class_1", "class_2"]
    assert len(src) == 13 and src.labels == [0] * 4 + [1] * 4 + [2] * 5
    assert src.items[0] == SourceItem("class_0/img_0.png", 0)
    assert "class_2/extra/UPPER.JPEG" in [it.relpath for it in src.items]
    img = src.load(0)
    assert img.dtype == torch.uint8 and img.shape == (3, 40, 48)
    assert torch.equal(img, _pil_tensor(root / "class_0" / "img_0.png"))
    assert src.load(len(src) - 5 + 4).shape[0] == 3


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(tmp_path / "missing", kind="folder")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        open_source(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown data format"):
        open_source(tmp_path, kind="lmdb")


def test_subset_counts_and_determinism():
    items = [SourceItem(f"c{c}/{j}.png", c) for c in range(4) for j in range(10 + c)]
    assert select_subset(items) == list(range(len(items)))
    a = select_subset(items, shots=3, seed=5)
    assert a == select_subset(list(items), shots=3, seed=5)
    assert a != select_subset(items, shots=3, seed=6)
    assert Counter(items[i].label for i in a) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert a == sorted(a, key=lambda i: (items[i].label, i))
    assert len(select_subset(items, shots=100)) == len(items)
    f = select_subset(items, fraction=0.25, seed=1)
    assert Counter(items[i].label for i in f) == {0: 2, 1: 2, 2: 3, 3: 3}
    assert Counter(items[i].label for i in select_subset(items, fraction=0.01)) == {c: 1 for c in range(4)}
    # Labels need not be contiguous or grouped; subsets of the shuffled list pick the same files.
    shuffled = [items[i] for i in np.random.default_rng(0).permutation(len(items))]
    assert len(select_subset(shuffled, shots=2, seed=0)) == 8
    for bad in (dict(shots=0), dict(fraction=0.0), dict(fraction=1.5), dict(shots=1, fraction=0.5)):
        with pytest.raises(ValueError):
            select_subset(items, **bad)


def test_subset_per_class_permutation_rule():
    items = [SourceItem(f"{c}/{j}", c) for c in range(2) for j in range(5)]
    rng = np.random.default_rng(9)
    expected = sorted(rng.permutation(5)[:2].tolist()) + sorted((5 + rng.permutation(5)[:2]).tolist())
    assert select_subset(items, shots=2, seed=9) == expected


def test_file_list_sha256():
    items = [SourceItem("a/1.png", 0), SourceItem("b/2.png", 1)]
    h = file_list_sha256(items)
    assert len(h) == 64 and h == file_list_sha256(list(items))
    assert h != file_list_sha256(items[::-1])
    assert h != file_list_sha256([SourceItem("a/1.png", 0), SourceItem("b/2.png", 0)])


def test_wds_index_load_label(tmp_path):
    root = make_wds_shards(tmp_path / "shards", classes=3, per_class=4, per_shard=5)
    src = open_source(root)
    assert src.kind == "wds" and src.classes == ["0", "1", "2"] and len(src) == 12
    assert src.labels == [0] * 4 + [1] * 4 + [2] * 4
    assert src.items[6].relpath == "shard-000001.tar#s000006.png"
    with tarfile.open(root / "shard-000001.tar") as tar:
        expected = np.asarray(Image.open(tar.extractfile("s000006.png")).convert("RGB")).copy()
    assert torch.equal(src.load(6), torch.from_numpy(expected).permute(2, 0, 1))
    # Brace patterns and explicit lists give the same items; a fresh (pickled) source rebuilds its index lazily.
    brace = open_source(str(root / "shard-{000000..000002}.tar"))
    listed = open_source([str(p) for p in sorted(root.glob("*.tar"))])
    assert brace.items == listed.items == src.items
    fresh = pickle.loads(pickle.dumps(src))
    assert fresh._index == {} and torch.equal(fresh.load(11), src.load(11))


def test_wds_class_names_file(tmp_path):
    root = make_wds_shards(tmp_path / "s", classes=2, per_class=2)
    (root / "classes.json").write_text(json.dumps(["cat", "dog"]))
    assert open_source(root).classes == ["cat", "dog"]
    (root / "classes.txt").write_text("only_one\n")
    with pytest.raises(ValueError, match="lists 1 classes"):
        open_source(root)


@pytest.mark.parametrize("bad", ["../evil.png", "/abs/evil.png", "a/../../evil.png"])
def test_wds_unsafe_member_refused(tmp_path, bad):
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "ok.png", _png_bytes())
        _add(tar, "ok.cls", b"0")
        _add(tar, bad, _png_bytes(1))
    with pytest.raises(CacheError, match="unsafe path"):
        open_source(tmp_path)


def test_wds_whole_extension_and_first_image(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        _add(tar, "k.seg.png", _png_bytes(5))  # a mask of sample k, not its image
        _add(tar, "k.png", _png_bytes(1))
        _add(tar, "k.jpg", _png_bytes(2))  # a second image of the same key: the first one wins
        _add(tar, "k.cls", b"4")
        _add(tar, "dir/m.webp", _png_bytes(3))
        _add(tar, "dir/m.cls", b" 1\n")
    src = open_source(tmp_path)
    assert [(it.relpath, it.label) for it in src.items] == [("a.tar#k.png", 4), ("a.tar#dir/m.webp", 1)]
    assert src.classes == ["0", "1", "2", "3", "4"]
    assert src.load(1).shape == (3, 12, 10)


def test_wds_missing_label_and_bad_label(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        _add(tar, "x.png", _png_bytes())
    with pytest.raises(ValueError, match="without a .cls"):
        open_source(tmp_path / "a.tar")
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        _add(tar, "x.png", _png_bytes())
        _add(tar, "x.cls", b"cat")
    with pytest.raises(ValueError, match="ASCII integer"):
        open_source(tmp_path / "b.tar")


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image_error_names_file(tmp_path, ext, monkeypatch):
    root = make_image_folder(tmp_path / "imgs", classes=2, per_class=2, size=(64, 64), ext=ext)
    bad = root / "class_1" / f"img_0.{ext}"
    _truncate(bad)
    src = open_source(root)
    i = [it.relpath for it in src.items].index(f"class_1/img_0.{ext}")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # a library set it; we must still refuse
    with pytest.raises(ImageDecodeError, match=str(bad)) as info:
        src.load(i)
    assert info.value.relpath == f"class_1/img_0.{ext}" and info.value.path == str(bad)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    src.load(0)


def test_corrupt_and_missing_image_errors(tmp_path):
    root = make_image_folder(tmp_path / "imgs", classes=1, per_class=2)
    (root / "class_0" / "img_1.png").write_bytes(b"definitely not a png")
    src = open_source(root)
    with pytest.raises(ImageDecodeError, match="class_0/img_1.png"):
        src.load(1)
    (root / "class_0" / "img_0.png").unlink()
    with pytest.raises(ImageDecodeError, match="img_0.png"):
        src.load(0)


def test_corrupt_wds_member_names_shard_and_member(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        _add(tar, "a.png", _png_bytes()[:60])
        _add(tar, "a.cls", b"0")
    with pytest.raises(ImageDecodeError, match=r"s\.tar#a\.png"):
        open_source(tmp_path).load(0)


@pytest.mark.parametrize("kind", ["folder", "wds"])
def test_manifest_round_trip_and_moved_root(tmp_path, kind):
    maker = make_image_folder if kind == "folder" else make_wds_shards
    root = maker(tmp_path / "data", classes=3, per_class=5)
    src = open_source(root)
    idx = select_subset(src.items, shots=2, seed=3)
    entry = json.loads(json.dumps(source_manifest_entry(src, idx)))
    assert entry["kind"] == kind and entry["num_files"] == 15 and len(entry["sources"]) == 6
    back = source_from_manifest({"data": entry})
    assert back.items == [src.items[i] for i in idx] and back.classes == src.classes
    ref = back.load(3)
    assert torch.equal(ref, src.load(idx[3]))
    moved = tmp_path / "moved"
    root.rename(moved)
    with pytest.raises(FileNotFoundError, match="--data"):
        source_from_manifest({"data": entry})
    assert torch.equal(source_from_manifest({"data": entry}, root=moved).load(3), ref)


def test_manifest_tampering_refused(tmp_path):
    src = open_source(make_image_folder(tmp_path / "d", classes=2, per_class=2))
    entry = source_manifest_entry(src)
    evil = dict(entry, sources=[["../../etc/passwd", 0]] + entry["sources"][1:])
    with pytest.raises(CacheError, match="unsafe path"):
        source_from_manifest({"data": evil})
    swapped = dict(entry, sources=entry["sources"][::-1])
    with pytest.raises(CacheError, match="hash"):
        source_from_manifest({"data": swapped})


def test_source_pickles_and_is_lazy(tmp_path):
    root = make_wds_shards(tmp_path / "s", classes=2, per_class=3, per_shard=2)
    src = open_source(root)
    entry = source_manifest_entry(src)
    lazy = source_from_manifest({"data": entry})
    assert lazy._index == {}  # nothing opened yet
    for s in (src, lazy, src.subset([1, 4])):
        clone = pickle.loads(pickle.dumps(s))
        assert clone.items == s.items and clone.classes == s.classes and clone.root == s.root
        assert torch.equal(clone.load(len(clone) - 1), s.load(len(s) - 1))
    assert set(lazy._index) == {"shard-000002.tar"}  # only the shard that was read got indexed


def test_wds_written_by_webdataset_tarwriter(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"img{i:03d}", "jpg": _png_bytes(i), "cls": i % 2})
    src = open_source(str(tmp_path / "train-{000000..000000}.tar"))
    assert src.labels == [0, 1, 0, 1] and src.items[2].relpath == "train-000000.tar#img002.jpg"
    assert src.load(3).shape == (3, 12, 10)
