"""What a training run tells the people watching it: metric records, console lines, a progress bar and a log file.

Records (:class:`MetricsLog`) go to ``metrics.jsonl`` and to the trackers of ``--report-to``. People see
(:class:`Console`, main process only, as Accelerate's examples print): a start summary, a progress bar over the
optimizer steps with the loss, learning rate, images/s and ETA, a line every ``--log-every`` steps and after every
evaluation, and an end summary. Lines go to stderr, so stdout keeps the command's result, and every one of them
is also appended to the run directory's ``train.log`` with a timestamp.

When stderr is not a terminal (CI logs, pipes, files) there is no bar, whose redraws would be one line each in a
log: the lines carry the same numbers and their own ETA. ``--quiet`` silences the console; ``train.log`` is still
written.
"""
from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, TextIO

import torch
from accelerate import Accelerator

from . import rundir
from .config import TrainConfig

#: Record keys a log line shows apart from the loss parts (or not at all).
_SHOWN_APART = ("kind", "epoch", "step", "loss", "lr", "images_per_s")
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}, ETA {remaining}{postfix}]"


class Meter:
    """Sums the loss parts of the micro-batches since the last log (on device; one sync per log)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.images = 0
        self._unreported_images = 0
        self.lr = 0.0
        self.window_start = time.perf_counter()

    def update(self, parts: Mapping[str, torch.Tensor], images: int) -> None:
        for key, value in parts.items():
            if value.ndim == 0:
                value = value.detach().float()
                self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1
        self.images += images
        self._unreported_images += images

    def pending_images(self) -> int:
        n, self._unreported_images = self._unreported_images, 0
        return n

    def flush(self, accelerator: Accelerator) -> dict[str, float]:
        """Mean of each part over the window and over processes; resets the window."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        stacked = accelerator.reduce(torch.stack([self.sums[k] for k in keys]) / self.count, reduction="mean")
        out = {k: float(v) for k, v in zip(keys, stacked.tolist())}
        now = time.perf_counter()
        out["images_per_s"] = self.images / max(now - self.window_start, 1e-9)
        self.sums, self.count, self.images, self.window_start = {}, 0, 0, now
        return out


class MetricsLog:
    """``metrics.jsonl`` (+ the trackers through the accelerator); files are written by the main process only."""

    def __init__(self, out: Path, accelerator: Accelerator):
        self.out = out
        self.accelerator = accelerator

    def write(self, record: dict[str, Any]) -> None:
        scalars = {f"{record['kind']}/{k}": v for k, v in record.items()
                   if k not in ("kind", "step", "epoch") and isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=int(record["step"]))
        if self.accelerator.is_main_process:
            rundir.append_metrics(self.out, record)

    def truncate(self, step: int) -> None:
        """Keep only records up to ``step`` (a resumed run rewrites what the killed one logged after it)."""
        if self.accelerator.is_main_process:
            rundir.truncate_metrics(self.out, step)


# ------------------------------------------------------------------------------------------------ the console


