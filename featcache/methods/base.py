"""The one interface every distillation method implements, and what a method may read.

A method is a small ``nn.Module`` (its trainable adapters are its submodules) that
  * says which cached teacher targets it needs (``required_targets``, checked against the manifest
    before step 0) and which student blocks it reads (``student_layers``);
  * computes its loss from the student's outputs and the cached targets (``forward`` returns a dict with
    ``loss``, already weighted by the method's own coefficients, plus unweighted parts for logging);
  * may build the student itself (``build_student``, e.g. WeCoLoRA's weight copy) and turn the trained
    student into a plain timm model (``export_student``, e.g. merging LoRA);
  * may run a few teacher blocks at train time (``online_teacher_cost``, e.g. ScaleKD's TPP) and say so.

The training loop only ever sees :class:`~featcache.methods.task.DistillTask` (in ``task.py``, with the parsing of
``--method`` specs): it never branches on the method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn

from ..errors import CompatError, ConfigError, MethodArgumentError
from ..manifest import Manifest, block_name
from ..models import count_blocks, forward_taps, resolve_layer
from ..registry import Registry

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
    norm = getattr(student, "norm", None)
    if not layers:  # nothing to tap: the plain forward is the cheapest path to the logits
        return StudentOutput(student(images), {}, npt, norm)
    final, feats = forward_taps(student, images, layers)
    return StudentOutput(student.forward_head(final), dict(zip(layers, feats)), npt, norm)


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
        """The manifest's ``teacher`` section: the teacher is never loaded, its description is enough."""
        return self.manifest["teacher"]

    @property
    def teacher_num_blocks(self) -> int:
        """Feature taps of the cache's teacher (what negative teacher indices count back from)."""
        return int(self.teacher["num_blocks"])

    def teacher_layer(self, index: int) -> int:
        """A teacher block index resolved against the cache's teacher (negative counts from the end)."""
        return resolve_layer(index, self.teacher_num_blocks)

    def student_num_blocks(self) -> int:
        """Feature taps of the student, counted the way ``forward_intermediates`` indexes them."""
        return count_blocks(self.student)

    def student_layer(self, index: int) -> int:
        """A student block index resolved against the student (negative counts from the end)."""
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
        if spec["type"] == "Identity":  # an average-pooling ViT: its tokens are not normalised before the pool
            return nn.Identity()
        if spec["type"] != "LayerNorm":
            raise CompatError(f"teacher final norm {spec['type']!r} is not supported; only LayerNorm is (use a method "
                              "setting that does not read the teacher's final norm)")
        weight = torch.tensor(spec["weight"], dtype=torch.float32)
        norm = nn.LayerNorm(weight.numel(), eps=float(spec["eps"]), elementwise_affine=True)
        with torch.no_grad():
            norm.weight.copy_(weight)
            bias = spec.get("bias")
            norm.bias.copy_(torch.tensor(bias, dtype=torch.float32) if bias is not None else torch.zeros_like(weight))
        norm.requires_grad_(False)
        return norm


class Method(nn.Module):
    """Base class of every distillation method. Subclasses register with ``@METHODS.register(name)``, which sets
    their ``name``.

    Hyperparameters are keyword arguments of ``__init__`` with the paper's (official code's) defaults.
    """

    name: ClassVar[str] = ""
    #: Weight of the plain label cross-entropy when this method runs alone (0 for label-free methods).
    default_ce_weight: ClassVar[float] = 1.0

    def __init__(self, ctx: MethodContext, **kwargs: Any):
        super().__init__()
        if kwargs:
            raise MethodArgumentError(f"method {self.name!r} got unknown arguments {sorted(kwargs)}; drop them or "
                                      "check the spelling of --method-arg")

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
    """Target names for teacher blocks given possibly negative indices.

    Each index is resolved on its own, so two spellings of one block (``11`` and ``-1``) may both appear; a method
    that reads overlapping blocks deduplicates the names itself.
    """
    n = int(manifest["teacher"]["num_blocks"])
    return [block_name(resolve_layer(i, n)) for i in layers]
