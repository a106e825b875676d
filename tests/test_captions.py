"""Caption training as a stage-2 option: captions mixed with questions, the adapter-only
alignment phase, resume across phases, caption evaluation in the stage and in `mmfusion eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed

from mmfusion.cli import main as cli_main
from mmfusion.data import scenes
from mmfusion.data.scenes import question_template
from mmfusion.errors import CheckpointError
from mmfusion.evaluation import format_template_table, score_by_template
from mmfusion.training import train_vqa
from mmfusion.vit import ViT
from mmfusion.vlm import VLM


def _args(out, vit, gpt, *extra):
    return ["--dataset", "scenes", "--vit", vit, "--gpt", gpt, "--output-dir", str(out), "--batch-size", "8",
            "--warmup-steps", "0", "--no-progress", "--eval-batch-size", "16", "--caption-max-new-tokens", "6",
            "--max-new-tokens", "3", *extra]


def _state(model, prefix):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


@pytest.mark.slow
def test_alignment_trains_only_the_adapter_then_the_rest(small_scenes, parts, tmp_path):
    vit, gpt = parts
    out = tmp_path / "run"
    argv = _args(out, vit, gpt, "--task", "both", "--no-freeze-vit", "--align-epochs", "1", "--max-steps", "2",
                 "--lr", "1e-3")
    stage, run_cfg = train_vqa.parse(argv)
    set_seed(run_cfg.seed)  # the stage builds its model right after seeding, so this is its start
    start = train_vqa.build_vlm(stage)
    metrics = train_vqa.run(stage, run_cfg)

    aligned = VLM.from_pretrained(out / "align" / "model")
    final = VLM.from_pretrained(out / "model")
    for prefix in ("vit.", "gpt."):
        a, s = _state(aligned, prefix), _state(start, prefix)
        assert all(torch.equal(a[k], s[k]) for k in s), f"alignment changed {prefix}"
    changed = [k for k, v in _state(aligned, "adapter.").items() if not torch.equal(v, start.state_dict()[k])]
    assert len(changed) == len(_state(start, "adapter.")), "alignment left adapter weights untouched"
    # the main phase trains everything the freeze flags leave open (here: all of it)
    for prefix in ("vit.", "adapter.", "gpt."):
        f, a = _state(final, prefix), _state(aligned, prefix)
        assert any(not torch.equal(f[k], a[k]) for k in a), f"main phase did not train {prefix}"

    assert metrics["count"] == 4 * scenes.QUESTIONS_PER_SCENE
    assert set(metrics["captions"]) == {"exact_match", "token_f1", "bleu4", "cider", "count"}
    assert metrics["captions"]["count"] == 4
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["captions"] for r in rows] == [[c] for c in scenes.load_scenes_captions("test")["caption"]]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4 * scenes.QUESTIONS_PER_SCENE


@pytest.mark.slow
def test_resume_skips_a_finished_alignment(small_scenes, parts, tmp_path, capsys):
    vit, gpt = parts
    out = tmp_path / "run"
    base = _args(out, vit, gpt, "--task", "caption", "--align-epochs", "1", "--max-steps", "2")
    train_vqa.main(base)
    first = VLM.from_pretrained(out / "model").state_dict()
    capsys.readouterr()
    # The main phase has no checkpoint: the finished alignment is loaded, not rerun, and the
    # main phase then replays the same steps.
    train_vqa.main(base + ["--resume", "latest"])
    assert "loaded the finished phase" in capsys.readouterr().out
    again = VLM.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    # the alignment phase's model is compared too: another attention would load its weights silently
    with pytest.raises(CheckpointError, match="cannot load the finished alignment .*attention 'prefix' -> 'causal'"):
        train_vqa.run(*train_vqa.parse(base + ["--resume", "latest", "--attention", "causal"]))


def test_an_alignment_with_other_model_settings_is_refused_before_the_folder_is_touched(small_scenes, parts,
                                                                                     tmp_path, monkeypatch):
    """The alignment phase's model (its finished align/model, or its own checkpoints) was compared
    only when the phase began, after run_config.json was rewritten and a log folder started."""
    from mmfusion.training.run_folder import model_record

    def too_early(*args, **kwargs):
        raise AssertionError("the run was set up (precision, accelerator) before the resume was checked")

    monkeypatch.setattr(train_vqa, "choose_precision", too_early)
    vit, gpt = parts
    out = tmp_path / "run"
    base = _args(out, vit, gpt, "--task", "caption", "--align-epochs", "1", "--max-steps", "2")
    config = train_vqa.build_vlm(train_vqa.parse(base)[0]).config
    (out / "align" / "checkpoints" / "step_1").mkdir(parents=True)
    (out / "align" / "checkpoints" / "step_1" / "progress.json").write_text(
        json.dumps({"step": 1, "model": model_record(config)}))
    (out / "run_config.json").write_text("{}")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # its own checkpoints, with --resume latest (the main phase has none)
    with pytest.raises(CheckpointError, match=r"cannot resume from .*align.*attention 'prefix' -> 'causal'"):
        train_vqa.run(*train_vqa.parse(base + ["--resume", "latest", "--attention", "causal"]))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before and not (out / "logs").exists()
    # its finished model
    train_vqa.build_vlm(train_vqa.parse(base)[0]).save_pretrained(out / "align" / "model")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="cannot load the finished alignment .*attention 'prefix' -> 'causal'"):
        train_vqa.run(*train_vqa.parse(base + ["--resume", "latest", "--attention", "causal"]))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before and not (out / "logs").exists()


@pytest.mark.slow
def test_a_resume_from_an_alignment_checkpoint_finishes_the_alignment_then_trains_the_main_phase(
        small_scenes, parts, tmp_path, capsys):
    """The main phase was handed the alignment's checkpoint too: it failed after the alignment had
    finished ("step 3, not a step of this 2-step run"), and in a longer run would have loaded the
    adapter-only optimizer state into the main phase."""
    vit, gpt = parts
    out = tmp_path / "run"
    base = _args(out, vit, gpt, "--task", "caption", "--align-epochs", "1", "--max-steps", "2", "--save-every", "1")
    train_vqa.main(base)
    first = VLM.from_pretrained(out / "model").state_dict()
    align_step = sorted((out / "align" / "checkpoints").iterdir())[0]
    capsys.readouterr()
    train_vqa.main(base + ["--resume", str(align_step)])
    printed = capsys.readouterr().out
    assert f"resumed from {align_step} at step" in printed and printed.count("resumed from") == 1
    assert sorted(p.name for p in (out / "earlier_run" / "checkpoints").iterdir()) == ["step_1", "step_2"]
    again = VLM.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)  # the same run, from a mid-alignment checkpoint


@pytest.mark.slow
def test_resume_latest_after_an_interrupted_alignment_resume_continues_it_not_the_older_finished_model(
        small_scenes, parts, tmp_path, capsys, monkeypatch):
    """The reviewer's case: a resume from a path inside align/ kept the older finished align/model,
    and when that resume was killed mid-alignment, --resume latest loaded the stale model instead
    of continuing the alignment from its newest checkpoint."""
    from mmfusion.training import loop

    vit, gpt = parts
    out = tmp_path / "run"
    base = _args(out, vit, gpt, "--task", "caption", "--align-epochs", "1", "--max-steps", "2", "--save-every", "1")
    train_vqa.main(base)
    first = VLM.from_pretrained(out / "model").state_dict()
    # the older finished alignment differs from the one being resumed (as after other settings)
    stale = VLM.from_pretrained(out / "align" / "model")
    with torch.no_grad():
        for p in stale.adapter.parameters():
            p.add_(1.0)
    stale.save_pretrained(out / "align" / "model")
    align_steps = sorted((out / "align" / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[1]))

    class Killed(Exception):
        pass

    real_save = loop.save_checkpoint

    def killed_after_an_alignment_checkpoint(accelerator, output_dir, step, *args, **kwargs):
        real_save(accelerator, output_dir, step, *args, **kwargs)
        if Path(output_dir).name == "align":
            raise Killed(step)

    with monkeypatch.context() as patch, pytest.raises(Killed):  # not monkeypatch.undo: small_scenes' patch stays
        patch.setattr(loop, "save_checkpoint", killed_after_an_alignment_checkpoint)
        train_vqa.main(base + ["--resume", str(align_steps[0])])
    capsys.readouterr()

    train_vqa.main(base + ["--resume", "latest"])
    printed = capsys.readouterr().out
    assert "loaded the finished phase" not in printed
    assert f"resumed from {align_steps[-1]} at step" in printed  # the interrupted resume's newest checkpoint
    again = VLM.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    aside = VLM.from_pretrained(out / "earlier_run" / "align" / "model").state_dict()  # set aside, not deleted
    assert all(torch.equal(aside[k], v) for k, v in stale.state_dict().items())


@pytest.mark.slow
def test_caption_only_training_learns_a_fixed_caption(small_scenes, parts, tmp_path):
    """Enough steps on captions to see the loss fall: the caption labels reach the model."""
    vit, gpt = parts
    out = tmp_path / "run"
    stage, run_cfg = train_vqa.parse(_args(out, vit, gpt, "--task", "caption", "--max-steps", "30", "--lr", "3e-3",
                                           "--caption-max-new-tokens", "40"))
    metrics = train_vqa.run(stage, run_cfg)
    assert "accuracy" not in metrics and metrics["captions"]["count"] == 4
    # After 30 steps the model writes caption-like text: the shared vocabulary of the captions.
    assert metrics["captions"]["token_f1"] > 0.3


def test_caption_any_order_reorders_training_captions_only(small_scenes, parts, tmp_path, capsys):
    vit, gpt = parts
    out = tmp_path / "run"
    stage, run_cfg = train_vqa.parse(_args(out, vit, gpt, "--task", "caption", "--max-steps", "1",
                                           "--caption-any-order", "1"))
    train_vqa.run(stage, run_cfg)
    train = [scenes.caption(scenes.make_scene(scenes.SPLIT_SEEDS["train"], i)) for i in range(32)]
    moved = sum(scenes.caption_in_any_order(text, i, 1.0) != text for i, text in enumerate(train))
    assert moved > 10 and f"data: {moved} of 32 training captions name their shapes in another order" in (
        capsys.readouterr().out)
    # evaluation is scored against reading order
    test = [scenes.caption(scenes.make_scene(scenes.SPLIT_SEEDS["test"], i)) for i in range(4)]
    refs = [json.loads(line)["captions"] for line in (out / "captions.jsonl").read_text().splitlines()]
    assert refs == [[t] for t in test]
    assert json.loads((out / "run_config.json").read_text())["stage"]["caption_any_order"] == 1.0


def test_caption_any_order_is_for_scenes_captions(parts, tmp_path, capsys):
    vit, gpt = parts
    argv = ["train-vqa", "--dataset", "easy-vqa", "--caption-any-order", "0.5", "--vit", vit, "--gpt", gpt,
            "--output-dir", str(tmp_path / "x")]
    assert cli_main(argv) == 2 and not (tmp_path / "x").exists()
    assert "pass --caption-any-order 0" in capsys.readouterr().err


def test_captions_need_a_dataset_with_captions(parts, tmp_path):
    vit, gpt = parts
    with pytest.raises(train_vqa.DatasetError, match="needs captions, which 'easy-vqa' has none of"):
        train_vqa.main(["--dataset", "easy-vqa", "--task", "both", "--vit", vit, "--gpt", gpt,
                        "--output-dir", str(tmp_path / "x")])
    assert cli_main(["train-vqa", "--dataset", "easy-vqa", "--align-epochs", "1", "--vit", vit, "--gpt", gpt,
                     "--output-dir", str(tmp_path / "x")]) == 2


def test_eval_cli_prints_caption_metrics(small_scenes, parts, tmp_path, capsys):
    vit, gpt = parts
    model = train_vqa.build_vlm(train_vqa.VQAStageConfig(vit=vit, gpt=gpt))
    model.save_pretrained(tmp_path / "vlm")
    assert cli_main(["eval", "--model", str(tmp_path / "vlm"), "--dataset", "scenes", "--batch-size", "4",
                     "--max-new-tokens", "2", "--caption-max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "| captions | exact match | token F1 | BLEU-4 | CIDEr-D |" in out and "| **all** | 24 |" in out
    assert "| question (C color, S shape, P position) | questions | VQA accuracy |" in out
    assert (tmp_path / "predictions_test_captions.jsonl").exists()
    assert cli_main(["eval", "--model", str(tmp_path / "vlm"), "--dataset", "scenes", "--task", "caption",
                     "--caption-max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "exact match" in out and "VQA accuracy" not in out


def test_captions_job_writes_a_report(small_scenes, tmp_path, capsys):
    from mmfusion.training import captions

    result = captions.main(["--output-dir", str(tmp_path / "job"), "--no-progress", "--examples", "2",
                            "--vit-max-steps", "2", "--vit-batch-size", "16", "--",
                            "--max-steps", "2", "--batch-size", "8", "--caption-max-new-tokens", "4",
                            "--max-new-tokens", "2", "--final-eval-limit", "3"])
    report = (tmp_path / "job" / "results.md").read_text()
    assert "| captions | exact match | token F1 |" in report and "| **all** | 3 |" in report
    assert "Stage 1 (ViT, a label per cell)" in report
    assert sum(m["count"] for m in result["per_template"].values()) == 3 and "| question (C color" in report
    assert all(question_template(t) == t for t in result["per_template"])  # templates, not questions
    assert report.strip() in capsys.readouterr().out
    assert result["captions"]["count"] == 3 and (tmp_path / "job" / "model" / "model.safetensors").exists()
    assert len((tmp_path / "job" / "captions.jsonl").read_text().splitlines()) == 3
    # Stage 1 trained a cell classifier; stage 2 used it, frozen, with one token per cell.
    vit = ViT.from_pretrained(tmp_path / "job" / "vit" / "model")
    assert vit.config.label_grid == 2 and result["vit"]["label_grid"] == 2
    # transformers' start, attention and patch projection: the ViT the captions job was measured with
    assert vit.config.attention_init == "normal" and vit.config.patch_init_std == 0.02
    run_config = json.loads((tmp_path / "job" / "run_config.json").read_text())
    assert run_config["stage"]["task"] == "both" and run_config["stage"]["freeze_vit"] is True
    assert run_config["stage"]["output_vocab"] == "data" and run_config["stage"]["caption_any_order"] == 0.25
    assert run_config["run"]["epochs"] == 7  # the recipe the job was measured with (docs/experiments.md)
    assert run_config["stage"]["vit"] == str(tmp_path / "job" / "vit" / "model")
    model = VLM.from_pretrained(tmp_path / "job" / "model")
    assert model.num_image_tokens == 4 and model.config.adapter.position_embedding
    # the fresh gpt-tiny started from std 0.1, its preset's (docs/experiments.md: GPT init scale)
    assert model.config.gpt.initializer_range == 0.1
    for name, p in vit.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(model.vit.state_dict()[name], p)


def test_captions_job_takes_a_saved_vit_and_checks_stage_two_flags_first(small_scenes, parts, tmp_path, capsys):
    from mmfusion.training import captions

    vit, _ = parts
    with pytest.raises(SystemExit):
        captions.main(["--output-dir", str(tmp_path / "bad"), "--", "--epochs", "lots"])
    assert not (tmp_path / "bad").exists()  # nothing trained before the bad flag was found
    result = captions.main(["--output-dir", str(tmp_path / "job"), "--no-progress", "--vit", vit, "--",
                            "--max-steps", "1", "--batch-size", "4", "--caption-max-new-tokens", "2",
                            "--max-new-tokens", "1", "--final-eval-limit", "2", "--pixel-shuffle", "2"])
    assert result["vit"] is None and not (tmp_path / "job" / "vit").exists()
    assert f"(ViT: {vit})" in (tmp_path / "job" / "results.md").read_text()


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_captions_job_reports_only_what_a_one_task_stage_two_measured(small_scenes, parts, tmp_path, task):
    from mmfusion.training import captions

    vit, _ = parts
    result = captions.main(["--output-dir", str(tmp_path / "job"), "--no-progress", "--vit", vit, "--",
                            "--task", task, "--max-steps", "1", "--batch-size", "4", "--caption-max-new-tokens", "2",
                            "--max-new-tokens", "1", "--final-eval-limit", "2", "--pixel-shuffle", "2"])
    report = (tmp_path / "job" / "results.md").read_text()
    assert ("| captions | exact match" in report) == (task == "caption") == ("captions" in result)
    assert ("| **all** | 2 |" in report) == (task == "vqa") == ("per_template" in result)
    assert ("Example captions" in report) == (task == "caption")


def test_scenes_accuracy_by_question_template_by_hand():
    rows = [{"question": "is there a red circle?", "prediction": "yes", "answers": ["yes"]},
            {"question": "is there a blue square?", "prediction": "Yes", "answers": ["no"]},
            {"question": "is there a green triangle?", "prediction": "No.", "answers": ["no"]},  # normalized
            {"question": "what shape is at the top left?", "prediction": "circle", "answers": ["circle"]}]
    by = score_by_template(rows)
    assert by == {"is there a C S?": {"accuracy": 2 / 3, "count": 3}, "what shape is at the P?": {"accuracy": 1.0, "count": 1}}
    table = format_template_table(by).splitlines()
    assert table[2] == "| what shape is at the P? | 1 | 100.00% |"  # lookups first
    assert table[3] == "| is there a C S? | 3 | 66.67% |"


def test_captions_job_on_other_question_data_reports_without_a_template_table(parts, tmp_path):
    from PIL import Image

    from mmfusion.training import captions

    rows = []
    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "question": "what color?", "answers": [f"c{i % 2}"]})
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    vit, _ = parts
    result = captions.main(["--output-dir", str(tmp_path / "job"), "--no-progress", "--vit", vit, "--",
                            "--dataset", str(data), "--task", "vqa", "--caption-any-order", "0", "--max-steps", "1",
                            "--batch-size", "4", "--max-new-tokens", "1", "--pixel-shuffle", "2"])
    report = (tmp_path / "job" / "results.md").read_text()
    assert "per_template" not in result and "| **all** |" in report
    assert f"Evaluated on 1 of the 8 rows of {data}" in report  # not "Scenes test split"
    # the evaluation line, though other data lines (here: no feature cache for 1 step) follow it
    assert result["evaluation"].startswith(f"evaluation: 1 of the 8 rows of {data} held out of training")


@pytest.mark.parametrize("flag", ["--output-dir", "--seed", "--mixed-precision", "--vit", "--no-progress"])
def test_job_flags_after_the_separator_are_refused_before_any_work(flag, tmp_path):
    from mmfusion.config import ConfigError
    from mmfusion.training import captions

    value = [] if flag == "--no-progress" else [str(tmp_path / "elsewhere") if flag in ("--output-dir", "--vit") else "1"]
    with pytest.raises(ConfigError, match=f"{flag} after -- applies to stage 2 only; give it before --"):
        captions.parse(["--output-dir", str(tmp_path / "job"), "--", flag, *value])
    assert not (tmp_path / "job").exists()
