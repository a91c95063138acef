"""Fault injection for the stores: every backend's extraction SIGKILLed at random points and resumed, a full disk
on every backend, and edited or damaged manifests, unit markers and stored data.

Extractions use a random-init 4-block, width-48 ViT at 32 px over 6 images x 2 views in units of 2 rows (6 units),
fp16 with zstd, so one killed run plus its resume costs about two seconds.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import pytest

from featcache.config import ExtractConfig
from featcache.errors import CacheError
from featcache.extract import run_extract
from featcache.manifest import FORMAT_VERSION
from featcache.stores import WRITERS, create_writer, hdf5_store, open_reader
from featcache.stores.encodings import encode_targets
from featcache.testing.caches import TINY_VIT_TEACHER
from featcache.testing.faults import (cache_content, can_mount_tmpfs, count_fsyncs, killed_extraction,
                                      tmpfs_command, tree_bytes)
from featcache.testing.images import make_image_folder
from featcache.testing.toystore import toy_manifest, toy_records, toy_targets, unit_slice, write_toy

FORMATS = ("zarr", "wds", "hdf5")
TRIALS = {"zarr": 4, "wds": 4, "hdf5": 10}
ARGS = ["--teacher", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "--num-classes", "3",
        "--teacher-kwargs", json.dumps(TINY_VIT_TEACHER), "--layers", "0,-1", "--views", "2", "--shard-size", "2",
        "--batch-size", "4", "--workers", "0", "--device", "cpu", "--codec", "zstd:1"]


def make_cfg(data: Path, out: Path, fmt: str, **kw) -> ExtractConfig:
    return ExtractConfig(data=str(data), out=str(out), format=fmt, teacher="vit_tiny_patch16_224", pretrained=False,
                         img_size=32, num_classes=3, teacher_kwargs=dict(TINY_VIT_TEACHER), layers=[0, -1], views=2,
                         shard_size=2, batch_size=4, workers=0, device="cpu", codec="zstd:1", **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=3, per_class=2)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[str, tuple[Path, float, int]]:
    """Per backend: an uninterrupted cache, the seconds it took and the fsyncs it made (the kill points)."""
    root, out = tmp_path_factory.mktemp("ref"), {}
    for fmt in FORMATS:
        start = time.monotonic()
        fsyncs = count_fsyncs(lambda: run_extract(make_cfg(data, root / fmt, fmt), progress=False))
        out[fmt] = (root / fmt, time.monotonic() - start, fsyncs)
    return out


def assert_same_cache(path: Path, ref: Path, fmt: str) -> None:
    """Zarr and wds caches are byte-identical; HDF5 parts are named per writer process, so an HDF5 cache must hold
    the same manifest, unit notes, rows and records, and no other file (no temp file of a killed writer)."""
    if fmt == "hdf5":
        assert cache_content(path) == cache_content(ref)
        assert (path / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    else:
        assert tree_bytes(path) == tree_bytes(ref)


def assert_readable_after_kill(path: Path, fmt: str) -> None:
    """What a kill leaves opens: every HDF5 part with plain h5py, and the cache (once its manifest exists) as a
    reader opens it (markers checked against the manifest, stored layout checked)."""
    for part in sorted(path.glob("part-*.h5")):
        h5py.File(part, "r").close()
    has_manifest = (path / "manifest.json").is_file() or (path / "zarr.json").is_file() and "featcache" in json.loads(
        (path / "zarr.json").read_text()).get("attributes", {})
    if has_manifest:
        open_reader(path, format=fmt, require_complete=False).close()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(data, reference, tmp_path, fmt):
    """Half the trials kill after a random delay, half just before a random fsync (every write that makes a unit
    durable ends in one, so these land inside unit writes); each resumed cache equals the uninterrupted one."""
    ref, seconds, fsyncs = reference[fmt]
    rng, killed = random.Random(f"kill-{fmt}"), 0
    for trial in range(TRIALS[fmt]):
        out = tmp_path / f"trial{trial}"
        run = lambda: run_extract(make_cfg(data, out, fmt), progress=False)  # noqa: E731
        if trial % 2:
            killed += killed_extraction(run, kill_at_fsync=rng.randint(1, fsyncs))
        else:
            killed += killed_extraction(run, delay=rng.uniform(0.0, seconds))
        assert_readable_after_kill(out, fmt)
        run_extract(make_cfg(data, out, fmt), progress=False)
        assert_same_cache(out, ref, fmt)
        shutil.rmtree(out)
    assert killed >= TRIALS[fmt] // 2, f"only {killed} of {TRIALS[fmt]} runs were killed before they finished"


def _legacy_part(path: Path) -> None:
    """Leave ``path`` as a featcache 0.1 writer killed mid-run left its part: libver="latest", open for write."""
    script = ("import h5py, os, signal, sys\n"
              "f = h5py.File(sys.argv[1], 'r+', libver='latest')\n"
              "f.flush()\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_part_left_open_for_write_is_refused_then_redone(tmp_path, monkeypatch):
    """The issue's case: a v0.1 part killed while open (HDF5's open-for-write flag set) made the resume report
    success and every reader fail. Now a reader refuses it in one line, and a resume redoes its units."""
    m = toy_manifest("hdf5")
    targets, records = toy_targets(m), toy_records(m)
    monkeypatch.setattr(hdf5_store, "LIBVER", "latest")  # the v0.1 writer
    write_toy(tmp_path / "c", m, targets, records)
    monkeypatch.undo()
    _legacy_part(tmp_path / "c" / "part-000.h5")
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(tmp_path / "c" / "part-000.h5", "r")
    with pytest.raises(CacheError, match=r"part .*part-000\.h5 cannot be opened .*re-run the same `featcache extract`"):
        open_reader(tmp_path / "c")
    with pytest.warns(UserWarning, match="whose manifest says it is complete"):
        writer = create_writer(tmp_path / "c", m, format="hdf5")
    with pytest.warns(UserWarning, match="cannot be trusted"):
        assert writer.completed_units() == set()
    assert sorted(writer.redone) == [0, 1, 2, 3] and "cannot be read back" in writer.redone[0]
    with pytest.warns(UserWarning, match="whose manifest says it is complete"):  # its markers are gone now
        write_toy(tmp_path / "c", m, targets, records)
    write_toy(tmp_path / "ref", m, targets, records)
    assert cache_content(tmp_path / "c") == cache_content(tmp_path / "ref")


def _flip_a_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0xFF]))


def _zarr_damage(cache: Path) -> None:
    shard = cache / "block_0" / "c" / "1" / "0" / "0"  # unit 1: 4 raw fp32 chunks, then the 68-byte index
    _flip_a_byte(shard, shard.stat().st_size - 200)


def _wds_damage(cache: Path) -> None:
    with tarfile.open(cache / "shard-000001.tar") as tar:
        member = tar.getmember("s000000001_v0002.block_0.npy")
    _flip_a_byte(cache / "shard-000001.tar", member.offset_data + member.size - 8)


def _hdf5_damage(cache: Path) -> None:
    with h5py.File(cache / "part-000.h5", "r") as f:
        offset = f["block_0"].id.get_chunk_info_by_coord((5, 0, 0)).byte_offset  # row 5 is in unit 1
    _flip_a_byte(cache / "part-000.h5", offset + 8)


DAMAGE = {"zarr": _zarr_damage, "wds": _wds_damage, "hdf5": _hdf5_damage}


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_redoes_a_unit_that_reads_back_wrong(tmp_path, fmt):
    """Bytes changed under a marked unit: the resume reads every unit it keeps back, un-marks the one whose CRC-32s
    no longer match, redoes it, and the cache ends as it should have."""
    m = toy_manifest(fmt, dtype="fp32")
    targets, records = toy_targets(m), toy_records(m)
    write_toy(tmp_path / "c", m, targets, records, finalize=False)
    before = cache_content(tmp_path / "c")["notes"]
    DAMAGE[fmt](tmp_path / "c")
    writer = create_writer(tmp_path / "c", m, format=fmt)
    with pytest.warns(UserWarning, match="cannot be trusted"):
        done = writer.completed_units()
    assert done == {0, 2, 3} and list(writer.redone) == [1], writer.redone
    assert "block_0 read back other bytes than were written (CRC-32 mismatch)" in writer.redone[1]
    write_toy(tmp_path / "c", m, targets, records)
    assert cache_content(tmp_path / "c")["notes"] == before
    write_toy(tmp_path / "ref", m, targets, records)
    assert cache_content(tmp_path / "c") == cache_content(tmp_path / "ref")


# ------------------------------------------------------------------------------------------------ disk full

# Runs inside the namespace holding one small tmpfs per backend: extract until the disk is full, grow the tmpfs, run
# the same command again, and record what happened (one interpreter for the three backends keeps the test short).
_DISK_FULL_SCRIPT = """
import json, subprocess, sys
from click.testing import CliRunner
from featcache.cli import main
from featcache.testing.faults import cache_content
data, results, args, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
out = {}
for fmt, mnt, ref, grown in jobs:
    argv = ["extract", "--data", data, "--out", mnt + "/cache", "--format", fmt, *args]
    first = CliRunner().invoke(main, argv)
    subprocess.run(["mount", "-o", "remount,size=%dk" % grown, mnt], check=True)
    second = CliRunner().invoke(main, argv)
    out[fmt] = {"code": first.exit_code, "output": first.output, "raised": type(first.exception).__name__,
                "resumed": second.exit_code == 0 and cache_content(mnt + "/cache") == cache_content(ref)}
