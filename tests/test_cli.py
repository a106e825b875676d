"""The `mmfusion` command: real work on a tiny saved model, and one clear line for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion import VLM, VLMConfig
from mmfusion.cli import main
from mmfusion.config import AdapterConfig, GPTConfig, ViTConfig


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    config = VLMConfig(vit=ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=0),
                       gpt=GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64), adapter=AdapterConfig())
    root = tmp_path_factory.mktemp("cli")
    VLM(config).save_pretrained(root / "model")
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(root / "img.png")
    return root


def test_generate_prints_an_answer(tiny_model, capsys):
    code = main(["generate", "--model", str(tiny_model / "model"), "--image", str(tiny_model / "img.png"),
                 "--question", "what color?", "--max-new-tokens", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "{root}/nope", "--image", "{root}/img.png"], "nope does not exist; a saved model is a folder"),
    (["generate", "--model", "{root}/model", "--image", "{root}/missing.png"], "does not exist"),
    (["generate", "--model", "{root}/model", "--image", "{root}/img.png", "--question", "   "], "question must be"),
    (["generate", "--model", "{root}/model", "--image", "{root}/img.png", "--top-p", "2"], "--top-p must be"),
    (["pretrain-vit", "--n-embd", "30", "--n-head", "4", "--output-dir", "{root}/bad"], "not divisible"),
    (["frobnicate"], "unknown command"),
])
def test_bad_input_is_one_line_and_exit_code_2(tiny_model, capsys, args, message):
    code = main([a.format(root=tiny_model) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["--top-k", "0", "--temperature", "1"], "--top-k must be >= 1, got 0"),
    (["--top-p", "0", "--temperature", "1"], "--top-p must be in (0, 1], got 0.0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--seed", "-1", "--temperature", "1"], "--seed must be in [0, "),
])
def test_generate_errors_name_the_flag_not_the_python_field(tiny_model, capsys, flags, message):
    code = main(["generate", "--model", str(tiny_model / "model"), "--image", str(tiny_model / "img.png"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"mmfusion: error: {message}"), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags", [["--top-k", "5"], ["--top-p", "0.5"], ["--seed", "5"],
                                   ["--temperature", "0", "--top-k", "5"]])
def test_sampling_flags_at_greedy_temperature_are_refused_not_ignored(tiny_model, capsys, flags):
    code = main(["generate", "--model", str(tiny_model / "model"), "--image", str(tiny_model / "img.png"), *flags])
    err = capsys.readouterr().err
    flag = next(f for f in flags if f != "--temperature" and f.startswith("--"))
    assert code == 2 and f"{flag} needs --temperature > 0 (sampling); greedy decoding ignores it" in err, err


@pytest.mark.parametrize("temperature", ["1", "1e-45", "1e-300"])
def test_sampling_flags_work_at_any_positive_temperature(tiny_model, capsys, temperature):
    code = main(["generate", "--model", str(tiny_model / "model"), "--image", str(tiny_model / "img.png"),
                 "--temperature", temperature, "--top-k", "5", "--top-p", "0.9", "--seed", "1",
                 "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0 and len(out.splitlines()) == 1, err


@pytest.mark.parametrize("args", [
    ["eval", "--model", "m", "--limit", "abc"],
    ["eval", "--model", "m", "--frobnicate"],
    ["generate", "--model", "m", "--image", "x.png", "--top-k", "x"],
    ["generate", "--model", "m"],
    ["export", "--model", "m", "--output", "o", "--max-bad-fraction", "1"],
    ["export", "--model", "m"],
])
def test_argparse_errors_are_one_line_with_exit_code_2(capsys, args):
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"mmfusion {args[0]}: error: "), err


def test_not_an_image_file_is_rejected(tiny_model, capsys):
    bad = tiny_model / "notes.png"
    bad.write_text("not an image")
    assert main(["generate", "--model", str(tiny_model / "model"), "--image", str(bad)]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_eval_writes_predictions_for_a_local_dataset(tiny_model, capsys):
    import json

    with open(tiny_model / "qa.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"image": "img.png", "question": f"question {i}?", "answers": ["yes"] * 10}) + "\n")
    out = tiny_model / "new" / "folder" / "preds.jsonl"  # made as needed: it failed after the whole evaluation
    code = main(["eval", "--model", str(tiny_model / "model"), "--dataset", str(tiny_model / "qa.jsonl"),
                 "--split", "test", "--output", str(out), "--max-new-tokens", "2"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(r["answers"] == ["yes"] * 10 for r in rows)
    assert "| **all** | 5 |" in capsys.readouterr().out


def test_eval_and_generate_run_on_the_device_flag(tiny_model, capsys):
    """--device places the model (both commands ran on the CPU whatever the machine had)."""
    import json

    with open(tiny_model / "qa_device.jsonl", "w") as f:
        f.write(json.dumps({"image": "img.png", "question": "what?", "answers": ["yes"] * 10}) + "\n")
    out = tiny_model / "device_preds.jsonl"
    assert main(["eval", "--model", str(tiny_model / "model"), "--dataset", str(tiny_model / "qa_device.jsonl"),
                 "--output", str(out), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "device: cpu\n" in capsys.readouterr().out and len(out.read_text().splitlines()) == 1
    assert main(["generate", "--model", str(tiny_model / "model"), "--image", str(tiny_model / "img.png"),
                 "--max-new-tokens", "2", "--device", "cpu:0"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


@pytest.mark.parametrize("command", ["eval", "generate"])
@pytest.mark.parametrize("device, message", [
    ("nonsense", "--device 'nonsense' is not a device name"),
    ("meta", "--device 'meta' holds shapes, not weights"),
    ("cuda:99", "--device 'cuda:99'"),  # no CUDA here, or not that many devices
    ("hpu", "--device 'hpu': torch cannot place tensors there"),  # torch has no torch.hpu module: was a traceback
    ("mps", "--device 'mps'"),  # torch's error is a 50-line dispatcher listing: one line of it
])
def test_a_device_torch_cannot_use_is_one_line(tiny_model, capsys, command, device, message):
    extra = ["--dataset", str(tiny_model / "missing.jsonl")] if command == "eval" else ["--image", str(tiny_model / "img.png")]
    code = main([command, "--model", str(tiny_model / "model"), *extra, "--device", device])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"mmfusion: error: {message}") and len(err.strip().splitlines()) == 1, err
    assert len(err) < 400, err  # torch's own text cut to its first sentence


@pytest.mark.parametrize("cuda, expected", [(True, "cuda"), (False, "cpu")])
def test_device_auto_is_cuda_where_torch_sees_it(monkeypatch, cuda, expected):
    """The GPU branch of `auto`, injected: this machine may have no GPU."""
    import mmfusion.weights
    from mmfusion.cli import _device

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(mmfusion.weights, "checked_device", lambda name, flag: asked.append((name, flag)) or name)
    assert _device("auto") == expected and asked == [(expected, "--device")]
    assert _device("cpu") == "cpu" and asked[-1] == ("cpu", "--device")


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def _default_shown(text: str, flag: str) -> str:
    """The default the help text gives for `flag` (its entry under options, not the usage line)."""
    entry = text[max(text.rfind(f"{flag} "), text.rfind(f"{flag},")):]
    return entry.split("(default: ", 1)[1].split(")", 1)[0]


def test_stage_help_shows_the_defaults_a_run_uses(capsys):
    from mmfusion.training import pretrain_vit, train_vqa

    text = _help("pretrain-vit", capsys)
    stage, run = pretrain_vit.parse([])
    for flag, value in [("--epochs", run.epochs), ("--batch-size", run.batch_size), ("--lr", run.lr),
                        ("--warmup-steps", run.warmup_steps), ("--n-embd", stage.vit.n_embd),
                        ("--image-size", stage.vit.image_size)]:
        assert _default_shown(text, flag) == str(value), flag
    assert (run.epochs, run.batch_size, run.lr) == (30, 32, 2e-3)  # the main job's stage 1, not RunConfig's
    text = _help("train-vqa", capsys)
    stage, run = train_vqa.parse([])
    for flag, value in [("--epochs", run.epochs), ("--pixel-shuffle", stage.adapter.pixel_shuffle),
                        ("--keep-cls", stage.adapter.keep_cls), ("--adapter-layer", stage.adapter.layer),
                        ("--image-positions", stage.adapter.position_embedding)]:
        assert _default_shown(text, flag) == str(value), flag


def test_adapter_flags_fill_the_stage_adapter_config():
    from mmfusion.training import train_vqa

    stage, _ = train_vqa.parse(["--projection", "linear", "--adapter-layer", "1", "--keep-cls", "--pixel-shuffle", "4",
                                "--merge", "mean", "--image-positions"])
    assert stage.adapter == AdapterConfig(projection="linear", layer=1, keep_cls=True, pixel_shuffle=4, merge="mean",
                                          position_embedding=True)


def test_vit_size_flags_apply_on_top_of_the_preset():
    from mmfusion.config import vit_preset
    from mmfusion.training import pretrain_vit

    stage, _ = pretrain_vit.parse(["--preset", "vit-small-patch16-224", "--n-layer", "2"])
    assert stage.vit == vit_preset("vit-small-patch16-224", num_classes=0).replace(n_layer=2)
    # two flags that are only valid together: the config is built once, with both
    stage, _ = pretrain_vit.parse(["--n-embd", "30", "--n-head", "3"])
    assert (stage.vit.n_embd, stage.vit.n_head) == (30, 3)


def test_version(capsys):
    from mmfusion import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mmfusion {__version__}"


def test_eval_and_generate_help_show_their_defaults(capsys):
    text = _help("generate", capsys)
    auto = "auto: the first CUDA device torch sees, else the CPU"
    for flag, value in [("--max-new-tokens", "32"), ("--temperature", "0.0"), ("--device", auto)]:
        assert _default_shown(text, flag) == value, flag
    text = _help("eval", capsys)
    for flag, value in [("--dataset", "easy-vqa"), ("--split", "test"), ("--batch-size", "256"),
                        ("--max-new-tokens", "8"), ("--caption-max-new-tokens", "48"), ("--max-bad-fraction", "0.01"),
                        ("--device", auto)]:
        assert _default_shown(text, flag) == value, flag


@pytest.mark.parametrize("temperature", ["0", "1"])
def test_a_model_whose_finite_weights_overflow_is_refused_not_answered(tiny_model, tmp_path, capsys, temperature):
    """Every weight finite, so loading accepts it, but the scores overflow to NaN: greedy decoding
    answered "!!!!!" (argmax of NaN is token 0) and sampling ended in a torch traceback."""
    model = VLM.from_pretrained(tiny_model / "model")
    with torch.no_grad():
        model.gpt.wte.weight.mul_(3e37)
    model.save_pretrained(tmp_path / "huge")
    code = main(["generate", "--model", str(tmp_path / "huge"), "--image", str(tiny_model / "img.png"),
                 "--temperature", temperature, "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "scores are NaN or infinite" in err and len(err.splitlines()) == 1, err


def test_a_restricted_output_vocabulary_is_not_mistaken_for_overflow(tiny_model):
    """-inf marks the tokens outside config.output_tokens: legitimate scores, not an overflow."""
    from mmfusion.generation import GenerationConfig, generate

    gpt = VLM.from_pretrained(tiny_model / "model").gpt
    gpt.restrict_output([5, 6, 7])
    out = generate(gpt, input_ids=torch.tensor([[1, 2, 3]]), config=GenerationConfig(max_new_tokens=4))
    assert out[0] and all(t in (5, 6, 7) for t in out[0])


@pytest.mark.parametrize("flags, message", [
    (["--task", "vqa", "--caption-column", "nosuch"], "--caption-column would be ignored here (only questions"),
    (["--dataset", "easy-vqa", "--image-column", "nosuch"], "--image-column would be ignored here (the built-in"),
    (["--dataset", "easy-vqa", "--max-bad-fraction", "0.5"], "--max-bad-fraction would be ignored here"),
])
def test_eval_refuses_flags_it_would_ignore(tiny_model, tmp_path, capsys, flags, message):
    """They were accepted and ignored: a typo in --caption-column or --image-column changed nothing."""
    import json

    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"image": str(tiny_model / "img.png"), "question": "q?", "answers": ["yes"]}) + "\n")
    code = main(["eval", "--model", str(tiny_model / "model"), "--dataset", str(data), *flags,
                 "--output", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("flags", [["--image-column", "x"], ["--max-bad-fraction", "0.5"], ["--answer-column", "a"]])
def test_train_vqa_refuses_column_flags_the_built_in_data_would_ignore(flags, tmp_path):
    from mmfusion.config import ConfigError
    from mmfusion.training import train_vqa

    with pytest.raises(ConfigError, match=f"{flags[0]} would be ignored here \\(the built-in datasets"):
        train_vqa.parse([*flags, "--output-dir", str(tmp_path / "o")])
    train_vqa.parse([*flags, "--eval-dataset", str(tmp_path / "mine.jsonl"), "--output-dir", str(tmp_path / "o")])


@pytest.mark.parametrize("outcome", ["done", "refused"])
def test_a_second_command_in_the_same_processes_still_has_the_process_group(tmp_path, outcome):
    """A launched script, notebook or test may run several commands in the same processes: the
    first one destroyed the group accelerate keeps using, and the second failed ('Default process
    group has not been initialized'), also after a refused first command."""
    import torch
    import torch.distributed as dist

    from mmfusion.errors import ConfigError, run_command

    def command(argv):
        if outcome == "refused":
            raise ConfigError("bad flag")

    def collective(argv):
        dist.all_reduce(torch.ones(1))

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert run_command(command, []) == (0 if outcome == "done" else 2)
        assert run_command(collective, []) == 0 and dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


AT_EXIT = """
import atexit, sys
import torch.distributed as dist
from mmfusion.errors import run_command
atexit.register(lambda: print("initialized at exit:", dist.is_initialized()))  # runs after run_command's hook
dist.init_process_group("gloo", store=dist.FileStore(sys.argv[1], 1), rank=0, world_size=1)
for _ in range(2):
    assert run_command(lambda argv: None, []) == 0 and dist.is_initialized()
"""


def test_the_process_group_a_command_left_up_is_destroyed_at_exit(tmp_path):
    """torch warns at exit about a group never destroyed: the process's exit ends it, once."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", AT_EXIT, str(tmp_path / "store")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "initialized at exit: False"


@pytest.mark.parametrize("error, shown", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 51200000000 bytes. Error code 12 (Cannot allocate memory)"), "47.7 GiB asked for at once"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"),
     "CUDA out of memory"),
    (MemoryError(), "MemoryError")])
def test_running_out_of_memory_is_one_line_naming_the_fix(error, shown, capsys):
    """A --block-size of 1e8 passed the parameter limit and died in torch's allocator: a traceback."""
    from mmfusion.errors import run_command

    def command(argv):
        raise error

    assert run_command(command, []) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmfusion: error: out of memory ({shown}") and "lower --batch-size" in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_runtime_error_that_is_not_memory_keeps_its_traceback():
    from mmfusion.errors import run_command

    def command(argv):
        raise RuntimeError("shape mismatch in a matmul: a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_command(command, [])


@pytest.mark.skipif(not hasattr(os, "setpgid"), reason="POSIX file-size limits")
def test_a_failed_safetensors_write_is_one_line(tmp_path):
    """safetensors' failed write (a full disk; here a file-size limit) is a SafetensorError, not
    an OSError: it was a traceback. In a process of its own, which the limit then binds."""
    import subprocess
    import sys

    code = ("import resource, signal, sys, torch\n"
            "from safetensors.torch import save_file\n"
            "from mmfusion.errors import run_command\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            "sys.exit(run_command(lambda argv: save_file({'w': torch.zeros(100_000)}, sys.argv[1]), []))\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.safetensors")], capture_output=True,
                            text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "I/O error" in lines[0] and "writing a safetensors file; check the free space" in lines[0]
