"""What eval and export write, and what eval reads next to the model: an output never overwrites
the data or the model it comes from, and the model's run record is read wherever the command runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion import GPT, VLM, VLMConfig
from mmfusion.cli import main
from mmfusion.config import AdapterConfig, GPTConfig, ViTConfig
from mmfusion.export_folder import MARKER

TINY_GPT = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)
FAST = ["--max-new-tokens", "1", "--caption-max-new-tokens", "1", "--batch-size", "8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder as train-vqa leaves it, trained (by its record) from the folder above it:
    root/qa.jsonl, root/run/model, root/run/run_config.json."""
    torch.manual_seed(0)
    config = VLMConfig(vit=ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=0),
                       gpt=TINY_GPT, adapter=AdapterConfig())
    root = tmp_path_factory.mktemp("cli_outputs")
    VLM(config).save_pretrained(root / "run" / "model")
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(root / "img.png")
    write_rows(root / "qa.jsonl", 3)
    return root


def write_rows(path: Path, good: int, bad: int = 0) -> None:
    rows = [{"image": "img.png", "question": f"q{i}?", "answers": ["yes"]} for i in range(good)]
    rows += [{"image": f"missing{i}.png", "question": "q?", "answers": ["no"]} for i in range(bad)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def record(run: Path, dataset, **extra) -> None:
    """The run's run_config.json as the training stages write it (the parts eval reads)."""
    data = {"stage": {"dataset": dataset, "train_split": "train"}, "run": {"output_dir": "run"}, **extra}
    (run / "run" / "run_config.json").write_text(json.dumps(data))


def evaluate(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *map(str, args), *FAST])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mmfusion: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# --- eval --output -------------------------------------------------------------------------------------------


