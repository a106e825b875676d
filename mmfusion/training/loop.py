"""The training loop both stages share: a plain function over accelerate (no Trainer, no
callbacks), checkpoints written atomically, and exact resume.

A stage supplies a `step(model, batch) -> (loss, items[, terms])` and an `evaluate(model, full) -> dict`
and gets back the trained, unwrapped model.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..errors import CheckpointError, ConfigError, NonFiniteLossError
from ..weights import fsync_dir, fsync_tree, read_json
from .data import EpochSampler, WeightedEpochSampler
from .run_folder import (
    PROGRESS_NAME,
    check_resume_processes,
    checked_step,
    checkpoint_dirs,
    checkpoint_step,
    find_resume,
    model_record,
    write_json,
)
from .setup import RunConfig, warmup_cosine

# checkpoint_dirs, find_resume, checked_step: in run_folder.py, which checks --resume before any work


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The global RNG seed for one micro-step (dropout): resume replays it exactly."""
    return (seed * 1_000_003 + step * 1009 + micro) * 131 + rank


class WeightEMA:
    """An exponential moving average of a model's floating-point weights (parameters and
    buffers), updated after every optimizer step with decay min(decay, (1 + n) / (10 + n)) at
    update n, so the first averages do not cling to the initial weights. Kept in fp32 on the
    weights' device; checkpoints store it as `ema.safetensors`."""

    FILE = "ema.safetensors"

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                v.copy_(self.shadow[k].to(v.dtype))

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(folder / self.FILE))

    def load(self, folder: Path, updates: int) -> None:
        from safetensors.torch import load_file

        device = next(iter(self.shadow.values())).device if self.shadow else "cpu"
        saved = load_file(str(folder / self.FILE), device=str(device))
        if saved.keys() != self.shadow.keys() or any(saved[k].shape != v.shape for k, v in self.shadow.items()):
            raise CheckpointError(f"{folder / self.FILE} does not match this model's weights")
        self.shadow, self.updates = {k: v.float() for k, v in saved.items()}, updates


# ---- checkpoints ----------------------------------------------------------------------------

# The settings that shape a run's updates: a resume with others does not continue the run exactly.
SCHEDULE_FIELDS = ("seed", "epochs", "max_steps", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps",
                   "weight_decay", "beta2", "adam_eps", "grad_clip")


# AdamW's own settings travel in its saved state: a resume keeps the checkpoint's, whatever it is given.
OPTIMIZER_FIELDS = ("weight_decay", "beta2", "adam_eps")


def schedule_settings(run: RunConfig) -> dict:
    return {name: getattr(run, name) for name in SCHEDULE_FIELDS}


def changed_settings(saved, run: RunConfig) -> list[str]:
    """`name old -> new` for each schedule setting of `run` that differs from a checkpoint's
    (epochs not where both runs count steps, which make epochs moot)."""
    if not isinstance(saved, dict):
        return []  # a checkpoint from before settings were saved
    now = schedule_settings(run)
    moot = {"epochs"} if saved.get("max_steps") and run.max_steps else set()
    return [f"{k} {saved[k]!r} -> {now[k]!r}" for k in SCHEDULE_FIELDS
            if k in saved and k not in moot and saved[k] != now[k]]


def save_checkpoint(accelerator, output_dir: str | Path, step: int, keep: int, ema: WeightEMA | None = None,
                    run: RunConfig | None = None, data: dict | None = None, model: dict | None = None) -> None:
    """accelerate's save_state into a temporary folder, fsync, then an atomic rename: a crash
    mid-write leaves the earlier checkpoints intact (and a `.tmp_step_*` folder that the next save
    removes). `progress.json` written last marks it complete; it holds the step, `run`'s
    schedule settings, `data` (what the run evaluates on) and `model` (setup.model_record), which a
    resume compares with its own."""
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
        if ema is not None:
            ema.save(tmp)
        write_json(tmp / PROGRESS_NAME, {"step": step} | ({"run": schedule_settings(run)} if run is not None else {})
                   | ({"data": data} if data is not None else {}) | ({"model": model} if model is not None else {}))
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        # a higher step is another run's: sorted in, it would push out the checkpoint just written
        done = [p for p in checkpoint_dirs(output_dir) if checkpoint_step(p) <= step]
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# ---- the loop -------------------------------------------------------------------------------

