"""The frozen teacher of stage 1: named targets for a batch of views, and what the manifest says about it.

Targets come from timm's ``forward_intermediates`` (block outputs before the final norm, prefix tokens kept) plus
the logits, so a teacher needs no hooks (see :func:`featcache.models.forward_taps`). The final norm's parameters go
into the manifest so a method can rebuild post-norm features exactly (ViTKD's deep target is ``norm(block_11)``).
Loading, names and normalisation are the timm plumbing of :mod:`featcache.models`, shared with the students.

Precision: by default the teacher runs in exact fp32 (on CUDA also without TF32 convolutions and matmuls, which
torch may otherwise allow): together with one forward per unit, a cache's bytes then do not depend on the batch
size, the worker count or the resume history on a given device and library stack. ``autocast="bf16"`` runs the
forward under ``torch.autocast(dtype=torch.bfloat16)``: several times faster on GPUs with bf16 tensor cores, but the
targets differ from fp32 by about bf16's rounding (relative ~4e-3 per op, compounding over blocks; measured in
BENCHMARKS.md) and across devices and kernel versions. The setting is recorded in the manifest (``teacher.autocast``)
so that a resume, ``verify`` and ``--online-teacher`` run the same way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from .errors import CompatError
from .manifest import block_name
from .models import (architecture_and_tag, count_blocks, forward_taps, load_model, normalization, resolve_name,
                     weights_sha256)


@dataclass
class Teacher:
    """A frozen teacher plus what the manifest must say about it."""

    model: nn.Module
    name: str
    timm_name: str
    pretrained: bool
    checkpoint: str | None
    autocast: str | None = None  # None: exact fp32; "bf16": torch.autocast to bfloat16

    @torch.no_grad()
    def targets(self, images: torch.Tensor, layers: list[int]) -> dict[str, torch.Tensor]:
        """Named targets for normalised images: ``block_{i}`` [B, T, D] (prefix tokens first) and ``logits``
        (float32, or bfloat16 under ``autocast="bf16"``)."""
        with self.precision(images.device):
            final, feats = forward_taps(self.model, images, layers)
            # CNN teachers: NCHW maps are stored as row-major [B, H*W, C] tokens, the layout of a ViT block.
            out = {block_name(i): f.flatten(2).transpose(1, 2) if f.ndim == 4 else f for i, f in zip(layers, feats)}
            out["logits"] = self.model.forward_head(final)
        return out

    def precision(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The teacher's compute precision on ``device`` (module docstring)."""
        if self.autocast == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        if self.autocast is not None:
            raise CompatError(f"unknown teacher autocast {self.autocast!r}; featcache knows none and bf16")
        return exact_fp32() if device.type == "cuda" else contextlib.nullcontext()

    def num_blocks(self) -> int:
        """Feature taps the teacher has (what ``--layers`` indexes)."""
        return count_blocks(self.model)

    def data_config(self, img_size: int) -> dict[str, Any]:
        """Normalisation from the teacher's pretrained config; geometry from ``img_size``."""
        norm = normalization(self.model)
        return {"mean": norm["mean"], "std": norm["std"], "interpolation": norm["interpolation"],
                "img_size": int(img_size)}

    def manifest_entry(self) -> dict[str, Any]:
        """The ``teacher`` section of the manifest (identity, token layout, final-norm parameters)."""
        m = self.model
        grid = getattr(getattr(m, "patch_embed", None), "grid_size", None)
        architecture, tag = architecture_and_tag(m, self.timm_name)
        return {
            "name": self.name, "timm_name": self.timm_name, "architecture": architecture,
            "pretrained_tag": tag, "pretrained": self.pretrained, "checkpoint": self.checkpoint,
            "weights_sha256": weights_sha256(m), "num_classes": int(m.num_classes),
            "embed_dim": int(getattr(m, "embed_dim", getattr(m, "num_features", 0))),
            "num_blocks": self.num_blocks(), "num_prefix_tokens": int(getattr(m, "num_prefix_tokens", 0)),
            "patch_size": _patch_size(m), "grid_size": list(grid) if grid is not None else None,
            "final_norm": _final_norm_entry(m), **({"autocast": self.autocast} if self.autocast else {}),
        }


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """No TF32 in cuDNN convolutions (torch's default allows it) nor in matmuls, restored afterwards."""
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)


def _final_norm_entry(model: nn.Module) -> dict[str, Any] | None:
    """The final LayerNorm's parameters (ViTs), so post-norm targets can be rebuilt from pre-norm cached blocks.

    ``{"type": "Identity"}`` for a ViT without a per-token final norm: timm's average-pooling ViTs
    (``global_pool="avg"``) normalise the pooled vector instead (``fc_norm``), so their last block's tokens are
    what a post-norm target is. ``None`` for a model without a ``norm`` (CNNs): nothing to rebuild.
    """
    norm = getattr(model, "norm", None)
    if isinstance(norm, nn.Identity):
        return {"type": "Identity"}
    if not isinstance(norm, nn.LayerNorm):
        return None
    return {"type": "LayerNorm", "eps": float(norm.eps), "weight": norm.weight.detach().float().tolist(),
            "bias": norm.bias.detach().float().tolist() if norm.bias is not None else None}


def _patch_size(model: nn.Module) -> int | None:
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    return int(ps[0]) if isinstance(ps, (tuple, list)) else (int(ps) if ps is not None else None)


def load_teacher(name: str, pretrained: bool = True, checkpoint: str | None = None, img_size: int | None = None,
                 num_classes: int | None = None, device: str | torch.device = "cpu", autocast: str | None = None,
                 **kwargs: Any) -> Teacher:
    """Load a frozen, eval-mode teacher (see :func:`featcache.models.load_model` for the arguments; ``autocast``:
    None for exact fp32, ``"bf16"`` for bfloat16 autocast)."""
    model = load_model(name, pretrained=pretrained, checkpoint=checkpoint, img_size=img_size,
                       num_classes=num_classes, **kwargs)
    model.eval().requires_grad_(False).to(device)
    return Teacher(model=model, name=name, timm_name=resolve_name(name), pretrained=pretrained,
                   checkpoint=str(checkpoint) if checkpoint else None, autocast=autocast)


def teacher_from_manifest(manifest: dict[str, Any], device: str | torch.device = "cpu",
                          checkpoint: str | None = None) -> Teacher:
    """Rebuild the exact teacher a cache was made with and check its weights hash.

    Args:
        checkpoint: where the recorded checkpoint is now, if it moved since extraction (its hash is still checked).
    """
    t = manifest["teacher"]
    teacher = load_teacher(t["name"], pretrained=t["pretrained"], checkpoint=checkpoint or t["checkpoint"],
                           img_size=manifest["img_size"], num_classes=t["num_classes"], device=device,
                           autocast=t.get("autocast"), **manifest.get("teacher_kwargs", {}))
    got = weights_sha256(teacher.model)
    if got != t["weights_sha256"]:
        random_init = not t["pretrained"] and not t["checkpoint"]
        raise CompatError(f"teacher weights differ from the cache's (sha256 {got[:12]} != {t['weights_sha256'][:12]}); "
                          + ("the cache's teacher is a random init, whose bits depend on the machine's kernels: "
                             "extract from a saved --checkpoint to check a cache on another machine"
                             if random_init else "pass the same --checkpoint/--pretrained the cache was extracted with"))
    return teacher
