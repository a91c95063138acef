"""Store speed: bytes/view, encode/decode MB/s and DataLoader read samples/s for every backend x codec.

Also prints the two comparisons the training read path must win, measured in the same run:
  * random-order views of a Zarr cache: featcache's direct shard-index reader vs zarr-python's per-view
    indexing (``zarr.open_array(...)[row]`` on arrays opened once, warm page cache);
  * read samples/s (2 DataLoader workers) vs a deit_tiny student training step (forward + backward + AdamW)
    at ``--img-size`` on this CPU;
  * one fp16 wds cache read shuffled by random access (a tar member per target per view) vs streamed (whole
    shards in a shuffled order, split over the workers), side by side, on local disk and on an S3 API: moto's
    server, started here on 127.0.0.1 (``pip install 'moto[server]' s3fs``; ``--no-s3`` skips it), read
    directly and through fsspec's ``simplecache::`` layer.

Targets are synthetic but shaped and distributed like ViT-S/16 block outputs at 224 px (197 tokens x 384
channels): low-rank token structure + noise, log-normal channel scales and a few x40 outlier channels, plus
1000-class logits. Run from the repository root::

    python benchmarks/store_speed.py                    # full table (a few minutes on 2 cores)
    python benchmarks/store_speed.py --views 64 --quick # smoke run
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featcache.manifest import Manifest

from featcache.stores import create_writer, open_reader
from featcache.stores.encodings import (array_specs, decode_targets, encode_with, fit_sample_rows, fit_targets,
                                       targets_section, unfitted)

CODECS = [("fp16", "none", None), ("fp16", "blosc-zstd:5:shuffle", None), ("fp16", "bitround:7", None),
          ("fp16", "int8+zstd", None), ("bf16", "zstd:3", 10), ("fp16", "pca:0.3", None), ("fp16", "pca:0.5", None)]
QUICK = [0, 3, 5]  # fp16, int8+zstd, pca:0.3


def synthetic_targets(views: int, tokens: int, dim: int, classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """ViT-like float32 features [views, tokens, dim] and logits [views, classes]."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((32, dim)).astype(np.float32)
    coef = rng.standard_normal((views, tokens, 32)).astype(np.float32) / 4
    x = coef @ basis + 0.5 * rng.standard_normal((views, tokens, dim)).astype(np.float32)
    x *= rng.lognormal(0.0, 0.5, dim).astype(np.float32)
    x[..., rng.choice(dim, 4, replace=False)] *= 40.0
    logits = (rng.standard_normal((views, classes)) * 2.5).astype(np.float32)
    return {"block_11": x, "logits": logits}


def bench_manifest(fmt: str, dtype: str, codec: str, topk: int | None, targets: dict, shard_size: int) -> Manifest:
    storage = {"format": fmt, "dtype": dtype, "shard_size": shard_size, "codec": codec, "topk": topk}
    shapes = {k: v.shape[1:] for k, v in targets.items()}
    views = len(next(iter(targets.values())))
    section = targets_section(shapes, storage)
    fit = fit_sample_rows(np.ones(views, dtype=np.uint8))  # pca: the codebook from the data, as convert fits it
    section = fit_targets(section, {n: targets[n][fit] for n in unfitted(section)})
    return Manifest({"format_version": 1, "teacher": {"name": "synthetic"}, "layers": [11], "img_size": 224,
                     "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"},
                     "data": {"kind": "folder", "root": "/nowhere"}, "subset": {"shots": None},
                     "views": {"count": 1, "seed": 0, "param_names": []},
                     "storage": storage, "targets": section,
                     "arrays": array_specs(shapes, storage), "num_samples": views, "num_rows": views,
                     "complete": False, "skipped": []})


def write_cache(path: Path, m: Manifest, targets: dict) -> tuple[float, float]:
    """Encode + write every unit; returns (encode seconds, encode + write seconds)."""
    n = m.num_rows
    records = {"sample": np.arange(n), "view": np.zeros(n), "label": np.zeros(n), "seed": np.arange(n),
               "params": np.zeros((n, 0)), "fingerprint": np.zeros(n), "valid": np.ones(n)}
    writer = create_writer(path, m, format=m["storage"]["format"], overwrite=True)
    enc_s, t0 = 0.0, time.perf_counter()
    for u in range(m.num_units):
        rows = m.unit_rows(u)
        t = time.perf_counter()
        stored = encode_with({k: v[rows.start:rows.stop] for k, v in targets.items()}, m)
        enc_s += time.perf_counter() - t
        writer.write_unit(u, stored, {k: v[rows.start:rows.stop] for k, v in records.items()})
    writer.finalize()
    return enc_s, time.perf_counter() - t0


