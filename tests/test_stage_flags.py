"""Flags a stage would silently ignore are refused at parse time, before any work."""

from __future__ import annotations

import pytest

from mmfusion.config import ConfigError
from mmfusion.training import pretrain_vit


@pytest.mark.parametrize("flags, named", [(["--n-layer", "3"], "--n-layer"), (["--image-size", "32"], "--image-size"),
                                          (["--preset", "vit-small-patch16-224"], "--n-embd"),
                                          (["--attention-init", "normal"], "--attention-init")])
def test_init_from_refuses_architecture_flags_it_would_ignore(flags, named, tmp_path):
    with pytest.raises(ConfigError, match=f"--init-from brings its own architecture, so .*{named}"):
        pretrain_vit.parse(["--init-from", "vit-tiny", "--output-dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_init_from_alone_and_size_flags_alone_parse(tmp_path):
    stage, _ = pretrain_vit.parse(["--init-from", "vit-tiny", "--output-dir", str(tmp_path / "a")])
    assert stage.init_from == "vit-tiny" and stage.vit == pretrain_vit.DEFAULT_VIT
    stage, _ = pretrain_vit.parse(["--n-layer", "3", "--output-dir", str(tmp_path / "b")])
    assert stage.vit.n_layer == 3 and stage.init_from is None


@pytest.mark.parametrize("flags, fix", [
    (["--lora-alpha", "16"], "add --lora-rank R"), (["--lora-targets", "qkv"], "add --lora-rank R"),
    (["--cross-every", "2"], "add --fusion cross"), (["--lr-vit", "1e-3"], "add --no-freeze-vit"),
    (["--lr-adapter", "1e-3", "--freeze-adapter"], "drop --freeze-adapter or add --align-epochs"),
    (["--lr-gpt", "1e-3", "--freeze-gpt"], "drop --freeze-gpt or add --lora-rank R")])
def test_train_vqa_refuses_flags_its_configuration_would_ignore(flags, fix):
    from mmfusion.training import train_vqa

    with pytest.raises(ConfigError, match=f"{flags[0]} would be ignored here \\(.*{fix}"):
        train_vqa.parse(["--vit", "vit-tiny", *flags])


@pytest.mark.parametrize("flags", [["--lora-rank", "4", "--lora-alpha", "16", "--lora-targets", "qkv"],
                                   ["--fusion", "cross", "--cross-every", "2"], ["--no-freeze-vit", "--lr-vit", "1e-3"],
                                   ["--freeze-adapter", "--align-epochs", "1", "--lr-adapter", "1e-3"],
                                   ["--freeze-gpt", "--lora-rank", "4", "--lr-gpt", "1e-3"]])
def test_the_same_flags_parse_where_they_apply(flags):
    from mmfusion.training import train_vqa

    stage, _ = train_vqa.parse(["--vit", "vit-tiny", *flags])
    assert stage.vit == "vit-tiny"


@pytest.mark.parametrize("job", ["main", "captions"])
def test_the_jobs_refuse_an_empty_output_dir_and_expand_a_tilde(job, tmp_path, monkeypatch):
    import importlib
    import os

    parse = importlib.import_module(f"mmfusion.training.{job}").parse
    with pytest.raises(ConfigError, match="--output-dir is empty"):
        parse(["--output-dir", " "])
    with pytest.raises(SystemExit):  # '' is refused by the parser, as for every flag
        parse(["--output-dir", ""])
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse(["--output-dir=~/runs"]).output_dir == os.path.join(str(tmp_path), "runs")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(ConfigError, match="dangling is a symbolic link to .*nowhere, which does not exist"):
        parse(["--output-dir", str(tmp_path / "dangling")])


@pytest.mark.parametrize("stage", ["pretrain_vit", "train_vqa"])
def test_help_states_each_default_once(stage, capsys):
    import importlib
    import re

    with pytest.raises(SystemExit):
        importlib.import_module(f"mmfusion.training.{stage}").parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: --lr)" in text or stage == "pretrain_vit"
    assert not re.search(r"\(default: [^()]*(\([^()]*\))?[^()]*\) \(default:", text)


@pytest.mark.parametrize("stage", ["pretrain-vit", "train-vqa"])
def test_no_progress_hides_the_data_bars_too_and_restores_them(stage, tmp_path, capsys):
    """--no-progress hid the loop's bar, not `datasets`' (generating, checking rows, casting)."""
    import json

    import datasets
    from PIL import Image

    from mmfusion.cli import main

    for i, color in enumerate([(255, 0, 0), (0, 0, 255)] * 4):
        Image.new("RGB", (16, 16), color).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "question": "color?", "answers": ["red" if i % 2 == 0 else "blue"],
             "label": "red" if i % 2 == 0 else "blue"} for i in range(8)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = [stage, "--dataset", str(data), "--holdout", "0", "--max-steps", "1", "--batch-size", "4",
             "--mixed-precision", "no", "--output-dir", str(tmp_path / "out")]
    flags += ["--vit", "vit-tiny"] if stage == "train-vqa" else ["--label-column", "label", "--image-size", "16",
                                                                 "--patch-size", "8"]
    assert datasets.is_progress_bar_enabled()
    assert main([*flags, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not any(bar in err for bar in ("Generating", "checking rows", "Casting", "it/s")), err
    assert datasets.is_progress_bar_enabled()  # as it was


@pytest.mark.parametrize("argv", [["captions", "--output-dir", "{out}", "--", "--output-d", "{out}/other"],
                                  ["captions", "--output-dir", "{out}", "--", "--see", "5"],
                                  ["train-vqa", "--output-d", "{out}"], ["pretrain-vit", "--max-st", "1"]])
def test_an_abbreviated_flag_is_refused_not_taken_for_another(argv, tmp_path, capsys):
    """argparse took `--output-d` for --output-dir: after the captions job's `--` it slipped past
    the guard on the job's own flags (stage 2 wrote elsewhere, the job then failed reading its
    captions.jsonl); `--see` gave the two stages different seeds."""
    from mmfusion.cli import main

    with pytest.raises(SystemExit) as stop:
        main([a.format(out=tmp_path / "out") for a in argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "unrecognized arguments: --" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
