"""How `make test` runs the suite: pytest-xdist with one worker per core (at most 8), each worker
with its share of the cores' threads, a test file kept on one worker."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_make_test_runs_one_worker_per_core_and_can_run_in_one_process():
    def command(*args: str) -> str:
        out = subprocess.run(["make", "-n", "-f", str(ROOT / "Makefile"), "-C", str(ROOT), *args, "test"],
                             capture_output=True, text=True, check=True).stdout
        return next(line for line in out.splitlines() if "pytest" in line)

    assert f"-n {min(8, len(os.sched_getaffinity(0)))} --dist loadfile" in command()  # a worker per core, at most 8
    assert "-n 0 " in command("TEST_WORKERS=0")


def test_a_worker_takes_its_share_of_the_cores():
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:  # one process: torch keeps its own default, unless the caller set one
        assert os.environ.get("OMP_NUM_THREADS") is None or torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
    else:
        assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // int(workers))
