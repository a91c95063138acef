"""Frozen timm teachers: aliases, loading (hub, offline hub cache or local checkpoint) and named targets.

Targets come from timm's ``forward_intermediates`` (block outputs before the final norm, prefix tokens
kept) plus the logits, so a teacher needs no hooks. The final norm's parameters go into the manifest so a
method can rebuild post-norm features exactly (ViTKD's deep target is ``norm(block_11)``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from .manifest import block_name

#: Short names -> timm ``name.tag`` used by the source papers.
TEACHER_ALIASES: dict[str, str] = {
    "deit3_small": "deit3_small_patch16_224.fb_in22k_ft_in1k",  # ViTKD (DeiT III-S teacher)
    "deit3_base": "deit3_base_patch16_224.fb_in22k_ft_in1k",  # ViTKD (DeiT III-B teacher)
    "deit3_large": "deit3_large_patch16_224.fb_in22k_ft_in1k",  # ViTKD (DeiT III-L teacher)
    "deit_tiny": "deit_tiny_patch16_224.fb_in1k",  # ViTKD student
    "deit_small": "deit_small_patch16_224.fb_in1k",  # ViTKD (DeiT-S teacher / student)
    "deit_base": "deit_base_patch16_224.fb_in1k",  # ViTKD student, ScaleKD student
    # WeCoLoRA's supervised ViT-B: timm 0.3.2's default vit_base_patch16_224 weights, the original JAX
    # in21k->in1k port (mean = std = 0.5), which timm now tags orig_in21k_ft_in1k.
    "vit_base": "vit_base_patch16_224.orig_in21k_ft_in1k",
    "vit_base_mae": "vit_base_patch16_224.mae",  # WeCoLoRA (self-supervised MAE teacher)
    "swin_large": "swin_large_patch4_window7_224.ms_in22k_ft_in1k",  # ScaleKD teacher
    "resnet50": "resnet50.a1_in1k",  # ScaleKD student
}


#: Seed of the weight init of models built without pretrained weights or a checkpoint.
RANDOM_INIT_SEED = 0


def normalization(model: nn.Module) -> dict[str, Any]:
    """The model's input normalisation from its (pretrained) timm config: mean, std, interpolation, input side."""
    cfg = timm.data.resolve_model_data_config(model)
    return {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
            "interpolation": str(cfg.get("interpolation", "bicubic")), "input_size": int(cfg["input_size"][-1])}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_name(name: str) -> str:
    """Alias -> full timm ``architecture.tag`` name; other names pass through unchanged."""
    return TEACHER_ALIASES.get(name, name)


