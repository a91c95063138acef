"""Small building blocks shared by the feature methods: dimension adapters, token layout helpers, frozen norms.

Public API (kept small and stable; other methods import it):
    * :func:`make_adapter` -- token-wise ``Linear(d_in, d_out)``, or ``Identity`` when the widths match.
    * :func:`to_tokens` -- ``[B, C, H, W]`` CNN maps -> ``[B, H*W, C]`` tokens (ViT tokens pass through).
    * :func:`split_prefix` -- ``[B, T, D]`` -> (prefix ``[B, P, D]``, patch ``[B, N, D]``).
    * :func:`grid_of` -- the (h, w) grid of N patch tokens (square unless a grid is given).
    * :func:`resize_tokens` -- resample patch tokens from one grid to another (bilinear on the 2-D map).
    * :class:`FrozenLayerNorm` / :func:`frozen_teacher_norm` -- the teacher's final LayerNorm as buffers, so it
      moves with ``.to(device)`` but is never a trainable parameter (not in ``parameters()``, no optimizer
      state, no weight decay).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CompatError, ConfigError

__all__ = ["FrozenLayerNorm", "frozen_teacher_norm", "grid_of", "make_adapter", "resize_tokens", "split_prefix",
           "to_tokens"]


def make_adapter(d_in: int, d_out: int, mode: str = "auto", bias: bool = True) -> nn.Module:
    """A token-wise projection from the student width to the teacher width.

    Args:
        d_in: student feature width.
        d_out: teacher feature width.
        mode: ``"auto"`` (identity when the widths match, else linear), ``"linear"`` (always a linear layer)
            or ``"identity"`` (widths must match).
        bias: whether the linear layer has a bias (the official ViTKD/FitNets adapters do).
    """
    if mode not in ("auto", "linear", "identity"):
        raise ConfigError(f"adapter mode {mode!r} is unknown; use 'auto', 'linear' or 'identity'")
    if mode == "identity" or (mode == "auto" and d_in == d_out):
        if d_in != d_out:
            raise ConfigError(f"adapter='identity' needs equal widths, got student {d_in} vs teacher {d_out}; "
                              "use adapter='auto' or 'linear'")
        return nn.Identity()
    return nn.Linear(d_in, d_out, bias=bias)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]`` (row-major, like timm's ``flatten(2).transpose(1, 2)``); 3-D passes."""
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2)
    if x.ndim != 3:
        raise CompatError(f"expected a [B, T, D] token tensor or a [B, C, H, W] map, got shape {tuple(x.shape)}")
    return x


def split_prefix(x: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[B, T, D]`` into its prefix tokens ``[B, P, D]`` (CLS/dist/registers) and patch tokens."""
    return x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]


def grid_of(num_tokens: int, grid: tuple[int, int] | list[int] | None = None) -> tuple[int, int]:
    """The (h, w) layout of ``num_tokens`` patch tokens: ``grid`` if it matches, else a square grid."""
    if grid is not None and int(grid[0]) * int(grid[1]) == num_tokens:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise CompatError(f"{num_tokens} patch tokens do not form a square grid and no matching grid was given; "
                          "check num_prefix_tokens (prefix tokens must be dropped first)")
    return side, side


def resize_tokens(x: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Resample patch tokens ``[B, h*w, D]`` from grid ``src_hw`` to ``dst_hw`` (bilinear, align_corners=False).

    Used when a student's token grid differs from the teacher's (CNN stage maps, other patch sizes). Bilinear
    weights sum to one, so resizing commutes with a token-wise linear adapter (bias included).
    """
    if tuple(src_hw) == tuple(dst_hw):
        return x
    b, n, d = x.shape
    grid = x.transpose(1, 2).reshape(b, d, *src_hw)
    grid = F.interpolate(grid, size=tuple(dst_hw), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


class FrozenLayerNorm(nn.Module):
    """A LayerNorm whose affine parameters are (non-persistent) buffers: it follows ``.to()``, never trains.

    Non-persistent because the values come from the manifest, not from training: checkpoints stay lean and a
    resumed run rebuilds the norm from the same manifest.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().float(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float(), persistent=False)
        self.eps = float(eps)

    @classmethod
    def from_module(cls, norm: nn.LayerNorm) -> "FrozenLayerNorm":
        return cls(norm.weight, norm.bias, norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.weight.numel(),), self.weight.to(x.dtype),
                            None if self.bias is None else self.bias.to(x.dtype), self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}, frozen"


def frozen_teacher_norm(ctx) -> FrozenLayerNorm | nn.Identity:
    """The teacher's final norm from the manifest (``ctx.teacher_final_norm()``) as a :class:`FrozenLayerNorm`;
    ``nn.Identity`` for a teacher whose tokens have no final norm (an average-pooling ViT)."""
    if not ctx.teacher.get("final_norm"):
        raise CompatError(f"the cache's teacher {ctx.teacher.get('name')!r} has no final LayerNorm in its manifest, "
                          "so post-norm targets cannot be rebuilt; use a method setting without the teacher norm")
    norm = ctx.teacher_final_norm()
    return norm if isinstance(norm, nn.Identity) else FrozenLayerNorm.from_module(norm)
