"""Several processes on one job: who each is (read from its launcher's environment) and how they wait for each other.

``torchrun``, ``accelerate launch`` (whose multi-process launcher is torchrun) and ``mpirun`` start the processes and
tell each its place in environment variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` for
the first two, ``OMPI_COMM_WORLD_*``/``PMI_*`` for MPI. Accelerate's ``get_cpu_distributed_information`` reads every
launcher's names, so that table is not copied here.

The processes talk through ``torch.distributed`` with the gloo backend, on GPU machines too. Extraction exchanges no
tensors (each rank writes its own units): only a few messages, the units to do and each rank's outcome. gloo runs
wherever torch does, and every collective of a group raises, in every waiting rank, once the group's timeout has
passed, where NCCL would need a GPU tensor for each message and its watchdog aborts a process whose collective times
out. Accelerate's ``PartialState``, which training uses, picks NCCL on CUDA machines and sets the device itself;
extraction's device comes from ``--device`` and ``LOCAL_RANK`` (:func:`rank_device`). Messages travel as JSON bytes,
so nothing received from another process is unpickled (``broadcast_object_list`` would unpickle).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch

from .errors import ConfigError, RankFailed


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that creates, finalizes, prints."""
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def detect() -> Ranks:
    """This process's ranks, from the launcher's environment (one process of one when nothing launched it).

    Raises:
        ConfigError: when the variables contradict each other (a rank outside the world).
    """
    from accelerate.utils import get_cpu_distributed_information

    info = get_cpu_distributed_information()
    ranks = Ranks(int(info.rank), int(info.world_size), int(info.local_rank))
    if not (0 <= ranks.rank < ranks.world_size and 0 <= ranks.local_rank < ranks.world_size):
        raise ConfigError(f"the launcher says this is rank {ranks.rank} (local rank {ranks.local_rank}) of "
                          f"{ranks.world_size} processes; launch with torchrun or accelerate launch, or unset RANK, "
                          "WORLD_SIZE and LOCAL_RANK to run one process")
    return ranks


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """The device of this rank: a bare ``cuda`` (``--device cuda``, or ``auto`` on a GPU machine) becomes
    ``cuda:LOCAL_RANK``, one GPU per process; any other device is used as given.

    Raises:
        ConfigError: when there are fewer GPUs than processes on this machine.
    """
    if device.type != "cuda" or device.index is not None or ranks.world_size == 1:
        return device
    count = torch.cuda.device_count()
    if ranks.local_rank >= count:
        raise ConfigError(f"{ranks} has LOCAL_RANK {ranks.local_rank}, but this machine has {count} CUDA device(s); "
                          f"start at most {count} processes per machine (torchrun --nproc_per_node {count})")
    torch.cuda.set_device(ranks.local_rank)
    return torch.device("cuda", ranks.local_rank)


class Group:
    """The ranks of one job, exchanging JSON messages over a gloo process group (see the module docstring)."""

    def __init__(self, ranks: Ranks, timeout_s: float, group: Any = None) -> None:
        self.ranks, self.timeout_s, self.group = ranks, timeout_s, group

    def gather(self, message: Any) -> list[Any]:
        """Every rank's ``message`` (JSON-serialisable), in rank order, on every rank.

        Raises:
            RankFailed: when some rank did not take part within the timeout (it died, hangs, or is still busy).
        """
        import torch.distributed as dist

        data = json.dumps(message).encode()
        try:
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.ranks.world_size)]
            dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self.group)
            longest = int(max(s.item() for s in sizes))
            mine = torch.zeros(longest, dtype=torch.uint8)
            mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            parts = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.ranks.world_size)]
            dist.all_gather(parts, mine, group=self.group)
        except RuntimeError as err:  # gloo: a peer closed its connection, or the timeout passed
            raise RankFailed(f"{self.ranks}: the other processes did not answer within --dist-timeout "
                             f"{self.timeout_s:g} s ({' '.join(str(err).split())[:300]}); a process died, hangs or "
                             "is still working; what was written is kept: re-run the same command, with any number "
                             "of processes, to finish") from None
        return [json.loads(bytes(p[:int(s.item())].numpy())) for p, s in zip(parts, sizes)]

    def step(self, what: str, run: Callable[[], Any]) -> list[Any]:
        """Run ``run`` on every rank, then exchange the outcomes: every rank's result (JSON), in rank order.

        A rank whose ``run`` raises still takes part in the exchange, so no rank waits for it; it then re-raises its
        own error (a bug keeps its traceback), and every other rank raises :class:`RankFailed` quoting it.
        """
        error: BaseException | None = None
        try:
            outcome: dict[str, Any] = {"result": run()}
        except Exception as err:
            error, outcome = err, {"error": " ".join(f"{type(err).__name__}: {err}".split())[:2000]}
        outcomes = self.gather(outcome)
        if error is not None:
            raise error
        failed = [(r, o["error"]) for r, o in enumerate(outcomes) if "error" in o]
        if failed:
            shown = "; ".join(f"rank {r}: {e}" for r, e in failed[:3])
            raise RankFailed(f"{self.ranks}: {len(failed)} other process(es) failed while {what} ({shown}); what was "
                             "written is kept: fix the cause and re-run the same command to finish")
        return [o["result"] for o in outcomes]


@contextmanager
def group(ranks: Ranks, timeout_s: float) -> Iterator[Group]:
    """The job's :class:`Group`: the default process group if the program made one (a gloo side group over the same
    ranks when its backend is another), else a gloo group made here from the launcher's rendezvous variables and
    destroyed on exit, so that a later ``Accelerator`` makes its own.

    Raises:
        ConfigError: when several processes were launched without ``MASTER_ADDR``/``MASTER_PORT``.
    """
    import torch.distributed as dist

    if ranks.world_size == 1:
        yield Group(ranks, timeout_s)
        return
    timeout = timedelta(seconds=timeout_s)
    own = not dist.is_initialized()
    if own:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise ConfigError(f"{ranks} was launched without {' and '.join(missing)}: start the processes with "
                              "torchrun or accelerate launch (which set them), or export them (rank 0's address and "
                              "a free port)")
        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=timeout)
    side = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    try:
        yield Group(ranks, timeout_s, side)
    finally:
        if own:
            dist.destroy_process_group()
