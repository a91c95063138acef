"""WeCoLoRA: weight copy + (enhanced) LoRA for few-shot, label-free feature distillation of ViTs.

Grigore, Georgescu et al., "Weight Copy and Low-Rank Adaptation for Few-Shot Distillation of Vision
Transformers", WACV 2025 (official code ``dianagrigore/WeCoLoRA``, ``LoRA_ViT_timm``).

* Student = the teacher with every k-th block kept (student block j = teacher block j·k), patch embedding,
  prefix tokens, position embedding, final norm and head copied; every copied weight frozen.
* LoRA of rank r on q, k and v *separately* (three low-rank branches on the fused ``qkv`` output slices
  ``[:D]``, ``[D:2D]``, ``[2D:]``), on ``attn.proj`` and on ``mlp.fc1``/``mlp.fc2`` of every block
  ("enhanced LoRA"); A ~ kaiming_uniform(a=√5), B = 0, scale 1, no bias, no dropout -- so at step 0 the
  student *is* the layer-subsampled teacher.
* Loss (paper Sec. 3.2, official ``engine_kd.py``): ``mean_{b,n,d} |T_{L-1}(x) - S_last(x)|`` over all tokens (CLS
  included) on the pre-norm residual stream; the target is the cached teacher block ``L-1``. Label-free.
* After training LoRA is merged (``W += B A`` per slice) and the student saved as a plain timm model.

Ablations (method arguments): ``variant="weco_kd"`` (WeCo+KD: weight copy, all weights trainable, no LoRA,
L1 on *final-normed* features as the official non-LoRA path does) and ``lora_targets="qv"`` (standard LoRA
on q and v only).

Why not peft: peft 0.21 puts one adapter (one A, one B) on a whole ``nn.Linear``. timm fuses q, k and v into
one ``qkv`` Linear, so peft can only give a rank-r LoRA on the fused output -- a *shared* A for q, k and v
(rank <= r jointly), not the paper's three independent rank-r branches (loralib's ``MergedLinear`` with
``enable_lora`` did this; peft has no equivalent). Splitting ``qkv`` into three Linears would change
timm's module tree and state-dict keys and the saved model would no longer be a plain timm model. So the
~40-line :class:`LoRALinear` below (output-slice LoRA, merge by ``W[slice] += B A``) is used for every
adapted layer; one mechanism keeps the step-0 identity, the trainable-parameter set and the merge uniform.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..errors import CompatError, ConfigError
from ..manifest import Manifest, block_name
from ..models import load_model
from ..teachers import teacher_from_manifest
from ._adapters import frozen_teacher_norm
from .base import METHODS, Method, MethodArgumentError, MethodContext, StudentOutput, teacher_layer_targets

VARIANTS = ("lora", "weco_kd")
LORA_TARGETS = {"all": ("q", "k", "v", "proj", "fc1", "fc2"), "qv": ("q", "v")}


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus independent rank-r branches on slices of its output.

    ``y = base(x)``, then ``y[..., a:b] += x A_s^T B_s^T`` for every adapted output slice ``s = (a, b)``.
    One slice covering the whole output is ordinary LoRA; three slices on a fused ``qkv`` give separate
    q/k/v adapters.
    """

    def __init__(self, base: nn.Linear, rank: int, slices: list[tuple[int, int]]):
        super().__init__()
        self.base = base
        self.slices = [(int(a), int(b)) for a, b in sorted(slices)]
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for a, b in self.slices:
            A = torch.empty(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # LoRA / loralib init; B = 0 keeps step 0 exact
            self.lora_A.append(nn.Parameter(A))
            self.lora_B.append(nn.Parameter(A.new_zeros(b - a, rank)))

    def delta(self) -> torch.Tensor:
        """The dense weight update ``[out, in]`` that :meth:`merge` adds (zero rows outside the slices)."""
        dw = self.base.weight.new_zeros(self.base.weight.shape)
        for (a, b), A, B in zip(self.slices, self.lora_A, self.lora_B):
            dw[a:b] = B @ A
        return dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        pieces, end = [], 0
        for (a, b), A, B in zip(self.slices, self.lora_A, self.lora_B):
            if a > end:
                pieces.append(y[..., end:a])
            pieces.append(y[..., a:b] + (x @ A.t()) @ B.t())
            end = b
        if end < y.shape[-1]:
            pieces.append(y[..., end:])
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the LoRA update folded into its weight (bias unchanged)."""
        out = copy.deepcopy(self.base)
        out.weight.copy_(self.base.weight + self.delta())
        return out


def subsample_blocks(model: nn.Module, k: int) -> nn.Module:
    """Keep teacher blocks ``0, k, 2k, ...`` in place (student block j = teacher block j·k).

    ``feature_info`` is rewritten too: timm's ``forward_intermediates`` counts ``len(self.blocks)`` but
    feature extraction wrappers read ``feature_info``, and both must describe the shallower model.
    """
    if k < 1:
        raise ConfigError(f"reduction factor k must be >= 1, got {k}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise CompatError(f"WeCoLoRA needs a ViT-like teacher with an nn.Sequential `blocks`; "
                          f"{type(model).__name__} has none")
    model.blocks = nn.Sequential(*list(blocks)[0::k])
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and len(info) == len(blocks):
        model.feature_info = [dict(d, module=f"blocks.{j}") for j, d in enumerate(info[0::k])]
    return model


def add_lora(model: nn.Module, rank: int, targets: str = "all") -> list[LoRALinear]:
    """Freeze ``model`` and wrap every block's q/k/v (slices of ``qkv``), ``proj``, ``fc1``, ``fc2`` with LoRA."""
    if targets not in LORA_TARGETS:
        raise ConfigError(f"lora_targets {targets!r} is unknown; use one of {sorted(LORA_TARGETS)}")
    wanted = LORA_TARGETS[targets]
    model.requires_grad_(False)
    wrapped = []
    for i, blk in enumerate(model.blocks):
        attn, mlp = blk.attn, blk.mlp
        for owner, attr in ((attn, "qkv"), (attn, "proj"), (mlp, "fc1"), (mlp, "fc2")):
            base = getattr(owner, attr, None)
            if not isinstance(base, nn.Linear):
                raise CompatError(f"block {i}: expected an nn.Linear at {attr!r}, got {type(base).__name__}; "
                                  "WeCoLoRA supports timm ViT blocks with fused qkv and an Mlp (fc1/fc2)")
            if attr == "qkv":
                d = base.out_features // 3
                slices = [(j * d, (j + 1) * d) for j, n in enumerate("qkv") if n in wanted]
            else:
                slices = [(0, base.out_features)] if attr in wanted else []
            if slices:
                setattr(owner, attr, LoRALinear(base, rank, slices))
                wrapped.append(getattr(owner, attr))
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` in ``model`` (in place) with its merged ``nn.Linear``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.merge())
    return model


def wecolora_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """L1 averaged over batch, tokens (CLS included) and channels: ``mean |T - S|`` (official ``engine_kd``)."""
    if student_tokens.shape != teacher_tokens.shape:
        raise CompatError(f"student tokens {tuple(student_tokens.shape)} and teacher tokens "
                          f"{tuple(teacher_tokens.shape)} differ; WeCoLoRA needs the teacher's own token layout")
    return (teacher_tokens.to(student_tokens.dtype) - student_tokens).abs().mean()


def student_spec(manifest: Manifest, k: int) -> dict[str, Any]:
    """timm name + kwargs that rebuild the (merged) student as a plain timm model: the teacher at depth L/k."""
    t = manifest["teacher"]
    depth = math.ceil(int(t["num_blocks"]) / k)
    kwargs = dict(manifest.get("teacher_kwargs", {}) or {}, depth=depth)
    return {"model": t["timm_name"], "img_size": int(manifest["img_size"]), "num_classes": int(t["num_classes"]),
            "model_kwargs": kwargs}


@METHODS.register("wecolora")
class WeCoLoRA(Method):
    """WeCoLoRA (WACV 2025): weight-copied shallow student + enhanced LoRA, L1 on the last block (label-free).

    Args:
        ctx: method context; ``ctx.student`` must come from :meth:`build_student` with the same arguments.
        k: depth reduction factor (student block j = teacher block j·k); the paper uses 2 and 3.
        r: LoRA rank (official README command: 128; argparse default 4).
        variant: ``"lora"`` (WeCoLoRA) or ``"weco_kd"`` (WeCo+KD ablation: all weights train, no LoRA,
            L1 on final-normed features).
        lora_targets: ``"all"`` (q, k, v, proj, fc1, fc2: enhanced LoRA) or ``"qv"`` (standard LoRA ablation).
    """

    default_ce_weight = 0.0  # label-free feature distillation

    def __init__(self, ctx: MethodContext, k: int = 2, r: int = 128, variant: str = "lora",
                 lora_targets: str = "all"):
        super().__init__(ctx)
        _check_args(k, r, variant, lora_targets)
        self.k, self.r, self.variant, self.lora_targets = int(k), int(r), variant, lora_targets
        self.spec = student_spec(ctx.manifest, self.k)
        self.teacher_last = block_name(ctx.teacher_layer(-1))
        depth = len(getattr(ctx.student, "blocks", []))
        if depth != self.spec["model_kwargs"]["depth"]:
            raise CompatError(f"student has {depth} blocks but k={k} on a {ctx.teacher_num_blocks}-block teacher "
                              f"needs {self.spec['model_kwargs']['depth']}; build it with WeCoLoRA.build_student")
        has_lora = any(isinstance(m, LoRALinear) for m in ctx.student.modules())
        if has_lora != (variant == "lora"):
            raise CompatError(f"variant={variant!r} but the student {'has' if has_lora else 'has no'} LoRA layers; "
                              "build it with WeCoLoRA.build_student and the same method arguments")
        self.student_last = depth - 1
        # WeCo+KD compares final-normed features: the teacher's norm is rebuilt (frozen) from the manifest.
        self.teacher_norm = frozen_teacher_norm(ctx) if variant == "weco_kd" else None

    @classmethod
    def required_targets(cls, manifest: Manifest, **kwargs: Any) -> list[str]:
        return teacher_layer_targets(manifest, [-1])

    @classmethod
    def build_student(cls, manifest: Manifest, student_name: str, img_size: int, k: int = 2, r: int = 128,
                      variant: str = "lora", lora_targets: str = "all", **kwargs: Any) -> nn.Module:
        """Rebuild the cached teacher (weights hash checked), keep every k-th block, add LoRA or unfreeze.

        ``student_name`` is not used to build anything: the architecture is the teacher's at depth ceil(L/k)
        (recorded as ``student.featcache_spec`` for ``student.json``).
        """
        _check_args(k, r, variant, lora_targets)
        if kwargs:
            raise MethodArgumentError(f"wecolora got unknown arguments {sorted(kwargs)}; its arguments are k, r, "
                                      "variant and lora_targets")
        if img_size is not None and int(img_size) != int(manifest["img_size"]):
            raise CompatError(f"wecolora copies the teacher's position embedding, so the student must see the cache's "
                              f"{manifest['img_size']} px views, not {img_size}; drop --img-size")
        t = manifest["teacher"]
        if student_name and student_name not in ("teacher", t.get("name"), t.get("timm_name"), t.get("architecture")):
            warnings.warn(f"wecolora builds its student from the cached teacher {t.get('name')!r} (every {k}-th "
                          f"block); --student {student_name!r} is ignored (pass --student teacher to silence this)",
                          stacklevel=2)
        student = subsample_blocks(teacher_from_manifest(manifest).model, int(k))
        student.train()
        if variant == "lora":
            add_lora(student, int(r), lora_targets)
        else:
            student.requires_grad_(True)
        student.featcache_spec = student_spec(manifest, int(k))
        return student

    def student_layers(self) -> list[int]:
        return [self.student_last]

    def forward(self, student: StudentOutput, targets: Mapping[str, torch.Tensor], labels: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        s = student.features[self.student_last]
        t = targets[self.teacher_last]
        if self.teacher_norm is not None:
            if student.final_norm is None:
                raise CompatError("variant='weco_kd' needs the student's final norm")
            s, t = student.final_norm(s), self.teacher_norm(t.to(s.dtype))
        loss = wecolora_loss(s, t)
        return {"loss": loss, "l1": loss.detach()}

    def export_student(self, student: nn.Module) -> nn.Module:
        """Merge LoRA and load the weights into a freshly created plain timm model (strict state-dict match)."""
        merged = merge_lora(copy.deepcopy(student))
        spec = self.spec
        plain = load_model(spec["model"], pretrained=False, img_size=spec["img_size"],
                           num_classes=spec["num_classes"], **spec["model_kwargs"])
        plain.load_state_dict(merged.state_dict(), strict=True)
        plain.featcache_spec = spec
        return plain.to(next(student.parameters()).device)


def _check_args(k: int, r: int, variant: str, lora_targets: str) -> None:
    if int(k) < 1:
        raise ConfigError(f"wecolora: k (depth reduction factor) must be >= 1, got {k}")
    if int(r) < 1:
        raise ConfigError(f"wecolora: r (LoRA rank) must be >= 1, got {r}")
    if variant not in VARIANTS:
        raise ConfigError(f"wecolora: variant {variant!r} is unknown; use one of {list(VARIANTS)}")
    if lora_targets not in LORA_TARGETS:
        raise ConfigError(f"wecolora: lora_targets {lora_targets!r} is unknown; use one of {sorted(LORA_TARGETS)}")
