"""The demo's teacher: a small ViT trained here on the train digits, saved once as ``teacher.safetensors``.

A plain loop on purpose: stage 2 (``featcache train``) needs a cache, and the teacher is what makes it.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from .config import MODEL, DemoConfig


def load_split(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of an ImageFolder as uint8 ``[N, 3, S, S]`` and its labels."""
    from ..sources import open_source

    source = open_source(root)
    return torch.stack([source.load(i) for i in range(len(source))]), torch.tensor(source.labels)


def eval_split(root: Path, img_size: int, data_config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out views exactly as ``featcache train --val`` evaluates them: resize to ``img_size / crop_pct`` and
    centre-crop, with the ``crop_pct`` and interpolation of the model's timm data config."""
    from ..datasets import EvalDataset
    from ..sources import open_source

    source = open_source(root)
    dataset = EvalDataset(source, img_size, source.classes, crop_pct=data_config["crop_pct"],
                          interpolation=data_config["interpolation"])
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


def _teacher_views(images: torch.Tensor, cfg: DemoConfig, epoch: int, interpolation: str) -> torch.Tensor:
    """A fresh random view of every image, drawn with the same recipe the cache will use."""
    from ..views import default_recipe, make_view

    recipe = default_recipe(cfg.img_size, scale=cfg.scale, hflip=0.0, interpolation=interpolation)
    return torch.stack([make_view(img, recipe, 10_000 + epoch, i, 0).image for i, img in enumerate(images)])


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std) -> float:
    """Top-1 (%) of ``model`` on uint8 views."""
    from ..views import normalize

    model.eval()
    correct = sum(int((model(normalize(images[i:i + 256], mean, std)).argmax(1) == labels[i:i + 256]).sum())
                  for i in range(0, len(images), 256))
    return 100.0 * correct / max(len(images), 1)


def build_teacher(cfg: DemoConfig, checkpoint: str | None = None) -> torch.nn.Module:
    """The teacher's architecture (seeded random init), with ``checkpoint``'s weights when given."""
    from ..models import load_model

    return load_model(MODEL, pretrained=False, checkpoint=checkpoint, img_size=cfg.img_size, num_classes=10,
                      **cfg.teacher_kwargs())


def train_teacher(cfg: DemoConfig, data: Path, path: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the demo teacher with AdamW + one-cycle on fresh views each epoch; save safetensors + a JSON note."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..models import normalization

    torch.manual_seed(cfg.seed)
    model = build_teacher(cfg)
    norm = normalization(model)
    x_train, y_train = load_split(data / "train")
    x_test, y_test = eval_split(data / "test", cfg.img_size, norm)
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
    note = {"settings": teacher_settings(cfg), "test_top1": top1}
    path.with_suffix(".json").write_text(json.dumps(note, indent=1))  # last: its presence means the weights are whole
    log(f"teacher: {top1:.1f} % top-1 on the {len(x_test)} test digits -> {path}")
    return note


def _teacher_epoch(model: torch.nn.Module, optim: tuple[Any, Any], views: torch.Tensor, labels: torch.Tensor,
                   norm: dict[str, Any], batch_size: int) -> float:
    """One epoch of plain cross-entropy over a random order of ``views``; returns the last batch's loss."""
    import torch.nn.functional as F

    from ..views import normalize

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


def teacher_settings(cfg: DemoConfig) -> dict[str, Any]:
    """The settings a saved teacher was trained with (a teacher is reused only when they all match)."""
    keys = ("img_size", "patch_size", "test_fraction", "heldout_fraction", "seed", "teacher_width", "teacher_depth",
            "heads", "teacher_epochs", "teacher_lr", "teacher_batch_size", "teacher_pool", "scale", "max_train")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items() if k in keys}


def ensure_teacher(cfg: DemoConfig, data: Path, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Reuse a teacher a previous demo trained with the same settings; else train it (and drop stale caches/runs)."""
    path = out / "teacher.safetensors"
    note = path.with_suffix(".json")
    if path.is_file() and note.is_file():
        saved = json.loads(note.read_text())
        if saved.get("settings") == teacher_settings(cfg):
            log(f"teacher: reusing {path} ({saved['test_top1']:.1f} % test top-1)")
            return saved
    for stale in ("cache", "runs", "timing"):  # made from another teacher: their identity no longer holds
        shutil.rmtree(out / stale, ignore_errors=True)
    return train_teacher(cfg, data, path, log)
