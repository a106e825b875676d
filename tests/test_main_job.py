"""The main job's wiring, end to end on easy-VQA with a handful of steps (accuracy is not the
point here; the full run is `make run`, reported in the README)."""

from __future__ import annotations

import json

import pytest

from mmfusion.config import ConfigError
from mmfusion.training import pretrain_vit
from mmfusion.training.main import main, parse, stage_run


@pytest.mark.slow
def test_main_job_writes_models_predictions_and_report(tmp_path, capsys):
    result = main(["--output-dir", str(tmp_path), "--vit-max-steps", "3", "--vqa-max-steps", "3",
                   "--no-progress", "--examples", "4"])
    out = capsys.readouterr().out
    assert (tmp_path / "vit" / "model" / "model.safetensors").exists()
    assert (tmp_path / "vqa" / "model" / "model.safetensors").exists()
    rows = (tmp_path / "vqa" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 9673  # the full easy-VQA test split
    assert set(json.loads(rows[0])) >= {"question", "prediction", "answers", "answer_type"}
    report = (tmp_path / "results.md").read_text()
    assert "| **all** | 9673 |" in report and report.strip() in out
    assert result["vit"]["precision"] == result["vqa"]["precision"] == "no"  # auto, pinned to fp32 in tests
    assert "| 888 images | no |" in report
    assert result["vqa"]["count"] == 9673 and 0.0 <= result["vqa"]["accuracy"] <= 1.0
    assert json.loads((tmp_path / "vit" / "metrics.json").read_text())["test_examples"] == 888
    # stage 2 reads the stage-1 ViT and keeps its CLS token (docs/2026-11-24-main-job-recipe.md)
    stage = json.loads((tmp_path / "vqa" / "run_config.json").read_text())["stage"]
    assert stage["vit"] == str(tmp_path / "vit" / "model") and stage["adapter"]["keep_cls"] is True
    config = json.loads((tmp_path / "vqa" / "model" / "config.json").read_text())["config"]
    assert config["adapter"]["keep_cls"] is True and config["gpt"]["initializer_range"] == 0.1


def test_main_job_passes_its_precision_to_both_stages(tmp_path):
    args = parse(["--mixed-precision", "bf16", "--seed", "2"])
    run = stage_run(pretrain_vit.STAGE_DEFAULTS, args, tmp_path, args.vit_epochs, args.vit_max_steps, args.vit_lr)
    assert run.mixed_precision == "bf16" and run.seed == 2 and run.epochs == pretrain_vit.STAGE_DEFAULTS.epochs
    default = parse([])
    assert stage_run(pretrain_vit.STAGE_DEFAULTS, default, tmp_path, None, 0, None).mixed_precision == "auto"


def test_the_stage_commands_repeat_the_main_job():
    """`mmfusion pretrain-vit` then `mmfusion train-vqa --vit OUT/vit/model` with the same seed and
    folders train what `mmfusion main` trains."""
    from mmfusion.training import train_vqa
    from mmfusion.training.main import stage_configs

    vit_stage, vit_run, vqa_stage, vqa_run = stage_configs(parse(["--output-dir", "runs/m", "--seed", "3"]))
    precision = ["--mixed-precision", "auto"]
    assert (vit_stage, vit_run) == pretrain_vit.parse(["--output-dir", "runs/m/vit", "--seed", "3", *precision])
    # The recipe as measured: the mimetic start, the 0.072 patch start, 30 epochs (docs/experiments.md).
    assert vit_stage.vit.attention_init == "mimetic" and vit_run.epochs == 30
    assert vit_stage.vit.patch_init_std == 0.072
    normal = stage_configs(parse(["--vit-attention-init", "normal", "--vit-patch-init-std", "0.02"]))[0]
    assert normal == pretrain_vit.parse(["--output-dir", "runs/main/vit", "--attention-init", "normal",
                                         "--patch-init-std", "0.02"])[0]
    assert normal.vit.patch_init_std == 0.02
    with pytest.raises(ConfigError, match="--vit-patch-init-std must be positive"):
        parse(["--vit-patch-init-std", "0"])
    assert (vqa_stage, vqa_run) == train_vqa.parse(["--vit", "runs/m/vit/model", "--output-dir", "runs/m/vqa",
                                                    "--seed", "3", *precision])
    assert vqa_stage.adapter.keep_cls and vqa_stage.balance_answers == 0.5
    assert vqa_run.min_lr_ratio == 0 and vit_run.min_lr_ratio == 0.05  # stage 2's cosine ends at zero
    unbalanced = stage_configs(parse(["--vqa-balance-answers", "0"]))[2]
    assert unbalanced == train_vqa.parse(["--vit", "runs/main/vit/model", "--balance-answers", "0"])[0]
    with pytest.raises(ConfigError, match=r"--vqa-balance-answers must be in \[0, 1\]"):
        parse(["--vqa-balance-answers", "1.5"])
    assert vqa_stage.output_vocab == "auto"  # -> data: the fresh GPT scores only the answers' tokens
    full = stage_configs(parse(["--vqa-output-vocab", "all"]))[2]
    assert full == train_vqa.parse(["--vit", "runs/main/vit/model", "--output-vocab", "all"])[0]


def test_main_passes_fusion_and_compile_to_its_stages():
    from mmfusion.training.main import stage_configs

    vit_stage, vit_run, vqa_stage, vqa_run = stage_configs(parse(["--fusion", "cross", "--compile"]))
    assert vqa_stage.fusion == "cross" and vqa_stage.model_attention == "causal"
    assert vit_run.compile and vqa_run.compile
    assert stage_configs(parse([]))[2].fusion == "early"


FAKE_STAGES = '''
import json, sys, time
from pathlib import Path
from accelerate import Accelerator
from mmfusion.training import captions, main, pretrain_vit, train_vqa

def stage_1(stage, run):
    if not Accelerator().is_main_process:
        return {}  # as the real stage: training is over, the main process evaluates and saves
    time.sleep(3)
    (Path(run.output_dir) / "model").mkdir(parents=True)
    return {"test_accuracy": 1.0, "test_cell_accuracy": 1.0, "test_examples": 1, "precision": "no"}

def stage_2(stage, run):
    state = Accelerator()
    assert Path(stage.vit).is_dir(), f"process {state.process_index} began stage 2 before stage 1 saved {stage.vit}"
    if not state.is_main_process:
        return {}
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    row = {"question": "q?", "prediction": "a", "answers": ["a"], "answer_type": "t", "image_id": 0}
    (out / "predictions.jsonl").write_text(json.dumps(row) + "\\n")
    return {"accuracy": 1.0, "count": 1, "per_type": {"t": {"accuracy": 1.0, "count": 1}}, "precision": "no"}

pretrain_vit.run, train_vqa.run = stage_1, stage_2
for job in sys.argv[2:]:  # one job after the other in the same two processes
    {"main": main, "captions": captions}[job].main(["--output-dir", f"{sys.argv[1]}/{job}", "--no-progress"])
'''
JOBS = {"main": "== stage 2: VQA fine-tuning", "captions": "== stage 2: captions and questions"}  # job: its stage-2 line


@pytest.fixture(scope="module")
def two_process_jobs(tmp_path_factory):
    """One 2-process launch (CPU processes) of FAKE_STAGES running each job in JOBS in turn: (the
    launch's result, its folder, which holds a folder per job). One launch for both: a launch costs 8-10 s."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("two_process_jobs")
    script = out / "fake_stages.py"
    script.write_text(FAKE_STAGES)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(root)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(29500 + os.getpid() % 1000)]
    result = subprocess.run([*launch, str(script), str(out), *JOBS], capture_output=True, text=True,
                            env=env, cwd=root, timeout=300)
    return result, out


@pytest.mark.slow
@pytest.mark.parametrize("job", list(JOBS))
def test_two_process_job_starts_stage_two_after_stage_one_is_saved(job, two_process_jobs):
    """Under accelerate launch the main process evaluates and saves stage 1 while the others have
    finished training: they began stage 2 at once, loading an earlier run's ViT or failing on a
    missing one (`mmfusion main` on 2 CPU processes: rank 1 exited 'does not exist')."""
    result, out = two_process_jobs
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "| **all** | 1 |" in (out / job / "results.md").read_text()
    assert result.stdout.count(JOBS[job]) == 1, result.stdout[-2000:]  # from the main process only
