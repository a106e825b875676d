"""Which precision a run trains in, and why.

The order of authority, first match wins:

1. `--mixed-precision no|bf16|fp16`: what the user typed for this run.
2. `accelerate launch` (its `--mixed_precision` flag or `accelerate config` file), which it passes
   on as ACCELERATE_MIXED_PRECISION. Launch falls back to "no" when neither says anything.
3. MMFUSION_AUTO_PRECISION=no|bf16 in the environment: pins what `auto` answers.
4. `auto`: decided by the device alone, never by a timing, so the same command trains the same
   model on every run: GPUs with bf16 get bf16, everything else fp32. CPUs get fp32 because
   bf16's speed there depends on the CPU: without native bf16 (AVX2-only) its matmuls run ~200x
   slower; with AVX512-BF16 the main job's stage 2 ran ~45% faster, its stage 1 anywhere from
   22% to 48% (the timing `auto` used until 2026-12-02 read both sides of its margin on one
   machine, so two runs of one command gave two models: docs/experiments.md). bf16 on a CPU is
   `--mixed-precision bf16`, and is checked: on a CPU whose bf16 matmuls are slower than fp32's,
   the decision carries a warning. fp16 on a CPU is refused (accelerate would train in fp32).

The decision is logged and written to run_config.json.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from ..config import ConfigError

PRECISIONS = ("no", "bf16", "fp16")
AUTO_ENV = "MMFUSION_AUTO_PRECISION"
LAUNCH_ENV = "ACCELERATE_MIXED_PRECISION"

MatmulCheck = Callable[[], tuple[bool, dict[str, float]]]  # -> (bf16 matmuls faster than fp32?, seconds)


@dataclass(frozen=True)
class PrecisionDecision:
    """`resolved` is what accelerate gets: "no" (fp32), "bf16" or "fp16". `warning`, when set, is
    printed with the decision: a choice that will run but that the user would not want."""

    requested: str
    resolved: str
    source: str
    reason: str
    seconds: dict[str, float] = field(default_factory=dict)  # what was timed -> seconds
    warning: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"precision {self.resolved} ({self.source}: {self.reason})" + (
            f"\nwarning: {self.warning}" if self.warning else "")


def training_device() -> torch.device:
    """The device a single-process run trains on, known before any Accelerator exists.
    (Touching accelerate's shared state this early would fix it before the Accelerator's own
    settings apply, and a multi-process CPU launch would train as independent processes.)"""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")


def _choice(value: str, where: str) -> str:
    value = value.strip().lower()
    if value not in PRECISIONS:
        raise ConfigError(f"{where}={value!r} is not a precision; use one of {', '.join(PRECISIONS)}")
    return value


def decide(requested: str, device: torch.device, bf16_matmul_is_fast: MatmulCheck | None = None,
           env: dict[str, str] | None = None, gpu_has_bf16: Callable[[], bool] | None = None) -> PrecisionDecision:
    """Resolve `requested` ("auto", "no", "bf16" or "fp16") for a run on `device`.

    bf16_matmul_is_fast() is the CPU check behind the warning for bf16 on a CPU without native bf16;
    gpu_has_bf16() is torch.cuda.is_bf16_supported. Both are injectable so that tests take every
    branch on any machine.
    """
    env = os.environ if env is None else env
    if requested != "auto":
        decision = PrecisionDecision(requested, _choice(requested, "--mixed-precision"), "--mixed-precision",
                                     "set for this run")
    elif env.get(LAUNCH_ENV):
        decision = PrecisionDecision(requested, _choice(env[LAUNCH_ENV], LAUNCH_ENV), "accelerate launch",
                                     "its --mixed_precision or config file (launch's own default is 'no')")
    elif env.get(AUTO_ENV):
        decision = PrecisionDecision(requested, _choice(env[AUTO_ENV], AUTO_ENV), AUTO_ENV, "pinned in the environment")
    elif device.type == "cuda":
        has_bf16 = (gpu_has_bf16 or torch.cuda.is_bf16_supported)()
        decision = PrecisionDecision(requested, "bf16" if has_bf16 else "no", "auto",
                                     "this GPU has bf16" if has_bf16 else "this GPU has no bf16")
    else:
        why = ("fp32 on CPUs, so the same command trains the same model wherever it runs; "
               "--mixed-precision bf16 opts in" if device.type == "cpu" else f"fp32 on {device.type} devices")
        return PrecisionDecision(requested, "no", "auto", why)
    if decision.resolved == "fp16" and device.type == "cpu":
        # accelerate runs it as fp32 without a loss scale, while run_config.json would say fp16
        raise ConfigError(f"{decision.source} asks for fp16, which needs a GPU; on a CPU use bf16 (where it has native "
                          "bf16) or no (fp32)")
    if decision.resolved == "bf16" and device.type == "cpu":
        fast, seconds = (bf16_matmul_is_fast or cpu_bf16_matmul_is_fast)()
        if not fast:
            slower = seconds.get("matmul256_bf16", 0) / max(seconds.get("matmul256_fp32", 0), 1e-12)
            return replace(decision, seconds=dict(seconds), warning=(
                f"bf16 matmuls on this CPU are {slower:.0f}x slower than fp32 (no native bf16): training will be "
                "far slower than with --mixed-precision no"))
    return decision


@functools.cache
def cpu_bf16_matmul_is_fast() -> tuple[bool, dict[str, float]]:
    """Best of 3 timings of 5 products of 256x256 matrices per dtype, once per process (milliseconds
    on CPUs with native bf16, ~0.1 s without)."""
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
