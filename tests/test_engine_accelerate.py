"""`accelerate launch` decides the processes and the mixed precision: 2 CPU processes from an Accelerate config
file train on disjoint samples, in bf16 (from that file, featcache's flag absent), and write every output once."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import yaml
from featcache.testing.caches import STUDENT, make_cache, make_val

from featcache import rundir

# What `accelerate config` writes for 2 processes on one machine; it is the multi-GPU launcher (torchrun) that
# starts several processes, and featcache puts them in one gloo group when the machine has no GPU.
ACCELERATE_CONFIG = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": 1,
                     "num_processes": 2, "mixed_precision": "bf16", "machine_rank": 0, "main_training_function": "main",
                     "gpu_ids": "all", "rdzv_backend": "static", "same_network": True, "use_cpu": True}

# `featcache.cli` with each process's samples recorded (the batches' "sample" ids), to check the sharding.
RECORDING_CLI = textwrap.dedent("""
    import json, os, sys
    from featcache import engine
    from featcache.cli import main

    seen, batches, real_step, where = [], [], engine.train_step, sys.argv.pop(-1)

    def recording_step(run, batch, meter):
        seen.extend(int(s) for s in batch["sample"])
        batches.append([batch["sample"].tolist(), batch["label"].tolist()])
        return real_step(run, batch, meter)

    engine.train_step = recording_step
    try:
        main()
    finally:
        with open(os.path.join(where, f"samples_{os.environ['RANK']}.json"), "w") as fh:
            json.dump(seen, fh)
        with open(os.path.join(where, f"batches_{os.environ['RANK']}.json"), "w") as fh:
            json.dump(batches, fh)
""")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_runs_two_cpu_processes_with_its_mixed_precision(tmp_path):
    data, cache = make_cache(tmp_path)  # 6 samples x 2 views
    config_file = tmp_path / "accelerate.yaml"
    config_file.write_text(yaml.safe_dump(ACCELERATE_CONFIG))
    script = tmp_path / "recording_cli.py"
    script.write_text(RECORDING_CLI)
    out = tmp_path / "run"
    args = ["train", "--cache", cache, "--out", str(out), "--method", "kd", "--student", STUDENT["student"],
            "--student-kwargs", json.dumps(STUDENT["student_kwargs"]), "--img-size", "32", "--epochs", "1",
            "--batch-size", "1", "--workers", "0", "--log-every", "1", "--val", str(make_val(tmp_path))]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("ACCELERATE_USE_CPU", None)
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           "--main_process_port", str(free_port()), str(script), *args, str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]

    samples = [json.loads((tmp_path / f"samples_{rank}.json").read_text()) for rank in (0, 1)]
    # 6 samples = 2 processes x 3 batches of 1: no batch is repeated to even out the last round
    assert set(samples[0]).isdisjoint(samples[1]), samples
    assert sorted(samples[0] + samples[1]) == list(range(6)), "the two processes share the epoch's samples"

    assert done.stdout.count('"steps"') == 1, "only the main process prints the result"
    assert yaml.safe_load((out / rundir.CONFIG_FILE).read_text())["mixed_precision"] == "bf16"
    log = (out / rundir.LOG_FILE).read_text()
    assert log.count("featcache train -> ") == 1 and log.count("done     3 steps") == 1
    assert re.search(r"run on   2 processes \(MULTI_CPU\), cpu(:0)?, mixed precision bf16", log), log
    records = rundir.read_metrics(out)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]  # 6 samples / 2 processes / batch 1
    assert [r["kind"] for r in records].count("eval") == 1
    assert rundir.read_final(out)["steps"] == 3
    assert len(list((out / rundir.TENSORBOARD_DIR).rglob("hparams.yml"))) == 1


@pytest.mark.slow
def test_labelled_batches_are_shared_out_whole_over_two_processes(tmp_path):
    """`--labelled-batch`: Accelerate shards the batch sampler by whole batches, each with its labelled item."""
    data, cache = make_cache(tmp_path)  # 6 samples x 2 views, 3 classes
    script = tmp_path / "recording_cli.py"
    script.write_text(RECORDING_CLI)
    out = tmp_path / "run"
    args = ["train", "--cache", cache, "--out", str(out), "--method", "kd", "--student", STUDENT["student"],
            "--student-kwargs", json.dumps(STUDENT["student_kwargs"]), "--img-size", "32", "--epochs", "1",
            "--batch-size", "1", "--label-shots", "1", "--labelled-batch", "1", "--workers", "0", "--log-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), *args, str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]

    batches = [json.loads((tmp_path / f"batches_{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(b) for b in batches] == [3, 3], "6 batches of 1 + 1 item, 3 per process"
    epoch_items = [samples[0] for rank in batches for samples, _ in rank]
    assert sorted(epoch_items) == list(range(6)), "the epoch's items are shared out, each once"
    labelled = [(samples[1], labels[1]) for rank in batches for samples, labels in rank]
    assert all(label >= 0 for _, label in labelled), "the second item of every batch is labelled"
    counts = Counter(s for s, _ in labelled)
    assert len(counts) == 3 and set(counts.values()) == {2}, "2 passes over the 3 labelled samples (1 per class)"
    assert rundir.read_final(out)["steps"] == 3
