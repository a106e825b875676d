"""Setting up a training run: its config, accelerator (precision, trackers), optimizer and
learning-rate schedule. Its folder, checkpoints and --resume: run_folder.py."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import check_number
from ..errors import ConfigError
from .precision import PRECISIONS, PrecisionDecision, decide, training_device

OUTPUT_DIR_FIX = "name the folder the run writes to"


def refuse_empty(flag: str, value: Any, fix: str) -> None:
    """An empty path flag is an unset shell variable (--output-dir "$OUT"), not the current folder or a fresh start."""
    if not str(value).strip():
        raise ConfigError(f"{flag} is empty ({str(value)!r}; an unset shell variable?); {fix}")


ADAM_EPS_MIN = torch.finfo(torch.float32).tiny  # the smallest normal float32: below it, flushed to zero on GPUs

# Seeds feed numpy (which takes < 2**32) and the per-step seeds derived from them (< 2**63).
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class RunConfig:
    """Settings every stage shares. `batch_size` is per process and per micro-step; the
    global batch is batch_size x processes x grad_accum."""

    output_dir: str = field(default="runs/stage", metadata={"help": "where models, logs and checkpoints go"})
    seed: int = field(default=0, metadata={"help": "seed for init, shuffling and augmentation"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training set (ignored if max_steps > 0)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0 means derive from epochs"})
    batch_size: int = field(default=64, metadata={"help": "examples per process per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.05, metadata={"help": "final LR as a fraction of the peak (cosine)"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW decay (never on norms, biases, embeddings)"})
    beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm; 0 disables"})
    mixed_precision: str = field(default="auto", metadata={
        "help": "auto (bf16 on GPUs that have it, else fp32; bf16 on a CPU is opt-in), no, bf16 or fp16",
        "choices": ["auto", *PRECISIONS]})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps on eval_samples (0: only at the end)"})
    eval_samples: int = field(default=1000, metadata={"help": "examples in a periodic evaluation"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: none)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint folder, or 'latest' in output_dir"})
    log_every: int = field(default=10, metadata={"help": "tracker logging interval in steps"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    compile: bool = field(default=False, metadata={
        "help": "train through torch.compile (the first steps compile, for a minute or more; saved models are the "
                "plain module)"})

    def __post_init__(self) -> None:
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        refuse_empty("--output-dir", self.output_dir, OUTPUT_DIR_FIX)
        if self.resume is not None:
            refuse_empty("--resume", self.resume, "name a checkpoint folder, pass latest, or leave the flag out to "
                         "start fresh")
        # the shell leaves ~ unexpanded after = (--output-dir=~/x): expand once, so checks and writes agree
        object.__setattr__(self, "output_dir", os.path.expanduser(self.output_dir))
        if self.resume not in (None, "latest"):
            object.__setattr__(self, "resume", os.path.expanduser(self.resume))

        for name in ("batch_size", "grad_accum", "keep_checkpoints", "eval_samples", "log_every"):
            check_number(flag(name), getattr(self, name), 1, integer=True)
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "num_workers"):
            check_number(flag(name), getattr(self, name), 0, integer=True)
        for name in ("epochs", "weight_decay", "grad_clip", "adam_eps"):
            check_number(flag(name), getattr(self, name), 0)
        if self.adam_eps < ADAM_EPS_MIN:  # AdamW divides by sqrt(v) + eps, and v is 0 where a gradient is
            raise ConfigError(f"--adam-eps must be at least {ADAM_EPS_MIN:.3g}, got {self.adam_eps!r}: a smaller one "
                              "is 0 in float32, and AdamW then divides 0 by 0 (NaN weights at step 1); the default "
                              "is 1e-8")
        check_number("--seed", self.seed, 0, MAX_SEED, integer=True)
        check_number("--beta2", self.beta2, 0, 1, high_open=True)
        check_number("--lr", self.lr, 0, low_open=True)
        check_number("--min-lr-ratio", self.min_lr_ratio, 0, 1)
        if self.epochs <= 0 and self.max_steps == 0:
            raise ConfigError("set --epochs > 0 or --max-steps > 0")


def progress_flag_for_datasets(stage_run: Callable) -> Callable:
    """A stage's run(stage, run_cfg) with `datasets`' bars (loading, checking rows, casting) hidden
    too under --no-progress, as the loop's are; restored after, as they were."""
    @functools.wraps(stage_run)
    def run(stage, run_cfg: RunConfig, *args, **kwargs):
        import datasets

        shown = datasets.is_progress_bar_enabled()
        if not run_cfg.progress:
            datasets.disable_progress_bars()
        try:
            return stage_run(stage, run_cfg, *args, **kwargs)
        finally:
            if shown:
                datasets.enable_progress_bars()
    return run


def make_accelerator(run: RunConfig, precision: PrecisionDecision):
    """An Accelerator with the decided precision, gradient accumulation and tensorboard.

    accelerate keeps one AcceleratorState per process and refuses a second Accelerator with
    another precision; a process that trains twice (a job's stages, a notebook, a test session)
    may resolve differently each time, so that state is reset (the process group is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision.resolved) != precision.resolved:
        AcceleratorState._reset_state(reset_partial_state=False)
    project = ProjectConfiguration(project_dir=run.output_dir, logging_dir=str(Path(run.output_dir) / "logs"))
    trackers = ["tensorboard"] if _has_tensorboard() else []
    accelerator = Accelerator(mixed_precision=precision.resolved, gradient_accumulation_steps=run.grad_accum,
                              log_with=trackers or None, project_config=project)
    set_seed(run.seed)
    accelerator.print(precision)
    return accelerator


def end_trackers(accelerator) -> None:
    """accelerate's end_training without its destroy_process_group: a job trains its next stage in the
    same processes, which then had no process group (`mmfusion main` on 2 processes: stage 2 failed with
    'Default process group has not been initialized'). The group ends with the processes."""
    for tracker in accelerator.trackers:
        tracker.finish()


def choose_precision(run: RunConfig) -> PrecisionDecision:
    """The run's precision (mmfusion/training/precision.py says who decides)."""
    return decide(run.mixed_precision, training_device())


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
        return True
    except ImportError:
        return False


NO_DECAY_NAMES = ("pos_embed", "cls_token", "wte", "wpe")


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], lr: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices decay; norms, biases, embeddings and the CLS token do not."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(part in name.split(".") for part in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    return [g for g in groups if g["params"]]


def adamw(groups: list[dict[str, Any]], run: RunConfig) -> torch.optim.AdamW:
    """AdamW over param_groups, with the fused kernel: on CPU the default per-tensor loop costs
    about ten times as much per step for stage 2's 7M trainable parameters (docs/experiments.md)."""
    return torch.optim.AdamW(groups, lr=run.lr, betas=(0.9, run.beta2), eps=run.adam_eps, fused=True)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine down to `min_ratio` at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor
