"""Bad checkpoints: a missing or corrupt model.safetensors (or a folder, FIFO or symlink loop in
its place), a config of another model kind, shapes that do not match the config, integer or
non-finite weights, an untied head, a folder written by a newer format. Saved models
(ViT, GPT, VLM; API and every CLI flag that takes one) and training checkpoints (--resume)
each raise CheckpointError naming the file and the fix, or end the CLI with one line, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmfusion import GPT, VLM, ViT, VLMConfig
from mmfusion.cli import main
from mmfusion.config import AdapterConfig, GPTConfig, ViTConfig
from mmfusion.weights import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, CheckpointError

VIT = ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=0)
GPT_CFG = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)
KINDS = {"vit": (ViT, VIT), "gpt": (GPT, GPT_CFG), "vlm": (VLM, VLMConfig(vit=VIT, gpt=GPT_CFG,
                                                                         adapter=AdapterConfig(pixel_shuffle=2)))}
OTHER_KIND = {"vit": "gpt", "gpt": "vlm", "vlm": "vit"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """One good saved folder per model kind, an image, and a tiny VQA set."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("saved")
    for kind, (cls, config) in KINDS.items():
        cls(config).save_pretrained(root / kind)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(root / "img.png")
    (root / "qa.jsonl").write_text("".join(
        json.dumps({"image": "img.png", "question": "what?", "answers": ["red"]}) + "\n" for _ in range(8)))
    return root


def edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / CONFIG_NAME).read_text())
    change(meta)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def halve(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def wider(meta):
    config = meta["config"]
    for part in (config, config.get("gpt", {}), config.get("vit", {})):
        if "n_embd" in part:
            part["n_embd"] = 64


def impossible(meta):
    config = meta["config"]
    (config["gpt"] if "gpt" in config else config)["n_head"] = 3  # 32 is not divisible by 3


def huge(meta):
    """Sizes that lie: a context (or image) that would need petabytes, refused before allocating."""
    config = meta["config"]
    for part in (config[k] for k in ("vit", "gpt") if k in config) if "gpt" in config else [config]:
        part.update(block_size=10**12) if "block_size" in part else part.update(image_size=8 * 10**6)


def unknown_field(meta):
    meta["config"]["rotary_base"] = 10000.0  # a field from some future version


def string_for_float(meta):
    config = meta["config"]
    (config["vit"] if "vit" in config else config)["layer_norm_eps"] = "1e-5"


def edit_weights(folder: Path, change) -> None:
    tensors = load_file(folder / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})


def last_float(tensors: dict) -> str:
    return sorted(k for k, v in tensors.items() if v.is_floating_point())[-1]


def one_nan(tensors):
    tensors[last_float(tensors)].view(-1)[0] = float("nan")


def int_for_float(tensors):
    name = last_float(tensors)
    tensors[name] = torch.ones_like(tensors[name], dtype=torch.int64)


def replaced_by(make):
    def damage(path: Path) -> None:
        path.unlink()
        make(path)
    return damage


def foreign_weights(folder: Path) -> None:
    kind = json.loads((folder / CONFIG_NAME).read_text())["model_type"]
    shutil.copy(folder.parent / OTHER_KIND[kind] / WEIGHTS_NAME, folder / WEIGHTS_NAME)


