"""A training run's folder: the checks of --output-dir and --resume made before anything is
written, the checkpoints --resume reads (step_N/ with a progress.json), what an earlier run left
in the folder (moved to earlier_run/, never deleted), and the resolved config written next to
the run's outputs."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..weights import atomic_write, check_writable, is_mmfusion_folder, read_json
from .setup import OUTPUT_DIR_FIX, RunConfig, refuse_empty

log = logging.getLogger("mmfusion.training")

PROGRESS_NAME = "progress.json"
EARLIER_RUN = "earlier_run"  # where a fresh run puts the checkpoints an earlier run left in its folder


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"))


def write_run_config(output_dir: str | Path, **configs: Any) -> None:
    """The resolved configuration of a run, next to its outputs, with the folder it ran from
    (relative paths in it, such as --dataset, are relative to that: `mmfusion eval` reads it)."""
    resolved = {name: (asdict(c) if hasattr(c, "__dataclass_fields__") else c) for name, c in configs.items()}
    resolved["cwd"] = os.getcwd()
    write_json(Path(output_dir) / "run_config.json", resolved)


def start_run_folder(accelerator, out: Path, log_name: str, *, run: RunConfig, **run_config) -> None:
    """Create the output folder, write run_config.json (`run` and the other configs given) and
    start the trackers (which write under out/logs/log_name/<start time>, one folder per run, so
    TensorBoard shows a rerun into the same folder as a run of its own instead of one curve
    that jumps back to step 0): called once every check has passed, so a refused run leaves no
    folder behind (the stages check a resume's model, check_resume_model, as soon as they have built
    it, before their slower preparation). A run that does not continue this folder's own run first
    sets the earlier run's checkpoints aside and says so (set_aside_earlier_run)."""
    check_run_paths(run)  # again here: a stage's run() may be called without its parse()
    check_keeps_inputs_and_data(run.output_dir, run_config.get("stage"))
    if accelerator.is_main_process:
        for line in set_aside_earlier_run(out, run):
            accelerator.print(line)
        out.mkdir(parents=True, exist_ok=True)
        write_run_config(out, run=run, **run_config)
    if accelerator.log_with:
        accelerator.init_trackers(f"{log_name}/{run_log_name(out / 'logs' / log_name)}")


def run_log_name(logs: Path) -> str:
    """A new folder name under `logs` for this run's events: its start time (.2, .3, ... when a
    run started in the same second)."""
    return free_name(logs, time.strftime("%Y-%m-%d_%H-%M-%S"))


def free_name(folder: Path, name: str) -> str:
    """`name`, or the first of name.2, name.3, ... that nothing in `folder` is called yet."""
    return next(free for n in range(1, 10**6) if not os.path.lexists(folder / (free := name if n == 1 else f"{name}.{n}")))


def world_size() -> int:
    """The number of processes a launcher started (WORLD_SIZE), known before any Accelerator exists."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named step_N, else None."""
    n = path.name.removeprefix("step_")
    return int(n) if n != path.name and n.isascii() and n.isdigit() else None  # isdigit alone takes '²'


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints (step_N with a progress.json) under output_dir/checkpoints, oldest step first."""
    root = Path(output_dir) / "checkpoints"
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None and (p / PROGRESS_NAME).exists()]
    return sorted(done, key=checkpoint_step)


def find_resume(resume: str | None, output_dir: str | Path, warn: bool = True) -> Path | None:
    """The checkpoint `--resume` names: None to start fresh (no flag, or `latest` with no
    checkpoint yet, which `warn` says); a CheckpointError for a path that is not a complete checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            if warn:
                log.warning("--resume latest: no checkpoint in %s, starting fresh", output_dir)
            return None
        return found[-1]
    path = Path(resume)
    if not (path / PROGRESS_NAME).exists():
        why = ("it does not exist" if not path.exists() else "not a folder" if not path.is_dir()
               else f"no {PROGRESS_NAME}")
        own = checkpoint_dirs(path) if path.is_dir() else []  # a run folder named instead of its checkpoint
        fix = (f"it is a run folder: resume its newest checkpoint with --resume {own[-1]}, or continue that run with "
               f"--output-dir {path} --resume latest" if own else
               f"pick one under {Path(output_dir) / 'checkpoints'} or use --resume latest")
        raise CheckpointError(f"--resume {path} is not a complete checkpoint ({why}); {fix}")
    return path


