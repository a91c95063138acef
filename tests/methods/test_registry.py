"""Every registered method (including ones added later) builds on a tiny student + synthetic manifest and trains.

Methods run with their paper defaults: no per-method kwargs, so a new method file is covered automatically.
"""
import pytest
import torch

from featcache.methods import METHODS, DistillTask, MethodContext

from featcache.testing.students import IMG, make_student


def build(name, manifest):
    cls = METHODS.get(name)
    student = cls.build_student(manifest, "teacher", IMG) or make_student()
    return student, cls(MethodContext(manifest, student, IMG))


def test_registry_is_populated():
    assert {"kd", "nkd", "featreg", "vitkd"} <= set(METHODS.names())


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name, manifest):
    cls = METHODS.get(name)
    assert cls.name == name, f"{cls.__name__}.name is {cls.name!r} but it is registered as {name!r}"
    assert (cls.__doc__ or "").strip(), "document the paper defaults"
    required = cls.required_targets(manifest)
    assert isinstance(required, list) and set(required) <= set(manifest.target_names), required


@pytest.mark.parametrize("name", METHODS.names())
def test_method_forward_backward(name, manifest, batch):
    student, method = build(name, manifest)
    images, targets, labels = batch
    required = type(method).required_targets(manifest)
    layers = method.student_layers()
    assert all(isinstance(i, int) and i >= 0 for i in layers), f"student_layers must be resolved: {layers}"
    task = DistillTask(student, {name: (method, 1.0)}, ce_weight=type(method).default_ce_weight)
    out = task(images, {k: targets[k] for k in required}, labels)  # only what it asked for
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss), loss
    parts = {k: v for k, v in out.items() if k.startswith(f"{name}/")}
    assert f"{name}/loss" in parts
    assert all(v.ndim == 0 and torch.isfinite(v) for v in parts.values()), parts
    loss.backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"trainable parameters of {name} get no gradient: {missing}"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.student.parameters()), \
        f"no gradient reaches the student of {name}"


@pytest.mark.parametrize("name", METHODS.names())
def test_method_holds_no_plain_tensors(name, manifest):
    """Tensors a method holds (adapters, frozen teacher norms) must be parameters or buffers to follow .to(device)."""
    _, method = build(name, manifest)
    plain = [f"{mod_name}.{attr}" for mod_name, mod in method.named_modules()
             for attr, value in vars(mod).items() if isinstance(value, torch.Tensor)]
    assert not plain, f"{name} keeps plain tensor attributes that will not move with .to(): {plain}"