StepFn = Callable[[torch.nn.Module, dict], tuple]  # (mean loss, items counted[, terms the mean is over])
EvalFn = Callable[[torch.nn.Module, bool], dict[str, float]]


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
          unit: str = "ex", tag: str = "train", ema_decay: float = 0.0,
          weights: torch.Tensor | None = None, data: dict | None = None) -> torch.nn.Module:
    """Train `model` for the configured steps; returns the unwrapped model.

    step_fn(model, batch) -> (mean loss, items in the batch[, terms]), items counted for throughput
    (`unit` names them); `terms` (an int: stage 2's supervised tokens) is how many terms the mean is
    over. Each optimizer step follows the mean over every term of its micro-steps on every process,
    as one process with the whole global batch would; without `terms` each micro-step counts the
    same (right for batches of equal size). evaluate(model, full) -> metrics, called every `eval_every` steps
    with full=False. `tag` prefixes the logged training scalars ("train/loss").
    With `ema_decay` > 0 the returned model holds the moving average of the weights (WeightEMA);
    periodic evaluations see the raw weights. `weights` (one per row) draws each epoch's rows
    with replacement in proportion to them (WeightedEpochSampler) instead of a permutation.
    `data` ({"held_out_images": digest} where the evaluation rows are held out of the training
    data) goes into each checkpoint; a resume that holds out other images says so, since it may
    then evaluate on images it trained on.
    """
    from tqdm.auto import tqdm

    if weights is not None and len(weights) != len(dataset):
        raise ValueError(f"{len(weights)} sampling weights for {len(dataset)} rows")
    sampler = EpochSampler(len(dataset), run.seed) if weights is None else WeightedEpochSampler(weights, run.seed)
    loader = DataLoader(dataset, batch_size=run.batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=run.num_workers, drop_last=True,
                        persistent_workers=run.num_workers > 0)
    per_epoch = steps_per_epoch(len(dataset), run, accelerator.num_processes)
    total = run.max_steps or max(1, math.ceil(run.epochs * per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, run.warmup_steps, run.min_lr_ratio))
    # The scheduler stays unprepared: accelerate would step it once per process per optimizer
    # step, which makes the schedule depend on the process count. It is a pure function of the
    # step, so resume replays it instead of storing it.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    plain = functools.partial(accelerator.unwrap_model, keep_torch_compile=False)  # what saving and EMA read
    if run.compile:  # after prepare, so checkpoints and the saved model hold the plain module's keys
        model = torch.compile(model)
    ema = WeightEMA(plain(model), ema_decay) if ema_decay > 0 else None
    step = _resume(accelerator, run, scheduler, total, ema, data)
    record = model_record(plain(model).config) if hasattr(plain(model), "config") else None

    bar = tqdm(total=total, initial=step, disable=not (run.progress and accelerator.is_local_main_process),
               desc=Path(run.output_dir).name, dynamic_ncols=True)
    model.train()
    seen, t0 = 0, time.perf_counter()
    sums = [0.0, 0, 0.0]  # this process's sums of micro-step loss x terms, of terms and of weights since the last step
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip * run.grad_accum) if skip else loader
        micro = 0
        for batch in batches:
            torch.manual_seed(step_seed(run.seed, step, micro % run.grad_accum, accelerator.process_index))
            value, items, step_loss = _micro_step(accelerator, run, model, optimizer, scheduler, step_fn, batch, step,
                                                  sums)
            seen = seen + items * accelerator.num_processes  # a device tensor may count: read after the step
            micro += 1
            if micro % run.grad_accum:
                continue
            step += 1
            if ema is not None:
                ema.update(plain(model))
            rate = float(seen) / (time.perf_counter() - t0)
            loss = value if step_loss is None else step_loss
            _after_step(accelerator, run, model, scheduler, bar, evaluate, step, total, loss, rate, unit, tag, ema,
                        data, record)
            if step >= total or step % per_epoch == 0:
                break
    bar.close()
    _check_finite_weights(model, step, run.output_dir)
    accelerator.wait_for_everyone()
    unwrapped = plain(model)
    if ema is not None:
        ema.copy_to(unwrapped)
        _check_finite_weights(unwrapped, step, run.output_dir)
    return unwrapped


