"""Bad inputs in the image sources end in a recorded skip or a one-line error naming the file, never in lost or
wrong data: symlinks out of an ImageFolder root and loops, 16-bit and other high-bit-depth images, extensions
Pillow can open, empty files, and WebDataset shards that are compressed, truncated, concatenated or hold links."""
from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from featcache.testing.images import make_image_folder, make_wds_shards, random_image
from PIL import Image

from featcache.cli import main
from featcache.errors import DecodeError, FeatcacheError, SourceError
from featcache.sources import IMG_EXTENSIONS, folder, open_source, source_from_manifest, source_manifest_entry

# ------------------------------------------------------------------------------------------- audited file access

_AUDIT: list[str] | None = None  # paths opened or listed while a test audits; None: not auditing


def _audit(event: str, args: tuple) -> None:
    if _AUDIT is not None and event in ("open", "os.listdir", "os.scandir") and args and args[0] is not None:
        if isinstance(args[0], (str, bytes, os.PathLike)):
            _AUDIT.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one records only while _AUDIT is a list


class audited:
    """Records the real path of every file opened and every directory listed inside the block."""

    def __enter__(self) -> list[str]:
        global _AUDIT
        _AUDIT = []
        return _AUDIT

    def __exit__(self, *exc) -> None:
        global _AUDIT
        _AUDIT = None


def _inside(path: str, root: Path) -> bool:
    root = os.path.realpath(root)
    return path == root or path.startswith(root + os.sep)


def _hostile_tree(tmp_path: Path) -> tuple[Path, Path]:
    """An ImageFolder root whose class folders hold links out of the root (files and folders), into another class,
    back to an ancestor (a loop), a broken link, and one link that stays in its class (followed)."""
    outside = make_image_folder(tmp_path / "outside", classes=1, per_class=3, seed=7)
    root = make_image_folder(tmp_path / "root", classes=2, per_class=3)
    c0, c1 = root / "class_0", root / "class_1"
    (c0 / "evil_file.png").symlink_to(outside / "class_0" / "img_0.png")
    (c0 / "evil_dir").symlink_to(outside / "class_0", target_is_directory=True)
    (c0 / "loop").symlink_to(root, target_is_directory=True)
    (c0 / "sub").mkdir()
    (c0 / "sub" / "up").symlink_to(c0, target_is_directory=True)
    (c1 / "other_class").symlink_to(c0, target_is_directory=True)
    (c1 / "alias.png").symlink_to(c1 / "img_2.png")
    (c1 / "nested").mkdir()
    random_image(np.random.default_rng(3), (20, 20)).save(c1 / "nested" / "deep.png")
    (c1 / "nested_link").symlink_to(c1 / "nested", target_is_directory=True)
    (c1 / "broken.png").symlink_to(c1 / "missing.png")
    return root, outside


def test_no_file_outside_the_root_is_ever_read(tmp_path, caplog):
    """The done-when tree: file and directory symlinks out of the root and symlink loops. Every path opened or listed
    while discovering, loading every item, and loading again from the manifest's record, is inside the root."""
    root, outside = _hostile_tree(tmp_path)
    with audited() as seen, caplog.at_level(logging.WARNING, logger="featcache.sources"):
        src = open_source(root)
        images = [src.load(i) for i in range(len(src))]
        again = source_from_manifest({"data": source_manifest_entry(src)})
        images += [again.load(i) for i in range(len(again))]
    assert seen and all(_inside(p, root) for p in seen if _inside(p, tmp_path)), "a path outside the root was read"
    assert [(it.relpath, it.label) for it in src.items] == [
        ("class_0/img_0.png", 0), ("class_0/img_1.png", 0), ("class_0/img_2.png", 0),
        ("class_1/img_0.png", 1), ("class_1/img_1.png", 1), ("class_1/img_2.png", 1), ("class_1/nested/deep.png", 1)]
    reasons = dict(src.ignored)
    assert reasons["class_0/evil_file.png"] == reasons["class_0/evil_dir"] == folder.OUTSIDE_ROOT
    assert reasons["class_0/loop"] == reasons["class_1/other_class"] == folder.OTHER_CLASS
    assert reasons["class_0/sub/up"] == folder.LOOP
    assert reasons["class_1/alias.png"] == reasons["class_1/nested_link"] == folder.SECOND_PATH
    assert reasons["class_1/broken.png"] == folder.BROKEN
    assert len(images) == 2 * len(src) and all(im.shape[0] == 3 for im in images)
    logged = caplog.text
    assert f"ignored 2 under {root} ({folder.OUTSIDE_ROOT}): class_0/evil_dir, class_0/evil_file.png" in logged
    assert folder.LOOP in logged


@pytest.mark.slow
def test_an_extraction_over_the_hostile_tree_reads_nothing_outside_the_root(tmp_path):
    from featcache.config import ExtractConfig
    from featcache.extract import run_extract
    from featcache.sources import source_from_manifest
    from featcache.stores import open_reader
    from featcache.testing.caches import CACHE_ARGS

    root, outside = _hostile_tree(tmp_path)
    cfg = ExtractConfig(data=str(root), out=str(tmp_path / "cache"), **dict(CACHE_ARGS, shots=None, layers=[0]),
                        teacher_kwargs={"depth": 1})
    with audited() as seen:
        run_extract(cfg, progress=False)
    assert seen and not [p for p in seen if _inside(p, outside)], "a file the links point at was read"
    items = source_from_manifest(open_reader(cfg.out).manifest).items
    assert len(items) == 7 and all("evil" not in it.relpath and "loop" not in it.relpath for it in items)


def test_a_link_changed_after_discovery_is_refused_at_load(tmp_path):
    root = make_image_folder(tmp_path / "root", classes=1, per_class=2)
    secret = tmp_path / "secret.png"
    random_image(np.random.default_rng(1), (8, 8)).save(secret)
    src = open_source(root)
    target = root / "class_0" / "img_1.png"
    target.unlink()
    target.symlink_to(secret)  # swapped after the scan: a manifest's tree may change the same way
    with audited() as seen, pytest.raises(DecodeError, match=r"img_1\.png.*outside the data root"):
        src.load(1)
    assert os.path.realpath(secret) not in seen


def test_a_class_folder_outside_the_root_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "root", classes=1, per_class=1)
    outside = make_image_folder(tmp_path / "outside", classes=1, per_class=1)
    (root / "class_9").symlink_to(outside / "class_0", target_is_directory=True)
    with pytest.raises(SourceError, match=r"class_9 is a symlink to .*outside the data root"):
        open_source(root)
    (root / "class_9").unlink()
    (root / "class_8").symlink_to(root / "class_0", target_is_directory=True)
    with pytest.raises(SourceError, match="two labels"):
        open_source(root)


# ------------------------------------------------------------------------------------------- pixels and extensions


def _save(root: Path, name: str, img: Image.Image, **kw) -> Path:
    path = root / "class_0" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _grey16() -> np.ndarray:
    return (np.arange(32 * 40, dtype=np.uint32).reshape(32, 40) * 51).astype(np.uint16)  # 0 .. 65229


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_grey_is_scaled_not_saturated(tmp_path, fmt):
    values = _grey16()
    _save(tmp_path, f"deep.{fmt}", Image.fromarray(values))
    img = open_source(tmp_path).load(0)
    expected = torch.from_numpy(np.round(values / 257.0).astype(np.uint8))
    assert img.shape == (3, 32, 40) and all(torch.equal(img[c], expected) for c in range(3))
    assert (img == 255).float().mean() < 0.01  # Pillow's own convert("RGB") saturates 99.6 % of these pixels