class Rows(torch.utils.data.Dataset):
    """Decoded targets of one row, as the training dataset reads them."""

    def __init__(self, reader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        return self.reader.read_row(row)


def loader_rate(reader, shuffle: bool, workers: int, batch: int = 32) -> float:
    """Samples/s of a DataLoader over the reader (first batch excluded: worker start-up)."""
    loader = torch.utils.data.DataLoader(Rows(reader), batch_size=batch, shuffle=shuffle, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)
    t, n = time.perf_counter(), 0
    for b in it:
        n += len(b["logits"])
    return n / max(time.perf_counter() - t, 1e-9)


def decode_rate(reader) -> tuple[float, float]:
    """(stored-array read seconds, decode seconds) over every row, in process."""
    m = reader.manifest
    read_s = dec_s = 0.0
    for row in range(len(reader)):
        t = time.perf_counter()
        stored = reader.read_stored_row(row)
        t2 = time.perf_counter()
        decode_targets(stored, m)
        read_s, dec_s = read_s + t2 - t, dec_s + time.perf_counter() - t2
    return read_s, dec_s


def bench_one(root: Path, fmt: str, dtype: str, codec: str, topk: int | None, targets: dict, args) -> dict:
    m = bench_manifest(fmt, dtype, codec, topk, targets, args.shard_size)
    path = root / f"{fmt}-{dtype}-{codec.replace(':', '_')}"
    enc_s, write_s = write_cache(path, m, targets)
    reader = open_reader(path)
    raw_mb = sum(v.nbytes for v in targets.values()) / 1e6  # logical float32
    fp16_bytes = sum(v[0].size for v in targets.values()) * 2
    read_s, dec_s = decode_rate(reader)  # first pass warms the page cache
    read_s, dec_s = decode_rate(reader)
    per_view = sum(reader.array_nbytes().values()) / m.num_rows
    row = {"format": fmt, "dtype": dtype, "codec": codec + (f" topk{topk}" if topk else ""),
           "bytes_per_view": per_view, "ratio_fp16": per_view / fp16_bytes,
           "encode_MBps": raw_mb / enc_s, "write_MBps": raw_mb / write_s, "decode_MBps": raw_mb / dec_s,
           "read_views_s_1proc": m.num_rows / (read_s + dec_s),
           "seq_samples_s": loader_rate(reader, False, args.workers), "rand_samples_s": loader_rate(reader, True,
                                                                                                     args.workers)}
    if fmt == "wds":
        row["stream_samples_s"] = stream_rate(reader, args.workers)
    if (fmt, dtype, codec) != ("zarr", "fp16", "none"):  # keep only the cache the zarr comparison reads
        shutil.rmtree(path)
    return row


def stream_rate(reader, workers: int, batch: int = 32) -> float:
    """Samples/s of the wds IterableDataset (shards split over the workers; first batch excluded)."""
    stream = reader.iterable_dataset(shuffle_shards=True)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers)
    it = iter(loader)
    next(it)
    t, n = time.perf_counter(), 0
    for rows, _ in it:
        n += len(rows)
    return n / max(time.perf_counter() - t, 1e-9)


def stream_vs_random(targets: dict, args) -> list[dict]:
    """Random-access vs streamed samples/s of the same fp16 wds cache: local, on S3 (moto), on S3 + simplecache."""
    m = bench_manifest("wds", "fp16", "none", None, targets, args.shard_size)
    root = Path(tempfile.mkdtemp(prefix="featcache-stream-"))
    out = [_rates("local", str(root / "wds"), m, targets, args)]
    if not args.no_s3:
        from featcache.testing.s3 import local_s3

        with local_s3("bench"):
            out.append(_rates("s3 (moto, 127.0.0.1)", "s3://bench/wds", m, targets, args))
            out.append(_rates("simplecache::s3", "simplecache::s3://bench/wds", m, targets, args, write=False))
    shutil.rmtree(root, ignore_errors=True)
    return out


def _rates(where: str, url: str, m: Manifest, targets: dict, args, write: bool = True) -> dict:
    if write:
        write_cache(url, m, targets)
    reader = open_reader(url)
    loader_rate(reader, True, args.workers)  # a first pass: what a cache layer (or the page cache) keeps
    return {"cache": where, "random_samples_s": loader_rate(reader, True, args.workers),
            "stream_samples_s": stream_rate(reader, args.workers)}


