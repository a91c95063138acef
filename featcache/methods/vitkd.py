"""ViTKD (Yang et al., "ViTKD: Practical Guidelines for ViT Feature Knowledge Distillation", arXiv 2209.02432,
Eq. 2 (mimicking), Eqs. 5-8 (generation), Eq. 9 (total)), following the official
``cls_KD/mmcls/models/dis_losses/vitkd.py`` (commit ``e21ad377``).

    L_lr  = sum_k sum_{n,d} (T_k - fc_k(S_k))^2 / B          shallow blocks k (default 0 and 1), patch tokens
    L_gen = sum_{n,d} M_n (norm_T(T_L) - G(mask(fc(norm_S(S_L)))))^2 / (B * lam)     deep block, patch tokens
    loss  = alpha * L_lr + beta * L_gen

Where the paper and the official code differ we follow the code:
    * Sum reduction divided by B (the paper's per-sample sums, batch-averaged) and an extra ``1/lam`` on L_gen
      (absent from Eq. 8). So ``alpha * L_lr = alpha * 2 * N * D_t * mse`` (about 4.5 x mse for DeiT3-S -> DeiT-T).
    * The mask keeps exactly ``int(N * (1 - lam))`` tokens per sample (MAE's argsort of ``torch.rand(B, N)``),
      not an independent ``r_i < lam`` draw per token (Eqs. 5-6).
    * The deep features are taken after each model's final LayerNorm; the shallow ones are raw block outputs.
      featcache extension: an average-pooling ViT (timm's ``global_pool="avg"``) has no per-token final norm (its
      ``fc_norm`` normalises the pooled vector), so on either side its deep feature is the last block's tokens.
    * Prefix tokens (CLS, dist) are dropped on both sides.
The logged parts ``mimic`` = L_lr and ``generation`` = L_gen are the terms without alpha and beta (the 1/lam
normalisation belongs to L_gen: it cancels the fraction of tokens that are scored).

Variants of Tables 2-3 (not in the official code; our reading of Sec. 3.1-3.2):
    * ``mimic="correlation"`` (Eqs. 3-4): per sample ``M = F F^T / sqrt(D)`` over the N patch tokens of each
      side with its own width D (no adapter), ``L_rm = sum_k sum_{i,j} (M^T_k - M^S_k)^2 / B``, weighted by alpha.
    * ``generation="self_attention" | "cross_attention"``: MAE-decoder / CAE-regressor blocks of ``gen_depth``
      layers (the paper uses 6), see :mod:`featcache.methods._generators`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn

from ..errors import CompatError, ConfigError
from ..manifest import Manifest, block_name
from ._adapters import frozen_teacher_norm, grid_of, make_adapter
from ._generators import build_generator
from .base import METHODS, Method, MethodContext, StudentOutput, teacher_layer_targets


class Masking(NamedTuple):
    """A per-sample random masking: ``mask`` [B, N] (1 = masked), MAE's restore/keep/masked index sets."""

    mask: torch.Tensor
    ids_restore: torch.Tensor
    ids_keep: torch.Tensor
    ids_masked: torch.Tensor