def checked_step(progress, total: int | None) -> int:
    """The step a progress.json holds, checked before it drives anything (a step of 1e9 would
    replay the schedule for hours): an integer in [0, total] (total None: >= 0), else a CheckpointError."""
    step = progress.get("step") if isinstance(progress, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or (total is not None and step > total):
        run = "a step count" if total is None else f"a step of this {total}-step run"
        raise CheckpointError(f"its {PROGRESS_NAME} gives step {step!r}, not {run}")
    return step


def check_run_paths(run: RunConfig) -> None:
    """Refuse, before any work and before anything is written, an output folder that cannot be
    used (check_output_dir) and a --resume that cannot resume (check_resume)."""
    check_output_dir(run.output_dir)
    check_resume(run)


# The folders a stage writes inside its output folder, and the jobs' stage folders: a file in
# the place of one failed only when it was written, at the end of training.
RUN_PARTS = ("model", "checkpoints", "logs", "logs/pretrain_vit", "logs/train_vqa", "align", "earlier_run")


def job_parts(*stages: str, own_run: bool = False) -> tuple[str, ...]:
    """A job's parts: each stage's folder and its RUN_PARTS, and RUN_PARTS where the job's
    folder is also a stage's (captions trains stage 2 there)."""
    parts = [name for stage in stages for name in (stage, *(f"{stage}/{part}" for part in RUN_PARTS))]
    return (*parts, *(RUN_PARTS if own_run else ()))


def check_output_dir(path: str | Path, flag: str = "--output-dir", parts: tuple[str, ...] = RUN_PARTS) -> str:
    """Refuse an output folder that is empty (""), under a broken symbolic link (dangling, or a
    loop), a file, or not writable (weights.check_writable), or that holds a file where the run
    writes one of its `parts` folders; else the path with ~ expanded (the shell leaves it after
    =: --output-dir=~/x)."""
    refuse_empty(flag, path, OUTPUT_DIR_FIX)
    out = Path(path).expanduser()
    for part in (out, *out.parents):
        if part.is_symlink():
            try:
                part.stat()
            except OSError as e:  # mkdir would fail late with a bare "File exists"
                what = ("a symbolic link loop" if e.errno == errno.ELOOP else
                        f"a symbolic link to {os.readlink(part)}, which does not exist")
                raise ConfigError(f"{flag} {out}: {part} is {what}; remove or fix the link, or pass another "
                                  f"{flag}") from e
    check_writable(out, flag, folder=True)
    for part in parts:
        if (out / part).exists() and not (out / part).is_dir():
            raise ConfigError(f"{flag} {out}: {out / part} is a file, where the run writes its {part}/ folder; "
                              f"move the file away, or pass another {flag}")
    return str(out)


def check_resume(run: RunConfig) -> None:
    """Refuse a --resume that names no complete checkpoint, or one whose progress.json cannot be
    read or gives a step past --max-steps. `latest` with no checkpoint starts fresh, as documented;
    the weights, optimizer and RNG states are checked when the loop loads them."""
    start_from = find_resume(run.resume, run.output_dir, warn=False)  # the loop says it when it starts fresh
    if start_from is None:
        return
    # train-vqa's alignment phase (OUTPUT_DIR/align) counts its own steps, not --max-steps
    aligning = resumes_alignment(run)
    if not aligning and (other := alignment_of(start_from)) is not None:
        # else the alignment was skipped and the main phase loaded the checkpoint: with the same
        # parameter groups (--freeze-gpt) it went on silently from the alignment's step and optimizer state
        raise CheckpointError(f"--resume {start_from} is a checkpoint of the alignment phase of the run in {other}, "
                              "which resumes only in that run's folder: pass --output-dir "
                              f"{other} to continue that run, or leave --resume out to start fresh")
    total = None if (run.max_steps == 0 or aligning) else run.max_steps
    try:
        checked_step(read_json(start_from / PROGRESS_NAME), total)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume from {start_from}: {e}; pick another checkpoint with --resume PATH, "
                              "or leave --resume out to start fresh") from e
    check_resume_processes(start_from, world_size())
    check_checkpoint_files(start_from, world_size())