def load_model(name: str, pretrained: bool = True, checkpoint: str | None = None, img_size: int | None = None,
               num_classes: int | None = None, init_seed: int = RANDOM_INIT_SEED, **kwargs: Any) -> nn.Module:
    """Create any timm model by alias or name.

    Args:
        name: alias (see ``TEACHER_ALIASES``) or timm name, optionally with a ``.tag``.
        pretrained: load timm's pretrained weights (works offline from a local hub cache).
        checkpoint: a local ``.safetensors`` file or torch state dict, loaded with ``weights_only=True``.
        img_size: timm's ``img_size`` override (ViTs resample their position embedding).
        num_classes: classifier size override.
        init_seed: seed of the random weight init (students pass the run's ``--seed``; teachers keep the default).
    """
    kwargs = {k: v for k, v in dict(kwargs, img_size=img_size, num_classes=num_classes).items() if v is not None}
    full = resolve_name(name)
    if timm.get_pretrained_cfg(full.split(".")[0]) is None and not timm.is_model(full.split(".")[0]):
        raise ValueError(f"unknown timm model {name!r}; list candidates with `timm.list_models('*{name}*')` or "
                         f"`featcache teachers`")
    use_hub = pretrained and checkpoint is None
    # A randomly initialised model (tests, `--no-pretrained`) must be the same model every time it is built,
    # or `verify` and `--online-teacher` would compare against a different teacher: seed its init locally.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            model = timm.create_model(full, pretrained=use_hub, **kwargs)
        except TypeError:  # img_size is a ViT-only argument
            if "img_size" not in kwargs:
                raise
            kwargs.pop("img_size")
            model = timm.create_model(full, pretrained=use_hub, **kwargs)
    if checkpoint is not None:
        model.load_state_dict(load_state_dict(checkpoint))
    return model


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights without ever unpickling: safetensors, or torch's ``weights_only=True`` loader."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):  # common wrappers (timm, DeiT, mmcls)
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    return state


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the model's parameters and buffers (names, dtypes, shapes, bytes), in state-dict order."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class Teacher:
    """A frozen teacher plus what the manifest must say about it."""

    model: nn.Module
    name: str
    timm_name: str
    pretrained: bool
    checkpoint: str | None

    @torch.no_grad()
    def targets(self, images: torch.Tensor, layers: list[int]) -> dict[str, torch.Tensor]:
        """Named targets for normalised images: ``block_{i}`` [B, T, D] (prefix tokens first) and ``logits``."""
        model = self.model
        if hasattr(model, "num_prefix_tokens"):
            final, inter = model.forward_intermediates(images, indices=list(layers), norm=False,
                                                       return_prefix_tokens=True, output_fmt="NLC")
            # timm gives (tokens, prefix) pairs only when the model has prefix tokens; plain tensors otherwise.
            feats = [torch.cat([f[1], f[0]], dim=1) if isinstance(f, tuple) else f for f in inter]
        else:  # CNN teacher: NCHW maps stored as [B, H*W, C] tokens
            final, maps = model.forward_intermediates(images, indices=list(layers), norm=False)
            feats = [m.flatten(2).transpose(1, 2) for m in maps]
        out = {block_name(i): f for i, f in zip(layers, feats)}
        out["logits"] = model.forward_head(final)
        return out

    def num_blocks(self) -> int:
        from .methods.base import count_blocks

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
        norm = getattr(m, "norm", None)
        final_norm = None
        if isinstance(norm, nn.LayerNorm):
            final_norm = {"type": "LayerNorm", "eps": float(norm.eps),
                          "weight": norm.weight.detach().float().tolist(),
                          "bias": norm.bias.detach().float().tolist() if norm.bias is not None else None}
        tag = self.timm_name.split(".", 1)[1] if "." in self.timm_name else m.pretrained_cfg.get("tag")
        return {
            "name": self.name, "timm_name": self.timm_name, "architecture": self.timm_name.split(".")[0],
            "pretrained_tag": tag, "pretrained": self.pretrained, "checkpoint": self.checkpoint,
            "weights_sha256": weights_sha256(m), "num_classes": int(m.num_classes),
            "embed_dim": int(getattr(m, "embed_dim", getattr(m, "num_features", 0))),
            "num_blocks": self.num_blocks(), "num_prefix_tokens": int(getattr(m, "num_prefix_tokens", 0)),
            "patch_size": _patch_size(m), "grid_size": list(grid) if grid is not None else None,
            "final_norm": final_norm,
        }


def _patch_size(model: nn.Module) -> int | None:
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    return int(ps[0]) if isinstance(ps, (tuple, list)) else (int(ps) if ps is not None else None)


def load_teacher(name: str, pretrained: bool = True, checkpoint: str | None = None, img_size: int | None = None,
                 num_classes: int | None = None, device: str | torch.device = "cpu", **kwargs: Any) -> Teacher:
    """Load a frozen, eval-mode teacher (see :func:`load_model` for the arguments)."""
    model = load_model(name, pretrained=pretrained, checkpoint=checkpoint, img_size=img_size,
                       num_classes=num_classes, **kwargs)
    model.eval().requires_grad_(False).to(device)
    return Teacher(model=model, name=name, timm_name=resolve_name(name), pretrained=pretrained,
                   checkpoint=str(checkpoint) if checkpoint else None)


def teacher_from_manifest(manifest: dict[str, Any], device: str | torch.device = "cpu") -> Teacher:
    """Rebuild the exact teacher a cache was made with and check its weights hash."""
    t = manifest["teacher"]
    teacher = load_teacher(t["name"], pretrained=t["pretrained"], checkpoint=t["checkpoint"],
                           img_size=manifest["img_size"], num_classes=t["num_classes"], device=device,
                           **manifest.get("teacher_kwargs", {}))
    got = weights_sha256(teacher.model)
    if got != t["weights_sha256"]:
        raise ValueError(f"teacher weights differ from the cache's (sha256 {got[:12]} != {t['weights_sha256'][:12]}); "
                         "pass the same --checkpoint/--pretrained the cache was extracted with")
    return teacher
