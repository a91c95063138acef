"""``featcache demo``: the whole two-stage pipeline on scikit-learn's handwritten digits, no download needed.

1. digits: the 1,797 real 8x8 digits, upsampled to 32 px RGB PNGs, split (seeded) into train/ and test/.
2. teacher: a small ViT (timm ``vit_tiny_patch16_224`` with 4 blocks, width 96, patch 8) trained here on the
   train split with featcache's own view recipe; saved as ``teacher.safetensors`` and reused by later demos.
3. extract: the teacher runs ONCE over several views of every train image (labels kept in the cache).
4. sweep: students (4 blocks, width 48) all trained from that one cache with only ``label_shots`` labels per
   class (the rest of the train split is unlabelled): a CE-only baseline, KD, NKD, ViTKD, ViTKD+NKD, KD with
   the teacher run online for comparison, and WeCoLoRA (the teacher's every 2nd block + LoRA, label-free).
   The CE baseline sees the same views and steps but can only learn from the labelled ones; the distilled
   students also learn from the teacher on the unlabelled ones, which is the few-shot setting these methods
   are for.
5. report: the table, the plot and a verdict computed from the measured numbers.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

if TYPE_CHECKING:
    from .sweep import SweepSpec

MODEL = "vit_tiny_patch16_224"  # a timm ViT family; the kwargs below shrink it to the digits' size


@dataclass
class DemoConfig:
    """Sizes and schedules of the demo (defaults: about 10 minutes on 2 CPU cores)."""

    out: str = "featcache_demo"
    img_size: int = 32
    patch_size: int = 8  # a 4x4 token grid: small enough for 2 cores, one token per 2x2 original pixels
    test_fraction: float = 0.2
    seed: int = 0
    teacher_width: int = 96
    teacher_depth: int = 4
    teacher_epochs: int = 35
    teacher_lr: float = 3e-3
    teacher_batch_size: int = 128  # fewer, larger steps: ~2x the images/s of batch 64 on 2 CPU cores
    student_width: int = 48
    student_depth: int = 4
    heads: int = 3
    views: int = 8
    scale: tuple[float, float] = (0.35, 1.0)  # crops keep most of a digit (the 0.08 ImageNet default loses it)
    label_shots: int = 10
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    warmup_epochs: float = 1.0
    online_kd: bool = True
    max_train: int | None = None  # cap on train images (the quick demo)
    train_kwargs: dict[str, Any] = field(default_factory=dict)  # extra TrainConfig fields for every run

    @classmethod
    def quick(cls, out: str = "featcache_demo_quick") -> "DemoConfig":
        """A tiny demo exercising every stage in a minute or two (numbers mean nothing)."""
        return cls(out=out, teacher_epochs=2, views=2, epochs=1, max_train=200, label_shots=5,
                   train_kwargs={"max_steps": 3, "fingerprint_checks": 2})

    def teacher_kwargs(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "embed_dim": self.teacher_width, "depth": self.teacher_depth,
                "num_heads": self.heads}

    def student_kwargs(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "embed_dim": self.student_width, "depth": self.student_depth,
                "num_heads": self.heads}


class Stopwatch:
    """Times named stages and prints them as they finish (the demo's per-stage timings)."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log, self.times, self.start = log, {}, time.perf_counter()

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        self.log(f"\n== {name} ==")
        t0 = time.perf_counter()
        result = fn()
        self.times[name] = time.perf_counter() - t0
        self.log(f"== {name}: {self.times[name]:.1f} s ==")
        return result

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


# --------------------------------------------------------------------------------------------------------------
# 1. digits as ImageFolders
# --------------------------------------------------------------------------------------------------------------

def digits_arrays(img_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 RGB ``[N, S, S, 3]`` (bilinear upsampling of the 8x8, 0-16 images) + labels."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    rgb = x.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1)
    return rgb.contiguous().numpy(), digits.target.astype(np.int64)


def write_digits(root: str | Path, img_size: int = 32, test_fraction: float = 0.2, seed: int = 0,
                 max_train: int | None = None) -> dict[str, Any]:
    """Write ``root/train/<digit>/*.png`` and ``root/test/<digit>/*.png`` (stratified seeded split), once."""
    root = Path(root)
    marker = root / "digits.json"
    want = {"img_size": img_size, "test_fraction": test_fraction, "seed": seed, "max_train": max_train}
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == want:
        return json.loads(marker.read_text())
    from PIL import Image
    from sklearn.model_selection import train_test_split

    images, labels = digits_arrays(img_size)
    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=labels)
    train = np.sort(train)[:max_train] if max_train else np.sort(train)
    shutil.rmtree(root, ignore_errors=True)
    for split, ids in (("train", train), ("test", np.sort(test))):
        for i in ids:
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
    info = {"settings": want, "train": len(train), "test": len(test)}
    marker.write_text(json.dumps(info))
    return info


# --------------------------------------------------------------------------------------------------------------
# 2. the teacher
# --------------------------------------------------------------------------------------------------------------

def _load_split(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from .sources import open_source

    source = open_source(root)
    return torch.stack([source.load(i) for i in range(len(source))]), torch.tensor(source.labels)


def _eval_split(root: Path, img_size: int, interpolation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out views exactly as ``featcache train --val`` evaluates them (resize + centre crop)."""
    from .sources import open_source
    from .datasets import EvalDataset

    source = open_source(root)
    dataset = EvalDataset(source, img_size, source.classes, interpolation=interpolation)
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


def _teacher_views(images: torch.Tensor, cfg: DemoConfig, epoch: int, interpolation: str) -> torch.Tensor:
    """A fresh random view of every image, drawn with the same recipe the cache will use."""
    from .views import default_recipe, make_view

    recipe = default_recipe(cfg.img_size, scale=cfg.scale, hflip=0.0, interpolation=interpolation)
    return torch.stack([make_view(img, recipe, 10_000 + epoch, i, 0).image for i, img in enumerate(images)])


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std) -> float:
    """Top-1 (%) of ``model`` on uint8 views."""
    from .views import normalize

    model.eval()
    correct = sum(int((model(normalize(images[i:i + 256], mean, std)).argmax(1) == labels[i:i + 256]).sum())
                  for i in range(0, len(images), 256))
    return 100.0 * correct / max(len(images), 1)


def train_teacher(cfg: DemoConfig, data: Path, path: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the demo teacher with AdamW + one-cycle on fresh views each epoch; save safetensors + a JSON note.

    A plain loop on purpose: stage 2 (``featcache train``) needs a cache, and the teacher is what makes it.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .models import load_model, normalization

    torch.manual_seed(cfg.seed)
    model = load_model(MODEL, pretrained=False, img_size=cfg.img_size, num_classes=10, **cfg.teacher_kwargs())
    norm = normalization(model)
    x_train, y_train = _load_split(data / "train")
    x_test, y_test = _eval_split(data / "test", cfg.img_size, norm["interpolation"])
    steps_per_epoch = math.ceil(len(x_train) / cfg.teacher_batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.teacher_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.teacher_lr, total_steps=cfg.teacher_epochs * steps_per_epoch,
                                                pct_start=0.1)
    bar = tqdm(range(cfg.teacher_epochs), desc="teacher", unit="epoch")
    for epoch in bar:
        views = _teacher_views(x_train, cfg, epoch, norm["interpolation"])
        loss = _teacher_epoch(model, (opt, sched), views, y_train, norm, cfg.teacher_batch_size)
        bar.set_postfix(loss=f"{loss:.3f}")
    top1 = evaluate(model, x_test, y_test, norm["mean"], norm["std"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    note = {"settings": _teacher_settings(cfg), "test_top1": top1}
    path.with_suffix(".json").write_text(json.dumps(note, indent=1))
    log(f"teacher: {top1:.1f} % top-1 on the {len(x_test)} test digits -> {path}")
    return note


def _teacher_epoch(model: torch.nn.Module, optim: tuple[Any, Any], views: torch.Tensor, labels: torch.Tensor,
                   norm: dict[str, Any], batch_size: int) -> float:
    """One epoch of plain cross-entropy over a random order of ``views``; returns the last batch's loss."""
    import torch.nn.functional as F

    from .views import normalize

    opt, sched = optim
    model.train()
    order = torch.randperm(len(views))
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        loss = F.cross_entropy(model(normalize(views[idx], norm["mean"], norm["std"])), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


def _teacher_settings(cfg: DemoConfig) -> dict[str, Any]:
    keys = ("img_size", "patch_size", "test_fraction", "seed", "teacher_width", "teacher_depth", "heads",
            "teacher_epochs", "teacher_lr", "teacher_batch_size", "scale", "max_train")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items() if k in keys}


def ensure_teacher(cfg: DemoConfig, data: Path, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Reuse a teacher a previous demo trained with the same settings; else train it (and drop stale caches/runs)."""
    path = out / "teacher.safetensors"
    note = path.with_suffix(".json")
    if path.is_file() and note.is_file():
        saved = json.loads(note.read_text())
        if saved.get("settings") == _teacher_settings(cfg):
            log(f"teacher: reusing {path} ({saved['test_top1']:.1f} % test top-1)")
            return saved
    for stale in ("cache", "runs"):  # made from another teacher: their identity no longer holds
        shutil.rmtree(out / stale, ignore_errors=True)
    return train_teacher(cfg, data, path, log)


# --------------------------------------------------------------------------------------------------------------
# 3-4. one cache, one sweep
# --------------------------------------------------------------------------------------------------------------

def demo_runs(cfg: DemoConfig) -> list[dict[str, Any]]:
    """The sweep's runs: the baseline, the cache-only methods, online KD, and WeCoLoRA (label-free).

    ViTKD's coefficients multiply *sums* over tokens and channels (Yang et al., "ViTKD: Practical Guidelines for
    ViT feature knowledge distillation", 2022; official code ``yzd-v/cls_KD``): alpha 3e-5 and beta 3e-6 are
    tuned for 196 tokens x 384 channels. The demo teacher has 16 x 96, so both are scaled by
    (196 * 384) / (16 * 96) = 49 to give the losses the paper's per-element weight.
    """
    scale = (196 * 384) / ((cfg.img_size // cfg.patch_size) ** 2 * cfg.teacher_width)
    vitkd = {"alpha": 3e-5 * scale, "beta": 3e-6 * scale}
    kd = {"temperature": 2.0}
    runs = [{"name": "ce-only", "method": "ce"},
            {"name": "kd", "method": "kd", "method_args": kd},
            {"name": "nkd", "method": "nkd"},
            {"name": "vitkd", "method": "vitkd", "method_args": vitkd},
            {"name": "vitkd+nkd", "method": "vitkd+nkd", "method_args": {"vitkd": vitkd}}]
    if cfg.online_kd:
        runs.append({"name": "kd-online-teacher", "method": "kd", "method_args": kd, "online_teacher": True})
    # Label-free: the student is the teacher's every-2nd block + LoRA, regressing the cached last block.
    runs.append({"name": "wecolora-teacher-init", "method": "wecolora", "method_args": {"k": 2, "r": 8}})
    return runs


def demo_spec(cfg: DemoConfig, out: Path, teacher_path: Path) -> "SweepSpec":
    """The in-memory sweep spec: extract the cache once (unless complete), then every run of :func:`demo_runs`."""
    from .sweep import SweepSpec

    extract = {"data": str(out / "digits" / "train"), "out": str(out / "cache"), "teacher": MODEL,
               "pretrained": False, "checkpoint": str(teacher_path), "img_size": cfg.img_size, "num_classes": 10,
               "teacher_kwargs": cfg.teacher_kwargs(), "layers": [0, 1, -1], "views": cfg.views, "seed": cfg.seed,
               "scale": list(cfg.scale), "hflip": 0.0, "batch_size": 128, "workers": 0, "device": "cpu"}
    base = {"student": MODEL, "pretrained": False, "student_kwargs": cfg.student_kwargs(),
            "val": str(out / "digits" / "test"), "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "warmup_epochs": cfg.warmup_epochs, "label_shots": cfg.label_shots, "seed": cfg.seed, "workers": 0,
            "log_every": 5, "fingerprint_checks": 4, **cfg.train_kwargs}
    return SweepSpec.from_dict({"cache": extract["out"], "extract": extract, "base": base,
                                "runs": demo_runs(cfg), "out": str(out / "runs")})


def verdict(rows: list[dict[str, Any]], baseline: str = "ce-only") -> list[str]:
    """Sentences comparing every run's final top-1 with the CE-only baseline, from the measured numbers."""
    by_name = {r["run"]: r for r in rows}
    base = by_name.get(baseline, {}).get("top1")
    if base is None:
        return [f"no verdict: the {baseline} baseline has no final top-1"]
    lines, better = [], []
    for r in rows:
        if r["run"] == baseline or r.get("top1") is None:
            continue
        delta = r["top1"] - base
        if delta > 0:
            better.append(r["run"])
        lines.append(f"  {r['run']}: {r['top1']:.1f} % ({delta:+.1f} points vs {baseline} {base:.1f} %)")
    head = (f"{len(better)} of {len(lines)} distilled run(s) beat the CE-only baseline: {', '.join(better)}"
            if better else "no distilled run beat the CE-only baseline in this run")
    return ["verdict: " + head, *lines, *_online_cost(by_name)]


def _online_cost(by_name: dict[str, dict[str, Any]]) -> list[str]:
    cached, online = by_name.get("kd", {}), by_name.get("kd-online-teacher", {})
    if not cached.get("train_time_s") or not online.get("train_time_s"):
        return []
    same = "identical" if cached.get("top1") == online.get("top1") else "not identical"
    return [f"  KD with the teacher run online: {online['top1']:.2f} % vs {cached['top1']:.2f} % from the cache "
            f"({same}); training took {online['train_time_s']:.0f} s vs {cached['train_time_s']:.0f} s "
            "(wall clock, shared CPU)"]


# --------------------------------------------------------------------------------------------------------------
# 5. everything
# --------------------------------------------------------------------------------------------------------------

def run_demo(cfg: DemoConfig | None = None, jobs: int | None = None, log: Callable[[str], None] = print
             ) -> dict[str, Any]:
    """Run the whole demo; returns the report paths, the table rows, the verdict and per-stage seconds."""
    from .sweep import run_sweep

    cfg = cfg or DemoConfig()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    watch = Stopwatch(log)
    data = out / "digits"
    info = watch.stage("1/3 digits", lambda: write_digits(data, cfg.img_size, cfg.test_fraction, cfg.seed,
                                                            cfg.max_train))
    log(f"digits: {info['train']} train / {info['test']} test images, {cfg.img_size} px, in {data}")
    teacher = watch.stage("2/3 teacher", lambda: ensure_teacher(cfg, data, out, log))
    spec = demo_spec(cfg, out, out / "teacher.safetensors")
    jobs = jobs or min(os.cpu_count() or 1, 4)
    result = watch.stage("3/3 extract once + sweep", lambda: run_sweep(spec, jobs=jobs, raise_failures=False,
                                                                                 log=log))
    setting = (f"teacher: {teacher['test_top1']:.1f} % test top-1; students: {cfg.label_shots} labels per class + "
               f"the teacher's targets for {cfg.views} cached views of all {info['train']} train images")
    return {**_summarize(Path(spec.out), result, watch, setting, log), "teacher_top1": teacher["test_top1"]}


def _summarize(runs_dir: Path, result: dict[str, Any], watch: Stopwatch, setting: str, log: Callable[[str], None]
               ) -> dict[str, Any]:
    """Print the table, ``setting``, the verdict, the timings and the paths; return what they are made of."""
    from .report import summarize_run

    rows = [summarize_run(runs_dir / name).row for name in result["runs"]]
    lines = verdict(rows)
    log("\n" + result["report"]["table"])
    log(setting)
    log("\n".join(lines))
    timings = ", ".join(f"{k.split(' ', 1)[1]} {v:.0f} s" for k, v in watch.times.items())
    log(f"\ntotal {watch.total:.0f} s ({timings})")
    log(f"report: {result['report']['md']}\ntable:  {result['report']['csv']}\nplot:   {result['report']['png']}")
    failed = {k: v for k, v in result["runs"].items() if v.startswith("failed")}
    if failed:
        log(f"FAILED runs (re-run the demo to retry them): {failed}")
    return {"report": result["report"], "rows": rows, "failed": failed, "verdict": lines, "seconds": dict(watch.times),
            "total_s": watch.total}
