"""Hugging Face ``datasets`` sources: a save_to_disk directory and parquet files, read by row, extracted end to end
and trained on; a changed dataset is refused at train time with the fix named."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.cli import main
from featcache.errors import CacheError, ConfigError, DecodeError, SourceError
from featcache.sources import detect_kind, open_source, source_from_manifest, source_manifest_entry
from featcache.sources.decode import decode_image
from featcache.sources.hf import entries_sha256
from featcache.stores import open_reader
from featcache.testing.caches import cli_ok, cli_train_steps, tiny_extract_args
from featcache.testing.hf import make_hf_dataset, png_samples, save_hf_dataset, save_parquet

pytestmark = pytest.mark.usefixtures("clean_accelerate")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_hf_dataset(tmp_path_factory.mktemp("hf") / "ds")


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    return save_parquet(tmp_path_factory.mktemp("pq") / "pq", files=2, row_group_size=4)


def expected_pixels(i: int) -> np.ndarray:
    images, _ = png_samples()
    return decode_image(images[i], f"sample {i}").numpy()


@pytest.mark.parametrize("which", ["saved", "parquet", "parquet_glob"])
def test_rows_are_the_dataset_images_in_order(which, saved, parquet):
    spec = {"saved": saved, "parquet": parquet, "parquet_glob": f"{parquet}/*.parquet"}[which]
    assert detect_kind(spec) == "hf"
    source = open_source(spec)
    assert source.kind == "hf" and len(source) == 12 and source.classes == ["class_0", "class_1", "class_2"]
    assert source.labels == [c for c in range(3) for _ in range(4)]
    assert source.items[7].relpath.endswith("#1")  # the second row of the second file (6 rows per file)
    workers_copy = pickle.loads(pickle.dumps(source))  # what a DataLoader worker gets: no open file inside
    for i in (0, 5, 6, 11, 3):  # out of order: parquet row groups are re-read
        np.testing.assert_array_equal(workers_copy.load(i).numpy(), expected_pixels(i))


def test_integer_labels_and_renamed_columns(tmp_path):
    make_hf_dataset(image_column="img", label_column="y", class_label=False).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ConfigError, match=r"no column 'image' \(columns: img, y\).*--data-image-column"):
        open_source(tmp_path / "d")
    source = open_source(tmp_path / "d", image_column="img", label_column="y")
    assert source.classes == ["0", "1", "2"] and source.labels[-1] == 2
    with pytest.raises(SourceError, match="label column 'img' is Image.*--data-label-column"):
        open_source(tmp_path / "d", image_column="img", label_column="img")


def test_dataset_dict_names_its_splits(tmp_path):
    import datasets

    datasets.DatasetDict({"train": make_hf_dataset(), "validation": make_hf_dataset(seed=1)}).save_to_disk(
        str(tmp_path / "dd"))
    assert detect_kind(tmp_path / "dd") == "hf"
    with pytest.raises(SourceError, match=r"DatasetDict \(splits: train, validation\); pass one split, e.g. --data "
                                          r".*dd/train"):
        open_source(tmp_path / "dd")
    assert len(open_source(tmp_path / "dd" / "train")) == 12


def test_image_without_bytes_is_refused_not_opened(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Written with pyarrow: datasets' own writers would embed the file's bytes.
    schema = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}).arrow_schema
    pq.write_table(pa.table({"image": [{"bytes": None, "path": "/etc/passwd"}], "label": [0]}, schema=schema),
                   tmp_path / "a.parquet")
    with pytest.raises(DecodeError, match="no image bytes, only a path"):
        open_source(tmp_path / "a.parquet").load(0)


def test_manifest_entry_round_trip_and_changed_dataset(tmp_path):
    root = save_parquet(tmp_path / "pq", files=2)
    manifest = {"data": source_manifest_entry(open_source(root))}
    assert [f[0] for f in manifest["data"]["hf"]["files"]] == ["part-0.parquet", "part-1.parquet"]
    np.testing.assert_array_equal(source_from_manifest(manifest).load(8).numpy(), expected_pixels(8))
    for tamper in ("files", "sources"):
        bad = copy.deepcopy(manifest)
        bad["data"]["hf"]["files"][0][0] = "../part-0.parquet" if tamper == "files" else "part-0.parquet"
        bad["data"]["sources"][0][0] = "../../etc/passwd#0" if tamper == "sources" else bad["data"]["sources"][0][0]
        bad["data"]["hf"]["files_sha256"] = entries_sha256(bad["data"]["hf"]["files"])  # a consistent forgery
        with pytest.raises(CacheError, match=r"\.\."):
            source_from_manifest(bad)
    save_parquet(root, files=2, seed=5)  # re-written: same names, same rows, other images (other sizes)
    with pytest.raises(SourceError, match=r"part-0.parquet changed since extraction .*pass --data with the dataset "
                                          r"the cache was extracted from"):
        source_from_manifest(manifest)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["saved", "parquet"])
def test_extract_and_train_end_to_end(which, saved, parquet, tmp_path):
    data = saved if which == "saved" else parquet
    cache = tmp_path / "cache"
    cli_ok("extract", "--data", data, "--out", cache, *tiny_extract_args())
    manifest = open_reader(str(cache)).manifest
    assert manifest["data"]["kind"] == "hf" and manifest["data"]["hf"]["image_column"] == "image"
    assert cli_train_steps(cache, tmp_path / "run") == 3  # an epoch: one of the 2 views of each of the 12 images, batches of 4


@pytest.mark.slow
def test_train_refuses_a_changed_dataset_in_one_line(tmp_path):
    data = save_hf_dataset(tmp_path / "ds")
    cache = tmp_path / "cache"
    cli_ok("extract", "--data", data, "--out", cache, *tiny_extract_args())
    save_hf_dataset(data, per_class=5)  # re-saved with more rows
    res = CliRunner().invoke(main, ["train", "--cache", str(cache), "--out", str(tmp_path / "run"), "--method", "kd",
                                    "--student", "deit_tiny", "--student-kwargs", '{"depth": 1}', "--workers", "0"])
    assert res.exit_code != 0 and "changed since extraction" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
