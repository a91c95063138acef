"""What the cache saves: forward FLOPs of teacher and student, and KD from the cache against KD with the teacher
online, timed one training at a time with the same torch threads, next to the ideal speedup.

The ideal is (teacher forward + student step) / student step, where the student step is all that one step of KD
from the cache does (fetch the batch: replay its views and read their targets; then forward, backward, update):
what the cache saves if reading its targets costs nothing and the teacher's forward is the only difference. The
measured speedup is the online training's time over the cached one's, each the faster of two runs (a shared box
only ever slows a run down). The compute-only figure (the batch fetch left out) is printed beside it: the speedup if
the views also came for free.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import MODEL, DemoConfig
from .runs import base_fields

TIMING_FILE = "timing.json"


def forward_flops(model: torch.nn.Module, img_size: int) -> int:
    """FLOPs of one image's forward pass, counted by torch's FlopCounterMode (a multiply-add is 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, img_size, img_size))
    return int(counter.get_total_flops())


def model_flops(cfg: DemoConfig) -> dict[str, int]:
    """Forward FLOPs per image of the demo's teacher and (from-scratch) student."""
    from ..models import load_model
    from .teacher import build_teacher

    student = load_model(MODEL, pretrained=False, img_size=cfg.img_size, num_classes=10, **cfg.student_kwargs())
    return {"teacher": forward_flops(build_teacher(cfg), cfg.img_size),
            "student": forward_flops(student, cfg.img_size)}


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def kd_config(cfg: DemoConfig, out: Path, run_dir: Path, online: bool) -> Any:
    """The demo's KD run, cut to ``timing_steps`` steps, without evaluation; the teacher online when asked."""
    from ..config import TrainConfig, from_dict

    values = {**base_fields(cfg, out), "cache": str(out / "cache"), "out": str(run_dir), "method": "kd",
              "method_args": {"temperature": 2.0}, "val": None, "max_steps": cfg.timing_steps,
              "online_teacher": online, "quiet": True, "labelled_batch": cfg.labelled_batch}
    return from_dict(TrainConfig, values)


def _seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn`` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cycling(loader: Any) -> Callable[[], Any]:
    """A function returning the loader's next batch, starting the loader again when an epoch runs out."""
    batches = iter(loader)

    def fetch_next() -> Any:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)
    return fetch_next


def step_costs(cfg: DemoConfig, out: Path, repeats: int = 15) -> dict[str, float]:
    """Seconds of one teacher forward (as ``--online-teacher`` runs it), one batch fetch and one student update (KD
    from the cache, as the training runs them) on batches of the run's size."""
    from .. import engine
    from ..build import OnlineTargets
    from ..progress import Meter
    from ..stores import open_reader

    scratch = out / "timing" / "step_costs"
    shutil.rmtree(scratch, ignore_errors=True)
    run = engine.setup(kd_config(cfg, out, scratch, online=False), scratch)
    fetch_next = _cycling(run.train_loader)
    batch = fetch_next()
    teacher = OnlineTargets(open_reader(str(out / "cache")).manifest, ["logits"], torch.device("cpu"))
    run.task.train()
    update = _seconds(lambda: engine.train_step(run, batch, Meter()), repeats)
    fetch = _seconds(fetch_next, repeats)
    with torch.no_grad():
        forward = _seconds(lambda: teacher(batch["image"]), repeats)
    run.accelerator.end_training()
    return {"teacher_forward_s": forward, "fetch_s": fetch, "update_s": update, "student_step_s": fetch + update,
            "batch": len(batch["label"])}


def timed_trainings(cfg: DemoConfig, out: Path, log: Callable[[str], None] = print, rounds: int = 2
                    ) -> dict[str, Any]:
    """Time cached and online-teacher KD one after the other (same threads, nothing else training), ``rounds``
    times in turn, keeping each one's fastest; reuse the numbers of an earlier demo with the same settings."""
    from .. import engine
    from ..config import to_dict

    saved = out / "timing" / TIMING_FILE
    settings = {"cached": to_dict(kd_config(cfg, out, out / "timing" / "kd-cached", online=False)),
                "threads": cfg.threads}
    if saved.is_file() and json.loads(saved.read_text()).get("settings") == settings:
        log(f"timing: reusing {saved}")
        return json.loads(saved.read_text())
    result: dict[str, Any] = {"settings": settings, "threads": cfg.threads, "steps": cfg.timing_steps}
    with torch_threads(cfg.threads):
        result.update(step_costs(cfg, out))
        for _ in range(rounds):
            for name, online in (("cached", False), ("online", True)):
                run_dir = out / "timing" / f"kd-{name}"
                shutil.rmtree(run_dir, ignore_errors=True)  # the previous round's or demo's: timed again
                seconds = engine.train(kd_config(cfg, out, run_dir, online))["train_time_s"]
                result[f"{name}_s"] = min(seconds, result.get(f"{name}_s", seconds))
                log(f"timing: KD {name}: {seconds:.1f} s for {cfg.timing_steps} steps")
    result["parity_max_abs_diff"] = weights_difference(out / "timing" / "kd-cached", out / "timing" / "kd-online")
    saved.write_text(json.dumps(result, indent=1))
    return result


def weights_difference(run_a: Path, run_b: Path) -> float:
    """The largest absolute difference between two runs' exported student weights (0.0: identical)."""
    from safetensors.torch import load_file

    from .. import rundir

    a, b = (load_file(str(rundir.student_weights(run))) for run in (run_a, run_b))
    if a.keys() != b.keys():
        raise ValueError(f"{run_a} and {run_b} exported different parameters")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def speedup_lines(timing: dict[str, Any], flops: dict[str, int]) -> list[str]:
    """The report's lines: FLOPs of both models, measured and ideal speedup and their ratio."""
    measured, ideal, compute_only = speedups(timing)
    ms = {k: timing[k] * 1e3 for k in ("teacher_forward_s", "student_step_s", "fetch_s", "update_s")}
    return [f"forward FLOPs per image: teacher {flops['teacher'] / 1e6:.1f} M, student {flops['student'] / 1e6:.1f} M "
            f"({flops['teacher'] / flops['student']:.1f}x)",
            f"timing ({timing['steps']} KD steps each, one training at a time, {timing['threads']} torch thread(s), "
            f"fastest of 2): online teacher {timing['online_s']:.1f} s, from the cache {timing['cached_s']:.1f} s: "
            f"speedup {measured:.2f}x",
            f"  ideal = (teacher forward {ms['teacher_forward_s']:.1f} ms + student step {ms['student_step_s']:.1f} ms "
            f"[batch fetch {ms['fetch_s']:.1f} + update {ms['update_s']:.1f}]) / student step = {ideal:.2f}x; "
            f"measured / ideal = {measured / ideal:.2f} (compute only, views for free: {compute_only:.2f}x)",
            f"  parity: the two timed students differ by at most {timing['parity_max_abs_diff']:.3g} in any weight "
            f"({'identical' if timing['parity_max_abs_diff'] == 0 else 'not identical'}: the cache holds what the "
            "teacher computes on the replayed views)"]


def speedups(timing: dict[str, Any]) -> tuple[float, float, float]:
    """(measured, ideal, compute-only ideal) speedup of the cached training over the online-teacher one."""
    forward = timing["teacher_forward_s"]
    return (timing["online_s"] / timing["cached_s"], (forward + timing["student_step_s"]) / timing["student_step_s"],
            (forward + timing["update_s"]) / timing["update_s"])