def check_checkpoint_files(folder: Path, processes: int) -> None:
    """Refuse, before the run folder is touched, a checkpoint missing a file accelerate's
    load_state reads (the weights, the optimizer, each process's RNG state): the loop found it
    only after the earlier run's checkpoints were set aside and run_config.json rewritten."""
    wanted = {"the weights (model.safetensors)": ["model*.safetensors", "pytorch_model*.bin"],
              "the optimizer state (optimizer.bin)": ["optimizer*.bin"],
              **{f"process {r}'s random state (random_states_{r}.pkl)": [f"random_states_{r}.pkl"]
                 for r in range(processes)}}
    missing = [what for what, patterns in wanted.items() if not any(any(folder.glob(p)) for p in patterns)]
    if missing:
        raise CheckpointError(f"cannot resume from {folder}: it lacks {', '.join(missing)}; the checkpoint is "
                              "incomplete: pick another with --resume PATH, or leave --resume out to start fresh")


def resumes_alignment(run: RunConfig) -> bool:
    """Whether --resume names a checkpoint of train-vqa's alignment phase (a path inside
    OUTPUT_DIR/align/): that phase resumes from it, and the main phase after it starts fresh."""
    align = Path(run.output_dir) / "align"
    return run.resume not in (None, "latest") and align.resolve() in Path(run.resume).resolve().parents


def alignment_of(checkpoint: Path) -> Path | None:
    """The run folder whose train-vqa alignment phase saved `checkpoint` (RUN/align/checkpoints/step_N,
    also where RUN is an earlier_run/ folder), else None. A stage's own output folder named align
    holds its run_config.json; an alignment phase's folder never does."""
    folder = checkpoint.resolve().parent
    align = folder.parent
    if folder.name == "checkpoints" and align.name == "align" and not (align / "run_config.json").exists():
        return align.parent
    return None


def check_resume_processes(folder: Path, processes: int) -> None:
    """Refuse a checkpoint saved by another number of processes (accelerate writes one
    random_states_<rank>.pkl per process). Its steps were global batches of that many processes and
    each rank's random state is its own: one process resuming two's checkpoint went on silently with
    half the global batch and another place in the data; two resuming one's failed on a missing file."""
    saved = len(list(folder.glob("random_states_*.pkl")))
    if saved and saved != processes:
        raise CheckpointError(
            f"cannot resume from {folder}: it was saved by a run of {saved} process(es) and this run has "
            f"{processes}, so its steps, global batch (batch size x processes x accumulation) and random states "
            f"would not carry over; resume with {saved} process(es) (accelerate launch --num_processes {saved}), or "
            "leave out --resume to start fresh")


def check_keeps_inputs(output_dir: str | Path, inputs: dict[str, str | None]) -> None:
    """Refuse a run whose saved model (OUTPUT_DIR/model) would replace a model folder it starts
    from (`inputs`: flag -> value): `--vit runs/vit/model --output-dir runs/vit` would overwrite
    the pretrained ViT when the run ends."""
    target = (Path(output_dir).expanduser() / "model").resolve()
    for flag, value in inputs.items():
        source = Path(value).expanduser() if value else None
        if source is not None and source.is_dir() and source.resolve() == target:
            raise ConfigError(f"{flag} {value} is the model this run would save as {Path(output_dir) / 'model'}, "
                              "replacing the model it starts from when it ends; pass another --output-dir "
                              "(or copy the model elsewhere first)")


