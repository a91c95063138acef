"""Stage 1 extraction: replay parity, byte-identical resume/batching/workers, SIGKILL, mismatches, corrupt images."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache.config import ExtractConfig
from featcache.errors import CacheError, ImageDecodeError
from featcache.extract import run_extract
from featcache.info import cache_info
from featcache.sources import source_from_manifest
from featcache.stores import open_reader
from featcache.teachers import teacher_from_manifest
from featcache.testing.images import make_image_folder
from featcache.verify import verify_cache
from featcache.views import Recipe, normalize, replay


def make_cfg(data, out, **kw) -> ExtractConfig:
    base = dict(data=str(data), out=str(out), teacher="deit3_small", pretrained=False, img_size=32, layers=[0, 1, 11],
                views=2, shard_size=4, batch_size=4, workers=0, device="cpu", dtype="fp32")
    return ExtractConfig(**dict(base, **kw))


def tree_bytes(root) -> dict[str, bytes]:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the 2-core CI box is shared, and OpenMP spinning under load is ~3x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=3, per_class=4)


@pytest.fixture(scope="module")
def ref_cache(folder, tmp_path_factory):
    """fp32 cache of 12 images x 2 views = 24 rows in 6 units, written in one run."""
    return run_extract(make_cfg(folder, tmp_path_factory.mktemp("ref") / "cache"), progress=False)


def test_replay_reproduces_fp32_features(ref_cache):
    reader = open_reader(ref_cache)
    m = reader.manifest
    assert m.complete and m.num_rows == 24 and m.shard_size == 4
    teacher = teacher_from_manifest(m)
    source = source_from_manifest(m)
    recipe = Recipe.from_dict(m["views"]["recipe"])
    rec = reader.records()
    np.testing.assert_array_equal(rec["sample"], np.repeat(np.arange(12), 2))
    np.testing.assert_array_equal(rec["view"], np.tile([0, 1], 12))
    views = torch.stack([replay(source.load(int(rec["sample"][r])), recipe, rec["params"][r]) for r in range(24)])
    x = normalize(views, m["normalization"]["mean"], m["normalization"]["std"])
    fresh = {k: v.numpy() for k, v in teacher.targets(x, m["layers"]).items()}
    for row in range(24):
        cached = reader.read_row(row)
        for name in ("block_0", "block_1", "block_11", "logits"):
            assert cached[name].dtype == np.float32
            assert np.abs(cached[name] - fresh[name][row]).max() <= 1e-5, (name, row)


def test_batch_size_and_workers_give_identical_bytes(folder, ref_cache, tmp_path):
    want = tree_bytes(ref_cache)
    for bs, workers in ((3, 0), (5, 2)):
        out = run_extract(make_cfg(folder, tmp_path / f"b{bs}w{workers}", batch_size=bs, workers=workers),
                          progress=False)
        assert tree_bytes(out) == want, (bs, workers)


def test_resumed_run_gives_identical_bytes(folder, ref_cache, tmp_path):
    cfg = make_cfg(folder, tmp_path / "cache", batch_size=3)
    run_extract(cfg, progress=False, max_units=2)
    partial = open_reader(cfg.out, require_complete=False)
    assert not partial.manifest.complete
    assert [bool(n) for n in partial.unit_notes()] == [True, True, False, False, False, False]
    with pytest.raises(CacheError, match="incomplete"):
        open_reader(cfg.out)
    run_extract(cfg, progress=False)
    assert tree_bytes(cfg.out) == tree_bytes(ref_cache)


def test_complete_cache_is_not_recomputed(folder, ref_cache):
    before = {p: p.stat().st_mtime_ns for p in Path(ref_cache).rglob("*") if p.is_file()}
    run_extract(make_cfg(folder, ref_cache), progress=False)
    assert {p: p.stat().st_mtime_ns for p in Path(ref_cache).rglob("*") if p.is_file()} == before


def test_mismatched_rerun_names_differing_keys(folder, ref_cache):
    with pytest.raises(CacheError) as err:
        run_extract(make_cfg(folder, ref_cache, views=3, dtype="fp16"), progress=False)
    assert "views.count" in str(err.value) and "storage.dtype" in str(err.value) and "--overwrite" in str(err.value)


def test_overwrite_starts_afresh(folder, tmp_path):
    out = tmp_path / "cache"
    run_extract(make_cfg(folder, out, shots=1), progress=False)
    run_extract(make_cfg(folder, out, shots=2, overwrite=True), progress=False)
    assert open_reader(out).manifest.num_rows == 12


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)  # like the parent test process, so the bytes can match
    import featcache.extract as ex
    import featcache.extract_units as units
    from featcache.config import ExtractConfig
    slow = units.launch_targets  # every unit's forward goes through it
    def launch_targets(*a, **k):  # slow the run down so the parent can kill it mid-way
        time.sleep(0.4)
        return slow(*a, **k)
    units.launch_targets = launch_targets
    ex.run_extract(ExtractConfig(data=sys.argv[1], out=sys.argv[2], teacher="deit3_small", pretrained=False,
                   img_size=32, layers=[0, 1, 11], views=2, shard_size=4, batch_size=4, workers=0, device="cpu",
                   dtype="fp32"), progress=False)
""")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(folder, ref_cache, tmp_path):
    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(folder), str(out)])
    marker = out / "_featcache" / "units" / "unit-000001.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the extraction finished before it could be killed"
    killed = open_reader(out, require_complete=False)
    assert not killed.manifest.complete
    ref = open_reader(ref_cache)
    done = [u for u, note in enumerate(killed.unit_notes()) if note]
    assert 2 <= len(done) < 6
    for u in done:  # every unit the killed cache claims holds exactly the reference data
        for row in killed.manifest.unit_rows(u):
            for name, value in killed.read_row(row).items():
                np.testing.assert_array_equal(value, ref.read_row(row)[name])
    run_extract(make_cfg(folder, out), progress=False)
    assert tree_bytes(out) == tree_bytes(ref_cache)


def _corrupt_folder(tmp_path) -> tuple[Path, str]:
    root = make_image_folder(tmp_path / "imgs", classes=2, per_class=2)
    bad = root / "class_1" / "img_0.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    return root, "class_1/img_0.png"


def test_corrupt_image_error_names_the_file(tmp_path):
    root, rel = _corrupt_folder(tmp_path)
    with pytest.raises(ImageDecodeError, match=rel):
        run_extract(make_cfg(root, tmp_path / "cache"), progress=False)
    assert not open_reader(tmp_path / "cache", require_complete=False).manifest.complete


def test_skip_corrupt_records_and_reports(tmp_path):
    root, rel = _corrupt_folder(tmp_path)
    out = run_extract(make_cfg(root, tmp_path / "cache", skip_corrupt=True, shard_size=3), progress=False)
    reader = open_reader(out)
    assert reader.manifest["skipped"] == [rel]
    rec = reader.records()
    bad_rows = np.flatnonzero(rec["valid"] == 0)
    np.testing.assert_array_equal(bad_rows, [4, 5])  # sample 2 (class_1/img_0) x 2 views
    assert not reader.read_row(4)["block_0"].any()
    info = cache_info(out)
    assert info["skipped"] == [rel] and info["complete"]
    assert verify_cache(out, samples=6, device="cpu")["ok"]


def test_fp16_range_check_suggests_bf16(folder, tmp_path, monkeypatch):
    import featcache.extract_units as ex

    real = ex.launch_targets  # the extraction loop queues its forwards through it
    monkeypatch.setattr(ex, "launch_targets", lambda *a, **k: {n: v * 1e5 for n, v in real(*a, **k).numpy().items()})
    with pytest.raises(ValueError, match="bf16"):
        run_extract(make_cfg(folder, tmp_path / "cache", dtype="fp16"), progress=False)


def test_checkpoint_teacher_kwargs_and_negative_layers(folder, tmp_path):
    from safetensors.torch import save_file

    from featcache.models import load_model, weights_sha256

    kwargs = {"patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3}
    model = load_model("vit_tiny_patch16_224", pretrained=False, img_size=32, **kwargs)
    torch.manual_seed(5)
    for p in model.parameters():  # weights that differ from the seeded random init
        p.data.normal_(0, 0.05)
    ckpt = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    cfg = make_cfg(folder, tmp_path / "cache", teacher="vit_tiny_patch16_224", checkpoint=str(ckpt),
                   teacher_kwargs=kwargs, layers=[0, -1], shots=1, dtype="bf16")
    out = run_extract(cfg, progress=False)
    m = open_reader(out).manifest
    assert m.layers == [0, 3] and m["teacher"]["weights_sha256"] == weights_sha256(model)
    assert m["targets"]["block_3"]["shape"] == [65, 48] and m["teacher_kwargs"] == kwargs
    result = verify_cache(out, samples=4, device="cpu")
    assert result["ok"] and 0 < result["targets"]["block_3"]["rel"] < 1e-2  # bf16 rounding, nothing more
    with pytest.raises(ValueError, match="blocks 0..3"):
        run_extract(make_cfg(folder, tmp_path / "c2", teacher="vit_tiny_patch16_224", teacher_kwargs=kwargs,
                             layers=[4]), progress=False)
