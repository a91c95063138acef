"""CE-only baseline: no distillation term, so the run is plain supervised training on the cached views.

The label cross-entropy itself lives in :class:`~featcache.methods.task.DistillTask` (``ce_weight * CE``, label
smoothing from the run, ``label == -1`` ignored); this method only contributes a zero loss and reads no
teacher target. It makes the baseline of a sweep an ordinary run (same data order, views, schedule and
evaluation as the distilled runs), which is what a fair comparison needs.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..manifest import Manifest
from .base import METHODS, Method, MethodContext, StudentOutput


@METHODS.register("ce")
class CE(Method):
    """Supervised baseline: the run's label cross-entropy only (``ce_weight`` defaults to 1).

    Args:
        ctx: method context (unused: the baseline has no adapters).
    """

    default_ce_weight = 1.0

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)

    @classmethod
    def required_targets(cls, manifest: Manifest, **kwargs: Any) -> list[str]:
        return []

    def forward(self, student: StudentOutput, targets: Mapping[str, torch.Tensor], labels: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        return {"loss": student.logits.sum() * 0.0}