# defect: (how to damage a good folder, message fragments)
DEFECTS = {
    "weights_missing": (lambda f: (f / WEIGHTS_NAME).unlink(), ["model.safetensors is missing", "save the model again"]),
    "weights_truncated": (lambda f: halve(f / WEIGHTS_NAME), ["not a readable safetensors file", "truncated"]),
    "weights_empty": (lambda f: (f / WEIGHTS_NAME).write_bytes(b""), ["not a readable safetensors file"]),
    "weights_garbage": (lambda f: (f / WEIGHTS_NAME).write_bytes(b"\x00\xff" * 512), ["not a readable safetensors"]),
    "weights_of_another_model": (foreign_weights, ["missing keys", "another kind of model"]),
    "weights_is_a_folder": (lambda f: replaced_by(Path.mkdir)(f / WEIGHTS_NAME), ["is not a regular file", "FIFO"]),
    "weights_symlink_loop": (lambda f: replaced_by(lambda p: p.symlink_to(p.name))(f / WEIGHTS_NAME),
                             ["cannot be read (Too many levels of symbolic links)"]),
    "weights_dangling_symlink": (lambda f: replaced_by(lambda p: p.symlink_to("/nonexistent/x"))(f / WEIGHTS_NAME),
                                 ["is missing (a symbolic link to /nonexistent/x, which does not exist)"]),
    "weights_hold_nan": (lambda f: edit_weights(f, one_nan), ["holds NaN or inf values", "load an earlier checkpoint"]),
    "weights_int_for_float": (lambda f: edit_weights(f, int_for_float), ["is stored as int64, expected a float dtype"]),
    "shapes_not_matching_config": (lambda f: edit_meta(f, wider), ["shapes do not match the config",
                                                                    "come from different models"]),
    "config_missing": (lambda f: (f / CONFIG_NAME).unlink(), ["config.json is missing", "save_pretrained"]),
    "config_not_json": (lambda f: (f / CONFIG_NAME).write_text("{half a json"), ["not valid JSON"]),
    "config_not_mmfusion": (lambda f: (f / CONFIG_NAME).write_text('{"model_type": "gpt2", "n_embd": 32}'),
                            ["is a transformers config (model_type 'gpt2')", "import the model with --vit/--gpt"]),
    "config_of_another_kind": (lambda f: edit_meta(f, lambda m: m.update(model_type=OTHER_KIND[m["model_type"]])),
                               ["model, not a", "folder, or load this one with", ".from_pretrained"]),
    "config_model_type_not_a_string": (lambda f: edit_meta(f, lambda m: m.update(model_type=[m["model_type"]])),
                                       ['"model_type" is [', "not a string"]),
    "config_settings_a_string": (lambda f: edit_meta(f, lambda m: m.update(config="x")),
                                 ['"config" is a string, not an object of settings']),
    "config_settings_null": (lambda f: edit_meta(f, lambda m: m.update(config=None)), ['"config" is null, not an object']),
    "config_settings_a_list": (lambda f: edit_meta(f, lambda m: m.update(config=[])), ['"config" is a list, not an object']),
    "config_impossible_values": (lambda f: edit_meta(f, impossible), ["holds an invalid", "not divisible by n_head"]),
    "config_unknown_field": (lambda f: edit_meta(f, unknown_field), ["holds an invalid", "rotary_base"]),
    "config_huge_sizes": (lambda f: edit_meta(f, huge), ["holds an invalid", "parameters", "check these sizes"]),
    "newer_format_version": (lambda f: edit_meta(f, lambda m: m.update(format_version=FORMAT_VERSION + 1)),
                             [f"newer mmfusion (format {FORMAT_VERSION + 1} > {FORMAT_VERSION})", "upgrade mmfusion"]),
    "format_version_not_a_number": (lambda f: edit_meta(f, lambda m: m.update(format_version="2")),
                                    ["format_version must be an integer"]),
    "not_a_folder": (lambda f: (shutil.rmtree(f), f.write_text("x")), ["is not a folder"]),
    "config_binary_garbage": (lambda f: (f / CONFIG_NAME).write_bytes(bytes(range(256)) * 8), ["not UTF-8 text"]),
    "config_is_a_folder": (lambda f: ((f / CONFIG_NAME).unlink(), (f / CONFIG_NAME).mkdir()),
                           ["is not a regular file"]),
    "config_nested_100k_deep": (lambda f: (f / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000),
                                ["nested too deeply"]),
    "config_oversized": (lambda f: (f / CONFIG_NAME).write_bytes(b" " * (17 * 2**20) + b"{}"), ["too large"]),
    "config_string_for_float": (lambda f: edit_meta(f, string_for_float), ["holds an invalid", "layer_norm_eps must be"]),
}