def zarr_comparison(path: Path, rounds: int = 2) -> dict:
    """Random-order views/s on the same Zarr files, warm: featcache's reader vs zarr-python
    ``open_array(...)[row]`` vs tensorstore ``array[row].read().result()`` (arrays opened once for both)."""
    import tensorstore as ts
    import zarr

    reader = open_reader(path)
    names = list(reader.manifest["arrays"])
    zarrs = {n: zarr.open_array(str(path / n), mode="r") for n in names}
    stores = {n: ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / n)}}).result()
              for n in names}
    readers = {
        "fast": lambda row: reader.read_stored_row(row),
        "zarr_python": lambda row: [np.asarray(zarrs[n][row]) for n in names],
        "tensorstore": lambda row: [stores[n][row].read().result() for n in names],
    }
    order = [int(r) for r in np.random.default_rng(0).permutation(len(reader))]
    seconds = dict.fromkeys(readers, 0.0)
    for name, read in readers.items():
        for row in order:  # warm each path (page cache, shard indexes)
            read(row)
        for _ in range(rounds):
            t = time.perf_counter()
            for row in order:
                read(row)
            seconds[name] += time.perf_counter() - t
    n = rounds * len(order)
    out = {f"{name}_views_s": n / s for name, s in seconds.items()}
    out["speedup"] = seconds["zarr_python"] / seconds["fast"]
    out["speedup_vs_tensorstore"] = seconds["tensorstore"] / seconds["fast"]
    return out


def train_step_rate(img_size: int, batch: int, steps: int = 3) -> float:
    """deit_tiny student samples/s for forward + backward + AdamW step at ``img_size`` on CPU."""
    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=img_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 1000, (batch,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


def print_table(rows: list[dict]) -> None:
    cols = ["format", "codec", "dtype", "bytes_per_view", "ratio_fp16", "encode_MBps", "write_MBps", "decode_MBps",
            "read_views_s_1proc", "seq_samples_s", "rand_samples_s", "stream_samples_s"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        print("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--views", type=int, default=256)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--formats", default="zarr,wds,hdf5")
    p.add_argument("--img-size", type=int, default=224, help="student image size for the training-step comparison")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="only the fp16/none, int8+zstd and pca:0.3 codecs")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--no-s3", action="store_true", help="compare streaming with random access on local disk only")
    args = p.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    targets = synthetic_targets(args.views, args.tokens, args.dim, args.classes)
    codecs = [CODECS[i] for i in QUICK] if args.quick else CODECS
    root = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    try:
        rows = [bench_one(root, fmt, *c, targets, args) for fmt in args.formats.split(",") for c in codecs]
        print_table(rows)
        cmp = zarr_comparison(root / "zarr-fp16-none") if "zarr" in args.formats else {}
        train = train_step_rate(args.img_size, args.train_batch)
        streams = stream_vs_random(targets, args) if "wds" in args.formats else []
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if cmp:
        print(f"\nzarr random-order reads, 1 process: fast reader {cmp['fast_views_s']:.0f} views/s vs zarr-python "
              f"open_array[row] {cmp['zarr_python_views_s']:.0f} views/s -> {cmp['speedup']:.1f}x; vs tensorstore "
              f"{cmp['tensorstore_views_s']:.0f} views/s -> {cmp['speedup_vs_tensorstore']:.1f}x")
    best = min(r["rand_samples_s"] for r in rows if r["format"] == "zarr") if cmp else None
    print(f"deit_tiny train step @ {args.img_size}px, batch {args.train_batch}, {torch.get_num_threads()} threads: "
          f"{train:.1f} samples/s" + (f"; slowest zarr random read with {args.workers} workers: {best:.0f} samples/s "
                                      f"({best / train:.0f}x ahead)" if best else ""))
    if streams:
        print(f"\nwds fp16 cache, {args.views} views in shards of {args.shard_size}, {args.workers} workers, batch 32:")
        print("| cache | random access samples/s | streamed samples/s | streamed / random |\n|---|---:|---:|---:|")
        for s in streams:
            print(f"| {s['cache']} | {s['random_samples_s']:.0f} | {s['stream_samples_s']:.0f} | "
                  f"{s['stream_samples_s'] / s['random_samples_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "zarr": cmp, "train_samples_s": train, "stream": streams,
                                               "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