def check_keeps_data(output_dir: str | Path, inputs: dict[str, str | None]) -> None:
    """Refuse a run folder that holds a dataset the run reads (`inputs`: flag -> value), or lies
    inside a dataset's folder: the run writes predictions.jsonl, metrics.json and model/ there
    (`--dataset runs/x/predictions.jsonl --output-dir runs/x` replaced the training data), and a
    folder dataset would read the run's own JSON files as rows next time."""
    from ..data import BUILT_IN

    out = Path(os.path.realpath(Path(output_dir).expanduser()))
    for flag, value in inputs.items():
        if not value or value in BUILT_IN or not Path(value).expanduser().exists():
            continue  # a built-in or Hub dataset: nothing of it on disk to overwrite
        data = Path(os.path.realpath(Path(value).expanduser()))
        if data.is_relative_to(out):
            where = "is" if data == out else "is inside"
            raise ConfigError(f"{flag} {value} {where} --output-dir {output_dir}, where the run writes its model, "
                              "predictions and metrics; keep the data outside the run folder, or pass another "
                              "--output-dir")
        if data.is_dir() and out.is_relative_to(data):
            raise ConfigError(f"--output-dir {output_dir} is inside the {flag} folder {value}, whose files are read "
                              "as data (the run's own JSON files would be, next time); pass an --output-dir outside it")


def check_keeps_inputs_and_data(output_dir: str | Path, stage) -> None:
    """check_keeps_inputs for a stage's model folders, check_keeps_data for its datasets."""
    if hasattr(stage, "model_inputs"):
        check_keeps_inputs(output_dir, stage.model_inputs())
    if hasattr(stage, "data_inputs"):
        check_keeps_data(output_dir, stage.data_inputs())


def model_record(config) -> dict:
    """What a checkpoint records of the model it holds (its config's kind and fields, as JSON
    gives them back), so a resume can compare before anything is written."""
    return json.loads(json.dumps({"kind": type(config).__name__, "config": config.to_dict()}))


# Model settings a stage derives from its data, not from flags: a resume on changed data may
# change them (named in a note). Settings of a fresh model's starting weights: a resume loads the
# weights, so they change nothing (ignored). Keys as flattened, the last part.
FROM_DATA = {"output_tokens": "the output vocabulary (--output-vocab, from the training targets)",
             "class_names": "the class names (from the training data)"}
INIT_ONLY = {"attention_init", "patch_init_std", "initializer_range"}


def check_resume_model(run: RunConfig, config) -> list[str]:
    """Refuse a --resume whose checkpoint holds another kind of model, or one built with other model
    settings (weights of the same shapes would load and silently train another model); before the
    run folder is touched. Checkpoints that record no model are checked when their weights load.
    Returns notes on the settings the data decides (FROM_DATA) that changed."""
    start_from = find_resume(run.resume, run.output_dir, warn=False)
    if start_from is None:
        return []
    progress = read_json(start_from / PROGRESS_NAME)  # not an object: check_resume names it
    saved = progress.get("model") if isinstance(progress, dict) else None
    return compare_models(saved, config, f"cannot resume from {start_from}") if isinstance(saved, dict) else []


def compare_models(saved: dict, config, what: str) -> list[str]:
    """Refuse (CheckpointError starting with `what`) a recorded model (model_record) of another kind
    or with other settings than `config`; notes on the changed settings the data decides."""
    now = model_record(config)
    if saved.get("kind") != now["kind"]:
        raise CheckpointError(f"{what}: it holds a {str(saved.get('kind')).removesuffix('Config')} training run, this "
                              f"run trains a {now['kind'].removesuffix('Config')}; pass another --output-dir, or leave "
                              "out --resume to start fresh")
    old, new = _flat(saved.get("config")), _flat(now["config"])
    differ = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    last = {k: k.rsplit(".", 1)[-1] for k in differ}
    changed = [f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in differ
               if last[k] not in FROM_DATA and last[k] not in INIT_ONLY]
    if changed:
        raise CheckpointError(f"{what}: its model was built with other settings ({', '.join(changed[:6])}"
                              f"{', ...' if len(changed) > 6 else ''}); resume with the model flags its run had, or "
                              "leave out --resume to start fresh")
    return [f"note: {FROM_DATA[last[k]]}: {_short(old.get(k))} in the checkpoint, {_short(new.get(k))} now (the "
            "training data changed since it was saved)" for k in differ if last[k] in FROM_DATA]


