"""The composite a run trains: ``--method`` specs parsed into methods, and the one trainable module that sums them.

``vitkd+nkd`` or ``vitkd:1.0+nkd:0.5`` names registered methods with their weights; ``method_args`` holds their
keyword arguments (flat for one method, one mapping per method for several). :func:`method_specs` turns both into
:class:`MethodSpec` rows before anything is built, so a typo fails before a model is loaded. Whether the cache can
serve those methods is checked above this package (``featcache.compat``), not here.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .base import METHODS, Method, student_forward


class MethodSpec(NamedTuple):
    """One part of a ``--method`` spec, resolved but not built.

    Attributes:
        name: the registry key (``--method`` value, file name).
        cls: the registered :class:`~featcache.methods.base.Method` subclass.
        kwargs: keyword arguments for ``cls`` (and its ``build_student``/``required_targets``).
        weight: the part's coefficient in the summed loss.
    """

    name: str
    cls: type[Method]
    kwargs: dict[str, Any]
    weight: float


def parse_method_spec(spec: str) -> list[tuple[str, float]]:
    """Parse ``"vitkd+nkd"`` or ``"vitkd:1.0+nkd:0.5"`` into ``[(name, weight), ...]``."""
    out = []
    for part in spec.split("+"):
        name, _, weight = part.strip().partition(":")
        if not name:
            raise ConfigError(f"empty method name in {spec!r}; write e.g. 'vitkd+nkd' or 'vitkd:1+nkd:0.5'")
        METHODS.get(name)  # raises with the list of known methods
        out.append((name, _weight(weight, name, spec)))
    return out


def _weight(text: str, name: str, spec: str) -> float:
    """The ``:weight`` suffix of one spec part (1 when absent)."""
    if not text:
        return 1.0
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"method weight {text!r} of {name!r} in {spec!r} is not a number; write e.g. "
                          f"'{name}:0.5'") from None


def split_method_args(names: list[str], method_args: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per-method keyword arguments: ``{"alpha": 1}`` for one method, ``{"vitkd": {...}, "nkd": {...}}`` for several.

    A single method also accepts the nested form (``{"vitkd": {...}}``).
    """
    args = dict(method_args or {})
    if len(names) == 1 and not (set(args) == {names[0]} and isinstance(args[names[0]], Mapping)):
        return {names[0]: args}
    unknown = sorted(set(args) - set(names))
    if unknown:
        raise ConfigError(f"--method-arg keys {unknown} name no method of {'+'.join(names)}; with several methods "
                          "write name.key=value, e.g. --method-arg nkd.temperature=1.0")
    for name, value in args.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"method_args[{name!r}] must be a mapping of keyword arguments, got {value!r}")
    return {n: dict(args.get(n, {})) for n in names}


def method_specs(method: str, method_args: Mapping[str, Any] | None) -> list[MethodSpec]:
    """``--method`` + ``method_args`` -> one :class:`MethodSpec` per part, in spec order (nothing is built)."""
    parsed = parse_method_spec(method)
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(f"--method {method!r} names a method twice; give each method once")
    per_method = split_method_args(names, method_args)
    return [MethodSpec(n, METHODS.get(n), per_method[n], w) for n, w in parsed]


class DistillTask(nn.Module):
    """The one trainable module: student + every method's adapters, summing weighted method losses.

    The label term is shared, not per method: ``ce_weight * CE(logits, labels, label_smoothing)`` with
    ``labels == -1`` ignored (unlabelled views), or soft-target CE for the soft labels of mixed views. Teacher targets come from the batch, never from a teacher.
    Only this module is wrapped for distributed training (as timm's distillation task wraps student + adapters).
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
        """``{"loss": weighted total, "ce": ..., "<method>/<part>": ...}``; parts are detached, for logging."""
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
    """Cross-entropy over labelled views only; 0 when none is labelled.

    ``labels`` are class indices [B] (``-1``: unlabelled, ``label_smoothing`` applied here) or the soft targets
    [B, C] of mixed views (timm's ``SoftTargetCrossEntropy``: the smoothing is already in them; an all-zero row is
    unlabelled).
    """
    # Sum over labelled rows / their count, not boolean indexing: no device->host sync in the training step.
    if labels.ndim == 2:
        total = -(labels * F.log_softmax(logits.float(), dim=1)).sum()
        return total / (labels.sum(dim=1) > 0).sum().clamp_min(1)
    total = F.cross_entropy(logits, labels, ignore_index=-1, label_smoothing=label_smoothing, reduction="sum")
    return total / (labels >= 0).sum().clamp_min(1)


__all__ = ["DistillTask", "MethodSpec", "ce_loss", "method_specs", "parse_method_spec", "split_method_args"]
