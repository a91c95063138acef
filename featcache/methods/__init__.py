"""Distillation methods: one module per method, each registered in ``METHODS`` under its file name.

``base`` holds the interface a method implements, ``task`` the ``--method`` spec parsing and the composite that
sums the methods' losses; every other public module is a method, imported here so that it registers.
"""
import importlib
import pkgutil

from .base import METHODS, Method, MethodArgumentError, MethodContext, StudentOutput, student_forward
from .task import DistillTask, MethodSpec, method_specs, parse_method_spec, split_method_args

_NOT_METHODS = ("base", "task")

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name not in _NOT_METHODS:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "DistillTask", "Method", "MethodArgumentError", "MethodContext", "MethodSpec", "StudentOutput",
           "method_specs", "parse_method_spec", "split_method_args", "student_forward"]