def across_processes(accelerator, rows: int, part: Callable[[int, int], list]) -> list:
    """`part(first, stop)` over rows [0, rows), one contiguous share per process, gathered in row
    order on every process: N processes (one device each) do 1/N of the work each, and every process
    gets the whole result (what one process computes, up to batching)."""
    n, i = accelerator.num_processes, accelerator.process_index
    if n == 1:
        return part(0, rows)
    from accelerate.utils import gather_object

    return gather_object(part(i * rows // n, (i + 1) * rows // n))


def steps_per_epoch(examples: int, run: RunConfig, processes: int, what: str = "the training set") -> int:
    """Optimizer steps in one pass (last partial batch dropped); a ConfigError if not even one.
    The stages call it before they create their output folder, so the refusal leaves nothing."""
    per_epoch = examples // run.batch_size // (run.grad_accum * processes)
    if per_epoch < 1:
        raise ConfigError(f"{what} ({examples} examples) is smaller than one global batch ({run.batch_size} x "
                          f"{processes} process(es) x {run.grad_accum} accumulation); lower --batch-size")
    return per_epoch


def _check_rng_state(folder: Path, process_index: int) -> None:
    """accelerate skips an RNG-state file it cannot load (one log line), so a resumed run would
    silently draw other dropout masks and augmentations; check it loads (weights_only) first."""
    from accelerate.utils import load

    path = folder / f"random_states_{process_index}.pkl"
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing or not a regular file")
    try:
        states = load(path, map_location="cpu")
    except Exception as e:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"{path.name} cannot be loaded ({type(e).__name__})") from e
    needed = ("random_state", "numpy_random_seed", "torch_manual_seed")
    if not isinstance(states, dict) or any(k not in states for k in needed):
        raise CheckpointError(f"{path.name} does not hold the random states accelerate saves")


def _resume(accelerator, run: RunConfig, scheduler, total: int, ema: WeightEMA | None = None,
            data: dict | None = None) -> int:
    """Load the checkpoint `run.resume` names (if any) and replay the schedule; its step, else 0."""
    start_from = find_resume(run.resume, run.output_dir)
    if start_from is None:
        return 0
    check_resume_processes(start_from, accelerator.num_processes)
    try:
        progress = read_json(start_from / PROGRESS_NAME)
        step = checked_step(progress, total)
        has_ema = (start_from / WeightEMA.FILE).is_file()
        if has_ema != (ema is not None):
            raise CheckpointError("it was saved " + ("with" if has_ema else "without") + " an average of the "
                                  "weights (--ema), this run is " + ("not" if has_ema else "averaging"))
        _check_rng_state(start_from, accelerator.process_index)
        accelerator.load_state(str(start_from))
        if ema is not None:
            ema.load(start_from, step)
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
    changed = changed_settings(progress.get("run"), run)
    if not isinstance(progress.get("run"), dict):
        accelerator.print("note: this checkpoint records no run settings (it predates them), so flags or defaults "
                          "changed since it was saved cannot be named; pass the flags its run had to continue it "
                          "exactly")
    elif changed:
        kept = [c for c in changed if c.split()[0] in OPTIMIZER_FIELDS]
        accelerator.print(f"note: this run's settings differ from the checkpoint's run ({', '.join(changed)}; a changed "
                          "default counts too), so it will not end where that run would have"
                          + (f"; the checkpoint's values of {', '.join(c.split()[0] for c in kept)} stay, since its "
                             "optimizer state holds them" if kept else "")
                          + "; pass the old values to continue that run exactly")
    saved_data = progress.get("data")
    if data is not None and isinstance(saved_data, dict) and saved_data != data:
        accelerator.print(f"WARNING: this run holds out other images than the checkpoint's run (held-out images "
                          f"{saved_data.get('held_out_images')}, now {data.get('held_out_images')}): the data or "
                          "--holdout changed, so the resumed run may be scored on images it trained on; start "
                          "afresh for a clean evaluation")
    return step


def _micro_step(accelerator, run: RunConfig, model, optimizer, scheduler, step_fn: StepFn, batch,
                step: int, sums: list) -> tuple[float, int | torch.Tensor, float | None]:
    """Forward, backward and (on the last micro-step of an accumulation) average, clip and step;
    returns the loss as a number, the items, and on the last micro-step the step's mean loss over
    every process. Reading the loss is the micro-step's one wait for the device,
    placed after backward is queued and before the optimizer step, so a non-finite loss never
    reaches the weights (several processes add one: the sum of their terms)."""
    combined = run.grad_accum * accelerator.num_processes > 1  # else the step's mean is this batch's
    with accelerator.accumulate(model):
        loss, items, *counted = step_fn(model, batch)
        terms = counted[0] if counted else 1
        # weighed by its terms per row, not its terms: fp16's loss scale sees gradients tens, not ~1,000, times the usual
        weight = terms / run.batch_size if counted else 1
        accelerator.backward(loss * weight if combined else loss)  # rescaled at the step
        if not math.isfinite(value := loss.item()):
            raise _non_finite(f"loss is {value}", step + 1, run.output_dir)
        sums[0] += value * terms
        sums[1] += terms
        sums[2] += weight
        step_loss = None
        if accelerator.sync_gradients:
            step_loss = _mean_over_terms(accelerator, optimizer, sums, run.grad_accum) if combined else value
            sums[:] = [0.0, 0, 0.0]
            if run.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), run.grad_clip)
        optimizer.step()
        if accelerator.sync_gradients:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return value, items, step_loss


