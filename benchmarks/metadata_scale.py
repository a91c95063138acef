"""Metadata at ImageNet scale: what opening a 1.28 M-image, 16-view cache costs a training process.

Builds the metadata of such a cache through the real writer (a Zarr cache with no target arrays: the manifest, the
source list, every unit's records, finalize's bulk arrays; no pixels, no teacher), with synthetic ImageNet-like
relpaths (``n01440764/n01440764_10026.JPEG``, 1000 classes), then measures in a fresh Python process, after its
imports:

* ``zarr.json`` size;
* time to a ready training process: ``open_reader`` + ``source_from_manifest`` + ``CachedViewDataset``;
* the RSS that adds, and ``len(pickle.dumps(dataset))``: what a spawned DataLoader worker receives;
* what a worker then pays to rebuild its row index (restoring that state + the first ``row_of``).

Run from the repository root (the build takes a few minutes and ~4 GB of disk on 2 cores)::

    python benchmarks/metadata_scale.py                      # 1.28 M images x 16 views
    python benchmarks/metadata_scale.py --images 20000 --views 4   # smoke run
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = {"zarr.json": 1 << 20, "ready_s": 2.0, "rss_mb": 200.0, "pickle_mb": 5.0}  # the bars to beat

MEASURE = r"""
import copy, json, os, pickle, sys, time
import numpy as np, torch
from featcache.datasets import CachedViewDataset
from featcache.sources import source_from_manifest
from featcache.stores import open_reader
from featcache.views import Recipe

def rss_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

path = sys.argv[1]
before, t0 = rss_mb(), time.perf_counter()
reader = open_reader(path)
t1 = time.perf_counter()
source = source_from_manifest(reader.manifest)
t2 = time.perf_counter()
m = reader.manifest
ds = CachedViewDataset(reader, source, Recipe.from_dict(m["views"]["recipe"]), [], fingerprint_checks=0)
t3 = time.perf_counter()
after = rss_mb()
blob = pickle.dumps(ds)
t4 = time.perf_counter()
# The state a worker receives, restored through the same __getstate__ / __setstate__ protocol that unpickling uses
# (nothing is ever unpickled here: a copy of the live object stands in for the worker's).
worker = copy.deepcopy(ds)
rows = [int(worker.row_of(i)) for i in range(0, len(worker), max(1, len(worker) // 1000))]
t5 = time.perf_counter()
assert rows == [int(ds.row_of(i)) for i in range(0, len(ds), max(1, len(ds) // 1000))]
print(json.dumps({"open_reader_s": t1 - t0, "source_s": t2 - t1, "dataset_s": t3 - t2, "ready_s": t3 - t0,
                  "rss_mb": after - before, "pickle_bytes": len(blob), "worker_ready_s": t5 - t4,
                  "items": len(ds), "relpath": source.items[len(source) - 1].relpath}))
"""


def synthetic_items(images: int, classes: int) -> list[list]:
    """ImageNet-like ``wnid/wnid_N.JPEG`` relpaths, ``images // classes`` per class, in class order."""
    per_class = -(-images // classes)
    wnids = [f"n{1440764 + 9973 * c:08d}" for c in range(classes)]
    return [[f"{wnids[i // per_class]}/{wnids[i // per_class]}_{10026 + i % per_class}.JPEG", i // per_class]
            for i in range(images)]


def build(path: Path, images: int, views: int, shard_size: int, classes: int = 1000) -> float:
    """Write the cache's metadata through the real writer; return the seconds it took."""
    from featcache.manifest import FORMAT_VERSION, Manifest
    from featcache.sources.base import SourceItem
    from featcache.sources.subsets import file_list_sha256
    from featcache.stores import create_writer
    from featcache.views import default_recipe

    t0 = time.perf_counter()
    sources = synthetic_items(images, classes)
    recipe = default_recipe(224)
    root = path.parent / "images"
    root.mkdir(exist_ok=True)
    data = {"kind": "folder", "root": str(root), "classes": sorted({s[0].split("/")[0] for s in sources}),
            "num_files": images, "sources": sources,
            "file_list_sha256": file_list_sha256(SourceItem(r, lab) for r, lab in sources)}
    manifest = Manifest({
        "format_version": FORMAT_VERSION, "teacher": {"name": "synthetic", "num_classes": classes}, "layers": [], "img_size": 224,
        "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}, "data": data,
        "subset": {"shots": None}, "views": {"count": views, "seed": 0, "recipe": recipe.to_dict(),
                                             "param_names": list(recipe.param_names)},
        "storage": {"format": "zarr", "dtype": "fp16", "shard_size": shard_size, "codec": "none", "topk": None},
        "targets": {}, "arrays": {}, "num_samples": images, "num_rows": images * views, "complete": False,
        "skipped": []})
    writer = create_writer(path, manifest, format="zarr")
    rng = np.random.default_rng(0)
    labels = np.asarray([s[1] for s in sources], dtype=np.int64)
    for unit in range(writer.manifest.num_units):
        span = writer.manifest.unit_rows(unit)
        rows = np.arange(span.start, span.stop)
        writer.write_unit(unit, {}, {
            "sample": rows // views, "view": rows % views, "label": labels[rows // views], "seed": rows * 7919 + 11,
            "params": rng.random((len(rows), len(recipe.param_names))),
            "fingerprint": rng.integers(0, 2**32, len(rows), dtype=np.uint64).astype(np.uint32),
            "valid": (rng.random(len(rows)) > 0.001).astype(np.uint8)})  # a few skipped views
    writer.finalize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1_281_167)
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=1 << 16, help="rows per unit")
    ap.add_argument("--keep", help="build (or reuse) the cache here instead of a temp dir")
    args = ap.parse_args()
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="featcache-meta-"))
    path = tmp / "cache"
    try:
        built = None if (path / "zarr.json").is_file() else build(path, args.images, args.views, args.shard_size)
        out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], check=True, capture_output=True, text=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        got["zarr.json"] = (path / "zarr.json").stat().st_size
        got["pickle_mb"] = got["pickle_bytes"] / 2**20
        meta = sum(p.stat().st_size for p in (path / "_featcache" / "meta").glob("*.npy"))  # none in format 1
        print(f"{args.images:,} images x {args.views} views = {args.images * args.views:,} rows"
              f"{'' if built is None else f'; metadata built in {built:.0f} s'}; bulk arrays {meta / 2**20:.0f} MB")
        rows = [("zarr.json", f"{got['zarr.json'] / 1024:.1f} KB", "< 1 MB", got["zarr.json"] < TARGETS["zarr.json"]),
                ("ready (reader + source + dataset)", f"{got['ready_s']:.2f} s", "< 2 s", got["ready_s"] < 2),
                ("  open_reader", f"{got['open_reader_s']:.2f} s", "", None),
                ("  source_from_manifest", f"{got['source_s']:.2f} s", "", None),
                ("  CachedViewDataset", f"{got['dataset_s']:.2f} s", "", None),
                ("RSS added", f"{got['rss_mb']:.0f} MB", "< 200 MB", got["rss_mb"] < TARGETS["rss_mb"]),
                ("pickled dataset (to a worker)", f"{got['pickle_mb'] * 1024:.1f} KB", "< 5 MB",
                 got["pickle_mb"] < TARGETS["pickle_mb"]),
                ("worker: restore state + row index", f"{got['worker_ready_s']:.2f} s", "", None)]
        print(f"{'figure':36s} {'measured':>12s}  {'target':>9s}")
        for name, value, target, ok in rows:
            print(f"{name:36s} {value:>12s}  {target:>9s}  {'' if ok is None else 'ok' if ok else 'MISSED'}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
