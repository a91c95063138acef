"""Hinton knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015).

``L_KD = T^2 * mean_b KL(softmax(z_t / T) || softmax(z_s / T))`` -- the mdistiller ``kd_loss`` form
(``F.kl_div(log_softmax(z_s/T), softmax(z_t/T), reduction='batchmean') * T**2``), i.e. the KL form of
Hinton et al.'s soft-target loss with their T^2 gradient correction (Sec. 2). The run's label term
``ce_weight * CE`` lives in ``DistillTask``.

Notes on the official implementations:
    * Temperature: the mdistiller ImageNet configs (R34->R18) use T=1 (CE 0.5, KD 0.5); its CIFAR configs use
      T=4 (CE 0.1, KD 0.9). Our default is the ImageNet T=1.
    * cls_KD / ScaleKD ``KDLoss`` compute the soft cross-entropy ``-T^2 mean_b sum_c p^T_c log p^S_c`` instead of
      the KL. The value differs by the teacher's entropy (a constant w.r.t. the student), so the gradients are
      identical; we follow mdistiller's KL so the loss is 0 when the student matches the teacher.
    * ``reduction='mean'`` in ``F.kl_div`` would divide by B*C (C times too small); we use batchmean.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..manifest import Manifest
from .base import METHODS, Method, MethodContext, StudentOutput


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` at temperature ``T``, summed over classes and averaged over the batch."""
    log_p_s = F.log_softmax(logits_s.float() / temperature, dim=1)
    log_p_t = F.log_softmax(logits_t.detach().float() / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


@METHODS.register("kd")
class KD(Method):
    """Hinton KD on cached teacher logits.

    Args:
        ctx: method context (unused besides the base checks; KD has no adapters).
        temperature: softmax temperature T (1 for ImageNet configs, 4 for the mdistiller CIFAR configs).
        weight: the KD coefficient (mdistiller's ``KD.LOSS.KD_WEIGHT``); the CE coefficient is the run's
            ``ce_weight``.
    """

    def __init__(self, ctx: MethodContext, temperature: float = 1.0, weight: float = 1.0):
        super().__init__(ctx)
        if temperature <= 0:
            raise ConfigError(f"kd temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.weight = float(weight)

    @classmethod
    def required_targets(cls, manifest: Manifest, **kwargs: Any) -> list[str]:
        return ["logits"]

    def forward(self, student: StudentOutput, targets: Mapping[str, torch.Tensor], labels: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        kd = kd_loss(student.logits, targets["logits"], self.temperature)
        return {"loss": self.weight * kd, "kd": kd}