def _mean_over_terms(accelerator, optimizer, sums: list, micro_steps: int) -> float:
    """Rescale the step's gradients to those of the mean loss over every term of its micro-steps on
    every process; returns that mean. `sums` is this process's [sum of loss x terms, terms, weights].
    Each micro-step back-propagated its mean loss x its weight (terms / rows per micro-batch),
    accelerate divided that by the micro-steps and DDP averaged over the processes, so the factor is
    micro-steps x processes / all weights: exactly 1 when every weight is 1 (stage 1, no terms), and
    then skipped. (Averaging the micro-steps' means instead gave the tokens of a batch with few of
    them more weight than those of one with many.)"""
    total = sums
    if accelerator.num_processes > 1:
        total = accelerator.reduce(torch.tensor(sums, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    scale = micro_steps * accelerator.num_processes / total[2]
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads and scale != 1:
        torch._foreach_mul_(grads, scale)
    return total[0] / total[1]


def _after_step(accelerator, run: RunConfig, model, scheduler, bar, evaluate: EvalFn | None, step: int,
                total: int, loss: float, rate: float, unit: str, tag: str, ema: WeightEMA | None = None,
                data: dict | None = None, record: dict | None = None) -> None:
    """Progress bar, tracker logging, periodic evaluation and checkpoints after optimizer step `step`."""
    lr = scheduler.get_last_lr()[0]
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **{f"{unit}/s": f"{rate:.0f}"})
    if step % run.log_every == 0 or step == total:
        accelerator.log({f"{tag}/loss": loss, f"{tag}/lr": lr, f"{tag}/{unit}_per_s": rate}, step=step)
    if evaluate is not None and run.eval_every and step % run.eval_every == 0 and step < total:
        metrics = evaluate(accelerator.unwrap_model(model, keep_torch_compile=False), False)
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        model.train()
    if run.save_every and step % run.save_every == 0:
        _check_finite_weights(model, step, run.output_dir)
        save_checkpoint(accelerator, run.output_dir, step, run.keep_checkpoints, ema, run, data, record)
