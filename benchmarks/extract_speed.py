"""Extraction speed: `featcache extract` img/s against the bare loop, measured side by side in one run.

The bare loop is what the teacher pass costs with nothing stored: decode + the same seeded augmentation +
normalise + teacher forward (``forward_intermediates`` + head), same DataLoader batch size and workers, one
forward per ``--batch-size`` views. Extraction adds the subset/manifest work, unit bookkeeping, encoding,
Zarr writes with fsync and resume markers (its teacher forward runs once per ``--shard-size`` views; the
default shard size equals the batch size so both loops use the same forward batch). Both are timed end to
end including teacher construction. Images are synthetic JPEGs written to a temp directory.

The view flags (``--aa``, ``--reprob``, ``--mixup``, ``--cutmix``, ...) are ``featcache extract``'s; the bare loop
draws the same views (``featcache.extract.view_recipe``: RandAugment, erasing, and for mixed views the partner's
decode and augmentation too), so the ratio isolates what the cache adds. Run from the repository root::

    python benchmarks/extract_speed.py --teacher deit3_small --img-size 64 --images 100 --views 2
    python benchmarks/extract_speed.py ... --aa rand-m9-mstd0.5-inc1 --reprob 0.25 --mixup 0.8 --cutmix 1.0
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from featcache.config import ExtractConfig
from featcache.sources import open_source
from featcache.extract import run_extract, view_recipe
from featcache.durable import disk_bytes
from featcache.models import resolve_device
from featcache.teachers import load_teacher
from featcache.views import make_view, normalize

#: ``featcache extract``'s view flags, passed through to both loops.
VIEW_FLAGS = ("hflip", "color_jitter", "aa", "reprob", "remode", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob")


def make_images(root: Path, images: int, classes: int = 10, size: tuple[int, int] = (180, 240)) -> Path:
    """``images`` random JPEGs with some structure, spread over ``classes`` folders."""
    rng = np.random.default_rng(0)
    for i in range(images):
        d = root / f"class_{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size[1], size[0]), Image.BILINEAR)
        img.save(d / f"img_{i:05d}.jpg", quality=90)
    return root


class BareViews(Dataset):
    """Decode + augment only: view ``i`` of sample ``i // views``."""

    def __init__(self, source, recipe, views: int) -> None:
        self.source, self.recipe, self.views = source, recipe, views

    def __len__(self) -> int:
        return len(self.source) * self.views

    def __getitem__(self, i: int) -> torch.Tensor:
        sample, view = divmod(i, self.views)
        return make_view(self.source.load(sample), self.recipe, 0, sample, view, len(self.source),
                         self.source.load).image


def bare_loop(args: argparse.Namespace, data: Path) -> tuple[float, int]:
    """Seconds and views for decode + augment + teacher forward, nothing stored."""
    start = time.perf_counter()
    device = resolve_device(args.device)
    teacher = load_teacher(args.teacher, pretrained=args.pretrained, img_size=args.img_size, device=device)
    cfg = teacher.data_config(args.img_size)
    recipe = view_recipe(extract_config(args, data, Path("unused")), args.img_size, cfg)
    dataset = BareViews(open_source(data), recipe, args.views)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    layers = [int(v) for v in args.layers.split(",")]
    layers = [i + teacher.num_blocks() if i < 0 else i for i in layers]
    for images in loader:
        out = teacher.targets(normalize(images.to(device), cfg["mean"], cfg["std"]), layers)
        {k: v.float().cpu().numpy() for k, v in out.items()}  # the same device -> host copy extraction does
    return time.perf_counter() - start, len(dataset)


def extract_config(args: argparse.Namespace, data: Path, out: Path) -> ExtractConfig:
    """The `featcache extract` settings of this benchmark (the view flags as given)."""
    return ExtractConfig(data=str(data), out=str(out), teacher=args.teacher, pretrained=args.pretrained,
                         img_size=args.img_size, layers=[int(v) for v in args.layers.split(",")], views=args.views,
                         dtype=args.dtype, codec=args.codec, shard_size=args.shard_size or args.batch_size,
                         batch_size=args.batch_size, workers=args.workers, device=args.device,
                         **{k: getattr(args, k) for k in VIEW_FLAGS})


def extraction(args: argparse.Namespace, data: Path, out: Path) -> tuple[float, int]:
    """Seconds and views for a full `run_extract` into a fresh cache."""
    cfg = extract_config(args, data, out)
    start = time.perf_counter()
    run_extract(cfg, progress=False)
    return time.perf_counter() - start, args.images * args.views


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="deit3_small")
    p.add_argument("--pretrained", action="store_true", help="timm pretrained weights (default: seeded random init)")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--layers", default="0,1,-1")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=None, help="[--batch-size]")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--codec", default="none")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    fields = {f.name: f for f in dataclasses.fields(ExtractConfig)}
    for flag in VIEW_FLAGS:  # featcache extract's view flags, with its defaults and help
        default = fields[flag].default
        p.add_argument("--" + flag.replace("_", "-"), type=str if default is None else type(default), default=default,
                       help=fields[flag].metadata["help"])
    p.add_argument("--repeats", type=int, default=1, help="alternate the two loops this many times; the best run of "
                   "each is reported (robust to other jobs' load on a shared box)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bare, ext = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "imgs", args.images)
        for r in range(args.repeats):  # alternated, so both loops see the same share of the box
            bare.append(bare_loop(args, data))
            ext.append(extraction(args, data, Path(tmp) / f"cache{r}"))
        size = disk_bytes(Path(tmp) / "cache0")
    report(args, bare, ext, size)


def report(args: argparse.Namespace, bare: list[tuple[float, int]], ext: list[tuple[float, int]], size: int) -> None:
    """Every run's seconds, then the best of each loop and their img/s ratio."""
    print(f"teacher {args.teacher} img {args.img_size} views {bare[0][1]} batch {args.batch_size} workers "
          f"{args.workers} device {resolve_device(args.device)} threads {torch.get_num_threads()} dtype {args.dtype}")
    print("view flags: " + " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in VIEW_FLAGS))
    print("runs (s): bare " + " ".join(f"{t:.2f}" for t, _ in bare)
          + " | extract " + " ".join(f"{t:.2f}" for t, _ in ext))
    (t_bare, n), (t_ext, n_ext) = min(bare), min(ext)
    print(f"{'loop (best of ' + str(len(bare)) + ')':<28} {'seconds':>8} {'img/s':>8}")
    print(f"{'bare (decode+aug+forward)':<28} {t_bare:>8.2f} {n / t_bare:>8.1f}")
    print(f"{'featcache extract':<28} {t_ext:>8.2f} {n_ext / t_ext:>8.1f}")
    print(f"ratio extract/bare img/s: {(n_ext / t_ext) / (n / t_bare):.3f}   cache {size / 2**20:.1f} MiB")

if __name__ == "__main__":
    main()
