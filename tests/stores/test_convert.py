"""Backends agree on a real extraction; `featcache convert` round-trips byte for byte and reports lossy errors."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.cli import main
from featcache.config import ExtractConfig
from featcache.convert import convert
from featcache.errors import CacheError
from featcache.extract import run_extract
from featcache.info import codec_report, format_report
from featcache.stores import open_reader
from featcache.stores.encodings import decode_targets, encode_targets, error_bound
from featcache.testing.images import make_image_folder
from featcache.testing.toystore import toy_manifest, toy_records, toy_targets, write_toy
from featcache.verify import verify_cache

FORMATS = ("zarr", "wds", "hdf5")


def _stored(reader) -> dict[str, np.ndarray]:
    rows = [reader.read_stored_row(r) for r in range(len(reader))]
    return {k: np.stack([r[k] for r in rows]) for k in reader.manifest["arrays"]}


def _assert_same_cache(a, b) -> None:
    sa, sb = _stored(a), _stored(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].tobytes() == sb[k].tobytes(), k
    ra, rb = a.records(), b.records()
    for k in ra:
        assert ra[k].dtype == rb[k].dtype and ra[k].tobytes() == rb[k].tobytes(), k
    strip = ("storage", "complete", "num_units", "arrays", "seal")  # arrays: the compressor may change; the seal
    # digests the stripped keys too
    assert {k: v for k, v in a.manifest.items() if k not in strip} == {k: v for k, v in b.manifest.items()
                                                                        if k not in strip}
    shapes = [{n: (s["shape"], s["dtype"]) for n, s in r.manifest["arrays"].items()} for r in (a, b)]
    assert shapes[0] == shapes[1]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """One tiny deit3_small extraction (6 images x 2 views, 32 px) written in every backend."""
    folder = make_image_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=3)
    root = tmp_path_factory.mktemp("caches")
    base = dict(data=str(folder), teacher="deit3_small", pretrained=False, img_size=32, layers=[0, 11], views=2,
                shard_size=4, batch_size=4, workers=0, device="cpu", dtype="fp16")
    return {fmt: run_extract(ExtractConfig(out=str(root / fmt), format=fmt, **base), progress=False)
            for fmt in FORMATS}


@pytest.mark.slow
def test_backends_decode_identically_and_verify(extracted):
    readers = {fmt: open_reader(path) for fmt, path in extracted.items()}
    for fmt in ("wds", "hdf5"):
        _assert_same_cache(readers["zarr"], readers[fmt])
        for row in (0, 5, 11):
            for k, v in readers["zarr"].read_row(row).items():
                np.testing.assert_array_equal(readers[fmt].read_row(row)[k], v)
    for fmt, path in extracted.items():
        result = verify_cache(path, samples=4, device="cpu")
        assert result["ok"], (fmt, result)


@pytest.mark.slow
def test_convert_round_trip_real_cache(extracted, tmp_path):
    src = extracted["zarr"]
    convert(src, tmp_path / "w", "wds", progress=False)
    convert(tmp_path / "w", tmp_path / "h", "hdf5", shard_size=3, progress=False)
    convert(tmp_path / "h", tmp_path / "z", "zarr", shard_size=4, progress=False)
    for path in ("w", "h", "z"):
        _assert_same_cache(open_reader(src), open_reader(tmp_path / path))
    assert open_reader(tmp_path / "h").manifest.shard_size == 3


@pytest.mark.slow
def test_lossy_real_cache_verifies_and_reports(extracted, tmp_path):
    convert(extracted["hdf5"], tmp_path / "q", "wds", codec="int8+zstd", topk=5, progress=False)
    assert verify_cache(str(tmp_path / "q"), samples=4, device="cpu")["ok"]
    report = codec_report(tmp_path / "q")
    assert report["block_0"]["encoding"]["kind"] == "int8" and report["block_0"]["measured_error"]["rel_l2"] < 0.03


@pytest.mark.parametrize("codec,topk", [("none", None), ("blosc-zstd:5:bitshuffle", 3)])
def test_convert_round_trip_toy(tmp_path, codec, topk):
    m = toy_manifest("zarr", codec=codec, topk=topk)
    write_toy(tmp_path / "src", m, toy_targets(m), toy_records(m))
    convert(tmp_path / "src", tmp_path / "w", "wds", progress=False)
    convert(tmp_path / "w", tmp_path / "h", "hdf5", codec="zstd:1", progress=False)  # only the compressor changes
    convert(tmp_path / "h", tmp_path / "z", "zarr", codec=codec, progress=False)
    src = open_reader(tmp_path / "src")
    for path in ("w", "h", "z"):
        _assert_same_cache(src, open_reader(tmp_path / path))
    assert open_reader(tmp_path / "z").manifest["storage"] == src.manifest["storage"]
    with pytest.raises(CacheError, match="destination"):
        convert(tmp_path / "z", tmp_path / "z", "zarr", progress=False)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("codec", ["int8", "bitround:7"])
def test_convert_to_lossy_measures_error_within_bound(tmp_path, fmt, codec):
    m = toy_manifest("hdf5", dtype="fp32")
    targets = toy_targets(m)
    write_toy(tmp_path / "src", m, targets, toy_records(m))
    convert(tmp_path / "src", tmp_path / "dst", fmt, dtype="fp16", codec=codec, topk=4, progress=False)
    reader = open_reader(tmp_path / "dst")
    report = codec_report(tmp_path / "dst")
    for name in ("block_0", "block_2"):
        entry = reader.manifest["targets"][name]
        err = entry["measured_error"]
        assert err["rows"] == m.num_rows and report[name]["measured_error"] == err
        decoded = np.stack([reader.read_row(r, [name])[name] for r in range(m.num_rows)])
        bound = error_bound(entry["encoding"], targets[name])
        assert (np.abs(decoded.astype(np.float64) - targets[name]) <= bound).all()
        got = np.abs(decoded.astype(np.float64) - targets[name]).max()
        assert got == pytest.approx(err["max_abs"], rel=1e-6) and 0 < err["rel_l2"] < 0.01
    assert report["logits"]["encoding"]["kind"] == "topk" and "not measured" not in format_report(report)
    convert(tmp_path / "dst", tmp_path / "again", "zarr", progress=False)  # copied: the measured error stays
    assert open_reader(tmp_path / "again").manifest["targets"] == reader.manifest["targets"]
    want = {"block_0", "block_0__scale"} if codec == "int8" else {"block_0"}
    assert report["block_0"]["bytes_per_view"] > 0 and set(report["block_0"]["arrays"]) == want


def test_convert_cli_and_report(tmp_path):
    m = toy_manifest("zarr", dtype="fp32")
    write_toy(tmp_path / "src", m, toy_targets(m), toy_records(m))
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--format", "hdf5",
                                       "--codec", "bitround:5", "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    assert "bitround:5 fp16" in result.output and "relL2" in result.output
    bad = CliRunner().invoke(main, ["convert", str(tmp_path / "src"), str(tmp_path / "x"), "--format", "wds",
                                    "--codec", "bitround:5", "--dtype", "bf16"])
    assert bad.exit_code != 0 and "fp32 or fp16" in bad.output
    stored = encode_targets(toy_targets(m), m["storage"])
    assert decode_targets(stored, m)["logits"].dtype == np.float32


@pytest.mark.slow
def test_training_reads_every_backend_and_codec(extracted, tmp_path):
    """Stage 2 reads lossy/top-k caches in any backend transparently (one short KD epoch each)."""
    from featcache.testing.caches import STUDENT, reset_accelerate

    from featcache.config import TrainConfig
    from featcache.engine import train

    convert(extracted["zarr"], tmp_path / "h", "hdf5", codec="int8+zstd", topk=5, progress=False)
    for cache in (extracted["wds"], tmp_path / "h"):
        reset_accelerate()
        out = tmp_path / f"run_{abs(hash(str(cache)))}"
        train(TrainConfig(cache=str(cache), out=str(out), method="kd", epochs=1, batch_size=4, workers=0, **STUDENT))
        assert (out / "final.json").is_file()
    reset_accelerate()
