"""A run's folder: an --output-dir or --resume that cannot work is refused before any work and
before anything is written; `~` after `=` means the home folder everywhere; a fresh run into a
folder that holds an earlier run sets that run's checkpoints aside (and says so), so checkpoint
rotation and --resume latest see only its own."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from mmfusion.cli import main
from mmfusion.config import ConfigError
from mmfusion.training import pretrain_vit
from mmfusion.training.loop import save_checkpoint
from mmfusion.training.run_folder import (
    EARLIER_RUN,
    check_resume,
    checkpoint_dirs,
    find_resume,
    run_log_name,
    start_run_folder,
)
from mmfusion.training.setup import RunConfig

# A dataset that does not exist: a flag refused at parse time is named before the data is read.
NOWHERE = ["--dataset", "/nonexistent/mmfusion-test-data.jsonl"]
TINY = ["--image-size", "16", "--patch-size", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--batch-size", "4", "--warmup-steps", "0", "--no-progress", "--mixed-precision", "no", "--holdout", "0"]


def error_lines(capsys, args: list) -> list[str]:
    """Runs the CLI, expects exit code 2; its stderr lines (no traceback)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()


def one_line_error(capsys, args: list) -> str:
    lines = error_lines(capsys, args)
    assert len(lines) == 1 and lines[0].startswith("mmfusion: error: "), lines
    return lines[0]


def checkpoint(out: Path, step: int, progress: str | None = None) -> Path:
    """A stand-in checkpoint folder: what the run-folder checks look at (progress.json, and that
    the files accelerate loads are there)."""
    folder = out / "checkpoints" / f"step_{step}"
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl"):
        (folder / name).write_bytes(b"")
    if progress != "":
        (folder / "progress.json").write_text(progress or json.dumps({"step": step}))
    return folder


def two_colour_folder(data: Path) -> Path:
    """An image folder of two classes, 4 plain 16x16 images each."""
    for color in ("red", "blue"):
        (data / color).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), color).save(data / color / f"{i}.png")
    return data


class Printer(SimpleNamespace):
    """The parts of an Accelerator start_run_folder uses, printing into a list."""

    def __init__(self) -> None:
        super().__init__(is_main_process=True, log_with=[], lines=[])

    def print(self, line: str) -> None:
        self.lines.append(line)


# ---- --resume ----------------------------------------------------------------------------------