class Console:
    """The lines and the bar people see, and ``train.log``; a no-op on the processes that are not the main one.

    Args:
        log_file: where every line is appended (``None``: nowhere).
        show: print to ``stream`` (False under ``--quiet`` and on the other processes).
        stream: the terminal or pipe [stderr]; the bar is drawn only when it is a terminal.
    """

    def __init__(self, log_file: Path | None, show: bool, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.show = show
        self.file = open(log_file, "a", encoding="utf-8") if log_file is not None else None
        self.bar: Any = None
        self.total = self.first_step = 0
        self.epochs = 1
        self.started = time.perf_counter()

    @classmethod
    def for_run(cls, out: Path, accelerator: Accelerator, quiet: bool) -> "Console":
        main = accelerator.is_main_process
        return cls(out / rundir.LOG_FILE if main else None, show=main and not quiet)

    def line(self, text: str) -> None:
        """One line to the console (above the bar) and to the log file."""
        self._log(text)
        if self.show and self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.show:
            print(text, file=self.stream, flush=True)

    def lines(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.line(text)

    def start(self, total: int, done: int, epochs: int) -> None:
        """Count steps from ``done`` to ``total``; draw the bar if the stream is a terminal."""
        self.total, self.first_step, self.epochs, self.started = total, done, epochs, time.perf_counter()
        if self.show and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, file=self.stream, bar_format=BAR_FORMAT, dynamic_ncols=True,
                            desc="epoch", leave=True)

    def end(self, texts: Iterable[str]) -> None:
        """The bar's last state stays above the closing lines."""
        self._close_bar()
        self.lines(texts)

    def epoch(self, epoch: int) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"epoch {epoch + 1}/{self.epochs}", refresh=False)

    def advance(self, step: int) -> None:
        """The bar follows optimizer step ``step`` (tqdm redraws at most ten times a second)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def train(self, record: Mapping[str, Any]) -> None:
        """The log line of a train record; its loss, lr and images/s become the bar's postfix."""
        if self.bar is not None:
            self.bar.set_postfix_str(bar_postfix(record), refresh=False)
        self.line(train_line(record, self.total, self.epochs, self.eta(int(record["step"]))))

    def eval(self, record: Mapping[str, Any], best_top1: float | None) -> None:
        self.line(eval_line(record, self.total, self.epochs, best_top1))

    def eta(self, step: int) -> float | None:
        """Seconds left at the mean pace of this process's steps so far (``None`` before the first)."""
        done = step - self.first_step
        return (time.perf_counter() - self.started) / done * (self.total - step) if done > 0 else None

    def _log(self, text: str) -> None:
        if self.file is not None:
            self.file.write(f"{datetime.datetime.now().isoformat(sep=' ', timespec='seconds')}  {text}\n")
            self.file.flush()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close_bar()
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> "Console":
        return self

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        if error is not None:  # the console shows the error itself; the log keeps it too
            self._log(f"stopped by {kind.__name__}: {error}")
        self.close()


# ------------------------------------------------------------------------------------------------ summaries


def start_summary(cfg: TrainConfig, manifest: Mapping[str, Any], acc: Accelerator, task: torch.nn.Module,
                  per_epoch: int, costs: list[str]) -> list[str]:
    """What the run reads, trains and computes, printed before step 0 (and kept in ``train.log``)."""
    trainable, student = parameter_counts(acc.unwrap_model(task))
    storage, teacher, views = manifest["storage"], manifest["teacher"], manifest["views"]["count"]
    batch = cfg.batch_size * acc.num_processes * cfg.grad_accum
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(per_epoch * cfg.epochs, cfg.max_steps)
    stop = f", cut at --max-steps {cfg.max_steps}" if cfg.max_steps is not None else ""
    kwargs = f" {json.dumps(cfg.student_kwargs)}" if cfg.student_kwargs else ""
    distributed = f" ({acc.distributed_type.value})" if acc.num_processes > 1 else ""
    return [
        f"featcache train -> {cfg.out} (this log: {Path(cfg.out) / rundir.LOG_FILE})",
        f"cache    {cfg.cache}: {storage['format']}, {manifest['num_samples']} samples x {views} views, "
        f"{storage['dtype']}, {cfg.img_size} px; targets {', '.join(manifest['targets'])}",
        f"teacher  {teacher['name']} ({teacher.get('timm_name', teacher['name'])}), blocks "
        f"{', '.join(map(str, manifest['layers']))}",
        f"student  {cfg.student}{kwargs}: {millions(student)} trainable parameters",
        f"method   {cfg.method} (label CE weight {cfg.ce_weight:g}): {millions(trainable)} trainable parameters, "
        f"{millions(trainable - student)} of them the method's own",
        f"steps    {total} = {plural(cfg.epochs, 'epoch')} x {plural(per_epoch, 'step')} of {batch} views (batch "
        f"{cfg.batch_size} x "
        f"{plural(acc.num_processes, 'process')} x {cfg.grad_accum} accumulated){stop}",
        f"optim    {cfg.opt}, lr {cfg.lr:g}, {cfg.sched} schedule, {cfg.warmup_epochs:g} warmup epochs"
        + (f"; EMA of the student (decay {cfg.model_ema_decay:g})" if cfg.model_ema else ""),
        f"views    --view-policy {cfg.view_policy} over each sample's {views} stored views",
        *(f"online   {c}" for c in costs),
        f"run on   {plural(acc.num_processes, 'process')}{distributed}, {acc.device}, mixed precision "
        f"{acc.mixed_precision}; trackers: {', '.join(map(str, acc.log_with)) or 'none'}",
    ]