def damaged(saved: Path, tmp_path: Path, kind: str, defect: str) -> Path:
    work = tmp_path / "models"
    if not work.exists():
        shutil.copytree(saved, work)
    DEFECTS[defect][0](work / kind)
    return work / kind


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_bad_saved_model_raises_checkpoint_error(saved, tmp_path, kind, defect):
    folder = damaged(saved, tmp_path, kind, defect)
    with pytest.raises(CheckpointError) as info:
        KINDS[kind][0].from_pretrained(folder)
    message = str(info.value)
    assert str(folder) in message and all(f in message for f in DEFECTS[defect][1]), message


def test_good_folders_load(saved):
    for kind, (cls, config) in KINDS.items():
        assert cls.from_pretrained(saved / kind).config == config


def one_line_error(capsys, args: list) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("mmfusion: error: ")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def cli_commands(root: Path, kind: str, folder: Path) -> list[list]:
    """Every CLI flag that reads a saved model of `kind`."""
    quiet = ["--max-steps", "1", "--no-progress", "--mixed-precision", "no", "--holdout", "0",
             "--output-dir", root / "out"]
    if kind == "vlm":
        return [["generate", "--model", folder, "--image", root / "img.png", "--question", "what?"],
                ["eval", "--model", folder, "--dataset", root / "qa.jsonl", "--split", "test"]]
    if kind == "vit":
        return [["train-vqa", "--vit", folder, "--dataset", root / "qa.jsonl", *quiet],
                ["pretrain-vit", "--init-from", folder, "--dataset", root / "qa.jsonl", "--label-column", "question",
                 "--eval-split", "train", *quiet]]
    return [["train-vqa", "--vit", "vit-tiny", "--gpt", folder, "--dataset", root / "qa.jsonl", *quiet]]


# Defects whose folder no longer looks like an mmfusion save: the ViT/GPT flags then try
# transformers (which fails with its own clear line), so only the fragment common to both is checked.
NOT_MMFUSION_ANY_MORE = {"config_missing", "config_not_json", "config_not_mmfusion", "not_a_folder"}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_bad_saved_model_through_cli_is_one_line(saved, tmp_path, capsys, kind, defect):
    folder = damaged(saved, tmp_path, kind, defect)
    for args in cli_commands(tmp_path / "models", kind, folder):
        line = one_line_error(capsys, args)
        assert str(folder) in line, line
        if kind == "vlm" or defect not in NOT_MMFUSION_ANY_MORE:
            assert all(f in line for f in DEFECTS[defect][1]), line


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_fifo_config_is_refused_without_blocking(saved, tmp_path, capsys, kind):
    """Reading a FIFO with no writer blocks forever, so it runs in a thread with a timeout."""
    shutil.copytree(saved, tmp_path / "models")
    folder = tmp_path / "models" / kind
    (folder / CONFIG_NAME).unlink()
    os.mkfifo(folder / CONFIG_NAME)
    outcome = []

    def load():
        try:
            KINDS[kind][0].from_pretrained(folder)
        except CheckpointError as e:
            outcome.append(str(e))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert len(outcome) == 1 and "is not a regular file" in outcome[0], "blocked on a FIFO config.json, or no error"
    for args in cli_commands(tmp_path / "models", kind, folder):  # ViT/GPT flags try transformers' loader too
        line = one_line_error(capsys, args)
        assert "is not a regular file" in line and str(folder) in line, line


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_fifo_weights_file_is_refused_before_it_is_opened(saved, tmp_path, capsys, monkeypatch, kind):
    """safetensors' open() of a FIFO with no writer blocks forever while holding the GIL (no thread
    can time it out), so a spy stands in for load_file: reaching it at all is the failure."""
    import mmfusion.weights

    def opened(*args, **kwargs):
        raise AssertionError("load_file was called on a FIFO: it would block forever")

    monkeypatch.setattr(mmfusion.weights, "load_file", opened)
    shutil.copytree(saved, tmp_path / "models")
    folder = tmp_path / "models" / kind
    (folder / WEIGHTS_NAME).unlink()
    os.mkfifo(folder / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="model.safetensors is not a regular file"):
        KINDS[kind][0].from_pretrained(folder)
    for args in cli_commands(tmp_path / "models", kind, folder):
        line = one_line_error(capsys, args)
        assert "is not a regular file" in line and str(folder) in line, line


