"""Who decides the precision, and that a process can train twice in different precisions.

Every branch of `--mixed-precision auto` and of the CPU bf16 warning is forced here by injection
(the GPU's bf16 support, the CPU's matmul check), so each one runs on every machine: AVX2-only
CPUs, CPUs with native bf16, and GPUs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.config import ConfigError
from mmfusion.training import precision as P
from mmfusion.training.precision import decide

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TINY = ["--image-size", "16", "--patch-size", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--max-steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--no-progress", "--eval-split", "train",
        "--holdout", "0"]


def never(*_):
    raise AssertionError("must not be called")


FAST = lambda: (True, {"matmul256_fp32": 2.0, "matmul256_bf16": 1.0})  # noqa: E731
SLOW = lambda: (False, {"matmul256_fp32": 1.0, "matmul256_bf16": 200.0})  # noqa: E731


def test_an_explicit_flag_wins_over_launch_and_environment():
    d = decide("no", CPU, bf16_matmul_is_fast=never, env={P.LAUNCH_ENV: "bf16", P.AUTO_ENV: "bf16"})
    assert (d.resolved, d.source) == ("no", "--mixed-precision")
    assert decide("bf16", CPU, FAST, env={}).resolved == "bf16"
    assert decide("fp16", CUDA, never, env={}, gpu_has_bf16=never).resolved == "fp16"


def test_accelerate_launch_precision_wins_over_auto():
    d = decide("auto", CPU, never, env={P.LAUNCH_ENV: "no", P.AUTO_ENV: "bf16"})
    assert (d.resolved, d.source) == ("no", "accelerate launch")
    d = decide("auto", CUDA, never, env={P.LAUNCH_ENV: "bf16"}, gpu_has_bf16=never)
    assert (d.resolved, d.source) == ("bf16", "accelerate launch")


def test_the_environment_pins_auto():
    d = decide("auto", CUDA, never, env={P.AUTO_ENV: "no"}, gpu_has_bf16=never)
    assert (d.resolved, d.source) == ("no", P.AUTO_ENV)


@pytest.mark.parametrize("env", [{P.AUTO_ENV: "fp8"}, {P.LAUNCH_ENV: "half"}])
def test_a_bad_precision_in_the_environment_is_a_clear_error(env):
    with pytest.raises(ConfigError, match="is not a precision"):
        decide("auto", CPU, never, env=env)


def test_auto_on_a_cpu_is_fp32_whatever_the_cpu_and_times_nothing(monkeypatch):
    # the timing `auto` used to do read both sides of its margin on one machine (docs/experiments.md)
    monkeypatch.setattr(P, "cpu_bf16_matmul_is_fast", never)
    d = decide("auto", CPU, bf16_matmul_is_fast=never, env={})
    assert (d.resolved, d.source, d.seconds, d.warning) == ("no", "auto", {}, "")
    assert "--mixed-precision bf16" in d.reason


@pytest.mark.parametrize(("has_bf16", "expected"), [(True, "bf16"), (False, "no")])
def test_auto_on_a_gpu_follows_its_bf16_support(has_bf16, expected):
    d = decide("auto", CUDA, bf16_matmul_is_fast=never, env={}, gpu_has_bf16=lambda: has_bf16)
    assert (d.resolved, d.source, d.warning) == (expected, "auto", "")


@pytest.mark.parametrize("how", [{"requested": "bf16", "env": {}}, {"requested": "auto", "env": {P.LAUNCH_ENV: "bf16"}},
                                 {"requested": "auto", "env": {P.AUTO_ENV: "bf16"}}])
def test_bf16_on_a_cpu_without_native_bf16_warns_however_it_was_asked_for(how):
    slow = decide(how["requested"], CPU, bf16_matmul_is_fast=SLOW, env=how["env"])
    assert slow.resolved == "bf16" and "200x slower" in slow.warning and "--mixed-precision no" in slow.warning
    assert slow.seconds == SLOW()[1] and "warning: bf16 matmuls" in str(slow)
    fast = decide(how["requested"], CPU, bf16_matmul_is_fast=FAST, env=how["env"])
    assert (fast.resolved, fast.warning, fast.seconds) == ("bf16", "", {}) and "warning" not in str(fast)


@pytest.mark.parametrize("how", [{"requested": "fp16", "env": {}}, {"requested": "auto", "env": {P.LAUNCH_ENV: "fp16"}}])
def test_fp16_on_a_cpu_is_refused_not_run_as_fp32(how):
    # accelerate gives CPU fp16 neither autocast nor a loss scale: the run trained in fp32, recorded as fp16
    with pytest.raises(ConfigError, match="fp16, which needs a GPU; on a CPU use bf16"):
        decide(how["requested"], CPU, never, env=how["env"])
    assert decide(how["requested"], CUDA, never, env=how["env"], gpu_has_bf16=never).resolved == "fp16"


def test_fp32_and_gpu_bf16_never_run_the_cpu_check():
    assert decide("no", CPU, bf16_matmul_is_fast=never, env={}).warning == ""
    assert decide("bf16", CUDA, bf16_matmul_is_fast=never, env={}, gpu_has_bf16=never).warning == ""


def test_the_cpu_matmul_check_answers_once_per_process():
    first = P.cpu_bf16_matmul_is_fast()
    assert P.cpu_bf16_matmul_is_fast() is first
    fast, seconds = first
    assert isinstance(fast, bool) and set(seconds) == {"matmul256_fp32", "matmul256_bf16"}


# ---- end to end: stage runs in one process ----------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for color, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (root / "train" / color).mkdir(parents=True)
        for i in range(6):
            arr = np.full((16, 16, 3), 245, np.uint8)
            y, x = rng.integers(0, 8, size=2)
            arr[y:y + 8, x:x + 8] = rgb
            Image.fromarray(arr).save(root / "train" / color / f"{i}.png")
    return root


def stage_one(images, out, *flags):
    from mmfusion.training.pretrain_vit import parse, run

    run(*parse(["--dataset", str(images), "--output-dir", str(out), *TINY, *flags]))
    return json.loads((out / "run_config.json").read_text())["precision"]


def test_two_runs_in_one_process_with_different_precisions(images, tmp_path):
    # accelerate keeps one state per process and refused the second precision (a notebook running
    # stage 1 then stage 2, a test session, the captions job's phases on a bf16 machine)
    assert stage_one(images, tmp_path / "a", "--mixed-precision", "no")["resolved"] == "no"
    assert stage_one(images, tmp_path / "b", "--mixed-precision", "bf16")["resolved"] == "bf16"
    assert stage_one(images, tmp_path / "c", "--mixed-precision", "no")["resolved"] == "no"


def test_auto_end_to_end_trains_in_fp32_on_cpu_and_says_why(images, tmp_path, monkeypatch):
    monkeypatch.delenv(P.AUTO_ENV, raising=False)
    monkeypatch.delenv(P.LAUNCH_ENV, raising=False)
    monkeypatch.setattr(P, "training_device", lambda: CPU)
    monkeypatch.setattr("mmfusion.training.setup.training_device", lambda: CPU)
    decision = stage_one(images, tmp_path / "a")
    assert (decision["requested"], decision["resolved"], decision["source"]) == ("auto", "no", "auto")
    assert decision["seconds"] == {} and decision["warning"] == ""


def test_explicit_bf16_on_a_slow_bf16_cpu_trains_and_records_the_warning(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(P, "cpu_bf16_matmul_is_fast", SLOW)
    monkeypatch.setattr(P, "training_device", lambda: CPU)
    monkeypatch.setattr("mmfusion.training.setup.training_device", lambda: CPU)
    decision = stage_one(images, tmp_path / "a", "--mixed-precision", "bf16")
    assert decision["resolved"] == "bf16" and "200x slower" in decision["warning"]
    assert "warning: bf16 matmuls on this CPU are 200x slower" in capsys.readouterr().out


def test_launch_precision_beats_auto_end_to_end(images, tmp_path, monkeypatch):
    monkeypatch.delenv(P.AUTO_ENV, raising=False)
    monkeypatch.setenv(P.LAUNCH_ENV, "no")
    decision = stage_one(images, tmp_path / "a")
    assert (decision["resolved"], decision["source"]) == ("no", "accelerate launch")
