"""The run directory's contract: the name of every file a run writes, and the one way to read each back.

A training run (``featcache train --out DIR``, or one run of a sweep) owns one directory::

    config.yaml                 the resolved TrainConfig (image size and CE weight filled in)
    metrics.jsonl / .csv        one JSON record per line: ``{"kind": "train" | "eval", "epoch", "step", ...}``
    train.log                   what the console showed: summaries, log lines, evaluations (timestamped)
    tensorboard/                TensorBoard's files (``--report-to``; the project's subdirectory, hparams in it)
    checkpoints/step_{n:08d}/   Accelerate state (+ model_ema.safetensors) + featcache_state.json, written last:
                                its presence = complete
    student/                    the exported student in timm's own format (model.safetensors + config.json):
                                ``timm.create_model("local-dir:DIR/student", pretrained=True)`` loads it
    student.safetensors         the same weights (a hard link) ...
    student.json                ... and what rebuilds them (real timm name, kwargs, image size, classes, mean/std)
    student_ema/                (``--model-ema``) the EMA of the student, in timm's format
    student_best/               (``--val``) the student of the epoch with the best top-1, in timm's format
    final.json                  the result, written last: its presence = the run is done
    sweep_run.yaml              (sweeps) the config the sweep asked for, before the engine resolved it
    probe.json                  (``featcache probe``) the linear-probe result
    .featcache.lock             held (``fcntl.flock``) by the one process writing the run; names its PID

Every module that reads or writes one of these goes through this one: the engine writes them, ``--resume`` and
sweeps read the status and the checkpoints, ``report``, ``demo`` and the sweep's progress lines read the metrics,
``probe`` reads the student. Writers append whole lines and replace small files atomically, so a killed run
leaves at worst a torn last metrics line, which every reader here skips.
"""
from __future__ import annotations

import copy
import csv
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from .config import TrainConfig, load_yaml, save_yaml, to_dict
from .durable import write_atomic
from .errors import ConfigError, MissingFileError
from .manifest import diff_keys

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
LOG_FILE = "train.log"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_STATE = "featcache_state.json"
CHECKPOINT_EMA = "model_ema.safetensors"
STUDENT_WEIGHTS = "student.safetensors"
STUDENT_SPEC = "student.json"
STUDENT_DIR = "student"
STUDENT_EMA_DIR = "student_ema"
STUDENT_BEST_DIR = "student_best"
TIMM_WEIGHTS = "model.safetensors"  # the file names timm's save_for_hf writes and local-dir: reads
TIMM_CONFIG = "config.json"
FINAL_FILE = "final.json"
SWEEP_CONFIG = "sweep_run.yaml"
PROBE_FILE = "probe.json"
PROBE_RANDOM_INIT_FILE = "probe_random_init.json"
#: The run's lock (:mod:`featcache.locks`): kept when a run is cleared, since deleting a held lock file would let a
#: second writer lock a new one.
LOCK_FILE = ".featcache.lock"

#: Files whose presence marks a directory as a run (what ``featcache report`` looks for).
RUN_MARKERS = (CONFIG_FILE, FINAL_FILE, SWEEP_CONFIG)

#: TrainConfig fields that may differ between a run and its continuation (``train --resume``, a re-run sweep)
#: because they cannot change the weights or the result: the loop's order, views and RNG draws depend on none of
#: them. ``data`` is where the same images live now (a changed image fails its replay fingerprint), ``workers``
#: only parallelises loading (worker seeds come from the loader's own generator), ``log_every`` and
#: ``checkpoint_every`` only decide when records and checkpoints are written, ``quiet``, ``report_to`` and
#: ``tracker_project`` only who sees them. Not neutral: ``val`` (it changes the reported top-1), ``ce_weight`` (compared
#: after the methods' default is filled in) and ``mixed_precision`` (compared as Accelerate resolved it).
NEUTRAL_KEYS = ("resume", "workers", "log_every", "data", "checkpoint_every", "quiet", "report_to", "tracker_project")

#: ``done``: final.json written; ``partial``: a complete checkpoint to resume from; ``failed``: the engine started
#: but left nothing to resume (killed before its first checkpoint); ``new``: no run file yet.
RunStatus = Literal["done", "partial", "failed", "new"]

#: Keys of ``student.json``; ``model`` is the real timm name (``architecture.tag``, never a featcache alias), so
#: ``timm.create_model(model, img_size=..., num_classes=..., **model_kwargs)`` (or featcache's ``load_model``)
#: rebuilds the student, ``mean``/``std`` are the normalisation it was trained with. The engine writes them all;
#: a reader needs :data:`STUDENT_REQUIRED` (hand-written specs may leave the rest to the model's defaults).
STUDENT_KEYS = ("model", "img_size", "num_classes", "model_kwargs", "mean", "std")
STUDENT_REQUIRED = ("model", "img_size")


