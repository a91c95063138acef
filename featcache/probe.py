"""Linear probing: frozen student features -> a linear classifier -> top-1 (WeCoLoRA's evaluation protocol).

Usable after any method: a run directory (``student.safetensors`` + ``student.json``) or a checkpoint file
plus ``--model``. Features are timm's ``forward_head(forward_features(x), pre_logits=True)`` -- the final-normed
CLS token or the pooled map, whichever the model's head uses -- on deterministic resize + centre-crop views
with the student's own normalisation.

The classifier is multinomial logistic regression on standardised features, fitted full-batch with L-BFGS
from a zero init (deterministic: same features -> same classifier). Its L2 strength is chosen from a small
grid on a fixed 80/20 split of the training features and the classifier is then refitted on all of them;
the validation split is used once, for the reported top-1.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import rundir
from .config import WEIGHT_DECAYS, ProbeConfig
from .errors import ConfigError
from .models import load_model, load_state_dict, normalization, resolve_device

def result_path(cfg: ProbeConfig) -> str | None:
    """``--out``, else the run directory's probe file (none for a checkpoint file: the result is only printed)."""
    if cfg.out or not Path(cfg.student).is_dir():
        return cfg.out
    return str(Path(cfg.student) / (rundir.PROBE_RANDOM_INIT_FILE if cfg.random_init else rundir.PROBE_FILE))


def student_spec(cfg: ProbeConfig) -> dict[str, Any]:
    """``student.json`` of a run dir, or the spec given by ``--model``/``--model-kwargs``/``--img-size``."""
    path = Path(cfg.student)
    if path.is_dir():
        spec = rundir.read_student(path)
        return dict(spec, img_size=cfg.img_size or spec["img_size"])
    if not cfg.model:
        raise ConfigError(f"--student {cfg.student!r} is a checkpoint file: also pass --model TIMM_NAME "
                          "(and --model-kwargs / --img-size if it is not the default shape)")
    kwargs = dict(cfg.model_kwargs)  # load_model takes these two by name: lift them out of the timm kwargs
    num_classes, img_size = kwargs.pop("num_classes", None), kwargs.pop("img_size", None)
    if img_size is not None and cfg.img_size and int(img_size) != cfg.img_size:
        raise ConfigError(f"--img-size {cfg.img_size} and --model-kwargs img_size {img_size} differ; give one")
    return {"model": cfg.model, "img_size": cfg.img_size or img_size, "num_classes": num_classes,
            "model_kwargs": kwargs}


def load_student(cfg: ProbeConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen, eval-mode student (trained weights, or a seeded random init) and its spec incl. mean/std."""
    spec = student_spec(cfg)
    path = Path(cfg.student)
    model = load_model(spec["model"], pretrained=False, img_size=spec.get("img_size"),
                       num_classes=spec.get("num_classes"), **spec.get("model_kwargs", {}))
    if not cfg.random_init:
        _load_features(model, rundir.student_weights(path) if path.is_dir() else path, spec)
    model.eval().requires_grad_(False)
    norm = normalization(model)
    spec = dict(spec, img_size=int(spec.get("img_size") or norm["input_size"]),
                mean=spec.get("mean") or norm["mean"], std=spec.get("std") or norm["std"])
    return model, spec


def _load_features(model: nn.Module, weights: Path, spec: dict[str, Any]) -> None:
    """Load every weight but the classifier's when its size differs: features are pre-logits, the head is unused."""
    heads = _classifier_prefixes(model)
    own = model.state_dict()
    state = {k: v for k, v in load_state_dict(weights).items()
             if not (k.startswith(heads) and (k not in own or own[k].shape != v.shape))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if not all(k.startswith(heads) for k in list(missing) + list(unexpected)):
        raise ConfigError(f"{weights} does not fit {spec['model']} {spec.get('model_kwargs', {})}: missing "
                          f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; pass the --model and "
                          "--model-kwargs the checkpoint was trained with")


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the model's classifier (timm's ``pretrained_cfg["classifier"]``)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    return tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))


