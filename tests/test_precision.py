"""Who decides the precision, and that a process can train twice in different precisions.

Every branch of `--mixed-precision auto` is forced here by injection (the CPU pre-check, the
step timings, the margin), so each one runs on every machine: AVX2-only CPUs, CPUs with
native bf16, and GPUs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.config import ConfigError
from mmfusion.training import precision as P
from mmfusion.training.precision import decide, model_step_timer

CPU = torch.device("cpu")
TINY = ["--image-size", "16", "--patch-size", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--max-steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--no-progress", "--eval-split", "train",
        "--holdout", "0"]


def timer(fp32: float, bf16: float):
    calls = []

    def seconds(precision: str) -> float:
        calls.append(precision)
        return bf16 if precision == "bf16" else fp32
    seconds.calls = calls
    return seconds


def never(*_):
    raise AssertionError("must not be called")


FAST, SLOW = (lambda: (True, {"matmul": 1.0})), (lambda: (False, {"matmul": 2.0}))


def test_an_explicit_flag_wins_over_launch_and_environment():
    d = decide("no", CPU, step_timer=never, bf16_matmul_is_fast=never,
               env={P.LAUNCH_ENV: "bf16", P.AUTO_ENV: "bf16"}, processes=1)
    assert (d.resolved, d.source) == ("no", "--mixed-precision")
    assert decide("bf16", CPU, never, never, env={}, processes=1).resolved == "bf16"


def test_accelerate_launch_precision_wins_over_auto():
    d = decide("auto", CPU, step_timer=timer(1.0, 0.1), bf16_matmul_is_fast=FAST, env={P.LAUNCH_ENV: "no"}, processes=1)
    assert (d.resolved, d.source) == ("no", "accelerate launch")
    d = decide("auto", CPU, never, never, env={P.LAUNCH_ENV: "bf16"}, processes=2)
    assert (d.resolved, d.source) == ("bf16", "accelerate launch")


def test_the_environment_pins_auto():
    d = decide("auto", CPU, never, never, env={P.AUTO_ENV: "bf16"}, processes=1)
    assert (d.resolved, d.source) == ("bf16", P.AUTO_ENV)


@pytest.mark.parametrize("env", [{P.AUTO_ENV: "fp8"}, {P.LAUNCH_ENV: "half"}])
def test_a_bad_precision_in_the_environment_is_a_clear_error(env):
    with pytest.raises(ConfigError, match="is not a precision"):
        decide("auto", CPU, never, never, env=env, processes=1)


def test_a_cpu_without_fast_bf16_gets_fp32_without_timing_the_model():
    d = decide("auto", CPU, step_timer=never, bf16_matmul_is_fast=SLOW, env={}, processes=1)
    assert (d.resolved, d.source) == ("no", "auto") and d.seconds == {"matmul": 2.0}


# 0.84: the main job's stage 2 on an AVX512-BF16 CPU in one run (0.94 in another): within the
# probe's noise, so fp32 both times, not a coin flip between runs
@pytest.mark.parametrize(("fp32", "bf16", "expected"), [(1.0, 0.5, "bf16"), (1.0, 0.74, "bf16"),
                                                        (1.0, 0.84, "no"), (1.0, 0.95, "no"), (1.0, 1.6, "no")])
def test_auto_times_the_model_step_and_wants_a_margin(fp32, bf16, expected):
    t = timer(fp32, bf16)
    d = decide("auto", CPU, step_timer=t, bf16_matmul_is_fast=FAST, env={}, processes=1)
    assert d.resolved == expected and d.source == "auto"
    assert t.calls == ["no", "bf16"] * P.REPEATS  # alternating
    assert d.seconds["step_fp32"] == fp32 and d.seconds["step_bf16"] == bf16 and d.seconds["matmul"] == 1.0
    assert "ms" in d.reason


def test_each_decision_reports_its_own_timings():
    # the CPU check's answer is cached per process: a second stage must not see the first's steps
    cached = (True, {"matmul": 1.0})
    first = decide("auto", CPU, step_timer=timer(0.05, 0.08), bf16_matmul_is_fast=lambda: cached, env={}, processes=1)
    second = decide("auto", CPU, step_timer=timer(0.20, 0.10), bf16_matmul_is_fast=lambda: cached, env={}, processes=1)
    assert (first.resolved, first.seconds["step_fp32"]) == ("no", 0.05)
    assert (second.resolved, second.seconds["step_fp32"], second.seconds["step_bf16"]) == ("bf16", 0.20, 0.10)
    assert cached[1] == {"matmul": 1.0}


def test_several_processes_are_not_timed():
    d = decide("auto", CPU, step_timer=never, bf16_matmul_is_fast=never, env={}, processes=2)
    assert d.resolved == "no" and "not timed" in d.reason


def test_the_cpu_matmul_check_answers_once_per_process():
    first = P.cpu_bf16_matmul_is_fast()
    assert P.cpu_bf16_matmul_is_fast() is first
    fast, seconds = first
    assert isinstance(fast, bool) and set(seconds) == {"matmul256_fp32", "matmul256_bf16"}


def test_timing_a_step_changes_no_weight_gradient_mode_or_random_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    model.train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 8)
    rng = torch.get_rng_state()
    seconds = model_step_timer(model, x, lambda m, x: m(x).square().mean(), CPU)
    assert seconds("no") > 0 and seconds("bf16") > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.training and not model[1].training
    assert torch.equal(torch.get_rng_state(), rng)


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


def test_auto_with_fast_bf16_forced_times_the_real_model_in_both_directions(images, tmp_path, monkeypatch):
    monkeypatch.delenv(P.AUTO_ENV, raising=False)
    monkeypatch.delenv(P.LAUNCH_ENV, raising=False)
    monkeypatch.setattr(P, "cpu_bf16_matmul_is_fast", lambda: (True, {"matmul256_bf16": 0.0}))
    monkeypatch.setattr(P, "BF16_MARGIN", float("inf"))  # whatever the timings: bf16
    chose_bf16 = stage_one(images, tmp_path / "a")
    monkeypatch.setattr(P, "BF16_MARGIN", 0.0)  # whatever the timings: fp32
    chose_fp32 = stage_one(images, tmp_path / "b")
    for decision in (chose_bf16, chose_fp32):
        assert decision["requested"] == "auto" and decision["source"] == "auto"
        if P.training_device().type == "cpu":
            assert "matmul256_bf16" in decision["seconds"]
        assert decision["seconds"]["step_fp32"] > 0 and decision["seconds"]["step_bf16"] > 0
    assert chose_bf16["resolved"] == "bf16" and chose_fp32["resolved"] == "no"


def test_auto_on_a_cpu_with_slow_bf16_picks_fp32(images, tmp_path, monkeypatch):
    monkeypatch.delenv(P.AUTO_ENV, raising=False)
    monkeypatch.delenv(P.LAUNCH_ENV, raising=False)
    monkeypatch.setattr(P, "cpu_bf16_matmul_is_fast", lambda: (False, {"matmul256_bf16": 9.0}))
    monkeypatch.setattr(P, "training_device", lambda: CPU)
    monkeypatch.setattr("mmfusion.training.setup.training_device", lambda: CPU)
    decision = stage_one(images, tmp_path / "a")
    assert decision["resolved"] == "no" and "step_fp32" not in decision["seconds"]


def test_launch_precision_beats_auto_end_to_end(images, tmp_path, monkeypatch):
    monkeypatch.delenv(P.AUTO_ENV, raising=False)
    monkeypatch.setenv(P.LAUNCH_ENV, "no")
    monkeypatch.setattr(P, "cpu_bf16_matmul_is_fast", lambda: (True, {}))
    monkeypatch.setattr(P, "BF16_MARGIN", float("inf"))
    decision = stage_one(images, tmp_path / "a")
    assert (decision["resolved"], decision["source"]) == ("no", "accelerate launch")
