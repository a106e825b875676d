"""Which precision a run trains in, and why.

The order of authority, first match wins:

1. `--mixed-precision no|bf16|fp16`: what the user typed for this run.
2. `accelerate launch` (its `--mixed_precision` flag or `accelerate config` file), which it passes
   on as ACCELERATE_MIXED_PRECISION. Launch falls back to "no" when neither says anything.
3. MMFUSION_AUTO_PRECISION=no|bf16 in the environment: pins what `auto` answers (the test suite
   pins "no", so no test depends on the CPU it runs on).
4. `auto` on one process: bf16 autocast only where it makes *this model's* training step faster.
   On CPUs a small matmul is timed first: without native bf16 (AVX2-only CPUs) bf16 products
   run ~200x slower, and one bf16 model step could take minutes, so such a CPU gets fp32
   without timing the model. Otherwise one forward+backward of the real model on a real batch
   is timed in fp32 and under bf16 autocast (best of `REPEATS` = 10 each, alternating), and bf16
   wins only if it is at least 25% faster (`BF16_MARGIN`): a smaller gain is within the probe's
   run-to-run noise, and bf16 gives other numbers than fp32. Tiny models often train slower under
   autocast even where bf16 matmuls are 4x faster.
5. `auto` on several processes (torchrun without accelerate launch): GPUs with bf16 support get
   bf16, CPUs fp32. Timings could differ between ranks, and every rank must agree.

The decision, with its measurements, is logged and written to run_config.json.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from accelerate.utils import send_to_device

from ..config import ConfigError

PRECISIONS = ("no", "bf16", "fp16")
AUTO_ENV = "MMFUSION_AUTO_PRECISION"
LAUNCH_ENV = "ACCELERATE_MIXED_PRECISION"
# bf16 must take at most 75% of the fp32 step time to be chosen. A one-batch probe of the same model
# on the same machine read 0.84 in one run and 0.94 in another: a threshold inside that noise makes
# the same command train in fp32 one day and bf16 the next (docs/experiments.md, 2026-11-30).
BF16_MARGIN = 0.75
# Steps timed per precision, alternating, the best of each kept: with 3, the main job's stage-1 ratio
# read 0.74-0.91 over 16 probes on one machine (0.74 picks bf16), with 10 0.79-0.92 (docs/experiments.md,
# 2026-12-02); 10 pairs cost about a second.
REPEATS = 10

StepTimer = Callable[[str], float]  # precision ("no" or "bf16") -> seconds for one training step


@dataclass(frozen=True)
class PrecisionDecision:
    """`resolved` is what accelerate gets: "no" (fp32), "bf16" or "fp16"."""

    requested: str
    resolved: str
    source: str
    reason: str
    seconds: dict[str, float] = field(default_factory=dict)  # what was timed -> seconds

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"precision {self.resolved} ({self.source}: {self.reason})"


def training_device() -> torch.device:
    """The device a single-process run trains on, known before any Accelerator exists.
    (Touching accelerate's shared state this early would fix it before the Accelerator's own
    settings apply, and a multi-process CPU launch would train as independent processes.)"""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _choice(value: str, where: str) -> str:
    value = value.strip().lower()
    if value not in PRECISIONS:
        raise ConfigError(f"{where}={value!r} is not a precision; use one of {', '.join(PRECISIONS)}")
    return value


def decide(requested: str, device: torch.device, step_timer: StepTimer | None = None,
           bf16_matmul_is_fast: Callable[[], tuple[bool, dict[str, float]]] | None = None,
           env: dict[str, str] | None = None, processes: int | None = None) -> PrecisionDecision:
    """Resolve `requested` ("auto", "no", "bf16" or "fp16") for a run on `device`.

    step_timer(precision) times one training step of the run's model (see `model_step_timer`);
    bf16_matmul_is_fast() -> (answer, seconds) is the CPU pre-check. Both are injectable so that
    tests exercise every branch on any machine.
    """
    env = os.environ if env is None else env
    processes = world_size() if processes is None else processes
    if requested != "auto":
        return PrecisionDecision(requested, _choice(requested, "--mixed-precision"), "--mixed-precision",
                                 "set for this run")
    if env.get(LAUNCH_ENV):
        return PrecisionDecision(requested, _choice(env[LAUNCH_ENV], LAUNCH_ENV), "accelerate launch",
                                 "its --mixed_precision or config file (launch's own default is 'no')")
    if env.get(AUTO_ENV):
        return PrecisionDecision(requested, _choice(env[AUTO_ENV], AUTO_ENV), AUTO_ENV, "pinned in the environment")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return PrecisionDecision(requested, "no", "auto", "this GPU has no bf16")
    if device.type not in ("cuda", "cpu"):
        return PrecisionDecision(requested, "no", "auto", f"no bf16 measurement for {device.type} devices")
    if processes > 1:
        resolved = "bf16" if device.type == "cuda" else "no"
        return PrecisionDecision(requested, resolved, "auto",
                                 f"{processes} processes: not timed (ranks must agree); {device.type} default")
    seconds: dict[str, float] = {}
    if device.type == "cpu":
        fast, matmul = (bf16_matmul_is_fast or cpu_bf16_matmul_is_fast)()
        seconds = dict(matmul)  # a copy: the check's answer is cached for the whole process
        if not fast:
            return PrecisionDecision(requested, "no", "auto", "bf16 matmuls are slower than fp32 on this CPU "
                                     "(no native bf16)", seconds)
    if step_timer is None:
        return PrecisionDecision(requested, "bf16", "auto", "bf16 matmuls are fast here; the model step was not timed",
                                 seconds)
    for precision in ("no", "bf16") * REPEATS:  # alternating, so a burst of load hits both
        t = step_timer(precision)
        key = f"step_{'fp32' if precision == 'no' else 'bf16'}"
        seconds[key] = min(seconds.get(key, float("inf")), t)
    ratio = seconds["step_bf16"] / seconds["step_fp32"]
    resolved = "bf16" if ratio <= BF16_MARGIN else "no"
    verdict = "faster" if ratio < 1 else "slower"
    return PrecisionDecision(requested, resolved, "auto",
                             f"this model's training step is {abs(1 - ratio):.0%} {verdict} in bf16 "
                             f"({1e3 * seconds['step_bf16']:.1f} ms vs {1e3 * seconds['step_fp32']:.1f} ms fp32; "
                             f"bf16 needs <= {BF16_MARGIN:.0%})", seconds)


@functools.cache
def cpu_bf16_matmul_is_fast() -> tuple[bool, dict[str, float]]:
    """Best of 3 timings of 5 products of 256x256 matrices per dtype, once per process."""
    a = torch.randn(256, 256)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(5):
                x @ x
            best = min(best, time.perf_counter() - start)
        seconds[f"matmul256_{'fp32' if dtype == torch.float32 else 'bf16'}"] = best
    return seconds["matmul256_bf16"] < seconds["matmul256_fp32"], seconds


def model_step_timer(model: torch.nn.Module, batch, loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
                     device: torch.device) -> StepTimer:
    """A StepTimer for one forward+backward of `model` on `batch` (a tensor, or a tuple/dict of
    them). The first call per precision is a warm-up and not counted; the global RNG state, the
    model's train/eval mode and its gradients are put back afterwards (no weight changes)."""
    model.to(device)
    batch = send_to_device(batch, device)
    warmed: set[str] = set()

    def seconds(precision: str) -> float:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        modes = {m: m.training for m in model.modules()}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for _ in range(1 if precision in warmed else 2):
                _sync(device)
                start = time.perf_counter()
                with ctx:
                    loss = loss_fn(model, batch)
                loss.backward()
                _sync(device)
                took = time.perf_counter() - start
                model.zero_grad(set_to_none=True)
        for m, mode in modes.items():
            m.train(mode)
        warmed.add(precision)
        return took

    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

