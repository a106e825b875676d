"""Timing and machine helpers shared by the benchmark scripts (run.py, loss.py): alternating
medians, this machine's limits (matmul peak, copy bandwidth), its description, and RSS readings.

The scripts import it as a sibling (`from timing import alternate`): run as `python benchmarks/X.py`,
a script's own folder is first on sys.path.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
              sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (order flipped every repeat)
    after `warmup` calls of each; `sync` waits for an accelerator before and after each call."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for k in order if r % 2 == 0 else order[::-1]:
            gc.collect()
            sync()
            t0 = time.perf_counter()
            fns[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def repeat_args(doc: str, repeats: int, argv: list[str] | None) -> argparse.Namespace:
    """The flags of the small side-by-side scripts (loss.py, attention.py): `--repeats` (at least 1)
    and `--smoke`; `args.repeats` is 2 under --smoke."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats, help=f"alternating repeats per side (default: {repeats})")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repeats")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.smoke:
        args.repeats = 2
    return args


def timed(f: Callable[[], object]) -> float:
    """Seconds one call of `f` takes."""
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- machine limits

def matmul_peak(shapes: tuple[tuple[int, int, int], ...], dtype: torch.dtype, repeats: int) -> float:
    """Best GFLOP/s of (m, k) @ (k, n) products over the given shapes (a square one and the
    models' own linear-layer shapes): the practical ceiling of this machine and library."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best


def copy_bandwidth(mib: int, repeats: int = 5) -> float:
    """GB/s moved by copying one large fp32 tensor into another (bytes read + bytes written)."""
    a = torch.randn(mib * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(timed(lambda: b.copy_(a)) for _ in range(repeats))
    return 2 * a.numel() * 4 / best / 1e9


def machine_info() -> dict:
    """CPU model, cores, vector ISA, torch threads and library versions, for a report's header."""
    import transformers  # lazily: mmfusion's memory children never load it

    cpu, cores = platform.processor() or "unknown", os.cpu_count()
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1] for line in info.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f} " in f" {flags} "]
    return {"cpu": cpu, "cores": cores, "isa": " ".join(isa) or "unknown", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.is_available()}


# ----------------------------------------------------------------------------- resident memory

def rss_now_mib() -> float:
    return _proc_status_mib("VmRSS:")


def rss_high_water_mib() -> float:
    """This process's RSS high-water mark in MiB. Linux's ru_maxrss carries the parent's peak
    over fork + exec (it is kept per thread group, not per address space), so a child spawned by a
    500 MiB parent reads at least 500 MiB; VmHWM belongs to the child's own address space."""
    return _proc_status_mib("VmHWM:")


def _proc_status_mib(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; elsewhere an upper bound