RESUME_CASES = {
    "missing": (["--resume", "{out}/checkpoints/step_9"], ["step_9 is not a complete checkpoint (it does not exist)",
                                                          "--resume latest"]),
    "incomplete": (["--resume", "{out}/checkpoints/step_1"], ["step_1 is not a complete checkpoint (no progress.json)"]),
    "a_file": (["--resume", "{out}/run_config.json"], ["run_config.json is not a complete checkpoint (not a folder)"]),
    "a_run_folder": (["--resume", "{out}"], ["is not a complete checkpoint (no progress.json); it is a run folder: "
                                             "resume its newest checkpoint with --resume {out}/checkpoints/step_4, or "
                                             "continue that run with --output-dir {out} --resume latest"]),
    "latest_past_max_steps": (["--resume", "latest", "--max-steps", "3"],
                              ["cannot resume from", "step_4", "gives step 4, not a step of this 3-step run"]),
    "progress_unreadable": (["--resume", "{out}/checkpoints/step_2"],
                            ["cannot resume from", "step_2", "is not valid JSON"]),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_a_resume_that_cannot_resume_is_refused_before_any_work_and_writes_nothing(tmp_path, capsys, case):
    """The refusal comes before the data is read (it does not even exist here) and leaves the
    earlier run's run_config.json as it was; into a new folder it creates nothing."""
    flags, fragments = RESUME_CASES[case]
    out = tmp_path / "run"
    checkpoint(out, 1, progress="")
    checkpoint(out, 2, progress="{")
    checkpoint(out, 4)
    (out / "run_config.json").write_text('{"earlier": "run"}\n')
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    flags = [f.format(out=out) for f in flags]
    for target in (out,) if "latest" in flags else (out, tmp_path / "new"):  # latest reads the target's own
        line = one_line_error(capsys, ["pretrain-vit", *NOWHERE, "--output-dir", target, *flags])
        assert all(f.format(out=out) in line for f in fragments) and "nonexistent" not in line, line
    assert (out / "run_config.json").read_text() == '{"earlier": "run"}\n'
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not (tmp_path / "new").exists()


def test_a_resume_from_another_runs_alignment_checkpoint_is_refused_before_any_work(tmp_path, capsys):
    """train-vqa resumes an alignment only in its own folder: elsewhere it skipped the alignment and
    the main phase loaded the checkpoint (with --freeze-gpt silently, from the alignment's step and
    optimizer state), or was refused as 'not a step of this N-step run'."""
    other = tmp_path / "other"
    (other / "run_config.json").parent.mkdir()
    (other / "run_config.json").write_text("{}\n")
    step = checkpoint(other / "align", 3)
    aside = checkpoint(tmp_path / "run" / EARLIER_RUN / "align", 2)  # an earlier run set aside is another run too
    for ckpt, run in ((step, other), (aside, tmp_path / "run" / EARLIER_RUN)):
        line = one_line_error(capsys, ["train-vqa", "--dataset", "/nonexistent/mmfusion-test-data.jsonl",
                                       "--output-dir", tmp_path / "new", "--max-steps", "10", "--resume", ckpt])
        assert f"is a checkpoint of the alignment phase of the run in {run}" in line, line
        assert f"pass --output-dir {run} to continue that run" in line and "nonexistent" not in line
    assert not (tmp_path / "new").exists()
    # a stage's own folder named align (it holds run_config.json) is no alignment phase
    (tmp_path / "align").mkdir()
    (tmp_path / "align" / "run_config.json").write_text("{}\n")
    own = checkpoint(tmp_path / "align", 1)
    check_resume(RunConfig(output_dir=str(tmp_path / "align"), resume=str(own), max_steps=2))


def test_an_alignment_checkpoint_under_a_symlinked_align_folder_counts_its_own_steps(tmp_path):
    """OUTPUT_DIR/align linked to another disk: train-vqa resumes the alignment from it
    (resumes_alignment resolves the link), so the parse-time check does not hold its step to --max-steps."""
    elsewhere = tmp_path / "disk" / "align"
    checkpoint(elsewhere, 5)
    out = tmp_path / "run"
    out.mkdir()
    (out / "align").symlink_to(elsewhere)
    check_resume(RunConfig(output_dir=str(out), resume=str(out / "align" / "checkpoints" / "step_5"), max_steps=2))


def test_resume_latest_without_a_checkpoint_still_starts_fresh(tmp_path, caplog):
    """As documented (README: newest complete, else fresh): a restart script may always pass it.
    The run says so once: the early check (check_resume) stays quiet, the loop warns."""
    from mmfusion.training.run_folder import check_resume

    _, run = pretrain_vit.parse(["--output-dir", str(tmp_path / "run"), "--resume", "latest"])
    check_resume(run)
    assert "starting fresh" not in caplog.text
    assert run.resume == "latest" and find_resume("latest", run.output_dir) is None
    assert caplog.text.count("--resume latest: no checkpoint in") == 1


# ---- empty values, ~, symbolic links --------------------------------------------------------------

def test_an_empty_output_dir_or_resume_is_refused(tmp_path, capsys, monkeypatch):
    """An unset shell variable (`--output-dir "$OUT"`) must not mean the current folder, nor
    `--resume "$CKPT"` a fresh start."""
    monkeypatch.chdir(tmp_path)
    for flag in ("--output-dir", "--resume", "--init-from", "--eval-dataset"):
        for args in ([flag, ""], [f"{flag}="]):
            lines = error_lines(capsys, ["pretrain-vit", *NOWHERE, "--output-dir", "out", *args])
            assert len(lines) == 1 and f"argument {flag}: empty value" in lines[0], lines
            assert "unset shell variable" in lines[0] and "leave the flag out" in lines[0], lines
    lines = error_lines(capsys, ["pretrain-vit", *NOWHERE, "--resume", " "])  # spaces: the flag's own check
    assert len(lines) == 1 and "argument --resume: empty" in lines[0] and "none" in lines[0], lines
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="--output-dir is empty"):
        RunConfig(output_dir="")
    with pytest.raises(ConfigError, match="--resume is empty"):
        RunConfig(resume=" ")


