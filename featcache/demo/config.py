"""The demo's sizes, schedules and seeds, written once (every stage reads them from here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODEL = "vit_tiny_patch16_224"  # a timm ViT family; the kwargs below shrink it to the digits' size


@dataclass
class DemoConfig:
    """Sizes and schedules of the demo (defaults: about 520 CPU-seconds; docs/SWEEPS.md says why each).

    The teacher (4 blocks, width 96) costs 5x the student's forward FLOPs (3 blocks, width 48), so reading its
    targets from the cache saves real compute. Both average-pool their tokens into the head: a CLS token learns
    slower, and a pooling teacher's prediction lives in its patch tokens, which are what the feature methods (ViTKD)
    distil; with a CLS-token teacher they are not what its head reads. The teacher trains 70 epochs (35 left it at
    85 % test top-1). Students train 40 epochs at batch 32, lr 1e-3 (3e-3 and 1e-2 trained KD worse), with a
    warm-up + cosine schedule: their test top-1 has about stopped rising by then. 5 labels per class: the few-label
    setting the distillation methods are for; every batch of a distilled run carries 8 of the 50 labelled digits
    next to its 32 items (``--labelled-batch``, FixMatch's batch), or each label would reach the label loss about
    once per epoch.
    """

    out: str = "featcache_demo"
    img_size: int = 32
    patch_size: int = 8  # a 4x4 token grid: small enough for 2 cores, one token per 2x2 original pixels
    test_fraction: float = 0.2
    heldout_fraction: float = 0.1  # of the train digits: the baseline's learning rate is chosen on it, not on test
    seed: int = 0  # the digits split, the teacher and the cache's views; students use seed, seed + 1, ...
    seeds: int = 1  # student runs per method (their init, batch order, views per epoch and masks)
    teacher_width: int = 96
    teacher_depth: int = 4
    teacher_epochs: int = 70
    teacher_lr: float = 3e-3
    teacher_batch_size: int = 128  # fewer, larger steps: ~2x the images/s of batch 64 on 2 CPU cores
    teacher_pool: str = "avg"
    student_width: int = 48
    student_depth: int = 3
    student_pool: str = "avg"  # timm global_pool: the tokens' mean feeds the head (a CLS token learns slower)
    heads: int = 3
    views: int = 8
    scale: tuple[float, float] = (0.35, 1.0)  # crops keep most of a digit (the 0.08 ImageNet default loses it)
    label_shots: int = 5
    labelled_batch: int = 8  # labelled items added to every batch of the distilled runs (--labelled-batch)
    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    warmup_epochs: float = 2.0
    ce_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)  # the labelled-only baseline's grid, scored on heldout/
    # A full KD run with the teacher online on the cached views (the parity row). Off by default: the timing stage
    # already trains both ways on the same steps and checks that the two students come out identical.
    online_kd: bool = False
    timing_steps: int = 80  # optimizer steps of each timed training (about two epochs)
    threads: int = 1  # torch threads of every training and of the timing stage
    max_train: int | None = None  # cap on train images (the quick demo)
    train_kwargs: dict[str, Any] = field(default_factory=dict)  # extra TrainConfig fields for every run

    @classmethod
    def quick(cls, out: str = "featcache_demo_quick", seeds: int = 1) -> "DemoConfig":
        """A tiny demo exercising every stage in a minute or two (numbers mean nothing)."""
        return cls(out=out, seeds=seeds, teacher_epochs=2, views=2, epochs=1, max_train=200, label_shots=5,
                   ce_lrs=(1e-3, 3e-3), timing_steps=3, online_kd=True, train_kwargs={"max_steps": 3, "fingerprint_checks": 2})

    @property
    def student_seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    def teacher_kwargs(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "embed_dim": self.teacher_width, "depth": self.teacher_depth,
                "num_heads": self.heads, "global_pool": self.teacher_pool}

    def student_kwargs(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "embed_dim": self.student_width, "depth": self.student_depth,
                "num_heads": self.heads, "global_pool": self.student_pool}