def test_eval_refuses_to_write_over_the_dataset_it_reads(run, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    write_rows(data, 3)
    (tmp_path / "img.png").symlink_to(run / "img.png")
    before = data.read_bytes()
    for output in (data, tmp_path / "." / "qa.jsonl"):
        code, _, err = evaluate(capsys, "--model", run / "run" / "model", "--dataset", data, "--output", output)
        assert "is the --dataset" in one_error_line(code, err) and "pass another path" in err
    assert data.read_bytes() == before


def test_eval_refuses_to_write_into_the_model_folder(run, tmp_path, capsys):
    model = Path(shutil.copytree(run / "run" / "model", tmp_path / "model"))  # a copy: the others need theirs
    before = (model / "config.json").read_bytes()
    for output in (model / "preds.jsonl", model / "sub" / "preds.jsonl"):
        code, _, err = evaluate(capsys, "--model", model, "--dataset", run / "qa.jsonl", "--output", output)
        assert "is inside the --model folder" in one_error_line(code, err)
    code, _, err = evaluate(capsys, "--model", model, "--dataset", run / "qa.jsonl", "--output", model / "config.json")
    assert "ending in .jsonl" in one_error_line(code, err)
    assert (model / "config.json").read_bytes() == before and not (model / "preds.jsonl").exists()
    VLM.from_pretrained(model)  # still loads


def test_eval_default_output_goes_next_to_the_model_even_from_inside_it(run, capsys, monkeypatch):
    monkeypatch.chdir(run / "run" / "model")
    code, out, err = evaluate(capsys, "--model", ".", "--dataset", run / "qa.jsonl", "--split", "other")
    assert code == 0, err
    written = run / "run" / "predictions_other.jsonl"
    assert written.exists() and not (run / "run" / "model" / "predictions_other.jsonl").exists()
    assert f"predictions written to {written}" in out


def test_eval_output_must_name_a_jsonl_file(run, tmp_path, capsys, monkeypatch):
    """A folder has no file name (`--output .` was a traceback); any other suffix may be a file eval
    reads: `--output img.png` replaced the dataset's image with predictions."""
    monkeypatch.chdir(run)
    image = (run / "img.png").read_bytes()
    for output, message in ((".", "names a folder"), ("..", "names a folder"), ("run", "names a folder"),
                            (f"{tmp_path}/new/", "names a folder"), ("img.png", "ending in .jsonl"),
                            ("preds.txt", "ending in .jsonl")):
        code, _, err = evaluate(capsys, "--model", "run/model", "--dataset", "qa.jsonl", "--output", output)
        assert message in one_error_line(code, err), err
    assert (run / "img.png").read_bytes() == image and not (tmp_path / "new").exists()
    assert not list(run.glob("*.jsonl.*")) and not (run / "preds.txt").exists()


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links on this OS")
def test_eval_output_writes_through_a_symbolic_link(run, tmp_path, capsys):
    """As `>` in a shell: the link stays and its target gets the predictions (the link itself was
    replaced by a file). A dangling link's target is created; a link loop is refused."""
    model, data = run / "run" / "model", run / "qa.jsonl"
    (tmp_path / "kept.jsonl").write_text("old\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "kept.jsonl")
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "made" / "target.jsonl")
    for link, target in (("link.jsonl", "kept.jsonl"), ("dangling.jsonl", "made/target.jsonl")):
        code, _, err = evaluate(capsys, "--model", model, "--dataset", data, "--output", tmp_path / link)
        assert code == 0, err
        assert (tmp_path / link).is_symlink()
        rows = [json.loads(line) for line in (tmp_path / target).read_text().splitlines()]
        assert len(rows) == 3 and all("prediction" in r for r in rows)
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    code, _, err = evaluate(capsys, "--model", model, "--dataset", data, "--output", tmp_path / "loop.jsonl")
    assert "is a symbolic link loop" in one_error_line(code, err)
    assert (tmp_path / "loop.jsonl").is_symlink()


# --- eval --max-bad-fraction -----------------------------------------------------------------------------------


def test_eval_takes_the_max_bad_fraction_its_data_error_names(run, capsys):
    data = run / "some_bad.jsonl"
    write_rows(data, 3, bad=1)
    out = run / "bad_preds.jsonl"
    code, _, err = evaluate(capsys, "--model", run / "run" / "model", "--dataset", data, "--output", out)
    assert "raise the limit with --max-bad-fraction" in one_error_line(code, err)
    code, stdout, err = evaluate(capsys, "--model", run / "run" / "model", "--dataset", data, "--output", out,
                                 "--max-bad-fraction", "0.5")
    assert code == 0 and "kept 3 of 4 rows" in stdout, err
    code, _, err = evaluate(capsys, "--model", run / "run" / "model", "--dataset", data, "--output", out,
                            "--max-bad-fraction", "1.5")
    assert "--max-bad-fraction must be in [0, 1], got 1.5" in one_error_line(code, err)


def test_a_data_error_is_said_once(run, capsys, caplog):
    """The bad-row report was logged as a WARNING, then repeated in the error; where the rows
    pass, the warning is all there is."""
    data = run / "some_bad.jsonl"
    write_rows(data, 3, bad=1)
    for limit, code_wanted in (("0.01", 2), ("0.5", 0)):
        caplog.clear()
        code, _, err = evaluate(capsys, "--model", run / "run" / "model", "--dataset", data, "--output",
                                run / "bad_preds.jsonl", "--max-bad-fraction", limit)
        warned = [r for r in caplog.records if "skipped 1" in r.getMessage()]
        assert code == code_wanted and len(warned) == (0 if code else 1), (err, caplog.text)


# --- eval's "trained on these rows" warning ---------------------------------------------------------------------


@pytest.mark.parametrize("dataset", [123, None, ["qa.jsonl"], {"path": "qa.jsonl"}, ""])
def test_a_run_record_with_a_dataset_that_is_not_a_path_says_nothing(run, tmp_path, capsys, dataset):
    record(run, dataset)
    code, out, err = evaluate(capsys, "--model", run / "run" / "model", "--dataset", run / "qa.jsonl",
                              "--output", tmp_path / "p.jsonl")
    assert code == 0 and "Traceback" not in err and "WARNING" not in out, err


def test_training_rows_warning_with_model_dot(run, tmp_path, capsys, monkeypatch):
    record(run, str(run / "qa.jsonl"))
    monkeypatch.chdir(run / "run" / "model")
    code, out, err = evaluate(capsys, "--model", ".", "--dataset", run / "qa.jsonl", "--output", tmp_path / "p.jsonl")
    assert code == 0 and "WARNING: . was trained on" in out, err


@pytest.mark.parametrize("cwd, model, dataset", [
    (".", "run/model", "qa.jsonl"),  # where it was trained from
    ("run", "model", "../qa.jsonl"),  # another folder, another spelling
    ("run/model", ".", "../../qa.jsonl"),
    ("elsewhere", "../run/model", "{root}/qa.jsonl"),
])
def test_training_rows_warning_finds_a_relative_dataset_from_any_folder(run, tmp_path, capsys, monkeypatch,
                                                                         cwd, model, dataset):
    record(run, "qa.jsonl")  # as typed at training time, in `run`'s parent (its output_dir was "run")
    (run / "elsewhere").mkdir(exist_ok=True)
    monkeypatch.chdir(run / cwd)
    code, out, err = evaluate(capsys, "--model", model, "--dataset", dataset.format(root=run),
                              "--output", tmp_path / "p.jsonl")
    assert code == 0 and f"WARNING: {model} was trained on qa.jsonl [train]" in out, err


def test_training_rows_warning_uses_a_recorded_working_directory(run, tmp_path, capsys, monkeypatch):
    other = tmp_path / "data"
    other.mkdir()
    write_rows(other / "qa.jsonl", 3)
    (other / "img.png").symlink_to(run / "img.png")
    model = run / "run" / "model"
    record(run, "qa.jsonl", cwd=str(other))
    monkeypatch.chdir(run)  # holds a qa.jsonl too, which the record does not mean
    code, out, err = evaluate(capsys, "--model", model, "--dataset", other / "qa.jsonl", "--output", tmp_path / "p.jsonl")
    assert code == 0 and "WARNING" in out, err
    code, out, err = evaluate(capsys, "--model", model, "--dataset", "qa.jsonl", "--output", tmp_path / "p.jsonl")
    assert code == 0 and "WARNING" not in out, err


def test_no_training_rows_warning_for_other_data(run, tmp_path, capsys, monkeypatch):
    record(run, "qa.jsonl")
    other = tmp_path / "qa.jsonl"  # the same name in another folder
    write_rows(other, 2)
    (tmp_path / "img.png").symlink_to(run / "img.png")
    monkeypatch.chdir(tmp_path)
    code, out, err = evaluate(capsys, "--model", run / "run" / "model", "--dataset", "qa.jsonl",
                              "--output", tmp_path / "p.jsonl")
    assert code == 0 and "WARNING" not in out, err


# --- export --output ---------------------------------------------------------------------------------------------


@pytest.fixture
def gpt_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    GPT(TINY_GPT).save_pretrained(tmp_path / "gpt")
    return tmp_path / "gpt"


def export(capsys, model, output) -> tuple[int, str]:
    code = main(["export", "--model", str(model), "--output", str(output)])
    return code, capsys.readouterr().err


def test_export_refuses_to_write_over_its_own_model(gpt_folder, capsys):
    before = {p.name: p.read_bytes() for p in gpt_folder.iterdir()}
    for output in (gpt_folder, f"{gpt_folder}/", gpt_folder / ".." / "gpt"):
        code, err = export(capsys, gpt_folder, output)
        assert "is the --model folder" in one_error_line(code, err) and "choose another folder" in err
    assert {p.name: p.read_bytes() for p in gpt_folder.iterdir()} == before


def test_export_refuses_a_folder_holding_another_mmfusion_model(run, gpt_folder, tmp_path, capsys):
    weights_only = tmp_path / "weights_only"  # a model whose config.json is lost: its weights still count
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes((gpt_folder / "model.safetensors").read_bytes())
    vlm = Path(shutil.copytree(run / "run" / "model", tmp_path / "vlm"))
    for target in (vlm, weights_only):
        before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
        code, err = export(capsys, gpt_folder, target)
        assert "holds a saved mmfusion model" in one_error_line(code, err) and "choose another folder" in err
        assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    VLM.from_pretrained(vlm)


def test_export_may_replace_an_earlier_export(gpt_folder, tmp_path, capsys):
    for _ in range(2):
        code, err = export(capsys, gpt_folder, tmp_path / "hf")
        assert code == 0, err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt2"
    assert os.listdir(gpt_folder) and GPT.from_pretrained(gpt_folder)


def test_an_empty_output_is_refused_not_taken_for_the_current_folder(gpt_folder, tmp_path, capsys, monkeypatch):
    """`--output ""` (an unset shell variable) exported into the current folder."""
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    for command in (["export", "--model", str(gpt_folder), "--output", ""],
                    ["export", "--model", str(gpt_folder), "--output="],
                    ["eval", "--model", "", "--dataset", "qa.jsonl"]):
        with pytest.raises(SystemExit) as stop:
            main(command)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert "empty value" in err and "leave the flag out" in err, err
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_export_does_not_block_on_a_fifo_marker(gpt_folder, tmp_path, capsys):
    """The earlier export's list was read with read_text: a FIFO under its name blocked forever."""
    import threading

    folder = tmp_path / "hf"
    folder.mkdir()
    os.mkfifo(folder / MARKER)
    codes = []
    worker = threading.Thread(target=lambda: codes.append(export(capsys, gpt_folder, folder)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert codes and codes[0][0] == 0, "blocked on the FIFO, or failed"
    assert json.loads((folder / MARKER).read_text())["entries"] and (folder / MARKER).is_file()


def test_a_folder_that_is_no_saved_model_says_what_it_is_and_where_the_model_is(run, gpt_folder, tmp_path, capsys):
    """A run folder, a checkpoint and an export got "config.json is missing; was this folder
    written by save_pretrained?" (or transformers' "Should have a `model_type` key")."""
    checkpoint = run / "run" / "checkpoints" / "step_1"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "progress.json").write_text('{"step": 1}')
    code, err = export(capsys, gpt_folder, tmp_path / "hf")
    assert code == 0, err
    for folder, said in ((run / "run", f"is a training run's folder; its model is {run / 'run' / 'model'}"),
                         (checkpoint, f"is a training checkpoint (continue its run with --resume {checkpoint})"),
                         (tmp_path / "hf", "config.json is a transformers config (model_type 'gpt2')")):
        code, _, err = evaluate(capsys, "--model", folder, "--dataset", run / "qa.jsonl", "--output",
                                tmp_path / "p.jsonl")
        assert said in one_error_line(code, err), err
    for flags in (["--vit", str(run / "run")], ["--vit", "vit-tiny", "--gpt", str(run / "run")]):
        code = main(["train-vqa", *flags, "--dataset", str(run / "qa.jsonl"), "--holdout", "0", "--batch-size", "2",
                     "--output-dir", str(tmp_path / "o"),
                     "--no-progress"])
        err = capsys.readouterr().err
        assert f"no config.json there; {run / 'run'} is a training run's folder" in one_error_line(code, err), err
