"""Loop pieces both training stages share: run config, precision, optimizer groups, LR
schedule, deterministic sampling, checkpoints with exact resume, and the step loop itself.

The loop is a plain function over accelerate: no Trainer, no callbacks. A stage supplies a
`step(model, batch) -> (loss, items)` and an `evaluate(model) -> dict` and gets back the
trained, unwrapped model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from mmfusion.config import ConfigError
from mmfusion.weights import CheckpointError
from training.precision import PRECISIONS, PrecisionDecision, decide, model_step_timer, training_device

log = logging.getLogger("mmfusion.training")


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
        "help": "auto (bf16 where it is faster than fp32 on this device), no, bf16 or fp16",
        "choices": ["auto", *PRECISIONS]})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps on eval_samples (0: only at the end)"})
    eval_samples: int = field(default=1000, metadata={"help": "examples in a periodic evaluation"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: none)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint folder, or 'latest' in output_dir"})
    log_every: int = field(default=10, metadata={"help": "tracker logging interval in steps"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "keep_checkpoints", "eval_samples", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "num_workers", "epochs",
                     "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.beta2 < 1 or self.adam_eps < 0:
            raise ConfigError(f"--beta2 must be in [0, 1) and --adam-eps >= 0, got {self.beta2} and {self.adam_eps}")
        if self.epochs <= 0 and self.max_steps == 0:
            raise ConfigError("set --epochs > 0 or --max-steps > 0")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")


def make_accelerator(run: RunConfig, log_name: str, precision: PrecisionDecision):
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
    if trackers:
        accelerator.init_trackers(log_name)
    accelerator.print(precision)
    return accelerator


def choose_precision(run: RunConfig, model: torch.nn.Module, make_batch: Callable[[], Any],
                     loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]) -> PrecisionDecision:
    """The run's precision (training/precision.py says who decides). `auto` may time a step of
    `model` on make_batch(), loss_fn(model, batch) -> loss; nothing is built unless it is timed."""
    device = training_device()
    timer = None

    def step_seconds(precision: str) -> float:
        nonlocal timer
        timer = timer or model_step_timer(model, make_batch(), loss_fn, device)
        return timer(precision)

    return decide(run.mixed_precision, device, step_timer=step_seconds)


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
    """AdamW over param_groups. The fused kernel: on CPU the default per-tensor loop costs
    ~70 ms per step for the 7M trainable parameters of stage 2, the fused one ~6 ms."""
    return torch.optim.AdamW(groups, lr=run.lr, betas=(0.9, run.beta2), eps=run.adam_eps, fused=True)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine down to `min_ratio` at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch from (seed, epoch) alone, so a resumed run replays the
    exact order of an uninterrupted one. accelerate shards its batches across processes.

    It yields *virtual* indices `epoch * n + i`: a dataset recovers the row with
    `split_index` and can seed per-example augmentation from (epoch, row), which makes
    augmentation independent of whatever else consumed the global RNG.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        offset = self.epoch * self.n
        if not self.shuffle:
            return iter(range(offset, offset + self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter((torch.randperm(self.n, generator=g) + offset).tolist())


def split_index(virtual: int, n: int) -> tuple[int, int]:
    """A virtual index from EpochSampler -> (epoch, row)."""
    return divmod(virtual, n)


def example_generator(seed: int, virtual: int) -> torch.Generator:
    """A generator for one example's augmentation, a pure function of (seed, epoch, row)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + virtual)


