"""Experiment trackers through Accelerate's ``log_with`` (``--report-to``), and the hyperparameters they record.

``--report-to`` takes what Accelerate's ``Accelerator(log_with=...)`` takes, comma-separated: any
``accelerate.utils.LoggerType`` name (``tensorboard``, ``wandb``, ``mlflow``, ``comet_ml``, ``aim``, ...), ``all``
for every installed one, or ``none``. A tracker that is not installed is refused before anything is built (Accelerate
itself would only drop it with a debug message). Every tracker logs under ``--tracker-project`` with the run
directory's name as the run's name; TensorBoard writes below the run's ``tensorboard/`` directory. The resolved
config is their hyperparameters: nested keys dotted (``method_args.vitkd.alpha``), lists as JSON text, since
trackers take scalars only (TensorBoard's ``add_hparams`` refuses anything else).
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from .errors import ConfigError


def log_with(report_to: str) -> list[str] | None:
    """The tracker names for ``Accelerator(log_with=...)`` (``None`` for ``none``), each checked to be installed.

    Raises:
        ConfigError: a name Accelerate does not know, or a tracker whose package is not installed.
    """
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    asked = list(dict.fromkeys(name.strip().lower() for name in report_to.split(",") if name.strip()))
    if asked in ([], ["none"]):
        return None
    unknown = [name for name in asked if name not in LoggerType.list()]
    if unknown:
        raise ConfigError(f"--report-to {report_to!r}: unknown tracker(s) {unknown}; Accelerate knows "
                          f"{', '.join(LoggerType.list())}, or none")
    available = [str(t) for t in get_available_trackers()]
    missing = [name for name in asked if name not in available and name != "all"]
    if missing:
        raise ConfigError(f"--report-to {report_to!r}: {', '.join(missing)} not installed; `pip install "
                          f"{' '.join(missing)}`, or drop it from --report-to (e.g. --report-to tensorboard, or none)")
    return available if "all" in asked else asked


def init_kwargs(run_name: str) -> dict[str, dict[str, Any]]:
    """Per-tracker ``init_kwargs`` of ``Accelerator.init_trackers``: the run is named after its directory (for the
    trackers whose constructor takes a run name besides the project)."""
    return {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}}


def hyperparameters(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` flattened to the scalar values trackers accept (dotted keys, lists as JSON text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(hyperparameters(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value))
        else:
            flat[name] = value
    return flat
