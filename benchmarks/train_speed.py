"""Steps/s of cached distillation vs online-teacher distillation vs plain CE, side by side in one run.

    python benchmarks/train_speed.py --img-size 64 --batch-size 32 --steps 20

Builds a synthetic ImageFolder, extracts a deit3_small cache once (random init: no network), then times the
same `featcache.engine.train` loop three ways on the same student (deit_tiny) and views:
    (a) cached    ViTKD with targets read from the cache,
    (b) online    ViTKD with the teacher run on every batch (``--online-teacher``),
    (c) plain CE  the same student with the label loss only.
It also times the teacher forward alone (T) and the distillation step alone (S: student + method adapters,
fwd + bwd + AdamW on in-memory targets) at the same batch size and prints the speedup (b)/(a) next to its
ideal value (T + S) / S (data loading and cache reads free), and the
overhead of distilling from the cache over plain training, (a)/(c). Ratios are of time per step.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def make_data(root: Path, classes: int, per_class: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"img_{j}.png")
    return root


def extract(data: Path, out: Path, args: argparse.Namespace) -> str:
    from featcache.config import ExtractConfig
    from featcache.extract import run_extract

    cfg = ExtractConfig(data=str(data), out=str(out), teacher=args.teacher, pretrained=False, img_size=args.img_size,
                        layers=[0, 1, -1], views=args.views, dtype=args.dtype, batch_size=args.batch_size,
                        workers=args.workers, device="cpu", shard_size=64)
    return run_extract(cfg, progress=False)


def timed_run(cache: str, out: Path, args: argparse.Namespace, **overrides) -> dict:
    """One `featcache train` run of ``--steps`` steps; steps/s over the loop (setup and checkpoints excluded)."""
    from accelerate.state import AcceleratorState, GradientState

    from featcache.config import TrainConfig
    from featcache.engine import train

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = TrainConfig(cache=cache, out=str(out), student=args.student, img_size=args.img_size, epochs=10_000,
                      max_steps=args.steps, batch_size=args.batch_size, workers=args.workers, log_every=args.steps,
                      fingerprint_checks=0, **overrides)
    result = train(cfg)
    return {"steps_per_s": result["steps"] / result["train_time_s"], "images_per_s": result["images_per_s"]}


def time_components(cache: str, args: argparse.Namespace) -> tuple[float, float]:
    """Seconds per teacher forward (targets) and per distillation train step at the batch size.

    The step is the run's own `DistillTask` (student + the method's adapters): forward, backward and AdamW on
    an in-memory batch of cached targets, i.e. (a) without data loading.
    """
    from featcache.build import build_student, build_task, resolve_methods
    from featcache.config import TrainConfig
    from featcache.stores.base import open_reader
    from featcache.teachers import teacher_from_manifest

    reader = open_reader(cache)
    manifest = reader.manifest
    teacher = teacher_from_manifest(manifest)
    cfg = TrainConfig(cache=cache, method=args.method, student=args.student, img_size=args.img_size)
    specs = resolve_methods(cfg, manifest)
    task = build_task(cfg, manifest, build_student(cfg, manifest, specs, args.img_size), specs, args.img_size)
    opt = torch.optim.AdamW(task.parameters())
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    rows = [reader.read_row(i % len(reader)) for i in range(args.batch_size)]
    targets = {k: torch.stack([torch.from_numpy(r[k].copy()) for r in rows]) for k in rows[0]}
    labels = torch.randint(0, 8, (args.batch_size,))

    def student_step() -> None:
        task(x, targets, labels)["loss"].backward()
        opt.step()
        opt.zero_grad()

    return (per_call(lambda: teacher.targets(x, manifest["layers"]), args.repeats),
            per_call(student_step, args.repeats))


def per_call(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="deit3_small")
    p.add_argument("--student", default="deit_tiny")
    p.add_argument("--method", default="vitkd")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=10, help="calls timed for the teacher/student components")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root / "data", args.classes, args.per_class, size=args.img_size + 16)
        cache = extract(data, root / "cache", args)
        runs = {"cached": timed_run(cache, root / "a", args, method=args.method),
                "online": timed_run(cache, root / "b", args, method=args.method, online_teacher=True),
                "plain_ce": timed_run(cache, root / "c", args, method="ce")}
        t_teacher, t_student = time_components(cache, args)
    report(runs, t_teacher, t_student, args)


def report(runs: dict, t_teacher: float, t_student: float, args: argparse.Namespace) -> None:
    a, b, c = (runs[k]["steps_per_s"] for k in ("cached", "online", "plain_ce"))
    out = {"runs": runs, "teacher_forward_s": t_teacher, "student_step_s": t_student,
           "speedup_online_over_cached": a / b, "ideal_speedup": (t_teacher + t_student) / t_student,
           "cached_over_plain_ce": c / a, "config": vars(args), "threads": torch.get_num_threads()}
    print(f"{args.teacher} -> {args.student}, {args.img_size} px, batch {args.batch_size}, {args.steps} steps, "
          f"method {args.method}, cache {args.dtype}, workers {args.workers}, torch threads {torch.get_num_threads()}")
    print("| run | steps/s | images/s |\n|---|---|---|")
    for name, label in (("cached", "(a) cached"), ("online", "(b) online teacher"), ("plain_ce", "(c) plain CE")):
        print(f"| {label} | {runs[name]['steps_per_s']:.3f} | {runs[name]['images_per_s']:.1f} |")
    print(f"teacher forward T = {1e3 * t_teacher:.1f} ms, distillation step S = {1e3 * t_student:.1f} ms per batch")
    print(f"speedup (b)/(a) = {out['speedup_online_over_cached']:.2f}x (ideal (T+S)/S = {out['ideal_speedup']:.2f}x); "
          f"(a)/(c) = {out['cached_over_plain_ce']:.2f}x time per step vs plain CE")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
