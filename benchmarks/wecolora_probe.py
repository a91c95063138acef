"""WeCoLoRA on the digits demo: does label-free distillation from the cache give better linear-probe features?

Steps (all on CPU, a few minutes on 2 cores; nothing is downloaded):
  1. the demo's digits ImageFolders and its small ViT teacher (``featcache.demo``; reused when already trained);
  2. one cache of the teacher's last block (``featcache extract``, RandomResizedCrop scale (0.2, 1) as WeCoLoRA);
  3. ``featcache train --method wecolora`` (k = 2: teacher blocks 0 and 2, rank r LoRA, no labels);
  4. ``featcache probe`` (linear probing, the paper's protocol) on the digits train -> test split of
     * the trained WeCoLoRA student,
     * the same student at step 0 (weight copy only: the layer-subsampled teacher),
     * a randomly initialised model of the same shape (the baseline of the issue),
     * the teacher itself (the upper bound).

Usage:
    python benchmarks/wecolora_probe.py --out bench_wecolora [--epochs 20] [--rank 32] [--blr 5e-3] [--seed 0]
                                        [--variant weco_kd] [--lora-targets qv]
Prints a table and writes ``wecolora_probe.json`` into the run directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from featcache import rundir
from featcache.config import ExtractConfig, TrainConfig
from featcache.demo import MODEL, DemoConfig, ensure_teacher, write_digits
from featcache.engine import train
from featcache.extract import run_extract
from featcache.methods import METHODS
from featcache.probe import ProbeConfig, run_probe
from featcache.errors import CacheError
from featcache.stores.base import open_reader


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_wecolora", help="working directory (digits, teacher, cache, runs)")
    p.add_argument("--k", type=int, default=2, help="depth reduction factor")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (the teacher is 96 wide)")
    p.add_argument("--variant", default="lora", choices=["lora", "weco_kd"], help="weco_kd: WeCo+KD ablation")
    p.add_argument("--lora-targets", default="all", choices=["all", "qv"], help="qv: standard-LoRA ablation")
    p.add_argument("--views", type=int, default=8, help="cached views per image")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--blr", type=float, default=5e-3, help="base lr; lr = blr * batch / 256 (WeCoLoRA)")
    p.add_argument("--seed", type=int, default=0, help="training seed (LoRA init, batch order); the digits split, "
                   "the teacher and the cache always use the demo's seed 0 so runs share them")
    p.add_argument("--name", default=None, help="run directory name under <out>/runs [wecolora_k{k}_r{rank}_...]")
    return p.parse_args()


def extract_cache(demo: DemoConfig, out: Path, views: int) -> str:
    cfg = ExtractConfig(data=str(out / "digits" / "train"), out=str(out / "cache_wecolora"), teacher=MODEL,
                        pretrained=False, checkpoint=str(out / "teacher.safetensors"), img_size=demo.img_size,
                        num_classes=10, teacher_kwargs=demo.teacher_kwargs(), layers=[-1], views=views,
                        seed=demo.seed, scale=(0.2, 1.0), hflip=0.0, batch_size=128, workers=0, device="cpu")
    try:
        return run_extract(cfg)
    except CacheError as err:  # the demo retrained its teacher (its settings changed): this cache is stale
        print(f"re-extracting: {err}")
        return run_extract(dataclasses.replace(cfg, overwrite=True))


def method_args(args: argparse.Namespace) -> dict:
    return {"k": args.k, "r": args.rank, "variant": args.variant, "lora_targets": args.lora_targets}


def run_dir(out: Path, args: argparse.Namespace) -> Path:
    name = args.name or (f"wecolora_{args.variant}_{args.lora_targets}_k{args.k}_r{args.rank}_e{args.epochs}"
                         f"_blr{args.blr:g}_s{args.seed}")
    return out / "runs" / name


def train_wecolora(cache: str, out: Path, args: argparse.Namespace) -> dict:
    cfg = TrainConfig(cache=cache, out=str(run_dir(out, args)), method="wecolora",
                      method_args=method_args(args), student=MODEL, epochs=args.epochs,
                      warmup_epochs=min(2.0, args.epochs / 5), batch_size=args.batch_size, lr=args.blr,
                      lr_base_batch=256, min_lr=0.0, betas=(0.9, 0.95), weight_decay=0.05, grad_clip=None,
                      ce_weight=0.0, seed=args.seed, workers=0, log_every=10, fingerprint_checks=4)
    return train(cfg)


def save_step0_student(cache: str, out: Path, args: argparse.Namespace) -> Path:
    """The WeCoLoRA student before any training (B = 0), exported like a trained run (student.json included)."""
    wecolora = METHODS.get("wecolora")
    manifest = open_reader(cache).manifest
    kwargs = method_args(args)
    student = wecolora.build_student(manifest, MODEL, int(manifest["img_size"]), **kwargs)
    from featcache.methods import MethodContext

    plain = wecolora(MethodContext(manifest, student, int(manifest["img_size"])), **kwargs).export_student(student)
    run = out / "runs" / f"wecolora_step0_k{args.k}"  # B = 0 / no LoRA: the same model for every rank
    run.mkdir(parents=True, exist_ok=True)
    rundir.write_student(run, plain, plain.featcache_spec, plain.pretrained_cfg["mean"], plain.pretrained_cfg["std"])
    return run


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    demo = DemoConfig(out=str(out))  # seed 0: one digits split, one teacher, one cache for every run
    times = {}
    t0 = time.perf_counter()
    write_digits(out / "digits", demo.img_size, demo.test_fraction, demo.seed)
    teacher = ensure_teacher(demo, out / "digits", out)
    times["teacher_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = extract_cache(demo, out, args.views)
    times["extract_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    final = train_wecolora(cache, out, args)
    times["train_s"] = time.perf_counter() - t0
    step0 = save_step0_student(cache, out, args)
    probe = dict(data=str(out / "digits" / "train"), val=str(out / "digits" / "test"), device="cpu")
    run = run_dir(out, args)
    t0 = time.perf_counter()
    rows = {
        f"wecolora {args.variant} (trained, label-free)": run_probe(ProbeConfig(student=str(run), **probe)),
        "weight copy only (step 0)": run_probe(ProbeConfig(student=str(step0), **probe)),
        "random init, same shape": run_probe(ProbeConfig(student=str(run), random_init=True, **probe)),
        "teacher": run_probe(ProbeConfig(student=str(out / "teacher.safetensors"), model=MODEL, img_size=demo.img_size,
                                         model_kwargs=demo.teacher_kwargs(), **probe)),
    }
    times["probe_s"] = time.perf_counter() - t0
    print(f"\nteacher {teacher['test_top1']:.1f} % supervised test top-1; WeCoLoRA {method_args(args)}, "
          f"{args.epochs} epochs x {args.views} cached views, {final['steps']} steps")
    print(f"{'student':<38} {'probe top-1':>11} {'wd':>8} {'dim':>5}")
    for name, r in rows.items():
        print(f"{name:<38} {r['top1']:>10.2f}% {r['weight_decay']:>8g} {r['feature_dim']:>5}")
    print("seconds:", {k: round(v, 1) for k, v in times.items()})
    summary = {"args": vars(args), "teacher_supervised_top1": teacher["test_top1"], "train_final": final,
               "probe_top1": {k: v["top1"] for k, v in rows.items()}, "seconds": times}
    (run_dir(out, args) / "wecolora_probe.json").write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
