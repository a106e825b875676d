"""Property tests (hypothesis) for bad input: whatever a saved config.json or a checkpoint's
progress.json holds, whatever bytes a metadata file or an image file holds, whatever text a
numeric flag gets, the answer is the value, a converted image, or one mmfusion error (exit code
2 on the command line, no folder) -- never another exception. (Numbers one by one:
tests/test_bad_numbers.py; streams: tests/test_generation.py.)"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmfusion import GPT, ViT
from mmfusion.config import GPTConfig, ViTConfig
from mmfusion.errors import CheckpointError, ImageError
from mmfusion.processing import load_image
from mmfusion.weights import CONFIG_NAME, read_json

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# JSON values of every type. Integers stay small (a config that asks for a 64-wide model is
# legitimate and gets built) or absurd (refused before allocation); floats include NaN and inf,
# which Python's json writes and reads back.
scalars = (st.none() | st.booleans() | st.integers(-8, 64) | st.integers(10**12, 10**40)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)

MODELS = {"gpt": (GPT, GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)),
          "vit": (ViT, ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=3))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("saved")
    for kind, (cls, config) in MODELS.items():
        cls(config).save_pretrained(root / kind)
    return {kind: root / kind for kind in MODELS}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_any_value_in_any_config_field_loads_or_is_a_checkpoint_error(kind, saved, tmp_path):
    cls = MODELS[kind][0]
    original = json.loads((saved[kind] / CONFIG_NAME).read_text())
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((saved[kind] / "model.safetensors").read_bytes())

    @FUZZ
    @given(where=st.sampled_from(["config." + k for k in original["config"]] + ["model_type", "format_version",
                                                                              "config", "(whole file)"]),
           value=json_values)
    def check(where, value):
        meta = json.loads(json.dumps(original))
        if where == "(whole file)":
            meta = value
        elif where.startswith("config."):
            meta["config"][where[len("config."):]] = value
        else:
            meta[where] = value
        model = load_or_refuse(cls, folder, meta)
        if model is None:
            return
        # it loaded because the value is valid (a head count, a dropout...): then it was taken as written
        assert json.loads(json.dumps(model.config.to_dict())) == meta["config"]

    check()


def load_or_refuse(cls, folder, meta: dict):
    """`meta` written as the folder's config.json, then the model it loads, or None where it is
    refused with a CheckpointError naming the folder."""
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    try:
        return cls.from_pretrained(folder)
    except CheckpointError as e:
        assert str(folder) in str(e), str(e)
        return None


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_bool_for_a_count_or_a_word_for_a_flag_is_a_checkpoint_error(kind, saved, tmp_path):
    """bool is an int to isinstance, and "false" is truthy: a hand-edited config.json with either
    must not build a model (nor crash inside torch building it); every loaded flag is a bool and
    every loaded count is not."""
    import dataclasses

    cls, config = MODELS[kind]
    original = json.loads((saved[kind] / CONFIG_NAME).read_text())
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((saved[kind] / "model.safetensors").read_bytes())
    for f in dataclasses.fields(config):
        for value in (True, "false", 1):
            meta = json.loads(json.dumps(original))
            meta["config"][f.name] = value
            model = load_or_refuse(cls, folder, meta)
            if model is None:
                continue
            loaded = getattr(model.config, f.name)
            assert isinstance(loaded, bool) == (f.type == "bool"), f"{f.name}={value!r} loaded as {loaded!r}"


@FUZZ
@given(data=st.binary(max_size=256) | st.integers(1, 200_000).map(lambda n: b"[" * n)
       | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_in_a_metadata_file_are_json_or_a_checkpoint_error(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("meta") / "progress.json"
    path.write_bytes(data)
    try:
        read_json(path)
    except CheckpointError as e:
        assert str(path) in str(e)


def _image_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    pixels = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    files = {}
    for fmt, extra in (("PNG", {}), ("JPEG", {"exif": Image.Exif()}), ("GIF", {}), ("BMP", {}), ("WEBP", {})):
        buf = io.BytesIO()
        try:
            pixels.save(buf, format=fmt, **extra)
        except (OSError, KeyError):  # a Pillow built without that codec
            continue
        files[fmt] = buf.getvalue()
    return files


IMAGE_FILES = _image_files()


@FUZZ
@given(fmt=st.sampled_from(sorted(IMAGE_FILES)), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=6))
def test_any_damage_to_an_image_file_is_rgb_or_an_image_error(fmt, cut, flips, tmp_path_factory):
    data = bytearray(IMAGE_FILES[fmt])
    for where, byte in flips:
        data[int(where * len(data))] = byte
    data = bytes(data[: max(0, int(cut * len(data)))]) if cut < 1 else bytes(data)
    path = tmp_path_factory.mktemp("img") / f"damaged.{fmt.lower()}"
    path.write_bytes(data)
    try:
        image = load_image(path)
    except ImageError as e:
        assert str(path) in str(e) and "re-save" in str(e), str(e)
        return
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1


@FUZZ
@given(progress=json_values | st.fixed_dictionaries({"step": json_values}), total=st.integers(1, 10**6))
def test_any_progress_json_gives_a_step_of_the_run_or_a_checkpoint_error(progress, total):
    from mmfusion.training.loop import checked_step

    try:
        step = checked_step(progress, total)
    except CheckpointError as e:
        assert "progress.json gives step" in str(e)
        return
    assert type(step) is int and 0 <= step <= total and step == progress["step"]


# What a user might type for a number: every spelling Python's float() or int() takes, and not.
flag_texts = st.sampled_from(["nan", "NaN", "inf", "-inf", "1e400", "-1e400", "1e-400", "-0", "0", "-1", "0x10",
                              "1_000", "\u0663", " 7 ", "", "1e18", "9" * 40, "2.5", "-2.5", "true"]) | st.text(max_size=6)


def _numeric_flags() -> list[tuple[str, str, str]]:
    """(command, flag, the config field it sets) for every numeric flag of both stages."""
    from mmfusion.training import pretrain_vit, train_vqa
    from mmfusion.training.args import config_flags
    from mmfusion.training.setup import RunConfig

    out = []
    for command, config in (("pretrain-vit", pretrain_vit.ViTStageConfig), ("train-vqa", train_vqa.VQAStageConfig)):
        for cls in (config, RunConfig):
            out += [(command, "--" + f.name.replace("_", "-"), f.path[-1]) for f in config_flags(cls)
                    if f.kind in (int, float)]
    return out


NUMERIC_FLAGS = _numeric_flags()


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(flag=st.sampled_from(NUMERIC_FLAGS), text=flag_texts)
def test_any_text_for_a_numeric_flag_parses_or_is_refused_in_one_line(flag, text):
    """Parse only (the stage's own parse, as the CLI runs it): a value either makes a valid
    configuration or is refused with exit code 2 / a ConfigError -- and no folder appears."""
    import contextlib
    import tempfile

    from mmfusion.config import ConfigError
    from mmfusion.training import pretrain_vit, train_vqa

    command, option, field = flag
    parse = pretrain_vit.parse if command == "pretrain-vit" else train_vqa.parse
    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "out"
        argv = ["--output-dir", str(out), f"{option}={text}"]
        if command == "train-vqa":
            argv += ["--vit", "vit-tiny"]
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                parse(argv)
        except SystemExit as e:  # argparse: not a number of that type
            assert e.code == 2 and "error:" in err.getvalue() and "Traceback" not in err.getvalue()
        except ConfigError as e:  # a number, but impossible: named
            assert option in str(e) or field in str(e), str(e)  # the flag, or the config field it sets
        assert not out.exists()
