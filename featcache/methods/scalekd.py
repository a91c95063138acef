"""ScaleKD: cross attention projector + dual-view feature mimicking (+ teacher parameter perception) + logit KD.

Fan et al., "ScaleKD: Strong Vision Transformers Could Be Excellent Teachers", NeurIPS 2024 (official code
``deep-optimization/ScaleKD``: ``fmd.py`` ``AttentionProjector``/``FreqMaskingDistillLoss``, ``kd.py``).

* **CAP** (:class:`CrossAttentionProjector`): the student map (any timm architecture: ViT tokens, CNN or
  Mixer maps) goes through conv3x3 + BN + ReLU plus a learnable position embedding and becomes keys/values;
  learnable queries sit on the teacher's token grid; one multi-head cross attention with softmax scale 5,
  then ``LN`` and an FFN with the identity on the normed input. Two independent projectors per target: one
  for the spatial view, one for the frequency view.
* **DFM** (:func:`spatial_view_loss`, :func:`frequency_view_loss`): channel-L2-normalised squared error
  summed over C·H·W and divided by the batch, on the direct view and on the "alternative" view with the DCT
  DC component zeroed -- numerically the per-channel spatial mean removed (the DC coefficient of a DCT-II is the
  mean up to a factor, so zeroing it and inverting subtracts the mean; checked in the tests against an explicit
  DCT-II). Weights ``alpha = (0.08, 0.06)``.
* **Logit KD** at T = 1 in the official soft cross-entropy form ``-T² mean_b Σ p_t log p_s`` (weight 0.5);
  it differs from KL(teacher‖student) by the teacher entropy only (same gradients). The label CE is the
  shared one in ``DistillTask`` (default weight 0.5, label smoothing from the train config).

Mapping the official Swin-L stage-3/4 path to a cached ViT teacher: the teacher target is the final-normed
last block's patch tokens (cached ``block_{L-1}`` + the manifest's final norm) as a ``[B, D_t, Hg, Wg]`` map,
the role of ``feat_T_s4``. The student map is the last feature map (ViT: last block after the student's final
norm, like the official block-11 tap).

**TPP** (``tpp=True``, off by default because it is *not* cache-only): two more projectors map the student
map to teacher block ``L-2``'s token space (queries on the teacher grid, plus learnable prefix tokens for the
CLS/register slots); the result is pushed, *with* gradients, through the teacher's frozen last block and
final norm -- the ViT analogue of Swin's ``forward_specific_stage`` -- and mimicked (DFM) against the same
cached final-normed target. As in the official s4 path, the main projectors then take the TPP outputs as
their queries. Only the teacher's last block and final norm are kept in memory; the cache needs no extra
targets.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CompatError, ConfigError
from ..manifest import Manifest, block_name
from ..teachers import teacher_from_manifest
from ._adapters import frozen_teacher_norm, grid_of, split_prefix
from .base import METHODS, Method, MethodContext, StudentOutput, teacher_layer_targets


class CrossAttentionProjector(nn.Module):
    """ScaleKD's CAP (official ``AttentionProjector`` with ``WindowMultiheadPosAttention``, global window).

    Args:
        student_dim: channels of the student map.
        teacher_dim: width of the teacher tokens (output width).
        query_hw: the teacher's token grid; one query per teacher token.
        student_hw: the student map's grid (size of the learnable position embedding).
        num_heads: attention heads (must divide ``teacher_dim``).
        softmax_scale: extra factor on the attention logits (5 in every official config).
    """

    def __init__(self, student_dim: int, teacher_dim: int, query_hw: tuple[int, int], student_hw: tuple[int, int],
                 num_heads: int = 8, softmax_scale: float = 5.0):
        super().__init__()
        if teacher_dim % num_heads:
            raise ConfigError(f"num_heads={num_heads} does not divide the teacher width {teacher_dim}")
        self.query_hw, self.num_heads, self.softmax_scale = tuple(query_hw), num_heads, float(softmax_scale)
        self.proj_student = nn.Sequential(nn.Conv2d(student_dim, student_dim, 3, padding=1),
                                          nn.BatchNorm2d(student_dim), nn.ReLU())
        self.pos_embed = nn.Parameter(torch.zeros(1, student_dim, *student_hw))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.query = nn.Embedding(query_hw[0] * query_hw[1], teacher_dim)
        self.proj_pos = nn.Sequential(nn.Conv2d(teacher_dim, teacher_dim, 1), nn.ReLU())
        self.q = nn.Linear(teacher_dim, teacher_dim)
        self.k = nn.Linear(student_dim, teacher_dim)
        self.v = nn.Linear(student_dim, teacher_dim)
        self.proj = nn.Linear(teacher_dim, teacher_dim)
        self.norm = nn.LayerNorm(teacher_dim)
        self.ffn = nn.Sequential(nn.Linear(teacher_dim, 4 * teacher_dim), nn.ReLU(), nn.Linear(4 * teacher_dim,
                                                                                              teacher_dim))

    def forward(self, x: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Student map ``[B, C_s, H_s, W_s]`` (+ optional queries ``[B, Hq*Wq, D_t]``) -> ``[B, Hq*Wq, D_t]``."""
        b = x.shape[0]
        kv = (self.proj_student(x) + self.pos_embed).flatten(2).transpose(1, 2)
        if query is None:
            query = self.query.weight.unsqueeze(0).expand(b, -1, -1)
        query = query.transpose(1, 2).reshape(b, -1, *self.query_hw)
        query = self.proj_pos(query).flatten(2).transpose(1, 2)
        q, k, v = (self._heads(t) for t in (self.q(query), self.k(kv), self.v(kv)))
        scale = (q.shape[-1] ** -0.5) * self.softmax_scale
        attn = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)
        out = self.proj((attn @ v).transpose(1, 2).flatten(2))
        normed = self.norm(out)
        return normed + self.ffn(normed)  # mmcv FFN: identity added onto the normed input, no outer residual

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)


