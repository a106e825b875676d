"""How `make test` runs the suite: pytest-xdist with one worker per core (at most 8), each worker
with its share of the cores' threads, a test file kept on one worker."""

from __future__ import annotations

import os
import subprocess
import sys
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
    """In this process (the branch its runner took), and in a fresh one told it is one of 2 and of
    3 xdist workers (the branch `make test` takes, checked even when this file runs alone)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:  # one process: torch keeps its own default, unless the caller set one
        assert os.environ.get("OMP_NUM_THREADS") is None or torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
    else:
        assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // int(workers))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTEST_XDIST_WORKER_COUNT")}
    for workers in (2, 3):
        conftest = str(ROOT / "tests" / "conftest.py")
        probe = (f"import os, runpy; os.environ['PYTEST_XDIST_WORKER_COUNT'] = '{workers}'; "
                 f"runpy.run_path({conftest!r}); import torch; print(torch.get_num_threads())")
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
        assert int(out) == max(1, len(os.sched_getaffinity(0)) // workers), (workers, out)
