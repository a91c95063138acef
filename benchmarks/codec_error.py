"""Per-layer error and size of the compact codecs on DeiT III-S features at 224 px, and what they imply on disk.

Extracts an fp16 cache of ``deit3_small`` (random init unless ``--pretrained``: no network here) blocks 0, 1, 11 +
logits for ``--views`` RandomResizedCrop views of each of scikit-learn's two sample photos (``china.jpg``,
``flower.jpg``, 427x640, shipped with scikit-learn), converts it with ``featcache convert`` into every ``--codecs``
entry (the codebook is fitted on the cache itself, as convert always does) and reports, per codec, the stored bytes
per view, the ratio to fp16, the relative L2 error per layer measured by convert on every row against the fp16
cache, and the disk size of the two ImageNet-1k budgets of issue 15 at that bytes/view:
16 shots x 1,000 classes x 16 views (256,000 views) and 10 % (128,117 images) x 10 views (1,281,170 views).

    python benchmarks/codec_error.py --out /tmp/codec_error [--views 64] [--codecs pca:0.3,pca:0.5,int8+zstd]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


from featcache.config import ExtractConfig
from featcache.convert import convert
from featcache.extract import run_extract
from featcache.info import codec_report

BUDGETS = {"16-shot x 16 views": 16 * 1000 * 16, "10 % x 10 views": 128_117 * 10}


def write_photos(root: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    for i, image in enumerate(load_sample_images().images):
        (root / f"class_{i}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / f"class_{i}" / "photo.png")
    return root


def read_rate(path: str, rounds: int = 3) -> float:
    """Views/s of ``read_row`` (read + decode of every target) in random order, one torch thread (as a DataLoader
    worker runs), warm page cache."""
    import numpy as np
    import torch

    from featcache.stores import open_reader

    torch.set_num_threads(1)
    reader = open_reader(path)
    order = np.random.default_rng(0).permutation(len(reader)).tolist()
    for row in order:
        reader.read_row(row)
    t = time.perf_counter()
    for _ in range(rounds):
        for row in order:
            reader.read_row(row)
    return rounds * len(order) / (time.perf_counter() - t)


def measure(path: str) -> dict:
    report = codec_report(path, rerun_teacher=False)
    stored = sum(r["bytes_per_view"] for r in report.values())
    fp16 = sum(r["fp16_bytes_per_view"] for r in report.values())
    errors = {n: (r["measured_error"] or {}).get("rel_l2", 0.0) for n, r in report.items() if n != "logits"}
    return {"bytes_per_view": stored, "ratio_to_fp16": stored / fp16, "rel_l2": errors, "read_views_s": read_rate(path),
            "disk_GB": {k: views * stored / 1e9 for k, views in BUDGETS.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="codec_error")
    p.add_argument("--teacher", default="deit3_small")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--views", type=int, default=64, help="views per photo")
    p.add_argument("--codecs", default="pca:0.3,pca:0.5,int8+zstd")
    args = p.parse_args()
    out = Path(args.out)
    data = write_photos(out / "photos")
    t = time.perf_counter()
    fp16 = run_extract(ExtractConfig(data=str(data), out=str(out / "fp16"), teacher=args.teacher,
                                     pretrained=args.pretrained, layers=[0, 1, -1], views=args.views, shard_size=32,
                                     batch_size=32, workers=0, device="cpu", dtype="fp16"), progress=False)
    print(f"extract: {time.perf_counter() - t:.0f} s")
    rows = {"fp16": measure(fp16)}
    for codec in [c for c in args.codecs.split(",") if c]:
        dst = out / codec.replace(":", "_").replace("+", "_")
        convert(fp16, dst, "zarr", codec=codec, overwrite=True, progress=False)
        rows[codec] = measure(str(dst))
    print("| codec | bytes/view | vs fp16 | rel L2 per layer | read views/s (1 thread) | " +
          " | ".join(f"disk {k}" for k in BUDGETS) + " |")
    print("|---|---:|---:|---|---:|" + "---:|" * len(BUDGETS))
    for codec, r in rows.items():
        err = ", ".join(f"{k} {v:.4f}" for k, v in r["rel_l2"].items())
        disks = " | ".join(f"{v:.1f} GB" for v in r["disk_GB"].values())
        print(f"| {codec} | {r['bytes_per_view']:.0f} | {r['ratio_to_fp16']:.3f} | {err} | {r['read_views_s']:.0f} | "
              f"{disks} |")
    (out / "codec_error.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))
    print(f"{2 * args.views} views of {args.teacher} ({'pretrained' if args.pretrained else 'random init'})")


if __name__ == "__main__":
    main()