# ------------------------------------------------------------------------------------------------ status


def run_status(run_dir: str | Path) -> RunStatus:
    """Where a run stands, read from its files alone (for a run no process is writing to)."""
    run_dir = Path(run_dir)
    if (run_dir / FINAL_FILE).is_file():
        return "done"
    if latest_checkpoint(run_dir) is not None:
        return "partial"
    if any((run_dir / name).exists() for name in (CONFIG_FILE, METRICS_FILE, CHECKPOINTS_DIR)):
        return "failed"
    return "new"


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted config keys that differ between a run and its continuation, :data:`NEUTRAL_KEYS` left out.

    A key the saved config lacks (an option added after the run started) is taken at its default: the run used
    that behaviour, so continuing it with the default is the same run.
    """
    saved = {**to_dict(TrainConfig()), **old}
    return [k for k in diff_keys(saved, new) if k.split(".")[0] not in NEUTRAL_KEYS]


def is_run(path: str | Path) -> bool:
    """True if ``path`` holds one of :data:`RUN_MARKERS`."""
    return any((Path(path) / name).is_file() for name in RUN_MARKERS)


def find_runs(root: str | Path) -> list[Path]:
    """Run directories at or below ``root``, sorted.

    Raises:
        MissingFileError: when ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"runs directory {str(root)!r} does not exist; pass the `out:` of a sweep or a "
                               "directory holding `featcache train --out` runs")
    return sorted({p.parent for name in RUN_MARKERS for p in root.rglob(name)})


# ------------------------------------------------------------------------------------------------ configs


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config: the engine's resolved ``config.yaml``, else the sweep's ``sweep_run.yaml``, else ``{}``."""
    for name in (CONFIG_FILE, SWEEP_CONFIG):
        if (Path(run_dir) / name).is_file():
            return load_yaml(Path(run_dir) / name)
    return {}


def write_config(run_dir: str | Path, config: Any, name: str = CONFIG_FILE) -> None:
    """Save a config dataclass as ``config.yaml`` (or ``name``, e.g. :data:`SWEEP_CONFIG`)."""
    save_yaml(config, Path(run_dir) / name)


# ------------------------------------------------------------------------------------------------ metrics


class MetricsTail:
    """Reads the records appended to a run's ``metrics.jsonl`` since the last call: the one metrics reader.

    A record counts once its newline is written (the engine writes record and newline in one call), so the torn
    last line of a killed or still-writing run is skipped, and so is any line that is not a JSON object. A file
    that shrank (a resumed run drops what its killed predecessor logged after the checkpoint) is read again from
    its start.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        """The whole records appended since the previous call (all of them on the first)."""
        data = self._read_from_offset()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [r for r in map(_record, data[:end].decode(errors="replace").splitlines()) if r is not None]

    def _read_from_offset(self) -> bytes:
        try:
            if self.path.stat().st_size < self.offset:
                self.offset = 0
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                return fh.read()
        except OSError:  # not written yet
            return b""


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every whole record of a run's ``metrics.jsonl`` (``[]`` when there is none)."""
    return MetricsTail(run_dir).read()


def append_metrics(run_dir: str | Path, record: Mapping[str, Any]) -> None:
    """Append one record as one line (a single write, so a kill leaves at most one torn line)."""
    with open(Path(run_dir) / METRICS_FILE, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Keep the records up to ``step``: a resumed run rewrites what the killed one logged after its checkpoint."""
    path = Path(run_dir) / METRICS_FILE
    if path.is_file():
        kept = [r for r in read_metrics(run_dir) if int(r.get("step", 0)) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def write_metrics_csv(run_dir: str | Path) -> None:
    """``metrics.csv``: every record, columns = the union of keys (blank where a record lacks one)."""
    records = read_metrics(run_dir)
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(Path(run_dir) / METRICS_CSV, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint after optimizer step ``step`` goes (zero-padded, so names sort by step)."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories whose state file was written (the engine writes it last), oldest first."""
    return sorted(p.parent for p in (Path(run_dir) / CHECKPOINTS_DIR).glob(f"step_*/{CHECKPOINT_STATE}"))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def write_checkpoint_state(checkpoint: str | Path, state: Mapping[str, Any]) -> None:
    """The loop's own state beside Accelerate's; written atomically and last, it marks the checkpoint complete."""
    write_atomic(Path(checkpoint) / CHECKPOINT_STATE, json.dumps(dict(state)).encode())


def read_checkpoint_state(checkpoint: str | Path) -> dict[str, Any]:
    """What :func:`write_checkpoint_state` wrote."""
    return json.loads((Path(checkpoint) / CHECKPOINT_STATE).read_text())


def write_checkpoint_ema(checkpoint: str | Path, state: Mapping[str, Any]) -> None:
    """The ``--model-ema`` weights beside Accelerate's state (safetensors: nothing is unpickled on resume)."""
    from safetensors.torch import save_file

    save_file(_cpu_tensors(state), str(Path(checkpoint) / CHECKPOINT_EMA))


def read_checkpoint_ema(checkpoint: str | Path) -> dict[str, Any]:
    """What :func:`write_checkpoint_ema` wrote.

    Raises:
        MissingFileError: the checkpoint was written without ``--model-ema``.
    """
    path = Path(checkpoint) / CHECKPOINT_EMA
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(checkpoint)!r} has no {CHECKPOINT_EMA}: it was written without "
                               "--model-ema; resume without it or train into a new --out")
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------------------------ result