class Rows(torch.utils.data.Dataset):
    """Serves rows of a datasets.Dataset by EpochSampler's virtual indices."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, virtual: int):
        return self.dataset[split_index(virtual, len(self.dataset))[1]]


class Conversations(torch.utils.data.Dataset):
    """VQA rows grouped by image into conversations of up to `turns` questions.

    Rows that share an `image_id` (>= 0) are grouped, in chunks of at most `turns`; rows with
    image_id -1 (the source had none) stay alone. The turns of a group come in a seeded random
    order, fixed per group, so the question a conversation opens with (the one seen exactly as
    at evaluation) varies across images. Items: {"image" (or "image_features" from FeatureRows),
    "turns": [(question, answers), ...]},
    which `VQACollator` turns into one sequence. Nothing is dropped: every row is in one group.
    """

    def __init__(self, dataset, turns: int, seed: int) -> None:
        if turns < 1:
            raise ConfigError(f"turns must be >= 1, got {turns}")
        self.dataset, self.turns = dataset, turns
        self.questions, self.answers = list(dataset["question"]), list(dataset["answers"])
        by_image: dict[int, list[int]] = {}
        groups = []
        for i, image_id in enumerate(dataset["image_id"]):
            if image_id < 0:
                groups.append([i])
            else:
                by_image.setdefault(image_id, []).append(i)
        groups += [rows[k:k + turns] for rows in by_image.values() for k in range(0, len(rows), turns)]
        groups.sort(key=lambda g: g[0])  # dataset order, independent of dict order
        g = torch.Generator().manual_seed(seed)
        self.groups = [[group[j] for j in torch.randperm(len(group), generator=g).tolist()] for group in groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __repr__(self) -> str:
        return (f"{len(self.dataset)} questions in {len(self.groups)} conversations "
                f"(up to {self.turns} questions about one image each)")

    def __getitem__(self, index: int) -> dict:
        group = self.groups[index]
        first = self.dataset[group[0]]
        image = {k: first[k] for k in ("image", "image_features") if k in first}  # FeatureRows: features
        return {**image, "turns": [(self.questions[i], self.answers[i]) for i in group]}


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The global RNG seed for one micro-step (dropout): resume replays it exactly."""
    return (seed * 1_000_003 + step * 1009 + micro) * 131 + rank


def write_json(path: str | Path, data: Any) -> None:
    from mmfusion.weights import atomic_write

    atomic_write(path, lambda p: Path(p).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"))


def write_run_config(output_dir: str | Path, **configs: Any) -> None:
    """The resolved configuration of a run, next to its outputs."""
    resolved = {name: (asdict(c) if hasattr(c, "__dataclass_fields__") else c) for name, c in configs.items()}
    write_json(Path(output_dir) / "run_config.json", resolved)


# ---- checkpoints ----------------------------------------------------------------------------

PROGRESS_NAME = "progress.json"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()
            and (p / PROGRESS_NAME).exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(accelerator, output_dir: str | Path, step: int, keep: int) -> None:
    """accelerate's save_state into a temporary folder, fsync, then an atomic rename: a crash
    mid-write leaves the earlier checkpoints intact (and a `.tmp_step_*` folder that the next save
    removes). `progress.json` written last marks it complete."""
    from mmfusion.weights import fsync_dir, fsync_tree

    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if accelerator.is_main_process and root.exists():
        for stale in root.glob(".tmp_step_*"):  # left by a crash mid-write
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every process has written its RNG state before the rename
    if accelerator.is_main_process:
        write_json(tmp / PROGRESS_NAME, {"step": step})
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            log.warning("--resume latest: no checkpoint in %s, starting fresh", output_dir)
            return None
        return found[-1]
    path = Path(resume)
    if not (path / PROGRESS_NAME).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {PROGRESS_NAME}); pick one under "
                                f"{Path(output_dir) / 'checkpoints'} or use --resume latest")
    return path


# ---- the loop -------------------------------------------------------------------------------

StepFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]
EvalFn = Callable[[torch.nn.Module, bool], dict[str, float]]


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN or infinite; the last good checkpoint is kept."""


def _non_finite(what: str, step: int, output_dir: str | Path) -> NonFiniteLossError:
    found = checkpoint_dirs(output_dir)
    kept = (f"the last good checkpoint, {found[-1]}, is kept: resume from it with --resume latest"
            if found else "no checkpoint was saved before it (see --save-every)")
    return NonFiniteLossError(f"{what} at step {step}; training stopped and {kept}. "
                              "Lower --lr (or raise --warmup-steps), or check the data")


def _check_finite_weights(model: torch.nn.Module, step: int, output_dir: str | Path) -> None:
    """A finite loss can still come with non-finite gradients; never save such weights."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise _non_finite(f"weights became NaN or infinite ({', '.join(bad[:3])})", step, output_dir)


