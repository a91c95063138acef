"""The GPU-ready stage-1 pipeline, exercised on the CPU: bf16 autocast of the teacher (recorded, resumed, verified,
byte-identical across batch sizes), exact fp32 as the default, and targets handed to the writer thread."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from featcache.config import ExtractConfig
from featcache.errors import CacheError
from featcache.extract import run_extract
from featcache.extract_units import HostTargets, compute_targets, iter_units
from featcache.stores import open_reader
from featcache.teachers import exact_fp32, load_teacher, teacher_from_manifest
from featcache.testing.caches import TINY_VIT_TEACHER
from featcache.testing.images import make_image_folder
from featcache.verify import verify_cache


def _cfg(data: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(data=str(data), out=str(out), teacher="vit_tiny_patch16_224", pretrained=False, img_size=32,
                num_classes=3, teacher_kwargs=TINY_VIT_TEACHER, layers=[0, -1], views=2, shard_size=4, batch_size=4,
                workers=0, device="cpu", dtype="fp32")
    return ExtractConfig(**dict(base, **kw))


def _stored(path) -> dict[str, np.ndarray]:
    reader = open_reader(path)
    rows = [reader.read_stored_row(r) for r in range(len(reader))]
    return {k: np.stack([r[k] for r in rows]) for k in reader.manifest["arrays"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=3, per_class=2)


@pytest.fixture(scope="module")
def exact(data, tmp_path_factory):
    return run_extract(_cfg(data, tmp_path_factory.mktemp("fp32") / "c"), progress=False)


@pytest.fixture(scope="module")
def bf16(data, tmp_path_factory):
    return run_extract(_cfg(data, tmp_path_factory.mktemp("bf16") / "c", autocast="bf16"), progress=False)


def test_bf16_autocast_is_recorded_and_close_to_fp32(exact, bf16):
    m_bf16, m_fp32 = open_reader(bf16).manifest, open_reader(exact).manifest
    assert m_bf16["teacher"]["autocast"] == "bf16" and "autocast" not in m_fp32["teacher"]
    assert teacher_from_manifest(m_bf16).autocast == "bf16" and teacher_from_manifest(m_fp32).autocast is None
    fast, ref = _stored(bf16), _stored(exact)
    for name in ("block_0", "block_3", "logits"):
        rel = np.linalg.norm(fast[name] - ref[name]) / np.linalg.norm(ref[name])
        assert 0 < rel < 0.05, (name, rel)  # bf16 rounding, compounded over the blocks


def test_bf16_cache_bytes_do_not_depend_on_the_batch_size(data, bf16, tmp_path):
    other = run_extract(_cfg(data, tmp_path / "c", autocast="bf16", batch_size=3), progress=False)
    a, b = _stored(bf16), _stored(other)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)  # the forward still runs once per unit


def test_bf16_cache_verifies_and_refuses_an_fp32_resume(data, bf16):
    assert verify_cache(bf16, samples=4, device="cpu")["ok"]
    with pytest.raises(CacheError, match="teacher"):
        run_extract(_cfg(data, bf16, autocast="none"), progress=False)


def test_exact_mode_restores_torch_settings():
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    with exact_fp32():
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before


def test_host_targets_on_cpu_hand_float32_arrays_to_the_writer(exact):
    m = open_reader(exact).manifest
    teacher = teacher_from_manifest(m)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    host = HostTargets(teacher.targets(images.float(), m.layers), torch.device("cpu"))
    got = host.numpy()
    assert host.event is None and all(v.dtype == np.float32 for v in got.values())
    want = compute_targets(teacher, images, m, torch.device("cpu"))
    assert sorted(want) == sorted(m["targets"]) and want["logits"].shape == (3, 3)


def test_units_are_stacked_in_view_order(exact):
    m = open_reader(exact).manifest
    batches = [{"row": [1, 0], "image": torch.stack([torch.full((3, 2, 2), 1, dtype=torch.uint8),
                                                      torch.zeros((3, 2, 2), dtype=torch.uint8)]),
                "error": ["", ""], **{k: [0, 0] for k in ("sample", "view", "label", "seed", "fingerprint")},
                "valid": [1, 1], "params": [[0.0], [0.0]], "relpath": ["", ""], "path": ["", ""]}]
    m4 = m.copy()
    m4["num_rows"] = 2
    (unit, cols), = list(iter_units(batches, m4, skip_corrupt=False))
    assert unit == 0 and cols["row"].tolist() == [0, 1] and cols["image"][:, 0, 0, 0].tolist() == [0, 1]


def test_teacher_rejects_unknown_autocast():
    teacher = load_teacher("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3,
                           autocast="fp8", **TINY_VIT_TEACHER)
    with pytest.raises(ValueError, match="autocast"):
        teacher.targets(torch.zeros(1, 3, 32, 32), [0])


# ---------------------------------------------------------------------------------------------- compact at extraction

def test_extract_fits_the_pca_codebook_and_resumes_with_it(data, tmp_path):
    once = run_extract(_cfg(data, tmp_path / "once", dtype="fp16", codec="pca:0.3"), progress=False)
    m = open_reader(once).manifest
    for name in ("block_0", "block_3"):
        enc = m["targets"][name]["encoding"]
        assert enc["kind"] == "pca" and enc["fit_rows"] == m.num_rows  # fewer views than FIT_ROWS: all of them
        err = m["targets"][name]["measured_error"]
        assert 0 < err["rel_l2"] < 0.3 / np.sqrt(12) * 1.05 and err["rows"] == m.num_rows
    cfg = _cfg(data, tmp_path / "twice", dtype="fp16", codec="pca:0.3", batch_size=3)
    run_extract(cfg, progress=False, max_units=1)
    run_extract(cfg, progress=False)  # resumed: the codebook comes from the cache, not a new fit
    twice = open_reader(tmp_path / "twice").manifest
    assert twice["targets"] == m["targets"]
    a, b = _stored(once), _stored(tmp_path / "twice")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)  # and bytes do not depend on the batch size
    assert verify_cache(once, samples=4, device="cpu")["ok"]
