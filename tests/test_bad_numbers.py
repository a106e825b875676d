"""Non-finite and out-of-range numbers are refused by name, at parse time, for every numeric flag.

NaN fails `x < 0` and `x <= 0` alike and inf passes them, so checks written as comparisons let
both through (--lr inf trained until the loss was NaN). Every numeric setting goes through
`mmfusion.config.check_number`; the flags below are enumerated from the stages' config
dataclasses, so a new flag is covered without editing this file.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmfusion.cli import main
from mmfusion.config import ConfigError, ViTConfig, check_number
from mmfusion.training import pretrain_vit, train_vqa
from mmfusion.training.args import config_flags
from mmfusion.training.setup import RunConfig


def numeric_flags(stage_config: type) -> list:
    return [f for cls in (stage_config, RunConfig) for f in config_flags(cls) if f.kind in (int, float)]


def cases() -> list[tuple[str, str, str, str]]:
    """(command, flag, bad value, field name the error must name) for every numeric flag."""
    out = []
    for command, config in (("pretrain-vit", pretrain_vit.ViTStageConfig), ("train-vqa", train_vqa.VQAStageConfig)):
        for flag in numeric_flags(config):
            option = "--" + flag.name.replace("_", "-")
            bad = ["nan", "inf", "-inf"] if flag.kind is float else ["-5"]
            out += [(command, option, value, flag.path[-1]) for value in bad]
    return out


CASES = cases()


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def test_the_cases_cover_every_numeric_flag_of_both_stages():
    assert len(CASES) >= 100
    options = {(c, o) for c, o, _, _ in CASES}
    for expected in [("pretrain-vit", "--lr"), ("pretrain-vit", "--dropout"), ("pretrain-vit", "--shift"),
                     ("train-vqa", "--gpt-init-std"), ("train-vqa", "--adam-eps"), ("train-vqa", "--seed"),
                     ("train-vqa", "--adapter-layer"), ("train-vqa", "--align-epochs")]:
        assert expected in options


@pytest.mark.parametrize("command, option, value, field", CASES, ids=[f"{c}{o}={v}" for c, o, v, _ in CASES])
def test_a_bad_number_is_one_line_naming_the_flag_before_any_work(command, option, value, field, tmp_path: Path,
                                                                   capsys):
    out = tmp_path / "out"
    base = [command, "--output-dir", str(out), "--dataset", str(tmp_path / "no-data-needed.jsonl")]
    if command == "train-vqa":
        base += ["--vit", "vit-tiny"]
    code, err = run_cli(capsys, [*base, f"{option}={value}"])
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert field in err.replace("-", "_") or option in err, err
    assert not out.exists(), "a refused flag must not create the output folder"


@pytest.mark.parametrize("value", ["-1", str(2**70)])
def test_seeds_outside_what_numpy_and_torch_take_are_refused(value, tmp_path, capsys):
    code, err = run_cli(capsys, ["pretrain-vit", "--output-dir", str(tmp_path / "o"), f"--seed={value}"])
    assert code == 2 and "--seed must be in [0, 4294967295]" in err, err


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "temperature must be >= 0 (a finite number), got nan"),
    (["--temperature", "inf"], "temperature must be >= 0 (a finite number), got inf"),
    (["--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--seed", "-3"], "seed must be"),
])
def test_generation_numbers_are_checked_before_the_model_is_read(flags, message, tmp_path, capsys):
    code, err = run_cli(capsys, ["generate", "--model", str(tmp_path / "none"), "--image", "x.png", *flags])
    assert code == 2 and message in err, err


@pytest.mark.parametrize("flag", ["--batch-size", "--limit", "--max-new-tokens", "--caption-max-new-tokens"])
def test_eval_numbers_are_checked_before_the_model_is_read(flag, tmp_path, capsys):
    code, err = run_cli(capsys, ["eval", "--model", str(tmp_path / "none"), flag, "0"])
    assert code == 2 and f"{flag} must be >= 1" in err, err


@pytest.mark.parametrize("field, value", [("layer_norm_eps", float("nan")), ("layer_norm_eps", "1e-6"),
                                          ("image_mean", (0.5, "a", 0.5)), ("image_std", (0.5, math.inf, 0.5)),
                                          ("image_mean", 0.5), ("dropout", float("inf"))])
def test_model_config_numbers_of_the_wrong_type_or_not_finite_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        ViTConfig(**{field: value})


@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.booleans(), st.text(max_size=3)),
       low=st.one_of(st.none(), st.floats(-10, 10)), width=st.floats(0, 10), low_open=st.booleans(),
       high_open=st.booleans())
def test_check_number_accepts_exactly_the_finite_numbers_in_range(value, low, width, low_open, high_open):
    high = None if low is None else low + width
    finite_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    inside = finite_number and (low is None or (value > low if low_open else value >= low)) and \
        (high is None or (value < high if high_open else value <= high))
    try:
        check_number("x", value, low, high, low_open=low_open, high_open=high_open)
        accepted = True
    except ConfigError as e:
        accepted = False
        assert str(e).startswith("x must be ") and repr(value) in str(e)
    assert accepted == inside