def train(accelerator, run: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          dataset, collate: Callable, step_fn: StepFn, evaluate: EvalFn | None = None,
          unit: str = "ex", tag: str = "train") -> torch.nn.Module:
    """Train `model` for the configured steps; returns the unwrapped model.

    step_fn(model, batch) -> (mean loss, items in the batch), items counted for throughput
    (`unit` names them). evaluate(model, full) -> metrics, called every `eval_every` steps
    with full=False. `tag` prefixes the logged training scalars ("train/loss").
    """
    from tqdm.auto import tqdm

    sampler = EpochSampler(len(dataset), run.seed)
    loader = DataLoader(dataset, batch_size=run.batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=run.num_workers, drop_last=True,
                        persistent_workers=run.num_workers > 0)
    per_epoch = len(loader) // (run.grad_accum * accelerator.num_processes)
    if per_epoch < 1:
        raise ValueError(f"the dataset ({len(dataset)} examples) is smaller than one global batch "
                         f"({run.batch_size} x {accelerator.num_processes} x {run.grad_accum}); lower --batch-size")
    total = run.max_steps or max(1, math.ceil(run.epochs * per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, run.warmup_steps, run.min_lr_ratio))
    # The scheduler stays unprepared: accelerate would step it once per process per optimizer
    # step, which makes the schedule depend on the process count. It is a pure function of the
    # step, so resume replays it instead of storing it.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    step = 0
    start_from = find_resume(run.resume, run.output_dir)
    if start_from is not None:
        try:
            accelerator.load_state(str(start_from))
            step = json.loads((start_from / PROGRESS_NAME).read_text())["step"]
        except Exception as e:  # accelerate, torch and safetensors raise many types for a bad folder
            first_line = (str(e).splitlines() or [""])[0]
            raise CheckpointError(
                f"cannot resume from {start_from}: {type(e).__name__}: {first_line} (a checkpoint from a run "
                "with other model flags, or a damaged one); resume with the same flags, or pick another "
                "checkpoint with --resume PATH") from e
        with warnings.catch_warnings():  # replaying the schedule: no optimizer step is missing
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            for _ in range(step):
                scheduler.step()
        accelerator.print(f"resumed from {start_from} at step {step}")

    bar = tqdm(total=total, initial=step, disable=not (run.progress and accelerator.is_local_main_process),
               desc=Path(run.output_dir).name, dynamic_ncols=True)
    model.train()
    seen, t0, last_loss = 0, time.perf_counter(), float("nan")
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip * run.grad_accum) if skip else loader
        micro = 0
        for batch in batches:
            torch.manual_seed(step_seed(run.seed, step, micro % run.grad_accum, accelerator.process_index))
            with accelerator.accumulate(model):
                loss, items = step_fn(model, batch)
                if not torch.isfinite(loss):
                    raise _non_finite(f"loss is {loss.item()}", step + 1, run.output_dir)
                accelerator.backward(loss)
                if accelerator.sync_gradients and run.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), run.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            seen += items * accelerator.num_processes
            micro += 1
            if micro % run.grad_accum:
                continue
            step += 1
            last_loss = loss.item()
            rate = seen / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", **{f"{unit}/s": f"{rate:.0f}"})
            if step % run.log_every == 0 or step == total:
                accelerator.log({f"{tag}/loss": last_loss, f"{tag}/lr": scheduler.get_last_lr()[0],
                                 f"{tag}/{unit}_per_s": rate}, step=step)
            if evaluate is not None and run.eval_every and step % run.eval_every == 0 and step < total:
                metrics = evaluate(accelerator.unwrap_model(model), False)
                accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                model.train()
            if run.save_every and step % run.save_every == 0:
                _check_finite_weights(model, step, run.output_dir)
                save_checkpoint(accelerator, run.output_dir, step, run.keep_checkpoints)
            if step >= total or step % per_epoch == 0:
                break
    bar.close()
    _check_finite_weights(model, step, run.output_dir)
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(model)