json.dump(out, open(results, "w"))
"""


def _assert_one_error_line(output: str, out: Path) -> None:
    """The run ends in one ``Error:`` line naming the cache and the fix (progress bars may come before it)."""
    assert "Traceback" not in output and output.count("Error:") == 1, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("Error: disk full while writing the cache") and str(out) in last, output
    assert "free space there or choose another --out, then re-run the same command" in last


@pytest.mark.slow
def test_disk_full_is_one_line_then_resumes(data, reference, tmp_path, monkeypatch):
    """Disk full mid-extraction, on every backend: a tmpfs half the cache's size where the machine allows mounting
    one, else an ENOSPC injected in the backend's unit write. The run ends in one line naming the cache and the fix,
    exit 1 (the HDF5 writer used to segfault, exit 139); once there is space the same command finishes a cache equal
    to an uninterrupted one."""
    mounts = {fmt: tmp_path / f"mnt_{fmt}" for fmt in FORMATS}
    for mnt in mounts.values():
        mnt.mkdir()
    if not can_mount_tmpfs(mounts["zarr"]):
        for fmt in FORMATS:
            _assert_one_error_line(_injected_disk_full(data, mounts[fmt] / "cache", fmt, reference[fmt][0],
                                                       monkeypatch), mounts[fmt] / "cache")
        return
    sizes = {fmt: sum(len(b) for b in tree_bytes(reference[fmt][0]).values()) for fmt in FORMATS}
    jobs = [[fmt, str(mounts[fmt]), str(reference[fmt][0]), 4 * sizes[fmt] // 1024 + 1024] for fmt in FORMATS]
    command = shlex.join([sys.executable, "-c", _DISK_FULL_SCRIPT, str(data), str(tmp_path / "results.json"),
                          json.dumps(ARGS), json.dumps(jobs)])
    proc = subprocess.run(tmpfs_command([(mounts[f], sizes[f] // 2) for f in FORMATS], command), shell=True,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]  # a segfault (-11 / 139) ends here
    results = json.loads((tmp_path / "results.json").read_text())
    for fmt in FORMATS:
        got = results[fmt]
        assert got["code"] == 1 and got["raised"] == "SystemExit", (fmt, got)
        _assert_one_error_line(got["output"], mounts[fmt] / "cache")
        assert got["resumed"], f"{fmt}: the re-run after freeing space did not finish an equal cache"


def _injected_disk_full(data: Path, out: Path, fmt: str, ref: Path, monkeypatch) -> str:
    """The fallback where no tmpfs can be mounted: the backend's unit write raises ENOSPC from the third unit on.
    Returns what the CLI printed, after checking that a re-run without the fault finishes an equal cache."""
    from click.testing import CliRunner

    from featcache.cli import main

    writer = WRITERS.get(fmt)
    real, calls = writer._write_data, [0]

    def full_disk(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(writer, "_write_data", full_disk)
    argv = ["extract", "--data", str(data), "--out", str(out), "--format", fmt, *ARGS]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    monkeypatch.undo()
    assert CliRunner().invoke(main, argv).exit_code == 0
    assert cache_content(out) == cache_content(ref)
    return res.output


# ------------------------------------------------------------------------------------------------ edited manifests

def _manifest_path(cache: Path, fmt: str) -> Path:
    return cache / ("zarr.json" if fmt == "zarr" else "manifest.json")


def _edit(cache: Path, fmt: str, change) -> None:
    """Apply ``change`` to the manifest as a user editing the file would (the seal stays as it was)."""
    path = _manifest_path(cache, fmt)
    doc = json.loads(path.read_text())
    change(doc["attributes"]["featcache"] if fmt == "zarr" else doc)
    path.write_text(json.dumps(doc))


@pytest.fixture(params=FORMATS)
def toy_cache(request, tmp_path) -> tuple[Path, str]:
    fmt = request.param
    m = toy_manifest(fmt)
    write_toy(tmp_path / "c", m, toy_targets(m), toy_records(m))
    return tmp_path / "c", fmt


EDITS = {
    "layers": (lambda m: m.update(layers=[0, 3]), r"block targets .* do not match layers \[0, 3\]"),
    "num_rows": (lambda m: m.update(num_rows=12), r"num_rows 12 is not num_samples 5 x views.count 3"),
    "num_rows+samples": (lambda m: m.update(num_rows=12, num_samples=4),  # zarr also records num_units
                         r"edited after extraction: num_rows, num_samples differ|num_units 4 does not match"),
    "teacher.num_classes": (lambda m: m["teacher"].update(num_classes=21), r"does not match teacher.num_classes 21"),
    "final_norm": (lambda m: m["teacher"].update(final_norm={"type": "layernorm", "eps": 1e-3}),
                   r"edited after extraction: teacher.final_norm differ"),
    "classes": (lambda m: m["data"].update(classes=["a", "b"]), r"edited after extraction: data.classes differ"),
    "views": (lambda m: m["views"].update(seed=1), r"edited after extraction: views.seed differ"),
    "arrays": (lambda m: m["arrays"]["block_0"].update(dtype="float32"), r"arrays.block_0 (is float32\[5, 8\]|differ)"),
    "format_version": (lambda m: m.update(format_version=FORMAT_VERSION + 1), rf"format_version {FORMAT_VERSION + 1} is "
                       r"newer"),
    "data.root url": (lambda m: m["data"].update(root="s3://bucket/images"), r"data.root 's3://bucket/images' is a "
                      r"URL"),
    "data.root relative": (lambda m: m["data"].update(root="images"), r"data.root 'images' is not an absolute path"),
    "sources escape": (lambda m: m["data"].update(sources=[["../../etc/passwd", 0]] * 5),
                       r"data.sources\[0\] .*unsafe path '../../etc/passwd'"),
    "checkpoint url": (lambda m: m["teacher"].update(checkpoint="https://x/w.pth"), r"teacher.checkpoint "
                       r"\"https://x/w.pth\" is not a local file path"),
    "shard_size 0": (lambda m: m["storage"].update(shard_size=0), r"storage.shard_size 0 .* must be positive"),
    "target not an object": (lambda m: m["targets"].update(logits=3), r"targets.logits.shape is null"),
    "missing key": (lambda m: m.pop("views"), r"views is missing"),
    "wrong type": (lambda m: m.update(num_rows="15"), r"num_rows is str \"15\", expected int"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edited_manifest_is_refused_naming_what_differs(toy_cache, edit):
    cache, fmt = toy_cache
    change, message = EDITS[edit]
    _edit(cache, fmt, change)
    with pytest.raises(CacheError, match=message) as err:
        open_reader(cache)
    assert "\n" not in str(err.value) and str(_manifest_path(cache, fmt)) in str(err.value)


def test_data_root_may_move(toy_cache):
    """Moving the images is no edit: data.root is outside the seal (every reader can be pointed elsewhere)."""
    cache, fmt = toy_cache
    _edit(cache, fmt, lambda m: m["data"].update(root="/mnt/elsewhere"))
    assert open_reader(cache).manifest["data"]["root"] == "/mnt/elsewhere"


def test_hand_set_complete_is_refused_then_finished(tmp_path):
    """A partial cache edited to say ``complete: true`` trained on a fraction of its rows; now it is refused, and
    re-running the extraction finishes it (the writer checks the claim instead of believing it)."""
    for fmt in FORMATS:
        m = toy_manifest(fmt)
        targets, records = toy_targets(m), toy_records(m)
        write_toy(tmp_path / fmt, m, targets, records, units=[0, 2], finalize=False)
        _edit(tmp_path / fmt, fmt, lambda doc: doc.update(complete=True))
        with pytest.raises(CacheError, match=r"says it is complete, but units \[1, 3\] of 4 have no completion"):
            open_reader(tmp_path / fmt)
        with pytest.warns(UserWarning, match="whose manifest says it is complete"):
            writer = create_writer(tmp_path / fmt, m, format=fmt)
        assert not writer.manifest.complete and writer.completed_units() == {0, 2}
        stored = encode_targets(targets, m["storage"])
        for u in (1, 3):
            writer.write_unit(u, unit_slice(m, stored, u), unit_slice(m, records, u), skipped=[f"bad_{u}.png"])
        assert writer.finalize().complete and open_reader(tmp_path / fmt).manifest.complete


@pytest.mark.parametrize("fmt", FORMATS)
def test_unsealed_manifests(tmp_path, fmt):
    """A featcache 0.1 cache has no seal: it opens, and an inconsistent edit is still refused. Dropping the seal of a
    sealed cache is itself refused: its unit markers record the seal they were written under."""
    legacy = Path(__file__).parent / "fixtures" / "v0_1" / f"cache_{fmt}"
    shutil.copytree(legacy, tmp_path / "old")
    open_reader(tmp_path / "old")
    _edit(tmp_path / "old", fmt, lambda m: m.update(num_rows=10))
    with pytest.raises(CacheError, match="num_rows 10 is not num_samples 6 x views.count 2"):
        open_reader(tmp_path / "old")
    _edit(tmp_path / "old", fmt, lambda m: m.update(num_rows=12) or m["targets"]["logits"]["encoding"].update(
        kind={"float": 1}))
    with pytest.raises(CacheError, match=r"targets.logits.encoding .* is not an encoding featcache can read"):
        open_reader(tmp_path / "old")
    m = toy_manifest(fmt)
    write_toy(tmp_path / "new", m, toy_targets(m), toy_records(m))
    _edit(tmp_path / "new", fmt, lambda doc: doc.pop("seal"))
    with pytest.raises(CacheError, match=r"unit 0: its marker was written under another manifest"):
        open_reader(tmp_path / "new")


def test_edited_marker_is_refused(toy_cache):
    cache, _ = toy_cache
    path = cache / "_featcache" / "units" / "unit-000001.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), rows=[4, 9])))
    with pytest.raises(CacheError, match=r"unit 1: its marker covers rows \[4, 9\], but the manifest puts rows "
                                         r"\[4, 8\] there"):
        open_reader(cache)


MALFORMED = {
    "a JSON list": (b"[1, 2, 3]", r"holds a JSON list, not a featcache manifest|is a JSON list, not Zarr v3"),
    "not JSON": (b"{\"zarr_format\": 3, ", r"is not valid JSON"),
    "not UTF-8": (b"\xff\xfe\x00", r"is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_metadata_is_one_cache_error(toy_cache, case):
    """A zarr.json or manifest.json that is a JSON list, not JSON or not text: one-line CacheError, also via the CLI
    (`featcache info`), never a traceback."""
    from click.testing import CliRunner

    from featcache.cli import main

    cache, fmt = toy_cache
    raw, message = MALFORMED[case]
    _manifest_path(cache, fmt).write_bytes(raw)
    with pytest.raises(CacheError, match=message):
        open_reader(cache, format=fmt)
    res = CliRunner().invoke(main, ["info", str(cache)])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output


def test_zarr_array_metadata_checked_on_open(tmp_path):
    """An array's zarr.json that disagrees with the manifest (shape edited, or a JSON list) is refused on open."""
    m = toy_manifest("zarr")
    write_toy(tmp_path / "c", m, toy_targets(m), toy_records(m))
    meta = tmp_path / "c" / "block_2" / "zarr.json"
    doc = json.loads(meta.read_text())
    meta.write_text(json.dumps(dict(doc, shape=[12, 5, 8])))
    with pytest.raises(CacheError, match=r"block_2/zarr.json holds float16\[12, 5, 8\], but the manifest gives "
                                         r"float16\[15, 5, 8\]"):
        open_reader(tmp_path / "c")
    meta.write_text("[]")
    with pytest.raises(CacheError, match="is a JSON list, not Zarr v3 array metadata"):
        open_reader(tmp_path / "c")