@torch.no_grad()
def extract_features(model: nn.Module, source: Any, class_names: list[str], spec: dict[str, Any],
                     device: torch.device, batch_size: int = 64, workers: int = 0, desc: str = "features",
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logits features ``[N, D]`` and labels ``[N]`` (labels mapped onto ``class_names`` by name)."""
    from tqdm import tqdm

    from .datasets import EvalDataset
    from .views import normalize

    loader = DataLoader(EvalDataset(source, spec["img_size"], class_names), batch_size=batch_size, shuffle=False,
                        num_workers=workers)
    feats, labels = [], []
    model.to(device)
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x = normalize(batch["image"].to(device), spec["mean"], spec["std"])
        feats.append(model.forward_head(model.forward_features(x), pre_logits=True).flatten(1).float().cpu())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, steps: int = 200
               ) -> nn.Linear:
    """Multinomial logistic regression ``CE + wd·||W||²`` fitted full-batch with L-BFGS from a zero init."""
    clf = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + weight_decay * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return clf.requires_grad_(False)


def accuracy(clf: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((clf(x).argmax(1) == y).float().mean()) if len(y) else float("nan")


def choose_weight_decay(x: torch.Tensor, y: torch.Tensor, num_classes: int, grid: tuple[float, ...], steps: int
                        ) -> tuple[float, dict[str, float]]:
    """Pick the L2 strength with the best accuracy on a fixed 20 % hold-out of the training features."""
    if len(grid) == 1:
        return float(grid[0]), {}
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    cut = max(1, int(round(0.8 * len(y))))
    fit, held = order[:cut], order[cut:]
    scores = {f"{wd:g}": accuracy(fit_linear(x[fit], y[fit], num_classes, wd, steps), x[held], y[held]) for wd in grid}
    best = max(grid, key=lambda wd: (scores[f"{wd:g}"], wd))  # ties -> the stronger regularisation
    return float(best), scores


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, grid: tuple[float, ...] = WEIGHT_DECAYS, steps: int = 200) -> dict[str, Any]:
    """Standardise with the training statistics, choose the L2 strength, refit on all training features, score."""
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    wd, scores = choose_weight_decay(train_x, train_y, num_classes, tuple(grid), steps)
    clf = fit_linear(train_x, train_y, num_classes, wd, steps)
    logits = clf(val_x)
    top5 = logits.topk(min(5, num_classes), dim=1).indices.eq(val_y[:, None]).any(1).float().mean()
    return {"top1": 100.0 * accuracy(clf, val_x, val_y), "top5": 100.0 * float(top5),
            "train_top1": 100.0 * accuracy(clf, train_x, train_y), "weight_decay": wd, "holdout_top1": scores}


def run_probe(cfg: ProbeConfig, progress: bool = True) -> dict[str, Any]:
    """Probe ``cfg.student`` on ``cfg.data`` -> ``cfg.val``; write the result JSON; return it."""
    from .sources import open_local_source

    cfg.validate()
    device = resolve_device(cfg.device)
    model, spec = load_student(cfg)
    train_src, val_src = open_local_source(cfg.data, "--data"), open_local_source(cfg.val, "--val")
    classes = list(train_src.classes)
    kw = dict(spec=spec, device=device, batch_size=cfg.batch_size, workers=cfg.workers, progress=progress)
    train_x, train_y = extract_features(model, train_src, classes, desc="train features", **kw)
    val_x, val_y = extract_features(model, val_src, classes, desc="val features", **kw)
    result = linear_probe(train_x, train_y, val_x, val_y, len(classes), cfg.weight_decays, cfg.steps)
    result.update(student=cfg.student, model=spec["model"], model_kwargs=spec.get("model_kwargs", {}),
                  random_init=cfg.random_init, feature_dim=int(train_x.shape[1]), num_train=len(train_y),
                  num_val=len(val_y), num_classes=len(classes), config=asdict(cfg))
    out = result_path(cfg)
    if out:
        Path(out).write_text(json.dumps(result, indent=1, default=list))
        result["written_to"] = out
    return result
