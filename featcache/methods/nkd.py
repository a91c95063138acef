"""NKD: Normalized Knowledge Distillation (Yang et al., ICCV 2023, "From Knowledge Distillation to
Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", the NKD loss).

Following the official ``cls_KD/mmcls/models/dis_losses/nkd.py`` (commit ``9466b3f3``, 2023-10-10), with
t the target class, p = softmax(z), q = softmax(z_{not t} / T) over the C-1 non-target classes:

    L_t  = -mean_b  p^T_t * log p^S_t                      (no temperature; p^T_t detached)
    L_nt = -T^2 * mean_b sum_{i != t} q^T_i * log q^S_i    (softmax renormalised over the C-1 non-targets)
    L_NKD = L_t + gamma * L_nt

Notes:
    * Defaults ``temperature=1.0, gamma=1.0`` are the DeiT distillation configs (``deit*_distill_deit*_img.py``)
      used with ViTKD; the official class default (and the ResNet configs) use ``gamma=1.5``.
    * Before commit ``9466b3f3`` the mask used ``scatter_(1, label, 1)``: the target column was *not* removed and
      the non-target softmax ran over all C classes. We implement the fixed version.
    * Both terms are cross-entropies, not KLs, so they include teacher-entropy constants (same gradients).
    * Soft labels ``[B, C]`` (mixup/cutmix scores) use their argmax as the target class, as the official code.
    * featcache extension: rows labelled ``-1`` (unlabelled views) use the teacher's argmax as the target class;
      the official code always has labels. This keeps NKD usable on label-free caches.
    * Logged parts are the unweighted terms ``target`` = L_t and ``non_target`` = L_nt (T^2 included, gamma not).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..manifest import Manifest
from .base import METHODS, Method, MethodContext, StudentOutput


def nkd_target_index(labels: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
    """Target class per row: argmax of soft labels, the hard label, or the teacher's argmax where the row is unlabelled
    (label -1, or an all-zero soft row)."""
    if labels.ndim > 1:
        return torch.where(labels.sum(dim=1) > 0, labels.argmax(dim=1), logits_t.argmax(dim=1))
    labels = labels.long()
    return torch.where(labels >= 0, labels, logits_t.argmax(dim=1))


def nkd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two NKD terms ``(L_t, L_nt)`` (see the module docstring); the total is ``L_t + gamma * L_nt``.

    Args:
        logits_s: student logits [B, C].
        logits_t: teacher logits [B, C] (treated as constants).
        target: target class per row [B] (long).
        temperature: temperature of the non-target softmax only.
    """
    logits_s, logits_t = logits_s.float(), logits_t.detach().float()
    b, c = logits_s.shape
    index = target.view(b, 1)
    s_t = F.log_softmax(logits_s, dim=1).gather(1, index)
    t_t = F.softmax(logits_t, dim=1).gather(1, index)
    loss_t = -(t_t * s_t).mean()
    # The C-1 non-target columns of each row, gathered (boolean indexing would sync the device every step).
    cols = torch.arange(c - 1, device=logits_s.device).expand(b, -1)
    non_target = cols + (cols >= index).long()
    log_q_s = F.log_softmax(logits_s.gather(1, non_target) / temperature, dim=1)
    q_t = F.softmax(logits_t.gather(1, non_target) / temperature, dim=1)
    loss_nt = -(q_t * log_q_s).sum(dim=1).mean() * temperature ** 2
    return loss_t, loss_nt


@METHODS.register("nkd")
class NKD(Method):
    """Normalized KD on cached teacher logits.

    Args:
        ctx: method context (NKD has no adapters).
        temperature: temperature of the renormalised non-target distributions (1.0 in every official config).
        gamma: weight of the non-target term (1.0 for the DeiT configs; 1.5 is the official class default).
    """

    def __init__(self, ctx: MethodContext, temperature: float = 1.0, gamma: float = 1.0):
        super().__init__(ctx)
        if temperature <= 0:
            raise ConfigError(f"nkd temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gamma = float(gamma)

    @classmethod
    def required_targets(cls, manifest: Manifest, **kwargs: Any) -> list[str]:
        return ["logits"]

    def forward(self, student: StudentOutput, targets: Mapping[str, torch.Tensor], labels: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        logits_t = targets["logits"]
        target = nkd_target_index(labels, logits_t)
        loss_t, loss_nt = nkd_loss(student.logits, logits_t, target, self.temperature)
        return {"loss": loss_t + self.gamma * loss_nt, "target": loss_t, "non_target": loss_nt}
