"""Feature regression: FitNets-style hint learning (Romero et al., "FitNets: Hints for Thin Deep Nets", 2015,
Eq. 3) with a mean-reduced MSE or MAE between the adapted student feature and the teacher's.

``L = mean_{b,t,d} |T_{b,t,d} - f(S)_{b,t,d}|^p`` with p = 2 (``loss="mse"``) or 1 (``loss="l1"``) and ``f`` a
token-wise ``Linear(D_s, D_t)`` (identity when the widths match and ``adapter="auto"``). One student block
(default: the last) regresses one cached teacher block (default: the last).

Token layout:
    * CNN students: the NCHW map is flattened to row-major tokens; if its grid differs from the teacher's patch
      grid, the (adapted) student map is resized to the teacher grid with bilinear ``F.interpolate``
      (align_corners=False). The same applies to ViT students with another patch grid.
    * ``tokens="all"`` compares patch tokens and, when both sides have them, the first
      ``min(P_s, P_t)`` prefix tokens (timm puts CLS first); ``tokens="patch"`` drops prefix tokens.
    * ``post_norm=True`` applies the teacher's final LayerNorm (frozen, from the manifest) to the target and the
      student's own final norm to the student feature -- the "last layer" mimicking of ViTKD's Table 1.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CompatError, ConfigError
from ..manifest import Manifest, block_name
from ._adapters import frozen_teacher_norm, grid_of, make_adapter, resize_tokens, split_prefix, to_tokens
from .base import METHODS, Method, MethodContext, StudentOutput, teacher_layer_targets


def feature_regression_loss(pred: torch.Tensor, target: torch.Tensor, loss: str = "mse") -> torch.Tensor:
    """Mean squared (``"mse"``) or absolute (``"l1"``) error over all elements; ``target`` is a constant."""
    target = target.detach().to(pred.dtype)
    if loss == "mse":
        return F.mse_loss(pred, target)
    if loss == "l1":
        return F.l1_loss(pred, target)
    raise ConfigError(f"featreg loss {loss!r} is unknown; use 'mse' or 'l1'")


def align_tokens(student: torch.Tensor, teacher: torch.Tensor, npt_s: int, npt_t: int, keep_prefix: bool,
                 student_grid: tuple[int, int] | None = None, teacher_grid: tuple[int, int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring adapted student tokens ``[B, T_s, D]`` onto the teacher's token layout ``[B, T_t, D]``.

    Returns the matched (student, teacher) token sets: patch tokens resized to the teacher grid, prefixed by
    the first ``min(npt_s, npt_t)`` prefix tokens of each side when ``keep_prefix``. Grids default to square.
    """
    pre_s, patch_s = split_prefix(student, npt_s)
    pre_t, patch_t = split_prefix(teacher, npt_t)
    dst = grid_of(patch_t.shape[1], teacher_grid)
    patch_s = resize_tokens(patch_s, grid_of(patch_s.shape[1], student_grid), dst)
    p = min(npt_s, npt_t) if keep_prefix else 0
    if p:
        return torch.cat([pre_s[:, :p], patch_s], 1), torch.cat([pre_t[:, :p], patch_t], 1)
    return patch_s, patch_t


@METHODS.register("featreg")
class FeatReg(Method):
    """Regress one cached teacher block from one student block through a token-wise linear adapter.

    Args:
        ctx: method context (student widths are probed with one dummy forward pass).
        student_layer: student block index (negative counts from the end).
        teacher_layer: teacher block index (negative counts from the end).
        adapter: ``"auto"`` (identity if the widths match), ``"linear"`` or ``"identity"``.
        loss: ``"mse"`` or ``"l1"`` (mean over elements).
        post_norm: compare after the final norms (teacher norm from the manifest, the student's own norm).
        tokens: ``"all"`` (prefix tokens too, when both have them) or ``"patch"``.
        weight: coefficient of the regression loss.
    """

    def __init__(self, ctx: MethodContext, student_layer: int = -1, teacher_layer: int = -1, adapter: str = "auto",
                 loss: str = "mse", post_norm: bool = False, tokens: str = "all", weight: float = 1.0):
        super().__init__(ctx)
        if tokens not in ("all", "patch"):
            raise ConfigError(f"featreg tokens {tokens!r} is unknown; use 'all' or 'patch'")
        feature_regression_loss(torch.zeros(1), torch.zeros(1), loss)  # validates `loss` early
        self.student_layer = ctx.student_layer(student_layer)
        self.target_name = block_name(ctx.teacher_layer(teacher_layer))
        self.loss_kind, self.tokens, self.post_norm, self.weight = loss, tokens, bool(post_norm), float(weight)
        self.teacher_npt = int(ctx.teacher.get("num_prefix_tokens", 0))
        grid = ctx.teacher.get("grid_size")
        self.teacher_grid = tuple(int(g) for g in grid) if grid else None
        width = ctx.student_feature_shapes([self.student_layer])[self.student_layer]
        d_s = width[-1] if len(width) == 2 else width[0]  # [T, D] tokens or [C, H, W] maps
        self.adapter = make_adapter(d_s, int(ctx.teacher["embed_dim"]), adapter)
        self.teacher_norm = frozen_teacher_norm(ctx) if self.post_norm else nn.Identity()
        if self.post_norm and getattr(ctx.student, "norm", None) is None:
            raise CompatError("featreg post_norm=True needs a student with a final `norm` module; use post_norm=False")

    @classmethod
    def required_targets(cls, manifest: Manifest, teacher_layer: int = -1, **kwargs: Any) -> list[str]:
        return teacher_layer_targets(manifest, [teacher_layer])

    def student_layers(self) -> list[int]:
        return [self.student_layer]

    def forward(self, student: StudentOutput, targets: Mapping[str, torch.Tensor], labels: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        raw = student.features[self.student_layer]
        grid_s = tuple(raw.shape[2:]) if raw.ndim == 4 else None
        feat = to_tokens(raw)
        if self.post_norm:
            feat = student.final_norm(feat)
        teacher = self.teacher_norm(targets[self.target_name].float())
        s, t = align_tokens(self.adapter(feat), teacher, student.num_prefix_tokens, self.teacher_npt,
                            keep_prefix=self.tokens == "all", student_grid=grid_s, teacher_grid=self.teacher_grid)
        reg = feature_regression_loss(s.float(), t, self.loss_kind)
        return {"loss": self.weight * reg, self.loss_kind: reg}