def _short(value) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"{len(value)} values"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _flat(tree, prefix: str = "") -> dict:
    """{"adapter": {"layer": -1}} -> {"adapter.layer": -1}."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def later_checkpoints(folder: Path, resumed: Path) -> list[Path]:
    """The complete checkpoints in `folder`/checkpoints, where a run resuming from `resumed` saves its
    own, with a higher step than `resumed`: left there, this run would overwrite them as it reaches
    their steps, and --resume latest would return to them were it cut short before."""
    step = checkpoint_step(resumed)
    return [] if step is None else [p for p in checkpoint_dirs(folder) if checkpoint_step(p) > step]


def set_aside_earlier_run(out: Path, run: RunConfig) -> list[str]:
    """Prepare `out` for a run, unless it continues from its newest checkpoint; returns the lines to
    print. An earlier run's checkpoints/ (and train-vqa's align/, which resumes from its own) move to
    out/earlier_run/ (earlier_run.2/, ... when that is taken): mixed with this run's, rotation would
    keep their higher steps and delete this run's, and --resume latest would pick them. A resume from
    inside align/ moves checkpoints/ and the older finished align/model (to earlier_run/align/model).
    A resume from a checkpoint in `out` moves the checkpoints with higher steps in the folder this
    run saves to. Moved, never deleted, so a forgotten --resume costs no training. An earlier model/
    stays until this run saves its own; a line says it will be replaced."""
    resumed = None if run.resume in (None, "latest") else Path(run.resume).resolve()
    inside = run.resume == "latest" or (resumed is not None and out.resolve() in resumed.parents)
    lines = []
    checkpoints, align, aligned = out / "checkpoints", out / "align", out / "align" / "model"
    aligning = resumes_alignment(run)
    # resuming the alignment: the main phase starts afresh, and were this run cut short, --resume
    # latest would load the older align/model instead of continuing from align/'s newest checkpoint
    stale = [checkpoints, align] if not inside else [checkpoints, aligned] if aligning else []
    stale = [p for p in stale if p.is_dir() and any(p.iterdir())]
    later = later_checkpoints(align if aligning else out, resumed) if inside and resumed is not None else []
    if stale or later:
        steps = [p.name for p in checkpoint_dirs(out)]
        held = ([f"checkpoints ({', '.join(steps) or 'unfinished ones'})"] if checkpoints in stale else []) + (
            ["alignment phase (align/)"] if align in stale else []) + (
            ["finished alignment (align/model), older than the alignment checkpoint this run resumes"]
            if aligned in stale else []) + (
            [f"checkpoints after the one this run resumes ({', '.join(p.name for p in later)})"] if later else [])
        aside = out / free_name(out, EARLIER_RUN)
        aside.mkdir()
        for p in stale + later:
            (aside / p.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(p, aside / p.relative_to(out))  # not os.replace: align/ may link to another disk
        last = aside / "checkpoints" / steps[-1] if checkpoints in stale and steps else (
            aside / later[-1].relative_to(out) if later else None)
        # a stage command's flag: the jobs (mmfusion main, captions) have no --resume
        again = (f"; to continue that run instead, stop this one and run its stage command (mmfusion "
                 f"pretrain-vit or train-vqa) with --resume {last}") if last else ""
        lines.append(f"note: {out} holds an earlier run's {' and '.join(held)}: moved to {aside} so that this "
                     "run's checkpoint rotation and --resume latest see only its own; delete it when no longer "
                     "needed" + again)
    fresh = not inside or aligning or (run.resume == "latest" and not checkpoint_dirs(out))
    if fresh and is_mmfusion_folder(out / "model"):
        lines.append(f"note: {out / 'model'} holds an earlier run's model; this run replaces it and metrics.json "
                     "when it ends (copy them elsewhere now to keep them)")
    return lines