def test_a_tilde_after_equals_means_the_home_folder_everywhere(tmp_path, monkeypatch):
    """bash leaves `~` in `--output-dir=~/x` as it is: the checks and every write must use the same
    expanded path, never a literal ./~ folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    stage, run = pretrain_vit.parse(["--output-dir=~/runs/x"])
    assert run.output_dir == str(tmp_path / "home" / "runs" / "x")
    start_run_folder(Printer(), Path(run.output_dir), "pretrain_vit", stage=stage, run=run)
    assert (tmp_path / "home" / "runs" / "x" / "run_config.json").exists() and not (tmp_path / "~").exists()
    assert RunConfig(resume="~/ck").resume == str(tmp_path / "home" / "ck")


@pytest.mark.parametrize("link, fragment", [("dangling", "is a symbolic link to /nowhere/x, which does not exist"),
                                             ("dangling/sub", "is a symbolic link to /nowhere/x, which does not exist"),
                                             ("loop_a", "is a symbolic link loop"),
                                             ("loop_a/sub", "is a symbolic link loop")])
def test_a_broken_symbolic_link_as_output_dir_is_refused_before_any_work(tmp_path, capsys, link, fragment):
    (tmp_path / "dangling").symlink_to("/nowhere/x")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    line = one_line_error(capsys, ["pretrain-vit", *NOWHERE, "--output-dir", tmp_path / link])
    assert fragment in line and "--output-dir" in line and "nonexistent" not in line, line


# ---- a fresh run into a folder with an earlier run --------------------------------------------------

def test_a_fresh_run_sets_an_earlier_runs_checkpoints_aside_and_says_so(tmp_path):
    from mmfusion import ViT, ViTConfig

    out = tmp_path / "run"
    for step in (3, 4):
        checkpoint(out, step)
    (out / "align" / "model").mkdir(parents=True)
    ViT(ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=16)).save_pretrained(out / "model")
    printer = Printer()
    start_run_folder(printer, out, "pretrain_vit", run=RunConfig(output_dir=str(out)))
    aside = out / EARLIER_RUN
    assert checkpoint_dirs(out) == [] and not (out / "align").exists()
    assert [p.name for p in checkpoint_dirs(aside)] == ["step_3", "step_4"] and (aside / "align" / "model").is_dir()
    moved, model = printer.lines
    assert f"{out} holds an earlier run's checkpoints (step_3, step_4) and alignment phase (align/)" in moved
    assert f"moved to {aside}" in moved and f"--resume {aside / 'checkpoints' / 'step_4'}" in moved
    assert f"{out / 'model'} holds an earlier run's model; this run replaces it" in model

    assert "run its stage command (mmfusion pretrain-vit or train-vqa) with --resume" in moved  # not `main`'s

    checkpoint(out, 1)  # a second fresh run: the first set-aside stays, this one goes next to it
    printer = Printer()
    start_run_folder(printer, out, "pretrain_vit", run=RunConfig(output_dir=str(out)))
    second = out / f"{EARLIER_RUN}.2"
    assert [p.name for p in checkpoint_dirs(aside)] == ["step_3", "step_4"]
    assert [p.name for p in checkpoint_dirs(second)] == ["step_1"] and f"moved to {second}" in printer.lines[0]

    for resume in ("latest", str(second / "checkpoints" / "step_1")):  # continuing this folder's run moves nothing
        checkpoint(out, 1)
        printer = Printer()
        start_run_folder(printer, out, "pretrain_vit", run=RunConfig(output_dir=str(out), resume=resume))
        assert [p.name for p in checkpoint_dirs(out)] == ["step_1"] and not printer.lines, printer.lines
        shutil.rmtree(out / "checkpoints" / "step_1")

    (out / "checkpoints" / ".tmp_step_5").mkdir(parents=True)  # only a save cut short: moved too, no --resume to offer
    printer = Printer()
    start_run_folder(printer, out, "pretrain_vit", run=RunConfig(output_dir=str(out)))
    assert printer.lines[0].startswith(f"note: {out} holds an earlier run's checkpoints (unfinished ones): moved to")
    third = out / f"{EARLIER_RUN}.3"
    assert "--resume" not in printer.lines[0].split("see only")[1] and (third / "checkpoints" / ".tmp_step_5").is_dir()


def test_a_resume_inside_align_sets_the_older_finished_alignment_aside(tmp_path):
    """Kept, the older align/model was what --resume latest loaded once this resume was cut short,
    instead of continuing the alignment from its newest checkpoint (the slow run of it is in test_captions)."""
    from mmfusion import ViT, ViTConfig

    out = tmp_path / "run"
    checkpoint(out, 2)
    resumed = checkpoint(out / "align", 3)
    ViT(ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=16)).save_pretrained(out / "align" / "model")
    printer = Printer()
    start_run_folder(printer, out, "train_vqa", run=RunConfig(output_dir=str(out), resume=str(resumed)))
    aside = out / EARLIER_RUN
    assert (aside / "align" / "model" / "config.json").exists() and not (out / "align" / "model").exists()
    assert [p.name for p in checkpoint_dirs(aside)] == ["step_2"] and checkpoint_dirs(out) == []
    assert checkpoint_dirs(out / "align") == [resumed]  # the alignment's own checkpoints stay
    assert f"{out} holds an earlier run's checkpoints (step_2) and finished alignment (align/model)" in printer.lines[0]

    checkpoint(out, 2)  # again, now without an align/model: only the main phase's checkpoints move
    printer = Printer()
    start_run_folder(printer, out, "train_vqa", run=RunConfig(output_dir=str(out), resume=str(resumed)))
    assert not (out / f"{EARLIER_RUN}.2" / "align").exists() and "alignment" not in printer.lines[0]

    # --resume latest continues this folder's run: a finished align/model stays (train-vqa loads it)
    shutil.move(aside / "align" / "model", out / "align" / "model")
    printer = Printer()
    start_run_folder(printer, out, "train_vqa", run=RunConfig(output_dir=str(out), resume="latest"))
    assert (out / "align" / "model" / "config.json").exists() and not printer.lines, printer.lines


@pytest.mark.parametrize("where", ["", "align"])
def test_a_resume_from_an_earlier_step_sets_the_later_checkpoints_aside(tmp_path, where):
    """Left in place, they outranked this run's in rotation, were overwritten as it reached their steps,
    and --resume latest went back to them (an older branch) after this run was cut short."""
    out = tmp_path / "run"
    for step in (2, 3, 4):
        checkpoint(out / where, step)
    printer = Printer()
    resumed = out / where / "checkpoints" / "step_2"
    start_run_folder(printer, out, "train_vqa", run=RunConfig(output_dir=str(out), resume=str(resumed)))
    aside = out / EARLIER_RUN / where
    assert checkpoint_dirs(out / where) == [resumed] and [p.name for p in checkpoint_dirs(aside)] == ["step_3", "step_4"]
    assert "checkpoints after the one this run resumes (step_3, step_4): moved to" in printer.lines[0]
    assert f"--resume {aside / 'checkpoints' / 'step_4'}" in printer.lines[0]

    printer = Printer()  # from the newest, or with --resume latest: nothing to move
    for resume in (str(resumed), "latest"):
        start_run_folder(printer, out, "train_vqa", run=RunConfig(output_dir=str(out), resume=resume))
    assert not printer.lines and checkpoint_dirs(out / where) == [resumed]


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """A higher step in the folder (another run's) must not push this run's new checkpoint out."""
    from accelerate import Accelerator

    checkpoint(tmp_path, 9)
    save_checkpoint(Accelerator(cpu=True), tmp_path, 1, keep=1)
    save_checkpoint(Accelerator(cpu=True), tmp_path, 2, keep=1)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_2", "step_9"]


@pytest.mark.slow
def test_a_second_fresh_run_into_the_same_folder_keeps_and_resumes_its_own_checkpoints(tmp_path, capsys):
    """The reviewer's case: a 4-step run leaves step_3 and step_4; a fresh 2-step run into the same
    folder used to have its own step_1 and step_2 rotated away at once."""
    data = tmp_path / "data"
    for split in ("train", "test"):
        for color in ("red", "blue"):
            (data / split / color).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (16, 16), color).save(data / split / color / f"{i}.png")
    out = tmp_path / "run"
    args = ["pretrain-vit", "--dataset", str(data), "--output-dir", str(out), *TINY, "--save-every", "1"]
    assert main([*args, "--max-steps", "4"]) == 0
    assert [p.name for p in checkpoint_dirs(out)] == ["step_3", "step_4"]
    capsys.readouterr()
    assert main([*args, "--max-steps", "2", "--lr", "5e-4"]) == 0
    printed = capsys.readouterr().out
    assert "holds an earlier run's checkpoints (step_3, step_4)" in printed and "holds an earlier run's model" in printed
    assert [p.name for p in checkpoint_dirs(out)] == ["step_1", "step_2"]
    progress = json.loads((out / "checkpoints" / "step_2" / "progress.json").read_text())
    assert progress["step"] == 2 and progress["run"]["lr"] == 5e-4 and progress["run"]["max_steps"] == 2
    assert find_resume("latest", out) == out / "checkpoints" / "step_2"
    assert main([*args, "--max-steps", "3", "--resume", "latest"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and [p.name for p in checkpoint_dirs(out)] == ["step_2", "step_3"]
    # this resume left out --lr 5e-4 and raised --max-steps: both named, since neither continues the run exactly
    assert "settings differ from the checkpoint's run (max_steps 2 -> 3, lr 0.0005 -> 0.002;" in printed
    assert "the checkpoint's values of" not in printed  # the schedule takes both; only AdamW's own settings stay
    assert main([*args, "--max-steps", "4", "--resume", "latest", "--weight-decay", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "weight_decay 0.05 -> 0.1" in printed and "the checkpoint's values of weight_decay stay" in printed
    assert "records no run settings" not in printed
    older = out / "checkpoints" / "step_4" / "progress.json"  # as checkpoints were written before they held settings
    older.write_text(json.dumps({"step": 4}))
    assert main([*args, "--max-steps", "5", "--resume", "latest"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "records no run settings" in printed and "settings differ" not in printed
    # each of the five runs logged into a folder of its own, so TensorBoard shows five runs
    runs = {p.parent for p in (out / "logs" / "pretrain_vit").rglob("events.out.tfevents.*")}
    assert len(runs) == 5 and all(p.parent == out / "logs" / "pretrain_vit" for p in runs), runs


def test_a_resume_names_the_schedule_settings_that_changed():
    from mmfusion.training.loop import changed_settings, schedule_settings

    saved = schedule_settings(RunConfig(lr=1e-3, min_lr_ratio=0.05, max_steps=100))
    assert changed_settings(saved, RunConfig(lr=1e-3, min_lr_ratio=0.05, max_steps=100)) == []
    assert changed_settings(saved, RunConfig(lr=1e-3, min_lr_ratio=0.0, max_steps=100)) == ["min_lr_ratio 0.05 -> 0.0"]
    assert changed_settings(saved, RunConfig(lr=1e-3, min_lr_ratio=0.05, max_steps=100, epochs=9)) == []  # steps count
    assert changed_settings(schedule_settings(RunConfig(epochs=3)), RunConfig(epochs=4)) == ["epochs 3 -> 4"]
    assert changed_settings(None, RunConfig()) == []  # a checkpoint from before settings were saved


def test_runs_started_in_the_same_second_log_into_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr("time.strftime", lambda fmt: "2026-12-01_23-59-59")
    first = run_log_name(tmp_path)
    (tmp_path / first).mkdir()
    second = run_log_name(tmp_path)
    (tmp_path / second).mkdir()
    assert (first, second, run_log_name(tmp_path)) == ("2026-12-01_23-59-59", "2026-12-01_23-59-59.2",
                                                       "2026-12-01_23-59-59.3")


def test_a_resume_with_other_model_settings_is_refused_before_the_folder_is_touched(tmp_path, capsys):
    """Weights of the same shapes loaded into a model built with other flags (the reviewer's
    `--attention prefix --adapter-layer 1`) resumed silently as another model; a refused resume
    still rewrote run_config.json and started a log folder."""
    data = two_colour_folder(tmp_path / "data")
    out = tmp_path / "run"
    args = ["pretrain-vit", "--dataset", str(data), "--output-dir", str(out), *TINY, "--save-every", "1"]
    assert main([*args, "--max-steps", "1"]) == 0
    progress = json.loads((out / "checkpoints" / "step_1" / "progress.json").read_text())
    assert progress["model"]["kind"] == "ViTConfig" and progress["model"]["config"]["n_embd"] == 16
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    line = error_lines(capsys, [*args, "--max-steps", "2", "--resume", "latest", "--dropout", "0.1"])[-1]
    assert "its model was built with other settings (dropout 0.0 -> 0.1)" in line and "--resume" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written, nothing added
    assert main([*args, "--max-steps", "2", "--resume", "latest"]) == 0  # the same flags resume


def test_a_resume_into_a_run_of_the_other_stage_is_refused_before_the_folder_is_touched(small_scenes, parts, tmp_path,
                                                                                      capsys, monkeypatch):
    from mmfusion.config import ViTConfig
    from mmfusion.training import train_vqa
    from mmfusion.training.run_folder import check_resume_model, model_record

    def too_early(*args, **kwargs):
        raise AssertionError("the run was set up (precision, accelerator) before the resume was checked")

    monkeypatch.setattr(train_vqa, "choose_precision", too_early)
    vit = ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=16, num_classes=2)
    out = tmp_path / "run"
    checkpoint(out, 3, json.dumps({"step": 3, "model": model_record(vit)}))
    (out / "run_config.json").write_text("{}")
    line = error_lines(capsys, ["train-vqa", "--dataset", "scenes", "--vit", parts[0], "--gpt", parts[1],
                                "--output-dir", out, "--resume", "latest", "--max-steps", "5", "--no-progress"])[-1]
    assert "it holds a ViT training run, this run trains a VLM" in line, line
    assert (out / "run_config.json").read_text() == "{}" and not (out / "logs").exists()
    assert check_resume_model(RunConfig(output_dir=str(out), resume="latest"), vit) == []  # its own kind and settings


def test_a_run_that_would_save_over_the_model_it_starts_from_is_refused(tmp_path, capsys):
    """`--vit runs/vit/model --output-dir runs/vit` replaced the pretrained ViT with the VLM at the
    end of the run, with only a note; refused at parse time now, and in run() too."""
    from mmfusion import ViT
    from mmfusion.config import ViTConfig
    from mmfusion.training import train_vqa

    vit = tmp_path / "vit" / "model"
    ViT(ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=16, num_classes=2)).save_pretrained(vit)
    saved = (vit / "model.safetensors").read_bytes()
    for args in (["train-vqa", *NOWHERE, "--vit", vit, "--output-dir", tmp_path / "vit"],
                 ["train-vqa", *NOWHERE, "--vit", "vit-tiny", "--gpt", f"{tmp_path}/./vit/model", "--output-dir",
                  tmp_path / "vit"],
                 ["pretrain-vit", *NOWHERE, "--init-from", vit, "--output-dir", tmp_path / "vit"]):
        line = one_line_error(capsys, args)
        assert "is the model this run would save as" in line and "pass another --output-dir" in line, line
    stage, run = train_vqa.parse([*NOWHERE, "--vit", str(vit), "--output-dir", str(tmp_path / "elsewhere")])
    with pytest.raises(ConfigError, match="replacing the model it starts from"):
        start_run_folder(Printer(), tmp_path / "vit", "train_vqa", run=dataclasses.replace(run, output_dir=str(tmp_path / "vit")),
                         stage=stage)
    assert (vit / "model.safetensors").read_bytes() == saved and not (tmp_path / "vit" / "run_config.json").exists()


def test_a_run_folder_that_holds_or_sits_in_its_data_is_refused(tmp_path, capsys):
    """`--dataset runs/x/predictions.jsonl --output-dir runs/x` replaced the training data with the
    run's predictions, exit code 0; an output folder inside a folder dataset left the run's JSON
    files to be read as data by the next run. Refused at parse time, and in run() too."""
    from mmfusion.training import train_vqa

    folder = tmp_path / "data"
    folder.mkdir()
    rows = folder / "predictions.jsonl"
    rows.write_text('{"image": "img.png", "question": "q?", "answers": ["a"]}\n')
    for args, message in (
            (["train-vqa", "--dataset", rows, "--output-dir", folder], "--dataset {0}/predictions.jsonl is inside"),
            (["train-vqa", "--dataset", "easy-vqa", "--eval-dataset", f"{folder}/../data", "--output-dir", folder],
             "--eval-dataset {0}/../data is --output-dir"),
            (["train-vqa", "--dataset", folder, "--output-dir", folder / "run"], "--output-dir {0}/run is inside the "
                                                                                  "--dataset folder"),
            (["pretrain-vit", "--dataset", folder, "--output-dir", folder], "--dataset {0} is --output-dir")):
        line = one_line_error(capsys, args)
        assert message.format(folder) in line, line
    assert sorted(p.name for p in folder.iterdir()) == ["predictions.jsonl"]
    stage, run = train_vqa.parse(["--dataset", str(rows), "--output-dir", str(tmp_path / "elsewhere")])
    with pytest.raises(ConfigError, match="is inside --output-dir"):
        start_run_folder(Printer(), folder, "train_vqa", run=dataclasses.replace(run, output_dir=str(folder)),
                         stage=stage)
    assert sorted(p.name for p in folder.iterdir()) == ["predictions.jsonl"]


def test_a_resume_ignores_fresh_init_settings_and_names_data_decided_ones():
    """A fresh model's starting weights (--gpt-init-std, the ViT's init) change nothing once the
    checkpoint's weights load, so a changed default must not refuse old runs; the class names
    come from the data, no flag sets them."""
    from mmfusion.config import ViTConfig
    from mmfusion.errors import CheckpointError
    from mmfusion.training.run_folder import compare_models, model_record

    vit = ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=16, num_classes=2, class_names=("a", "b"))
    saved = model_record(vit)
    assert compare_models(saved, vit.replace(patch_init_std=0.02, attention_init="normal"), "x") == []
    notes = compare_models(saved, vit.replace(class_names=("a", "c")), "x")
    assert len(notes) == 1
    assert "the class names (from the training data): ['a', 'b'] in the checkpoint, ['a', 'c'] now" in notes[0]
    with pytest.raises(CheckpointError, match=r"x: its model was built with other settings \(dropout 0.0 -> 0.1\)"):
        compare_models(saved, vit.replace(dropout=0.1), "x")


@pytest.mark.parametrize("progress", ["[3]", '"step 3"', "3"], ids=["list", "string", "number"])
def test_a_stage_run_without_its_parse_names_a_progress_json_that_is_not_an_object(tmp_path, progress):
    """run() may be called without parse() (start_run_folder checks the paths again): the resume's
    model check, moved ahead of start_run_folder, read progress.json with .get and stopped on an
    AttributeError ('list' object has no attribute 'get') instead of the CheckpointError naming it."""
    from mmfusion.errors import CheckpointError

    data = two_colour_folder(tmp_path / "data")
    out = tmp_path / "run"
    stage, run = pretrain_vit.parse(["--dataset", str(data), "--output-dir", str(out), *TINY, "--max-steps", "1"])
    checkpoint(out, 3, progress)
    with pytest.raises(CheckpointError, match=r"cannot resume from .*step_3.*progress\.json gives step None"):
        pretrain_vit.run(stage, dataclasses.replace(run, resume="latest"))
    assert not (out / "logs").exists()


def test_a_checkpoint_folder_named_with_other_digits_is_no_checkpoint(tmp_path):
    """str.isdigit takes '²' and '١٢', which int() refuses: --resume latest was a traceback."""
    from mmfusion.training.run_folder import checkpoint_dirs, checkpoint_step

    for name in ("step_²", "step_١٢", "step_", "step_-1", "step_1.0"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "progress.json").write_text('{"step": 1}')
        assert checkpoint_step(tmp_path / "checkpoints" / name) is None
    checkpoint(tmp_path, 3)
    assert checkpoint_dirs(tmp_path) == [tmp_path / "checkpoints" / "step_3"]


@pytest.mark.parametrize("command, part", [("pretrain-vit", "model"), ("pretrain-vit", "checkpoints"),
                                           ("train-vqa", "logs/train_vqa"), ("main", "vqa"), ("main", "vit/model"),
                                           ("captions", "checkpoints"), ("captions", "vit")])
def test_a_file_where_the_run_writes_a_folder_is_refused_before_any_work(command, part, tmp_path, capsys):
    """OUTPUT_DIR/model as a file failed only when the model was saved, after training; main's
    OUTPUT_DIR/vqa only after all of stage 1."""
    out = tmp_path / "run"
    (out / part).parent.mkdir(parents=True, exist_ok=True)
    (out / part).write_text("a file\n")
    flags = [*NOWHERE, "--vit", "vit-tiny"] if command == "train-vqa" else NOWHERE if command == "pretrain-vit" else []
    line = one_line_error(capsys, [command, *flags, "--output-dir", out])
    assert f"{out / part} is a file, where the run writes its {part}/ folder" in line, line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(
        [Path(part), *Path(part).parents][:-1])  # nothing written
