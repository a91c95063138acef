"""Generative blocks G for ViTKD's masked deep-feature generation (Yang et al., ViTKD, Sec. 3.2 and Table 2).

Every generator maps the masked, aligned student tokens ``x`` [B, N, D] (mask tokens already in place) to a
prediction of the teacher's deep feature [B, N, D]. Only the masked positions are scored by the loss.

    * :class:`ConvGenerator` -- MGD's "convolutional projector": conv3x3 -> ReLU -> conv3x3 on the token grid.
      This is the official ViTKD block (``cls_KD`` ``ViTKDLoss.generation``; same state-dict keys).
    * :class:`SelfAttentionGenerator` -- the paper's "self-attention" block "from MAE": our reading is MAE's
      decoder -- add fixed 2-D sin-cos position embeddings to all N tokens, ``depth`` timm ViT blocks, LayerNorm,
      Linear. The paper uses 6 layers.
    * :class:`CrossAttentionGenerator` -- the paper's "cross-attention" block "from CAE" (masked tokens are the
      queries): our reading is CAE's latent contextual regressor -- queries = mask tokens + their position
      embeddings, keys/values = all N tokens (visible student tokens and the mask tokens, as CAE concatenates
      them) + position embeddings, ``depth`` pre-norm cross-attention blocks (attention + MLP), LayerNorm, Linear.
      Visible positions pass through unchanged (they are not scored).
The official code ships only the convolutional projector; the attention variants are hand-written here
(timm has no cross-attention block) to reproduce the Table 2 ablation.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Mlp, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block

from ..errors import ConfigError


def default_heads(dim: int) -> int:
    """Heads of 64 channels where the width allows it (ViT convention), else a single head."""
    return dim // 64 if dim % 64 == 0 and dim >= 64 else 1


class ConvGenerator(nn.Sequential):
    """conv3x3 -> ReLU -> conv3x3 (bias, stride 1, no norm), applied to the tokens laid out as a grid."""

    def __init__(self, dim: int):
        super().__init__(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, x: torch.Tensor, ids_masked: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, d = x.shape
        # Row-major token order, as the official reshape(B, hw, hw, D).permute(0, 3, 1, 2).
        x = x.reshape(b, grid[0], grid[1], d).permute(0, 3, 1, 2)
        return super().forward(x).flatten(2).transpose(1, 2)


class _SinCosPositions(nn.Module):
    """Fixed 2-D sin-cos positions for a token grid, built once and kept as a non-persistent buffer (it moves
    with ``.to(device)`` and stays out of checkpoints) instead of being rebuilt on every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pos", None, persistent=False)

    def forward(self, grid: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
        n, d = grid[0] * grid[1], x.shape[-1]
        if self.pos is None or tuple(self.pos.shape[-2:]) != (n, d) or self.pos.device != x.device:
            self.pos = build_sincos2d_pos_embed(list(grid), d, device=x.device, dtype=torch.float32)
        return self.pos.to(x.dtype)


class SelfAttentionGenerator(nn.Module):
    """MAE-decoder-style generator: sin-cos positions, ``depth`` ViT blocks, LayerNorm, Linear."""

    def __init__(self, dim: int, depth: int = 6, num_heads: int | None = None, mlp_ratio: float = 4.0):
        super().__init__()
        heads = num_heads or default_heads(dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim)
        self.pos = _SinCosPositions()

    def forward(self, x: torch.Tensor, ids_masked: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.head(self.norm(self.blocks(x + self.pos(grid, x))))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block: ``q += Attn(LN q, LN kv)``; ``q += MLP(LN q)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        q = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm2(q))


class CrossAttentionGenerator(nn.Module):
    """CAE-regressor-style generator: the masked tokens attend to every token (``depth`` cross blocks)."""

    def __init__(self, dim: int, depth: int = 6, num_heads: int | None = None, mlp_ratio: float = 4.0):
        super().__init__()
        heads = num_heads or default_heads(dim)
        self.blocks = nn.ModuleList([CrossBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim)
        self.pos = _SinCosPositions()

    def forward(self, x: torch.Tensor, ids_masked: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        d = x.shape[-1]
        x = x + self.pos(grid, x)
        index = ids_masked.unsqueeze(-1).expand(-1, -1, d)
        q = torch.gather(x, 1, index)
        for blk in self.blocks:
            q = blk(q, x)
        return x.scatter(1, index, self.head(self.norm(q)))


GENERATORS = {"conv": ConvGenerator, "self_attention": SelfAttentionGenerator,
              "cross_attention": CrossAttentionGenerator}


def build_generator(kind: str, dim: int, depth: int = 6, num_heads: int | None = None) -> nn.Module:
    """One of :data:`GENERATORS` by name (``depth``/``num_heads`` only apply to the attention blocks)."""
    if kind not in GENERATORS:
        raise ConfigError(f"vitkd generation {kind!r} is unknown; use one of {sorted(GENERATORS)}")
    return GENERATORS[kind](dim) if kind == "conv" else GENERATORS[kind](dim, depth, num_heads)
