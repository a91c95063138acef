"""The one interface every distillation method implements, and the task that composes them.

A method is a small ``nn.Module`` (its trainable adapters are its submodules) that
  * says which cached teacher targets it needs (``required_targets``, checked against the manifest
    before step 0) and which student blocks it reads (``student_layers``);
  * computes its loss from the student's outputs and the cached targets (``forward`` returns a dict with
    ``loss``, already weighted by the method's own coefficients, plus unweighted parts for logging);
  * may build the student itself (``build_student``, e.g. WeCoLoRA's weight copy) and turn the trained
    student into a plain timm model (``export_student``, e.g. merging LoRA);
  * may run a few teacher blocks at train time (``online_teacher_cost``, e.g. ScaleKD's TPP) and say so.

The training loop only ever sees :class:`DistillTask`: it never branches on the method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import Registry
from ..manifest import Manifest, block_name

METHODS: Registry[type["Method"]] = Registry("method")


@dataclass
class StudentOutput:
    """Everything a method may read from one student forward pass.

    Attributes:
        logits: [B, C] classifier output.
        features: student block index -> that block's output before the final norm; [B, T, D] with prefix
            tokens first for ViT-like students, [B, C, H, W] for CNNs (timm ``forward_intermediates``).
        num_prefix_tokens: prefix (CLS/register/dist) tokens at the start of each ViT feature (0 for CNNs).
        final_norm: the student's final norm module, for methods that mimic post-norm features.
    """

    logits: torch.Tensor
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    num_prefix_tokens: int = 0
    final_norm: nn.Module | None = None


def student_forward(student: nn.Module, images: torch.Tensor, layers: list[int]) -> StudentOutput:
    """Run the student once, collecting the block outputs ``layers`` (pre-norm) and the logits."""
    npt = int(getattr(student, "num_prefix_tokens", 0))
    if not layers:
        return StudentOutput(student(images), {}, npt, getattr(student, "norm", None))
    if npt or hasattr(student, "num_prefix_tokens"):
        final, inter = student.forward_intermediates(images, indices=list(layers), norm=False,
                                                     return_prefix_tokens=True, output_fmt="NLC")
        # timm returns (tokens, prefix) pairs only when the model has prefix tokens; plain tensors otherwise.
        feats = [torch.cat([f[1], f[0]], dim=1) if isinstance(f, tuple) else f for f in inter]
    else:
        final, feats = student.forward_intermediates(images, indices=list(layers), norm=False)
    logits = student.forward_head(final)
    return StudentOutput(logits, dict(zip(layers, feats)), npt, getattr(student, "norm", None))


def count_blocks(model: nn.Module) -> int:
    """Number of feature taps ``forward_intermediates`` indexes: timm's ``feature_info`` when the model has one
    (it is what timm indexes: e.g. EfficientNet has 7 block groups but 5 taps), else ViT ``blocks`` / ``stages``."""
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info:
        return len(info)
    for attr in ("blocks", "stages", "layers"):
        blocks = getattr(model, attr, None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
            return len(blocks)
    raise ValueError(f"cannot count the feature taps of {type(model).__name__}: it has no feature_info/blocks/stages")


def resolve_layer(index: int, num_blocks: int) -> int:
    """Resolve a possibly negative block index (``-1`` = last block) against ``num_blocks``."""
    resolved = index + num_blocks if index < 0 else index
    if not 0 <= resolved < num_blocks:
        raise ValueError(f"block index {index} is out of range for a model with {num_blocks} blocks")
    return resolved


@dataclass
class MethodContext:
    """What a method may know when it builds its adapters.

    Attributes:
        manifest: the cache manifest (teacher dims, token layout, final-norm parameters, classes).
        student: the student model the method trains (already built).
        img_size: input size the student sees (the cached view geometry).
    """

    manifest: Manifest
    student: nn.Module
    img_size: int

    @property
    def teacher(self) -> Mapping[str, Any]:
        return self.manifest["teacher"]

    @property
    def teacher_num_blocks(self) -> int:
        return int(self.teacher["num_blocks"])

    def teacher_layer(self, index: int) -> int:
        return resolve_layer(index, self.teacher_num_blocks)

    def student_num_blocks(self) -> int:
        return count_blocks(self.student)

    def student_layer(self, index: int) -> int:
        return resolve_layer(index, self.student_num_blocks())

    @torch.no_grad()
    def student_feature_shapes(self, layers: list[int]) -> dict[int, tuple[int, ...]]:
        """Per-sample shapes of the student's block outputs, found by one dummy forward pass."""
        was_training = self.student.training
        self.student.eval()
        dummy = torch.zeros(1, 3, self.img_size, self.img_size, device=next(self.student.parameters()).device)
        out = student_forward(self.student, dummy, layers)
        self.student.train(was_training)
        return {k: tuple(v.shape[1:]) for k, v in out.features.items()}

    def teacher_final_norm(self) -> nn.Module:
        """The teacher's final norm rebuilt (frozen) from the parameters stored in the manifest."""
        spec = self.teacher["final_norm"]
        if spec["type"] != "LayerNorm":
            raise ValueError(f"teacher final norm {spec['type']!r} is not supported; only LayerNorm is")
        weight = torch.tensor(spec["weight"], dtype=torch.float32)
        norm = nn.LayerNorm(weight.numel(), eps=float(spec["eps"]), elementwise_affine=True)
        with torch.no_grad():
            norm.weight.copy_(weight)
            bias = spec.get("bias")
            norm.bias.copy_(torch.tensor(bias, dtype=torch.float32) if bias is not None else torch.zeros_like(weight))
        norm.requires_grad_(False)
        return norm


