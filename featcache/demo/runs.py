"""The demo's sweep: one extraction, then every student run (methods x seeds) from that one cache."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import MODEL, DemoConfig

if TYPE_CHECKING:
    from ..sweep import SweepSpec

#: The supervised baseline every distilled run is compared with.
BASELINE = "ce"
#: Runs whose student starts from the teacher's own blocks (not from scratch).
TEACHER_INIT = ("wecolora",)
#: The online-teacher runs: cached views replayed with the teacher run live, and fresh views every epoch.
ONLINE, FRESH_ONLINE = "kd-online", "kd-fresh-online"
#: The report's row order: the baseline, the methods from the cache, the online-teacher runs, WeCoLoRA.
TABLE_ORDER = (BASELINE, "kd", "nkd", "vitkd", "vitkd+nkd", ONLINE, FRESH_ONLINE, *TEACHER_INIT)


def vitkd_args(cfg: DemoConfig) -> dict[str, float]:
    """ViTKD's coefficients for the demo teacher's token grid and width.

    They multiply *sums* over tokens and channels (Yang et al., "ViTKD: Practical Guidelines for ViT feature
    knowledge distillation", 2022; official code ``yzd-v/cls_KD``): alpha 3e-5 and beta 3e-6 are tuned for 196
    tokens x 384 channels. The demo teacher has 16 x 96, so both are scaled by (196 * 384) / (16 * 96) = 49 to give
    the losses the paper's per-element weight.
    """
    scale = (196 * 384) / ((cfg.img_size // cfg.patch_size) ** 2 * cfg.teacher_width)
    return {"alpha": 3e-5 * scale, "beta": 3e-6 * scale}


def ce_runs(cfg: DemoConfig) -> list[dict[str, Any]]:
    """The labelled-only baseline at each learning rate of the grid, scored on heldout/ (never on test/)."""
    return [{"name": f"{BASELINE},lr={lr:g}", "method": "ce", "labelled_only": True, "lr": lr}
            for lr in cfg.ce_lrs]


def demo_runs(cfg: DemoConfig) -> list[dict[str, Any]]:
    """One entry per method (seed-free): the baseline's grid, the cache-only methods, online KD and WeCoLoRA.

    The online runs come first so that two trainings at once end together (they are the slow ones).
    """
    kd = {"temperature": 2.0}
    vitkd = vitkd_args(cfg)
    labels = {"labelled_batch": cfg.labelled_batch} if cfg.labelled_batch else {}  # the runs that learn from labels
    online = [{"name": FRESH_ONLINE, "method": "kd", "method_args": kd, "online_teacher": True, "fresh_views": True,
               **labels}]
    if cfg.online_kd:
        online.append({"name": ONLINE, "method": "kd", "method_args": kd, "online_teacher": True, **labels})
    cached = [{"name": "kd", "method": "kd", "method_args": kd, **labels},
              {"name": "nkd", "method": "nkd", **labels},
              {"name": "vitkd", "method": "vitkd", "method_args": vitkd, **labels},
              {"name": "vitkd+nkd", "method": "vitkd+nkd", "method_args": {"vitkd": vitkd}, **labels},
              # Label-free: the teacher's every-2nd block + LoRA, regressing the cached last block.
              {"name": "wecolora", "method": "wecolora", "method_args": {"k": 2, "r": 8}}]
    return online + cached + ce_runs(cfg)


def seeded_runs(cfg: DemoConfig) -> list[dict[str, Any]]:
    """Every run of :func:`demo_runs` once per student seed (``NAME,seed=S``); the parity run (cached views with
    the teacher online, which must equal ``kd``) only for the first seed."""
    runs = []
    for i, seed in enumerate(cfg.student_seeds):
        runs += [{**run, "name": f"{run['name']},seed={seed}", "seed": seed} for run in demo_runs(cfg)
                 if i == 0 or run["name"] != ONLINE]
    return runs


def base_name(run: str) -> str:
    """``kd,seed=1`` -> ``kd``; ``ce,lr=0.003,seed=0`` -> ``ce,lr=0.003``."""
    return run.rpartition(",seed=")[0] or run


def seed_of(run: str) -> int:
    return int(run.rpartition(",seed=")[2])


def extract_fields(cfg: DemoConfig, out: Path, teacher_path: Path) -> dict[str, Any]:
    """``featcache extract``'s fields: the teacher ONCE over ``views`` views of every train digit."""
    return {"data": str(out / "digits" / "train"), "out": str(out / "cache"), "teacher": MODEL, "pretrained": False,
            "checkpoint": str(teacher_path), "img_size": cfg.img_size, "num_classes": 10,
            "teacher_kwargs": cfg.teacher_kwargs(), "layers": [0, 1, -1], "views": cfg.views, "seed": cfg.seed,
            "scale": list(cfg.scale), "hflip": 0.0, "batch_size": 128, "workers": 0, "device": "cpu"}


def base_fields(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """``featcache train``'s fields shared by every run (scored on test/ unless the run says otherwise)."""
    return {"student": MODEL, "pretrained": False, "student_kwargs": cfg.student_kwargs(),
            "val": str(out / "digits" / "test"), "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "warmup_epochs": cfg.warmup_epochs, "label_shots": cfg.label_shots, "seed": cfg.seed, "workers": 0,
            "log_every": 10, "fingerprint_checks": 4, "report_to": "none",
            "keep_decoded": True,  # 4 MB decoded; decoding the PNGs again each epoch took ~2/3 of a step's data time
            **cfg.train_kwargs}


def demo_spec(cfg: DemoConfig, out: Path, teacher_path: Path) -> "SweepSpec":
    """The in-memory sweep spec: extract the cache once (unless complete), then every run of :func:`seeded_runs`."""
    from ..sweep import SweepSpec

    extract = extract_fields(cfg, out, teacher_path)
    heldout = str(out / "digits" / "heldout")
    runs = [{**run, "val": heldout} if run.get("labelled_only") else run for run in seeded_runs(cfg)]
    return SweepSpec.from_dict({"cache": extract["out"], "extract": extract, "base": base_fields(cfg, out),
                                "runs": runs, "out": str(out / "runs"), "threads": cfg.threads})