def test_hdf5_part_that_does_not_hold_its_unit_is_refused(tmp_path):
    m = toy_manifest("hdf5")
    write_toy(tmp_path / "c", m, toy_targets(m), toy_records(m))
    with h5py.File(tmp_path / "c" / "part-000.h5", "r+") as f:
        f["units"][2] = 0
    with pytest.raises(CacheError, match=r"part-000.h5 does not hold unit 2"):
        open_reader(tmp_path / "c")


def test_part_held_by_a_running_writer_is_busy_not_damaged(tmp_path):
    """A part another process has open for writing (HDF5's file lock) is reported as busy, with the fix (wait); a
    resume must not take it for damage and redo its units."""
    m = toy_manifest("hdf5")
    write_toy(tmp_path / "c", m, toy_targets(m), toy_records(m), units=[0, 1], finalize=False)
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r+'); "
                               "print('open', flush=True); time.sleep(60)", str(tmp_path / "c" / "part-000.h5")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(CacheError, match="is being written by a running extraction .*wait for it to finish"):
            open_reader(tmp_path / "c", require_complete=False)
        with pytest.raises(CacheError, match="being written by a running extraction"):
            create_writer(tmp_path / "c", m, format="hdf5").completed_units()
    finally:
        holder.kill()
        holder.wait()
    assert create_writer(tmp_path / "c", m, format="hdf5").completed_units() == {0, 1}