@pytest.mark.parametrize("device, message", [
    ("cuda:99", "map_location 'cuda:99'"),  # no CUDA here, or not that many devices
    ("nonsense", "map_location 'nonsense' is not a device name"),
    ("meta", "map_location 'meta' holds shapes, not weights"),  # was blamed on the file
])
def test_a_device_torch_cannot_use_is_a_config_error(saved, device, message):
    from mmfusion.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        GPT.from_pretrained(saved / "gpt", map_location=device)


@pytest.mark.parametrize("device", ["cpu:0", "cpu:5", torch.device("cpu", 0)])
def test_an_indexed_cpu_device_loads(saved, device):
    """torch takes 'cpu:0' (one CPU device, the index ignored); safetensors refused it, and the
    refusal read as a damaged file."""
    model = GPT.from_pretrained(saved / "gpt", map_location=device)
    assert next(model.parameters()).device == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA device")
def test_cuda_without_a_cuda_device_names_the_fix(saved):
    from mmfusion.errors import ConfigError

    with pytest.raises(ConfigError, match="map_location 'cuda' but torch sees no CUDA device; use 'cpu'"):
        GPT.from_pretrained(saved / "gpt", map_location="cuda")


def gpt_with(saved: Path, tmp_path: Path, change) -> Path:
    shutil.copytree(saved / "gpt", tmp_path / "gpt")
    edit_weights(tmp_path / "gpt", change)
    return tmp_path / "gpt"