def test_16_bit_pgm_and_48_bit_png_are_scaled(tmp_path):
    values = _grey16()
    (tmp_path / "class_0").mkdir()
    (tmp_path / "class_0" / "a.pgm").write_bytes(b"P5 40 32 65535\n" + values.astype(">u2").tobytes())
    rgb = np.stack([values, 65535 - values, values // 2], axis=-1)
    (tmp_path / "class_0" / "b.png").write_bytes(_png_rgb16(rgb))
    src = open_source(tmp_path)
    assert torch.equal(src.load(0)[0], torch.from_numpy(np.round(values / 257.0).astype(np.uint8)))
    got = src.load(1).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(got - np.round(rgb / 257.0)).max() <= 1  # Pillow keeps the high byte: within 1 of exact


def _png_rgb16(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("case", ["float", "int32", "ppm48"])
def test_pixels_of_unknown_range_are_refused_naming_the_file(tmp_path, case):
    values = _grey16()
    if case == "ppm48":
        (tmp_path / "class_0").mkdir()
        path = tmp_path / "class_0" / "x.ppm"
        path.write_bytes(b"P6 40 32 65535\n" + np.stack([values] * 3, -1).astype(">u2").tobytes())
        match = "wrong byte order"
    else:
        arr = values.astype(np.float32 if case == "float" else np.int32)
        path = _save(tmp_path, "x.tif", Image.fromarray(arr))
        match = "value range is unknown"
    with pytest.raises(DecodeError, match=match) as info:
        open_source(tmp_path).load(0)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def _pillow_extensions() -> list[str]:
    return sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def test_every_extension_pillow_opens_is_read_or_listed_as_ignored(tmp_path, caplog):
    root = make_image_folder(tmp_path / "root", classes=1, per_class=1)
    for ext in _pillow_extensions() + [".txt"]:
        (root / "class_0" / f"file{ext}").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="featcache.sources"):
        src = open_source(root)
    read = {os.path.splitext(it.relpath)[1] for it in src.items}
    ignored = {os.path.splitext(p)[1]: reason for p, reason in src.ignored}
    for ext in _pillow_extensions():
        assert (ext in read) == (ext in IMG_EXTENSIONS), ext
        assert ext in read or ("Pillow registers" in ignored[ext] and f"file{ext}" in caplog.text), ext
    assert ".tiff" in read and ".tif" in read
    assert ignored[".txt"] == "not an image extension (.txt)"


def test_tiff_is_read(tmp_path):
    path = _save(tmp_path, "a.tiff", random_image(np.random.default_rng(0), (10, 12)))
    assert torch.equal(open_source(tmp_path).load(0).permute(1, 2, 0),
                       torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()))


@pytest.mark.parametrize("data, match", [(b"", r"empty \(0 bytes\)"), (b"hello", "not an image format")])
def test_empty_or_unknown_file_names_the_file_not_a_buffer(tmp_path, data, match):
    make_image_folder(tmp_path, classes=1, per_class=1)
    bad = tmp_path / "class_0" / "zero.png"
    bad.write_bytes(data)
    with pytest.raises(DecodeError, match=match) as info:
        open_source(tmp_path).load(1)
    assert str(bad) in str(info.value) and "BytesIO" not in str(info.value)


# ------------------------------------------------------------------------------------------- WebDataset shards


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    random_image(np.random.default_rng(seed), (12, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_tar_gz_beside_tar_is_refused_not_dropped(tmp_path):
    shards = make_wds_shards(tmp_path / "s", classes=2, per_class=4, per_shard=4)
    second = shards / "shard-000001.tar"
    with open(second, "rb") as src, gzip.open(shards / "shard-000001.tar.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    second.unlink()
    with pytest.raises(SourceError, match=r"shard-000001\.tar\.gz is gzip-compressed.*decompress it"):
        open_source(shards)
    (shards / "shard-000000.tar").unlink()
    with pytest.raises(SourceError, match="gzip-compressed"):  # only compressed shards: still taken for shards
        open_source(shards)
    with pytest.raises(SourceError, match="gzip-compressed"):
        open_source([str(shards / "shard-000001.tar.gz")])


def test_gzip_named_tar_is_a_clear_error(tmp_path):
    shards = make_wds_shards(tmp_path / "s", classes=1, per_class=2, per_shard=2)
    path = shards / "shard-000000.tar"
    path.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(SourceError, match=r"shard-000000\.tar is gzip-compressed, though it is named like a plain"):
        open_source(shards)


def _two_member_shard(tmp_path: Path) -> tuple[Path, list[int]]:
    path = tmp_path / "s" / "a.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        for key in ("k0", "k1"):
            _add(tar, f"{key}.png", _png())
            _add(tar, f"{key}.cls", b"0")
    with tarfile.open(path) as tar:
        offsets = [m.offset for m in tar.getmembers()]  # header offsets
    return path, offsets


@pytest.mark.parametrize("cut, match", [
    (lambda offs, data: offs[2] + 100, "truncated or corrupt header"),  # inside the third header
    (lambda offs, data: offs[2] + 600, "is truncated: member 'k1.png'"),  # inside the third member's data
    (lambda offs, data: offs[3] + 512 + 512, "ends without tar's end-of-archive block"),  # after the last member
], ids=["in-header", "in-data", "no-end-block"])
def test_truncated_shard_is_an_error_naming_it(tmp_path, cut, match):
    path, offsets = _two_member_shard(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:cut(offsets, data)])
    with pytest.raises(SourceError, match=match) as info:
        open_source(path.parent)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_concatenated_shards_are_refused(tmp_path):
    path, _ = _two_member_shard(tmp_path)
    path.write_bytes(path.read_bytes() * 2)
    with pytest.raises(SourceError, match="data after its end-of-archive block"):
        open_source(path.parent)


def test_link_and_extra_members_are_recorded_as_skipped(tmp_path, caplog):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "k.png", _png())
        _add(tar, "k.cls", b"1")
        _add(tar, "k.json", b"{}")
        for kind, name in ((tarfile.SYMTYPE, "m.png"), (tarfile.LNKTYPE, "n.png")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tar.addfile(info)
        _add(tar, "m.cls", b"0")
        _add(tar, "n.cls", b"0")
    (tmp_path / "README").write_text("not a shard")
    with caplog.at_level(logging.WARNING, logger="featcache.sources"):
        src = open_source(tmp_path)
    assert [it.relpath for it in src.items] == ["a.tar#k.png"]
    reasons = dict(src.ignored)
    assert reasons["a.tar#m.png"] == "link member (symlink), not followed"
    assert reasons["a.tar#n.png"] == "link member (hard link), not followed"
    assert "nor a .cls label" in reasons["a.tar#k.json"]
    assert reasons["a.tar#m.cls"] == "a .cls label without an image"
    assert reasons["README"] == "not a .tar shard"
    assert "(link member (symlink), not followed): a.tar#m.png" in caplog.text
    assert src.load(0).shape == (3, 12, 10)


def test_bad_shards_end_the_cli_in_one_line(tmp_path):
    path, offsets = _two_member_shard(tmp_path)
    path.write_bytes(path.read_bytes()[:offsets[2] + 100])
    result = CliRunner().invoke(main, ["extract", "--data", str(path.parent), "--out", str(tmp_path / "c"),
                                       "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: shard ") and result.output.count("\n") == 1, result.output
    assert str(path) in result.output and "Traceback" not in result.output


def test_every_source_error_is_a_featcache_error():
    assert issubclass(SourceError, FeatcacheError) and issubclass(SourceError, ValueError)