def spatial_view_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFM direct view: ``Σ_{b,c,h,w} (n(P) - n(T))² / B`` with ``n`` = L2 normalisation over channels.

    Both maps are ``[B, C, H, W]``; unweighted (ScaleKD multiplies by ``alpha[0]`` = 0.08).
    """
    if pred.shape != target.shape:
        raise CompatError(f"projected student map {tuple(pred.shape)} != teacher map {tuple(target.shape)}")
    diff = F.normalize(pred, dim=1) - F.normalize(target.to(pred.dtype), dim=1)
    return diff.pow(2).sum() / pred.shape[0]


def remove_dc(x: torch.Tensor) -> torch.Tensor:
    """Zero the 2-D DCT-II DC coefficient of every channel == subtract each channel's spatial mean."""
    return x - x.mean(dim=(2, 3), keepdim=True)


def frequency_view_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFM alternative view: :func:`spatial_view_loss` after removing the DC component (unweighted, ``alpha[1]``)."""
    return spatial_view_loss(remove_dc(pred), remove_dc(target.to(pred.dtype)))


def soft_ce_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """cls_KD/ScaleKD ``KDLoss``: ``-T² mean_b Σ_c softmax(z_t/T) log_softmax(z_s/T)`` (soft cross-entropy)."""
    p_t = F.softmax(teacher_logits.to(student_logits.dtype) / temperature, dim=1)
    return -(p_t * F.log_softmax(student_logits / temperature, dim=1)).sum(1).mean() * temperature ** 2


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Row-major patch tokens ``[B, H*W, C]`` -> ``[B, C, H, W]`` (official ``permute(0, 2, 1).view``)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def pick_heads(dim: int, wanted: int) -> int:
    """The largest head count <= ``wanted`` that divides ``dim`` (8 for ViT-B's 768)."""
    return max(h for h in range(1, max(wanted, 1) + 1) if dim % h == 0)


@METHODS.register("scalekd")
class ScaleKD(Method):
    """ScaleKD (NeurIPS 2024): CAP + DFM (+ optional online TPP) + logit KD, for students of any timm architecture.

    Args:
        ctx: method context.
        alpha: DFM weights (spatial, frequency); official ``[0.08, 0.06]``.
        kd_weight: weight of the soft-CE logit KD (official ``KDLoss(alpha=0.5)``); 0 disables it.
        temperature: logit KD temperature (official 1).
        num_heads: CAP attention heads (official 8; reduced to a divisor of the teacher width if needed).
        softmax_scale: CAP attention logit factor (official 5).
        student_layer: student feature index (timm ``feature_info`` order, negative from the end) to project.
        tpp: run Teacher Parameter Perception online (needs the teacher's weights; not cache-only).
        tpp_layer: student feature index for the TPP projectors; ``None`` = ``student_layer``.
    """

    default_ce_weight = 0.5  # official total: 0.5 * LabelSmoothCE(0.1) + KD + DFM terms

    def __init__(self, ctx: MethodContext, alpha: tuple[float, float] | list[float] = (0.08, 0.06),
                 kd_weight: float = 0.5, temperature: float = 1.0, num_heads: int = 8, softmax_scale: float = 5.0,
                 student_layer: int = -1, tpp: bool = False, tpp_layer: int | None = None):
        super().__init__(ctx)
        if len(alpha) != 2:
            raise ConfigError(f"scalekd: alpha must be (spatial, frequency), got {alpha!r}")
        self.alpha, self.kd_weight, self.temperature = (float(alpha[0]), float(alpha[1])), kd_weight, temperature
        t = ctx.teacher
        self.teacher_dim, self.teacher_prefix = int(t["embed_dim"]), int(t.get("num_prefix_tokens", 0))
        self.teacher_grid = tuple(t["grid_size"]) if t.get("grid_size") else None
        self.teacher_blocks = ctx.teacher_num_blocks
        self.teacher_last = block_name(ctx.teacher_layer(-1))
        # CNN teachers have no final norm in the manifest: their last stage map is the target as is.
        self.teacher_norm = frozen_teacher_norm(ctx) if t.get("final_norm") else nn.Identity()
        self.student_prefix = int(getattr(ctx.student, "num_prefix_tokens", 0))
        self._grid_hint = getattr(getattr(ctx.student, "patch_embed", None), "grid_size", None)
        self.layer = ctx.student_layer(student_layer)
        self.tpp_layer = self.layer if tpp_layer is None else ctx.student_layer(tpp_layer)
        self.tpp = bool(tpp)
        heads = pick_heads(self.teacher_dim, num_heads)
        shapes = ctx.student_feature_shapes(sorted({self.layer, self.tpp_layer}))
        grid = self._query_grid(ctx)
        self.projectors = self._projector_pair(shapes[self.layer], grid, heads, softmax_scale)
        self.tpp_projectors = None
        if self.tpp:
            self.tpp_projectors = self._projector_pair(shapes[self.tpp_layer], grid, heads, softmax_scale)
            self._load_teacher_tail(ctx)

    def _query_grid(self, ctx: MethodContext) -> tuple[int, int]:
        """The teacher's token grid: the manifest's ``grid_size`` (ViT), else from the cached target's shape."""
        if self.teacher_grid is not None:
            return self.teacher_grid
        spec = ctx.manifest.get("targets", {}).get(self.teacher_last)
        if not spec:
            raise CompatError(f"the manifest gives neither the teacher's grid_size nor the shape of "
                              f"{self.teacher_last}; extract the cache with --layers including -1 (the last block)")
        return grid_of(int(spec["shape"][0]) - self.teacher_prefix)

    def _student_dims(self, shape: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
        if len(shape) == 3:  # C, H, W
            return shape[0], (shape[1], shape[2])
        return shape[1], grid_of(shape[0] - self.student_prefix, self._grid_hint)

    def _projector_pair(self, shape: tuple[int, ...], grid: tuple[int, int], heads: int, scale: float
                        ) -> nn.ModuleList:
        dim, hw = self._student_dims(shape)
        return nn.ModuleList(CrossAttentionProjector(dim, self.teacher_dim, grid, hw, heads, scale) for _ in range(2))

    def _load_teacher_tail(self, ctx: MethodContext) -> None:
        """Keep only the teacher's last block + final norm (frozen, eval mode); drop the rest of the teacher."""
        model = teacher_from_manifest(ctx.manifest).model
        if not isinstance(getattr(model, "blocks", None), nn.Sequential) or not isinstance(model.norm, nn.LayerNorm):
            raise CompatError(f"tpp=True needs a ViT teacher with blocks and a per-token final LayerNorm; "
                              f"{type(model).__name__} has none (an average-pooling ViT normalises only the pooled "
                              "vector) -- run scalekd with tpp=False")
        self.tpp_block, self.tpp_norm = model.blocks[-1].eval(), model.norm.eval()
        self.tpp_block.requires_grad_(False)
        self.tpp_norm.requires_grad_(False)
        self.tpp_prefix = nn.Parameter(torch.zeros(1, self.teacher_prefix, self.teacher_dim))
        nn.init.trunc_normal_(self.tpp_prefix, std=0.02)  # stands in for the CLS/register tokens at block L-2
        del model

    def train(self, mode: bool = True) -> "ScaleKD":
        super().train(mode)
        if self.tpp:  # the teacher tail behaves as the frozen teacher does (eval mode), whatever the task's mode
            self.tpp_block.eval()
            self.tpp_norm.eval()
        return self

    @classmethod
    def required_targets(cls, manifest: Manifest, kd_weight: float = 0.5, **kwargs: Any) -> list[str]:
        last = teacher_layer_targets(manifest, [-1])
        return last + (["logits"] if kd_weight else [])

    def student_layers(self) -> list[int]:
        return sorted({self.layer, self.tpp_layer})

    def online_teacher_cost(self) -> str | None:
        if not self.tpp:
            return None
        n = self.teacher_blocks
        return (f"ScaleKD TPP runs teacher block {n - 1} + final norm online (forward and backward on projected "
                f"student features): ~1/{n} of a teacher forward per projector, 2 projectors (spatial, frequency) "
                f"per step; the teacher's weights are needed at train time")

    def student_map(self, student: StudentOutput, layer: int) -> torch.Tensor:
        """The student's feature ``layer`` as ``[B, C, H, W]`` (ViT: last block after its final norm)."""
        x = student.features[layer]
        norm = student.final_norm if layer == self.layer else None  # only the main tap mimics a post-norm output
        if x.ndim == 3:
            x = norm(x) if isinstance(norm, nn.LayerNorm) else x
            _, x = split_prefix(x, student.num_prefix_tokens)
            return tokens_to_map(x, grid_of(x.shape[1], self._grid_hint))
        if isinstance(norm, nn.LayerNorm) and norm.normalized_shape[0] == x.shape[1]:  # Mixer: channel-last LN
            x = norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x

    def teacher_map(self, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        t = self.teacher_norm(targets[self.teacher_last].float())
        _, t = split_prefix(t, self.teacher_prefix)
        return tokens_to_map(t, grid_of(t.shape[1], self.teacher_grid))

    def forward(self, student: StudentOutput, targets: Mapping[str, torch.Tensor], labels: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        t_map = self.teacher_map(targets)
        s_map = self.student_map(student, self.layer)
        grid = t_map.shape[-2:]
        parts: dict[str, torch.Tensor] = {}
        queries: list[torch.Tensor | None] = [None, None]
        if self.tpp:
            tpp_in = self.student_map(student, self.tpp_layer)
            queries = [self._through_teacher_tail(proj(tpp_in)) for proj in self.tpp_projectors]
            parts["tpp_spat"] = spatial_view_loss(tokens_to_map(queries[0], grid), t_map)
            parts["tpp_freq"] = frequency_view_loss(tokens_to_map(queries[1], grid), t_map)
        spat_p, freq_p = (tokens_to_map(p(s_map, q), grid) for p, q in zip(self.projectors, queries))
        parts["spat"] = spatial_view_loss(spat_p, t_map)
        parts["freq"] = frequency_view_loss(freq_p, t_map)
        loss = self.alpha[0] * (parts["spat"] + parts.get("tpp_spat", 0.0))
        loss = loss + self.alpha[1] * (parts["freq"] + parts.get("tpp_freq", 0.0))
        if self.kd_weight:
            parts["kd"] = soft_ce_kd(student.logits, targets["logits"], self.temperature)
            loss = loss + self.kd_weight * parts["kd"]
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}

    def _through_teacher_tail(self, tokens: torch.Tensor) -> torch.Tensor:
        """Projected patch tokens (posing as teacher block L-2 output) -> teacher block L-1 + norm, with grads."""
        prefix = self.tpp_prefix.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        out = self.tpp_norm(self.tpp_block(torch.cat([prefix, tokens], dim=1)))
        return out[:, self.teacher_prefix:]

