"""Run checks on several CPU processes (gloo) and bring their outcomes back to pytest.

Starting a process costs seconds (importing torch), so a test module runs one job: a
function that performs many named checks on every rank. Each check's outcome (``None`` or
the traceback) comes back per rank; a pytest test per check asserts on it, so a failure is
reported under the check's own name.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import tempfile
import traceback
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
TIMEOUT_S = 120  # a collective that waits longer than this means a rank died or diverged


class Checks:
    """Collects named checks on one rank: ``with checks("name"): ...``."""

    def __init__(self):
        self.outcomes: dict[str, str | None] = {}

    def __call__(self, name: str):
        return _Check(self, name)


class _Check:
    def __init__(self, checks: Checks, name: str):
        self.checks, self.name = checks, name

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        self.checks.outcomes[self.name] = None if kind is None else "".join(
            traceback.format_exception(kind, error, tb))
        return kind is not None and issubclass(kind, Exception)


def run_job(job: Callable[[int, Checks, str], None], workdir: str) -> list[dict]:
    """Run ``job(rank, checks, workdir)`` on WORLD_SIZE gloo processes; outcomes per rank."""
    port = _free_port()
    mp.start_processes(_worker, args=(job, port, workdir), nprocs=WORLD_SIZE, join=True,
                       start_method="spawn")
    return [torch.load(os.path.join(workdir, f"outcomes{rank}.pt")) for rank in range(WORLD_SIZE)]


def check_passed(outcomes: list[dict], name: str) -> None:
    failures = []
    for rank, ranks_outcomes in enumerate(outcomes):
        if name not in ranks_outcomes:
            failures.append(f"rank {rank}: the check did not run (an earlier failure stopped the job)")
        elif ranks_outcomes[name] is not None:
            failures.append(f"rank {rank}:\n{ranks_outcomes[name]}")
    assert not failures, "\n".join(failures)


def _worker(rank: int, job, port: int, workdir: str) -> None:
    torch.set_num_threads(1)  # two processes on a two-core machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    checks = Checks()
    try:
        job(rank, checks, workdir)
    finally:
        torch.save(checks.outcomes, os.path.join(workdir, f"outcomes{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=None)
def job_outcomes(job) -> list[dict]:
    """Run ``job`` once per session in a temporary directory (the ranks share it)."""
    with tempfile.TemporaryDirectory() as workdir:
        return run_job(job, workdir)
