"""Distillation methods: one module per method, each registered in ``METHODS`` under its file name."""
import importlib
import pkgutil

from .base import METHODS, DistillTask, Method, MethodContext, StudentOutput, parse_method_spec, student_forward

# Every public module in this package is a method; importing it registers it.
for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "DistillTask", "Method", "MethodContext", "StudentOutput", "parse_method_spec",
           "student_forward"]
