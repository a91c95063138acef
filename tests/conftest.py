"""Shared pytest setup.

One intra-op thread per test process: CI runs two xdist workers on two cores, and oversubscribed torch thread
pools made small CPU runs 10-15x slower here. Set before torch is imported, so subprocesses inherit it too.
Helpers live in the importable :mod:`featcache.testing`, not here.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture
def clean_accelerate():
    """Forget Accelerate's process-wide singletons around a test, so each in-process run starts as a new process
    would (stage-2 tests request it with ``pytestmark = pytest.mark.usefixtures("clean_accelerate")``)."""
    from featcache.testing.caches import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()
