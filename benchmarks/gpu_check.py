"""The GPU check: is the pipeline, not the model, what limits featcache on a GPU? Ratios side by side in one run.

1. extraction img/s (``featcache extract``, bf16 autocast, fp16 cache) against the bare bf16 teacher forward on the
   device (random uint8 views already there: no decode, no copy, nothing stored), for every ``--teachers`` model;
2. training steps/s of the same student three ways (``featcache train``, bf16 mixed precision): from the cache
   (ViTKD+NKD targets), with ``--online-teacher``, and plain CE;
3. the training read path (DataLoader over the cached views: replay + target read + decode, ``--workers``) in
   views/s against the views/s one training step consumes;
4. where a step's time goes, per batch: target read (stored bytes), decode (host numpy, and on the device),
   replay (image decode + the stored view), host-to-device copy (pinned, uint8 views + stored targets),
   compute (forward + backward + AdamW of the distillation task).

``benchmarks/gpu_check.sh`` runs it at full size on one GPU (224 px, DeiT III-S and -B teachers, DeiT-Tiny student,
about 8 minutes on an H100-class GPU) or, with ``cpu``, at tiny sizes on the CPU (what the test runs). Teachers
and students are random init (timm ``pretrained=False``: nothing is downloaded); images are synthetic JPEGs.
Prints a report and writes ``gpu_check.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--teachers", default="deit3_small,deit3_base")
    p.add_argument("--teacher-kwargs", default="{}", help="JSON timm kwargs of every teacher (CPU mode: shallow ones)")
    p.add_argument("--student", default="deit_tiny")
    p.add_argument("--student-kwargs", default="{}")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--images", type=int, default=2048, help="synthetic JPEGs (10 classes)")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=40, help="training steps per timed run")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--codec", default="none", help="codec of the training cache (e.g. pca:0.3 after a convert)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ setup

def make_images(root: Path, images: int, size: int) -> Path:
    """``images`` structured random JPEGs a little larger than the views, in 10 class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    side = max(size * 8 // 7, 16)
    for i in range(images):
        folder = root / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (max(side // 8, 2), max(side // 8, 2), 3), dtype=np.uint8)
        Image.fromarray(base).resize((side, side), Image.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> float:
    """Seconds per call of ``fn`` (after one warm-up call), the device's queue drained at both ends."""
    fn()
    synchronize(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - t) / repeats


# ------------------------------------------------------------------------------------------------ 1. extraction

def bare_forward_rate(teacher_name: str, args: argparse.Namespace, device: torch.device) -> float:
    """img/s of the bf16 teacher forward alone, on views already on the device (the ceiling of extraction)."""
    from featcache.teachers import load_teacher
    from featcache.views import normalize

    teacher = load_teacher(teacher_name, pretrained=False, img_size=args.img_size, device=device, autocast="bf16",
                           **json.loads(args.teacher_kwargs))
    views = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8,
                          device=device)
    layers = [0, 1, teacher.num_blocks() - 1]
    seconds = timed(lambda: teacher.targets(normalize(views, [0.5] * 3, [0.5] * 3), layers), device, repeats=3)
    return args.batch_size / seconds


def extract_rate(teacher_name: str, data: Path, out: Path, args: argparse.Namespace) -> tuple[float, str]:
    """img/s of ``featcache extract`` (decode, augment, pinned copy, bf16 forward, overlapped writes), wall clock."""
    from featcache.config import ExtractConfig
    from featcache.extract import run_extract

    cfg = ExtractConfig(data=str(data), out=str(out), teacher=teacher_name, pretrained=False, img_size=args.img_size,
                        teacher_kwargs=json.loads(args.teacher_kwargs), layers=[0, 1, -1], views=args.views,
                        shard_size=args.batch_size, batch_size=args.batch_size, workers=args.workers,
                        device=args.device, autocast="bf16", overwrite=True)
    t = time.perf_counter()
    path = run_extract(cfg, progress=False)
    return args.images * args.views / (time.perf_counter() - t), path


# ------------------------------------------------------------------------------------------------ 2. training

def train_rate(cache: str, out: Path, args: argparse.Namespace, **overrides: Any) -> float:
    """Training samples/s over ``--steps`` steps of ``featcache train`` (the loop's own clock, setup excluded)."""
    from accelerate.state import AcceleratorState, GradientState

    from featcache.config import TrainConfig
    from featcache.engine import train

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = TrainConfig(cache=cache, out=str(out), student=args.student, student_kwargs=json.loads(args.student_kwargs),
                      img_size=args.img_size, epochs=10_000, max_steps=args.steps, batch_size=args.batch_size,
                      workers=args.workers, log_every=args.steps, fingerprint_checks=0, mixed_precision="bf16",
                      **overrides)
    final = train(cfg)
    return final["steps"] * args.batch_size / max(final["train_time_s"], 1e-9)


def training_rates(cache: str, out: Path, args: argparse.Namespace) -> dict[str, float]:
    kw = {"method": "vitkd+nkd"}
    return {"cached": train_rate(cache, out / "cached", args, **kw),
            "online_teacher": train_rate(cache, out / "online", args, online_teacher=True, **kw),
            "plain_ce": train_rate(cache, out / "ce", args, method="ce")}


# ------------------------------------------------------------------------------------------------ 3-4. read path

def dataset(cache: str, decode: str) -> Any:
    from featcache.build import required_targets
    from featcache.datasets import CachedViewDataset
    from featcache.methods.task import method_specs
    from featcache.sources import source_from_manifest
    from featcache.stores import open_reader
    from featcache.views import Recipe

    reader = open_reader(cache)
    m = reader.manifest
    names = required_targets(m, method_specs("vitkd+nkd", {}))
    return CachedViewDataset(reader, source_from_manifest(m), Recipe.from_dict(m["views"]["recipe"]), names,
                             fingerprint_checks=0, decode=decode)


def read_path_rate(cache: str, args: argparse.Namespace, decode: str) -> float:
    """Views/s of the training DataLoader alone (replay + read + decode in ``--workers`` workers, pinned)."""
    loader = torch.utils.data.DataLoader(dataset(cache, decode), batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)  # worker start-up
    t, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch["label"])
    return n / max(time.perf_counter() - t, 1e-9)


def breakdown(cache: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Milliseconds per batch of each part of a training step, each timed alone in this process."""
    ds = dataset(cache, "device")
    rows = [ds.row_of(i) for i in range(min(args.batch_size, len(ds)))]
    reader, names = ds.reader, ds.targets
    stored = [reader.read_stored_row(r, ds.stored) for r in rows]
    out = {"target_read": timed(lambda: [reader.read_stored_row(r, ds.stored) for r in rows], device),
           "decode_host": timed(lambda: [reader.decode(s, names) for s in stored], device),
           "replay": timed(lambda: [_replay(ds, i) for i in range(len(rows))], device)}
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(rows))])
    pinned = _pin(batch, device)
    out["host_to_device"] = timed(lambda: _to(pinned, device), device)
    on_device = _to(pinned, device)
    from featcache.build import DeviceTargets

    decoder = DeviceTargets(reader.manifest, names)
    out["decode_device"] = timed(lambda: decoder(on_device["stored"]), device)
    out["compute"] = compute_time(reader.manifest, on_device, decoder(on_device["stored"]), args, device)
    return {k: v * 1000 * args.batch_size / len(rows) for k, v in out.items()}


def _replay(ds: Any, index: int) -> torch.Tensor:
    from featcache.views import replay

    return replay(ds.source.load(ds.samples[index]), ds.recipe, ds.params[ds.row_of(index)])


def _pin(batch: dict, device: torch.device) -> dict:
    if device.type != "cuda":
        return batch
    return {"image": batch["image"].pin_memory(), "stored": {k: v.pin_memory() for k, v in batch["stored"].items()}}


def _to(batch: dict, device: torch.device) -> dict:
    return {"image": batch["image"].to(device, non_blocking=True),
            "stored": {k: v.to(device, non_blocking=True) for k, v in batch["stored"].items()}}


def compute_time(manifest: dict, batch: dict, targets: dict, args: argparse.Namespace, device: torch.device
                 ) -> float:
    """Seconds of forward + backward + AdamW of the ViTKD+NKD task on a batch already on the device (bf16)."""
    from featcache.build import build_student, build_task
    from featcache.config import TrainConfig
    from featcache.methods.task import method_specs
    from featcache.views import normalize

    cfg = TrainConfig(cache="-", student=args.student, student_kwargs=json.loads(args.student_kwargs),
                      method="vitkd+nkd")
    specs = method_specs(cfg.method, {})
    task = build_task(cfg, manifest, build_student(cfg, manifest, specs, args.img_size), specs, args.img_size)
    task.to(device).train()
    opt = torch.optim.AdamW(task.parameters(), lr=1e-4)
    labels = torch.zeros(len(batch["image"]), dtype=torch.long, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = task(normalize(batch["image"], [0.5] * 3, [0.5] * 3), targets, labels)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, device, repeats=3)


# ------------------------------------------------------------------------------------------------ report

def report(res: dict[str, Any]) -> str:
    lines = [f"gpu_check on {res['device_name']} ({res['args']['img_size']} px, batch {res['args']['batch_size']}, "
             f"{res['args']['workers']} workers), {res['date']}"]
    for name, r in res["extract"].items():
        lines.append(f"extract {name}: {r['extract_img_s']:.0f} img/s vs bare bf16 forward {r['bare_img_s']:.0f} img/s"
                     f" -> {r['extract_img_s'] / r['bare_img_s']:.2f}x of the ceiling")
    t = res["train"]
    lines.append(f"train {res['args']['student']} bf16: cached {t['cached']:.0f} samples/s, online teacher "
                 f"{t['online_teacher']:.0f} ({t['cached'] / t['online_teacher']:.2f}x slower), plain CE "
                 f"{t['plain_ce']:.0f} (cached/plain {t['cached'] / t['plain_ce']:.2f})")
    for decode, rate in res["read_path"].items():
        lines.append(f"read path ({decode} decode): {rate:.0f} views/s = {rate / t['cached']:.1f}x what a cached "
                     "training step consumes")
    b = res["breakdown_ms_per_batch"]
    total = sum(b[k] for k in ("target_read", "decode_device", "replay", "host_to_device", "compute"))
    lines.append("per batch (ms; share of read + device decode + replay + copy + compute): " + ", ".join(
        f"{k} {v:.1f}" + (f" ({100 * v / total:.0f} %)" if k != "decode_host" else "") for k, v in b.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    data = make_images(out / "images", args.images, args.img_size)
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    res: dict[str, Any] = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "extract": {},
                           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu}
    cache = None
    for name in [t for t in args.teachers.split(",") if t]:
        rate, path = extract_rate(name, data, out / f"cache_{name}", args)
        res["extract"][name] = {"extract_img_s": rate, "bare_img_s": bare_forward_rate(name, args, device)}
        cache = cache or path  # the first teacher's cache trains the students
    if args.codec != "none":
        from featcache.convert import convert

        convert(cache, out / "cache_codec", "zarr", codec=args.codec, overwrite=True, progress=False)
        cache = str(out / "cache_codec")
    res["train"] = training_rates(cache, out / "runs", args)
    res["read_path"] = {d: read_path_rate(cache, args, d) for d in ("workers", "device")}
    res["breakdown_ms_per_batch"] = breakdown(cache, args, device)
    print(report(res))
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