class Method(nn.Module):
    """Base class of every distillation method. Subclasses register with ``@METHODS.register(name)``.

    Hyperparameters are keyword arguments of ``__init__`` with the paper's (official code's) defaults.
    """

    name: ClassVar[str] = ""
    #: Weight of the plain label cross-entropy when this method runs alone (0 for label-free methods).
    default_ce_weight: ClassVar[float] = 1.0

    def __init__(self, ctx: MethodContext, **kwargs: Any):
        super().__init__()
        if kwargs:
            raise TypeError(f"method {self.name!r} got unknown arguments {sorted(kwargs)}")

    @classmethod
    def required_targets(cls, manifest: Manifest, **kwargs: Any) -> list[str]:
        """Names of the cached targets this method reads (e.g. ``["block_0", "logits"]``)."""
        raise NotImplementedError

    def student_layers(self) -> list[int]:
        """Student block indices (non-negative) whose outputs ``forward`` reads."""
        return []

    def forward(self, student: StudentOutput, targets: Mapping[str, torch.Tensor], labels: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """Return ``{"loss": weighted scalar, <part>: unweighted scalars...}``."""
        raise NotImplementedError

    @classmethod
    def build_student(cls, manifest: Manifest, student_name: str, img_size: int, **kwargs: Any) -> nn.Module | None:
        """Build the student from the teacher (e.g. weight copy); ``None`` = the engine builds it from timm."""
        return None

    def export_student(self, student: nn.Module) -> nn.Module:
        """Turn the trained student into a plain timm model for saving (e.g. merge LoRA)."""
        return student

    def online_teacher_cost(self) -> str | None:
        """A sentence saying which teacher compute runs at train time, or ``None`` if the method is cache-only."""
        return None


def teacher_layer_targets(manifest: Manifest, layers: list[int]) -> list[str]:
    """Target names for teacher blocks given possibly negative indices."""
    n = int(manifest["teacher"]["num_blocks"])
    return [block_name(resolve_layer(i, n)) for i in layers]


def parse_method_spec(spec: str) -> list[tuple[str, float]]:
    """Parse ``"vitkd+nkd"`` or ``"vitkd:1.0+nkd:0.5"`` into ``[(name, weight), ...]``."""
    out = []
    for part in spec.split("+"):
        name, _, weight = part.strip().partition(":")
        if not name:
            raise ValueError(f"empty method name in {spec!r}; write e.g. 'vitkd+nkd' or 'vitkd:1+nkd:0.5'")
        METHODS.get(name)  # raises with the list of known methods
        out.append((name, float(weight) if weight else 1.0))
    return out


class DistillTask(nn.Module):
    """The one trainable module: student + every method's adapters, summing weighted method losses.

    The label term is shared, not per method: ``ce_weight * CE(logits, labels, label_smoothing)`` with
    ``labels == -1`` ignored (unlabelled views). Teacher targets come from the batch, never from a teacher.
    """

    def __init__(self, student: nn.Module, methods: Mapping[str, tuple[Method, float]], ce_weight: float,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.student = student
        self.methods = nn.ModuleDict({name: m for name, (m, _) in methods.items()})
        self.weights = {name: w for name, (_, w) in methods.items()}
        self.ce_weight = ce_weight
        self.label_smoothing = label_smoothing
        self.layers = sorted({i for m in self.methods.values() for i in m.student_layers()})

    def forward(self, images: torch.Tensor, targets: Mapping[str, torch.Tensor], labels: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        out = student_forward(self.student, images, self.layers)
        parts: dict[str, torch.Tensor] = {}
        total = out.logits.new_zeros(())
        if self.ce_weight:
            ce = ce_loss(out.logits, labels, self.label_smoothing)
            parts["ce"] = ce.detach()
            total = total + self.ce_weight * ce
        for name, method in self.methods.items():
            result = method(out, targets, labels)
            total = total + self.weights[name] * result["loss"]
            parts.update({f"{name}/{k}": v.detach() for k, v in result.items()})
        parts["loss"] = total
        return parts


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over labelled views only (``label == -1`` means unlabelled); 0 when none is labelled."""
    # Sum over labelled rows / their count, not boolean indexing: no device->host sync in the training step.
    total = F.cross_entropy(logits, labels, ignore_index=-1, label_smoothing=label_smoothing, reduction="sum")
    return total / (labels >= 0).sum().clamp_min(1)