def end_summary(out: Path, result: Mapping[str, Any]) -> list[str]:
    """The result in words, and where the outputs are."""
    top = (f"top-1 {result['top1']:.2f} %, top-5 {result['top5']:.2f} % (best top-1 {result['best_top1']:.2f} %)"
           if result.get("top1") is not None else "no --val: not evaluated")
    speed = f", {result['images_per_s']:.0f} img/s" if result.get("images_per_s") else ""
    students = [name + "/" for name in (rundir.STUDENT_DIR, rundir.STUDENT_BEST_DIR, rundir.STUDENT_EMA_DIR)
                if (out / name).is_dir()]
    return [f"done     {result['steps']} steps in {duration(result['train_time_s'])}{speed}; {top}",
            f"wrote    {out}/: {', '.join(students)} (timm format), {rundir.STUDENT_SPEC}, {rundir.METRICS_CSV}, "
            f"{rundir.FINAL_FILE}"]


# ------------------------------------------------------------------------------------------------ lines


def duration(seconds: float | None) -> str:
    """``3725.2`` -> ``1:02:05``; ``?`` when unknown."""
    return "?" if seconds is None else str(datetime.timedelta(seconds=int(round(seconds))))


def _where(record: Mapping[str, Any], total: int, epochs: int) -> str:
    return f"epoch {int(record['epoch']) + 1}/{epochs}  step {int(record['step'])}/{total}"


def train_line(record: Mapping[str, Any], total: int, epochs: int, eta_s: float | None) -> str:
    """``epoch 1/3  step 20/60  loss 2.31 (ce 1.1, kd/kd 1.2)  lr 1.00e-03  412 img/s  ETA 0:01:02``."""
    parts = ", ".join(f"{k} {record[k]:.4g}" for k in loss_parts(record))
    loss = f"loss {record['loss']:.4g}" + (f" ({parts})" if parts else "") if "loss" in record else parts
    return (f"{_where(record, total, epochs)}  {loss}  lr {record.get('lr', 0.0):.2e}  "
            f"{record.get('images_per_s', 0.0):.0f} img/s  ETA {duration(eta_s)}")


def eval_line(record: Mapping[str, Any], total: int, epochs: int, best_top1: float | None) -> str:
    """``eval  epoch 1/3  step 20/60  top-1 41.20 %  top-5 80.00 %  (best top-1 41.20 %)``, with the EMA's top-1."""
    ema = f"  EMA top-1 {record['ema_top1']:.2f} %" if record.get("ema_top1") is not None else ""
    best = f"  (best top-1 {best_top1:.2f} %)" if best_top1 is not None else ""
    return (f"eval  {_where(record, total, epochs)}  top-1 {record['top1']:.2f} %  top-5 {record['top5']:.2f} %"
            f"{ema}{best}")


def loss_parts(record: Mapping[str, Any]) -> list[str]:
    """The parts a line shows: each method's total in a composite (``vitkd/loss``), else every part of the one
    method, and the label CE; ``metrics.jsonl`` keeps them all."""
    numbers = [k for k, v in record.items() if k not in _SHOWN_APART and _is_number(v)]
    totals = [k for k in numbers if "/" not in k or k.endswith("/loss")]
    return totals if any(k.endswith("/loss") for k in totals) else numbers


def bar_postfix(record: Mapping[str, Any]) -> str:
    return (f"loss {record.get('loss', float('nan')):.4g}, lr {record.get('lr', 0.0):.2e}, "
            f"{record.get('images_per_s', 0.0):.0f} img/s")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plural(n: int, noun: str) -> str:
    """``1 process``, ``2 processes``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("s") else f"{n} {noun}s"


def millions(n: int) -> str:
    """``5_717_416`` -> ``5.72 M``; ``12_288`` -> ``12.3 k``."""
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else str(n)


def parameter_counts(task: torch.nn.Module) -> tuple[int, int]:
    """Trainable parameters of ``task`` (student + method adapters) and of its student alone."""
    def trainable(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    return trainable(task), trainable(task.student)