def random_masking(batch: int, num_tokens: int, lam: float, device: torch.device | str = "cpu") -> Masking:
    """MAE random masking: ``noise = torch.rand(B, N)``; the ``int(N * (1 - lam))`` smallest are kept."""
    len_keep = int(num_tokens * (1 - lam))
    noise = torch.rand(batch, num_tokens, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_tokens, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(mask, ids_restore, ids_shuffle[:, :len_keep], ids_shuffle[:, len_keep:])


def apply_mask(x: torch.Tensor, mask_token: torch.Tensor, masking: Masking) -> torch.Tensor:
    """Replace masked tokens of ``x`` [B, N, D] by ``mask_token`` [1, 1, D] (the official gather construction)."""
    b, n, d = x.shape
    keep = torch.gather(x, 1, masking.ids_keep.unsqueeze(-1).expand(-1, -1, d))
    x_ = torch.cat([keep, mask_token.to(x.dtype).expand(b, n - keep.shape[1], d)], dim=1)
    return torch.gather(x_, 1, masking.ids_restore.unsqueeze(-1).expand(-1, -1, d))


def vitkd_mimic_loss(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """``L_lr = sum_k sum (T_k - P_k)^2 / B`` over [B, N, D] pairs (Eq. 2, official sum / B)."""
    b = preds[0].shape[0]
    return sum(((p.float() - t.detach().float()) ** 2).sum() for p, t in zip(preds, targets)) / b


def correlation_matrix(f: torch.Tensor) -> torch.Tensor:
    """Token-token correlation ``F F^T / sqrt(D)`` per sample: [B, N, D] -> [B, N, N] (Eq. 3)."""
    return f @ f.transpose(1, 2) / math.sqrt(f.shape[-1])


def correlation_mimic_loss(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """``L_rm = sum_k sum_{i,j} (M^T_k - M^S_k)^2 / B`` (Eq. 4, batch-averaged like L_lr)."""
    corr = [correlation_matrix(p.float()) for p in preds]
    return vitkd_mimic_loss(corr, [correlation_matrix(t.detach().float()) for t in targets])


def vitkd_generation_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """``L_gen = sum_{b,n,d} M_bn (T - G)^2 / (B * lam)`` over masked tokens only (Eq. 8, official scaling)."""
    sq = (pred.float() - target.detach().float()) ** 2
    return (sq * mask.unsqueeze(-1)).sum() / (pred.shape[0] * lam)


@METHODS.register("vitkd")
class ViTKD(Method):
    """ViTKD: linear mimicking of shallow blocks + masked generation of the final-normed deep block.

    Args:
        ctx: method context (student widths probed by one dummy forward pass).
        student_shallow: student blocks mimicking ``teacher_shallow`` (pairwise).
        teacher_shallow: teacher blocks to mimic (official: 0 and 1).
        student_deep: student block whose final-normed patch tokens generate the teacher's (official: last).
        teacher_deep: teacher block whose final-normed patch tokens are generated (official: last).
        alpha: weight of the mimicking term (3e-5).
        beta: weight of the generation term (3e-6).
        lam: masking ratio lambda (0.5); the generation term is divided by it.
        mimic: ``"linear"`` (official) or ``"correlation"`` (Table 2/3 ablation).
        generation: ``"conv"`` (official), ``"self_attention"`` or ``"cross_attention"`` (Table 2 ablation).
        gen_depth: layers of the attention generators (the paper uses 6).
        gen_heads: heads of the attention generators (default: D_t // 64, or 1).
    """

    def __init__(self, ctx: MethodContext, student_shallow: Sequence[int] = (0, 1),
                 teacher_shallow: Sequence[int] = (0, 1), student_deep: int = -1, teacher_deep: int = -1,
                 alpha: float = 3e-5, beta: float = 3e-6, lam: float = 0.5, mimic: str = "linear",
                 generation: str = "conv", gen_depth: int = 6, gen_heads: int | None = None):
        super().__init__(ctx)
        if len(student_shallow) != len(teacher_shallow):
            raise ConfigError(f"vitkd student_shallow {list(student_shallow)} and teacher_shallow "
                              f"{list(teacher_shallow)} must pair up one to one")
        if not 0 < lam <= 1:
            raise ConfigError(f"vitkd lam (masking ratio) must be in (0, 1], got {lam}")
        if mimic not in ("linear", "correlation"):
            raise ConfigError(f"vitkd mimic {mimic!r} is unknown; use 'linear' or 'correlation'")
        self.alpha, self.beta, self.lam, self.mimic = float(alpha), float(beta), float(lam), mimic
        self.s_shallow = [ctx.student_layer(i) for i in student_shallow]
        self.s_deep = ctx.student_layer(student_deep)
        self.t_shallow = [block_name(ctx.teacher_layer(i)) for i in teacher_shallow]
        self.t_deep = block_name(ctx.teacher_layer(teacher_deep))
        self.teacher_npt = int(ctx.teacher.get("num_prefix_tokens", 0))
        self.teacher_grid = ctx.teacher.get("grid_size")
        d_t = int(ctx.teacher["embed_dim"])
        widths = self._student_widths(ctx)
        if getattr(ctx.student, "norm", None) is None:
            raise CompatError("vitkd needs a student with a final `norm` (its deep feature is taken after it)")
        # Correlation matrices are N x N on both sides, so that variant needs no width adapter (Sec. 3.1).
        self.align2 = nn.ModuleList([make_adapter(widths[i], d_t) if mimic == "linear" else nn.Identity()
                                     for i in self.s_shallow])
        self.align = make_adapter(widths[self.s_deep], d_t)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d_t))
        self.generation = build_generator(generation, d_t, gen_depth, gen_heads)
        self.teacher_norm = frozen_teacher_norm(ctx)

    def _student_widths(self, ctx: MethodContext) -> dict[int, int]:
        shapes = ctx.student_feature_shapes(self.student_layers())
        bad = {i: s for i, s in shapes.items() if len(s) != 2}
        if bad:
            raise CompatError(f"vitkd needs ViT-like [B, T, D] student features, got per-sample shapes {bad}; "
                              "use featreg for CNN students")
        return {i: s[-1] for i, s in shapes.items()}

    @classmethod
    def required_targets(cls, manifest: Manifest, teacher_shallow: Sequence[int] = (0, 1), teacher_deep: int = -1,
                         **kwargs: Any) -> list[str]:
        return list(dict.fromkeys(teacher_layer_targets(manifest, [*teacher_shallow, teacher_deep])))

    def student_layers(self) -> list[int]:
        return sorted({*self.s_shallow, self.s_deep})

    def forward(self, student: StudentOutput, targets: Mapping[str, torch.Tensor], labels: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        mimic = self._mimic(student, targets)
        gen = self._generation(student, targets)
        return {"loss": self.alpha * mimic + self.beta * gen, "mimic": mimic, "generation": gen}

    def _mimic(self, student: StudentOutput, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        npt = student.num_prefix_tokens
        preds = [a(student.features[i][:, npt:]) for a, i in zip(self.align2, self.s_shallow)]
        tgts = [targets[name][:, self.teacher_npt:] for name in self.t_shallow]
        for p, t in zip(preds, tgts):
            _check_same_grid(p.shape[1], t.shape[1])
        loss_fn = vitkd_mimic_loss if self.mimic == "linear" else correlation_mimic_loss
        return loss_fn(preds, tgts)

    def _generation(self, student: StudentOutput, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = self.align(student.final_norm(student.features[self.s_deep])[:, student.num_prefix_tokens:])
        target = self.teacher_norm(targets[self.t_deep].float())[:, self.teacher_npt:]
        b, n, _ = x.shape
        _check_same_grid(n, target.shape[1])
        masking = random_masking(b, n, self.lam, x.device)
        pred = self.generation(apply_mask(x, self.mask_token, masking), masking.ids_masked,
                               grid_of(n, self.teacher_grid))
        return vitkd_generation_loss(pred, target, masking.mask, self.lam)


def _check_same_grid(n_student: int, n_teacher: int) -> None:
    if n_student != n_teacher:
        raise CompatError(f"vitkd needs the same patch grid for student and teacher: the student has {n_student} "
                          f"patch tokens, the teacher {n_teacher}; match the student's img_size/patch_size")