def write_final(run_dir: str | Path, result: Mapping[str, Any]) -> None:
    """``final.json``, atomically: written last, it is what marks the run done."""
    write_atomic(Path(run_dir) / FINAL_FILE, json.dumps(result, indent=1).encode())


def read_final(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's result, or ``None`` while it is not done."""
    path = Path(run_dir) / FINAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------------------------ student


def write_student(run_dir: str | Path, model: Any, spec: Mapping[str, Any], mean: Iterable[float],
                  std: Iterable[float], data_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Save the exported student: ``student/`` in timm's format, ``student.safetensors`` and ``student.json``.

    Args:
        run_dir: the run directory.
        model: the exported ``nn.Module`` (a timm model gets ``student/``; any other module only the two files).
        spec: ``{"model", "img_size", "num_classes", "model_kwargs"}``.
        mean: the normalisation the student was trained with.
        std: see ``mean``.
        data_config: the rest of the student's timm data config (``interpolation``, ``crop_pct``, ``crop_mode``)
            that ``student/config.json`` records for timm's evaluation transform.

    Returns:
        The ``student.json`` content.
    """
    run_dir = Path(run_dir)
    content = {**spec, "mean": list(mean), "std": list(std)}
    if is_timm_model(model):
        timm_config = {**(data_config or {}), "mean": content["mean"], "std": content["std"]}
        folder = write_timm_model(run_dir / STUDENT_DIR, model, timm_config, int(spec["img_size"]))
        _link_or_copy(folder / TIMM_WEIGHTS, run_dir / STUDENT_WEIGHTS)
    else:
        from safetensors.torch import save_file

        save_file(_cpu_tensors(model.state_dict()), str(run_dir / STUDENT_WEIGHTS),
                  metadata={"model": str(spec["model"])})
    (run_dir / STUDENT_SPEC).write_text(json.dumps(content, indent=1))
    return content


def is_timm_model(model: Any) -> bool:
    """True for a model timm created (it carries the ``pretrained_cfg`` that timm's export records)."""
    return isinstance(getattr(model, "pretrained_cfg", None), Mapping) and "architecture" in model.pretrained_cfg


def write_timm_model(folder: str | Path, model: Any, data_config: Mapping[str, Any], img_size: int) -> Path:
    """``timm.models.save_for_hf``: ``model.safetensors`` + ``config.json`` (architecture, ``model_args`` and the
    data config at ``img_size``), the folder plain timm loads with ``create_model("local-dir:FOLDER",
    pretrained=True)``."""
    from timm.models import save_for_hf

    keys = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
    config = {**{k: data_config[k] for k in keys if k in data_config}, "input_size": (3, img_size, img_size)}
    save_for_hf(_cpu_contiguous(model), str(folder), safe_serialization=True, data_config=config)
    return Path(folder)


def _cpu_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _cpu_contiguous(model: Any) -> Any:
    """``model`` itself when its state is on the CPU and contiguous (what safetensors saves), else such a copy."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    if all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return model
    model = copy.deepcopy(model).cpu()
    for t in itertools.chain(model.parameters(), model.buffers()):
        t.data = t.data.contiguous()
    return model


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (no second copy on disk), or a copy where the filesystem has no links."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def read_student(run_dir: str | Path) -> dict[str, Any]:
    """``student.json`` of a finished run, checked for the keys of :data:`STUDENT_REQUIRED`.

    Raises:
        MissingFileError: when the run has no ``student.json`` (not finished, or not a run directory).
        ConfigError: when it lacks a required key.
    """
    path = Path(run_dir) / STUDENT_SPEC
    if not path.is_file():
        raise MissingFileError(f"run directory {str(run_dir)!r} has no {STUDENT_SPEC}; is the run complete "
                               f"({FINAL_FILE} written)? Otherwise pass a checkpoint file and --model")
    spec = json.loads(path.read_text())
    missing = [k for k in STUDENT_REQUIRED if k not in spec]
    if missing:
        raise ConfigError(f"{path} lacks {missing}; it was not written by `featcache train`: add them (its keys are "
                          f"{list(STUDENT_KEYS)})")
    return spec


def student_weights(run_dir: str | Path) -> Path:
    """The path of a run's exported student weights."""
    return Path(run_dir) / STUDENT_WEIGHTS
