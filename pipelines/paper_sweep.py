"""The paper sweep: DeiT III-Small features of a few-shot ImageNet subset extracted once, every DeiT-Tiny recipe
of ``train/`` trained from that one cache, then the report (table + plot).

    python pipelines/paper_sweep.py --imagenet /data/imagenet --shots 16 --epochs 30 --out runs/paper

Stage 1 runs the teacher (blocks 0, 1 and 11 + logits, ``--views`` augmented views per image) only while the
cache is incomplete; stage 2 trains each recipe with its paper hyperparameters (``--epochs`` shortens the 300-epoch
schedule to a budget); re-running the command skips finished runs and resumes a killed one.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from featcache.config import load_yaml
from featcache.sweep import SweepSpec, run_sweep

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("kd", "nkd", "featreg", "vitkd")
#: The cache the paper recipes read (RandAugment + erasing views); recipes that name another one (the mixed-view
#: function-matching recipe) need other views and are left out of this sweep.
PAPER_CACHE = "caches/deit3_small_in1k_16shot"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--imagenet", required=True, help="ImageNet root holding train/ and val/ ImageFolders")
    p.add_argument("--shots", type=int, default=16, help="training images per class (default 16)")
    p.add_argument("--views", type=int, default=16, help="cached augmented views per image (default 16)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipes' 300 epochs (budget)")
    p.add_argument("--out", default="runs/paper_sweep", help="runs directory (default runs/paper_sweep)")
    p.add_argument("--cache", default=None, help="cache path (default caches/deit3_small_in1k_<shots>shot)")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once on this machine (default 1)")
    p.add_argument("--device", default="auto", help="extraction device (default auto)")
    return p.parse_args(argv)


def paper_spec(args: argparse.Namespace) -> SweepSpec:
    """The sweep spec: one extraction, one run per recipe of ``train/{kd,nkd,featreg,vitkd}/*_from_deit3_small``."""
    cache = args.cache or f"caches/deit3_small_in1k_{args.shots}shot"
    recipes = sorted(p for m in RECIPES for p in (ROOT / "train" / m).glob("deit_tiny_from_deit3_small*.yaml")
                     if load_yaml(p)["cache"] == PAPER_CACHE)
    base = {"val": str(Path(args.imagenet) / "val")}
    if args.epochs is not None:
        base["epochs"] = args.epochs
    extract = {"data": str(Path(args.imagenet) / "train"), "teacher": "deit3_small", "layers": [0, 1, 11],
               "img_size": 224, "shots": args.shots, "views": args.views, "device": args.device,
               "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25}  # the official cls_KD views
    return SweepSpec.from_dict({"cache": cache, "extract": extract, "base": base, "out": args.out,
                                "runs": [{"recipe": str(p)} for p in recipes]})


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return run_sweep(paper_spec(args), jobs=args.jobs)


if __name__ == "__main__":
    main()
