"""Shared pytest setup.

* Puts this directory on ``sys.path`` so tests can ``from helpers import ...``.
* One intra-op thread per test process: CI runs two xdist workers on two cores, and oversubscribed torch thread
  pools made small CPU runs 10-15x slower here. Set before torch is imported, so subprocesses inherit it too.
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture
def clean_accelerate():
    """Forget Accelerate's process-wide singletons around a test, so each in-process run starts as a new process
    would (stage-2 tests request it with ``pytestmark = pytest.mark.usefixtures("clean_accelerate")``)."""
    from train_helpers import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()