@pytest.mark.parametrize("stored, dtype", [
    (lambda t: t.view(torch.int32), "int32"),  # a header that lies about the dtype: the same bytes as I32
    (lambda t: t.round().long(), "int64"),
    (lambda t: t != 0, "bool"),
])
def test_a_non_float_tensor_for_a_float_weight_is_refused(saved, tmp_path, stored, dtype):
    folder = gpt_with(saved, tmp_path, lambda t: t.update({"ln_f.weight": stored(t["ln_f.weight"])}))
    with pytest.raises(CheckpointError, match=f"ln_f.weight is stored as {dtype}, expected a float dtype"):
        GPT.from_pretrained(folder)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_still_load_into_float32(saved, tmp_path, dtype):
    folder = gpt_with(saved, tmp_path, lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
    stored = load_file(folder / WEIGHTS_NAME)
    model = GPT.from_pretrained(folder)
    assert all(torch.equal(v, stored[k].float()) for k, v in model.state_dict().items() if k in stored)


@pytest.mark.parametrize("key", ["wpe.weight", "blocks.0.mlp.fc.weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_first(saved, tmp_path, key, value):
    def spoil(tensors):
        tensors[key].view(-1)[-1] = value
        tensors["ln_f.weight"].view(-1)[0] = value  # later in the model's order than `key`'s block

    with pytest.raises(CheckpointError, match=f": {key} holds NaN or inf values") as info:
        GPT.from_pretrained(gpt_with(saved, tmp_path, spoil))
    assert "ln_f.weight" not in str(info.value)


@pytest.mark.parametrize("kind, head, table", [("gpt", "lm_head.weight", "wte.weight"),
                                               ("vlm", "gpt.lm_head.weight", "gpt.wte.weight")])
def test_a_stored_tied_twin_that_differs_is_refused_an_equal_one_loads(saved, tmp_path, kind, head, table):
    """save_pretrained stores a tied head once; a file with both (an untied model's) must agree."""
    shutil.copytree(saved / kind, tmp_path / kind)
    folder = tmp_path / kind
    edit_weights(folder, lambda t: t.update({head: t[table].clone()}))
    assert torch.equal(KINDS[kind][0].from_pretrained(folder).state_dict()[head], load_file(folder / WEIGHTS_NAME)[head])
    edit_weights(folder, lambda t: t[head].view(-1).__setitem__(0, 1.0 + t[head].view(-1)[0]))
    with pytest.raises(CheckpointError, match=f"{head} differs from {table}, but this model ties them"):
        KINDS[kind][0].from_pretrained(folder)


def test_a_config_that_cannot_be_built_is_a_checkpoint_error(saved, tmp_path, monkeypatch):
    """A boolean count used to pass validation and crash inside torch, outside from_pretrained's
    try; whatever else construction raises is also the saved config's fault."""
    shutil.copytree(saved / "vit", tmp_path / "vit")
    folder = tmp_path / "vit"
    edit_meta(folder, lambda m: m["config"].update(num_classes=True))
    with pytest.raises(CheckpointError, match="holds an invalid vit config.*num_classes must be >= 0"):
        ViT.from_pretrained(folder)
    edit_meta(folder, lambda m: m["config"].update(num_classes=0))

    def crash(self, config):
        raise TypeError("empty(): argument 'size' (position 1) must be tuple of ints")

    monkeypatch.setattr(ViT, "__init__", crash)
    with pytest.raises(CheckpointError, match="holds an invalid vit config .*must be tuple of ints"):
        ViT.from_pretrained(folder)


# ---- training checkpoints (--resume) --------------------------------------------------------------

TINY = ["--image-size", "16", "--patch-size", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--batch-size", "4", "--warmup-steps", "1", "--no-progress", "--mixed-precision", "no", "--holdout", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    """A 2-step stage-1 run on a tiny image folder with a checkpoint after each step."""
    root = tmp_path_factory.mktemp("resume")
    for split in ("train", "test"):
        for color in ("red", "blue"):
            (root / "data" / split / color).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (16, 16), color).save(root / "data" / split / color / f"{i}.png")
    args = ["pretrain-vit", "--dataset", str(root / "data"), *TINY, "--max-steps", "2", "--save-every", "1"]
    assert main([*args, "--output-dir", str(root / "run")]) == 0
    assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == ["step_1", "step_2"]
    return root / "run", args


def copy_run(trained, tmp_path: Path, damage) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    damage(out / "checkpoints")
    return out


RESUME_DEFECTS = {
    "model_weights_truncated": (lambda c: halve(c / "step_2" / "model.safetensors"), [],
                                ["cannot resume from", "step_2", "pick another checkpoint with --resume PATH"]),
    "model_weights_missing": (lambda c: (c / "step_2" / "model.safetensors").unlink(), [],
                              ["cannot resume from", "step_2"]),
    "optimizer_state_garbage": (lambda c: (c / "step_2" / "optimizer.bin").write_bytes(b"junk"), [],
                                ["cannot resume from", "step_2"]),
    "progress_not_json": (lambda c: (c / "step_2" / "progress.json").write_text("{"), [],
                          ["cannot resume from", "step_2"]),
    "progress_step_is_text": (lambda c: (c / "step_2" / "progress.json").write_text('{"step": "2"}'), [],
                              ["cannot resume from", "step_2", "gives step '2'"]),
    "progress_step_past_the_run": (lambda c: (c / "step_2" / "progress.json").write_text('{"step": 1000000000}'), [],
                                   ["cannot resume from", "step 1000000000, not a step of this 3-step run"]),
    "progress_step_negative": (lambda c: (c / "step_2" / "progress.json").write_text('{"step": -1}'), [],
                               ["cannot resume from", "gives step -1"]),
    "progress_not_an_object": (lambda c: (c / "step_2" / "progress.json").write_text("[2]"), [],
                               ["cannot resume from", "step_2"]),
    "progress_is_a_folder": (lambda c: ((c / "step_2" / "progress.json").unlink(),
                                        (c / "step_2" / "progress.json").mkdir()), [],
                             ["cannot resume from", "progress.json is not a regular file"]),
    "progress_nested_100k_deep": (lambda c: (c / "step_2" / "progress.json").write_text("[" * 100_000), [],
                                  ["cannot resume from", "nested too deeply"]),
    "rng_state_garbage": (lambda c: (c / "step_2" / "random_states_0.pkl").write_bytes(b"junk"), [],
                          ["cannot resume from", "random_states_0.pkl cannot be loaded"]),
    "rng_state_missing": (lambda c: (c / "step_2" / "random_states_0.pkl").unlink(), [],
                          ["cannot resume from", "lacks process 0's random state (random_states_0.pkl)"]),
    # found by the loop only after the run folder was changed (checkpoints set aside, run_config.json rewritten)
    "weights_missing_from_checkpoint": (lambda c: (c / "step_2" / "model.safetensors").unlink(), [],
                                        ["cannot resume from", "lacks the weights (model.safetensors)"]),
    "optimizer_missing": (lambda c: (c / "step_2" / "optimizer.bin").unlink(), [],
                          ["cannot resume from", "lacks the optimizer state (optimizer.bin)", "incomplete"]),
    "rng_state_not_states": (lambda c: torch.save({"step": 2}, c / "step_2" / "random_states_0.pkl"), [],
                             ["cannot resume from", "does not hold the random states"]),
    # one process resuming two's checkpoint went on silently with half the global batch
    "saved_by_two_processes": (lambda c: shutil.copy(c / "step_2" / "random_states_0.pkl",
                                                     c / "step_2" / "random_states_1.pkl"), [],
                               ["cannot resume from", "saved by a run of 2 process(es) and this run has 1",
                                "accelerate launch --num_processes 2"]),
    "other_model_flags": (lambda c: None, ["--n-embd", "64"], ["cannot resume from", "step_2",
                                                               "model was built with other settings (n_embd 32 -> 64)"]),
    "named_checkpoint_incomplete": (lambda c: (c / "step_1" / "progress.json").unlink(),
                                    ["--resume", "{ckpt}/step_1"], ["is not a complete checkpoint", "--resume latest"]),
    "named_checkpoint_missing": (lambda c: None, ["--resume", "{ckpt}/step_9"], ["step_9 is not a complete checkpoint"]),
}


# Damaged contents are found when accelerate loads them, in the loop, after the run folder was
# started (its run_config.json rewritten): refused all the same, but not yet before that.
FOUND_BY_THE_LOOP = {"model_weights_truncated", "rng_state_garbage", "rng_state_not_states", "optimizer_state_garbage"}


@pytest.mark.parametrize("defect", sorted(RESUME_DEFECTS))
def test_bad_training_checkpoint_through_cli_is_one_line(trained, tmp_path, capsys, defect):
    damage, extra, fragments = RESUME_DEFECTS[defect]
    out = copy_run(trained, tmp_path, damage)
    extra = [e.format(ckpt=out / "checkpoints") for e in extra]
    resume = [] if "--resume" in extra else ["--resume", "latest"]
    config = (out / "run_config.json").read_bytes()
    line = one_line_error(capsys, [*trained[1], "--output-dir", out, "--max-steps", "3", *resume, *extra])
    assert all(f in line for f in fragments), line
    if defect not in FOUND_BY_THE_LOOP:
        assert (out / "run_config.json").read_bytes() == config and not (out / "earlier_run").exists()  # untouched


def test_an_unfinished_checkpoint_is_ignored_and_cleaned_up(trained, tmp_path, monkeypatch):
    """A crash mid-save leaves `.tmp_step_N` (no progress.json, never renamed): --resume latest
    takes the last complete checkpoint, and the next save removes the leftover. Every
    torch.load of the resume (optimizer and RNG state) runs with weights_only=True."""
    from mmfusion.training.loop import checkpoint_dirs

    weights_only, real_load = [], torch.load

    def spy(*args, **kwargs):
        weights_only.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)

    out = copy_run(trained, tmp_path, lambda c: shutil.copytree(c / "step_2", c / ".tmp_step_3"))
    (out / "checkpoints" / ".tmp_step_3" / "progress.json").unlink()
    halve(out / "checkpoints" / ".tmp_step_3" / "model.safetensors")
    assert [p.name for p in checkpoint_dirs(out)] == ["step_1", "step_2"]
    assert main([*trained[1], "--output-dir", str(out), "--max-steps", "3", "--resume", "latest"]) == 0
    assert len(weights_only) >= 2 and all(w is True for w in weights_only), weights_only
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_3"]
    reference = load_file(trained[0] / "checkpoints" / "step_2" / "model.safetensors")
    resumed_from = load_file(out / "checkpoints" / "step_2" / "model.safetensors")
    assert all(torch.equal(reference[k], resumed_from[k]) for k in reference)


def test_weights_saved_by_save_file_with_extra_metadata_still_load(saved, tmp_path):
    """Only keys and shapes matter: safetensors metadata written by other tools is fine."""
    shutil.copytree(saved / "gpt", tmp_path / "gpt")
    tensors = load_file(tmp_path / "gpt" / WEIGHTS_NAME)
    save_file(tensors, tmp_path / "gpt" / WEIGHTS_NAME, metadata={"format": "pt", "written_by": "someone else"})
    assert GPT.from_pretrained(tmp_path / "gpt").config == GPT_CFG


# ---- weights only as safetensors + JSON: no pickle anywhere in the package ------------------------

PICKLE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
TORCH_SAVES = {"torch.save", "torch.serialization.save"}


def dotted(node) -> str:
    import ast

    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def unsafe_loading(source: str) -> list[str]:
    """Calls and imports in `source` that can run pickled code: torch.load without
    weights_only=True, torch.save (writes pickles), pickle-family imports, numpy allow_pickle,
    and accelerate custom checkpoint objects (which accelerate loads with weights_only=False)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                found.append(f"line {node.lineno}: from {node.module} import")
            if node.module in ("torch", "torch.serialization"):
                found += [f"line {node.lineno}: from {node.module} import {a.name}" for a in node.names
                          if a.name in ("load", "save")]
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        safe = keywords.get("weights_only")
        if name in TORCH_LOADS and not (isinstance(safe, ast.Constant) and safe.value is True):
            found.append(f"line {node.lineno}: {name} without weights_only=True")
        if name in TORCH_SAVES:
            found.append(f"line {node.lineno}: {name}")
        allow = keywords.get("allow_pickle")
        if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
            found.append(f"line {node.lineno}: allow_pickle")
        if name.endswith("register_for_checkpointing"):
            found.append(f"line {node.lineno}: register_for_checkpointing")
    return found


def test_the_scanner_flags_unsafe_loading():
    bad = ("import pickle\nfrom joblib import load\nimport torch\nimport numpy as np\nfrom torch import load\n"
           "torch.load('a')\ntorch.load('a', weights_only=False)\ntorch.serialization.load('a')\n"
           "torch.save({}, 'a')\nnp.load('a', allow_pickle=True)\naccelerator.register_for_checkpointing(obj)\n")
    assert sorted(int(f.split(":")[0][5:]) for f in unsafe_loading(bad)) == [1, 2, 5, 6, 7, 8, 9, 10, 11]
    assert unsafe_loading("import torch\ntorch.load('a', map_location='cpu', weights_only=True)\n") == []


def test_package_never_loads_pickles():
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "mmfusion").rglob("*.py")) + sorted((root / "training").rglob("*.py"))
    assert len(files) > 20
    problems = {str(f.relative_to(root)): unsafe_loading(f.read_text()) for f in files}
    assert {f: p for f, p in problems.items() if p} == {}


def test_saved_files_get_the_usual_permissions(saved):
    """Atomic writes go through mkstemp, whose files are private (0600); saved models are shared."""
    from mmfusion.weights import FILE_MODE

    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (saved / "gpt" / name).stat().st_mode & 0o777 == FILE_MODE


@pytest.mark.parametrize("kind, lie", [
    ("gpt", {"block_size": 10_000_000}),  # positions: 3.2e8 weights at width 32
    ("vit", {"n_layer": 20_000}),  # blocks the file does not hold: 2.5e8 weights
    ("vlm", {"gpt": {"n_layer": 20_000}}),
])
def test_a_config_far_larger_than_its_weights_is_refused_before_building(saved, tmp_path, kind, lie):
    """A config.json that lies about sizes (under the parameter cap) built the whole model first:
    1.5 GB and 5 s for the block_size lie before the shape check, an out-of-memory kill for larger ones."""
    folder = Path(shutil.copytree(saved / kind, tmp_path / kind))

    def grow(meta):
        config = meta["config"]
        for key, value in lie.items():
            config[key].update(value) if isinstance(value, dict) else config.update({key: value})

    edit_meta(folder, grow)
    cls = KINDS[kind][0]
    with pytest.raises(CheckpointError, match="describes a model of at least .* weights, but model.safetensors holds"):
        cls.from_pretrained(folder)
