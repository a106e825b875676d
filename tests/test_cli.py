"""The `mmfusion` command: real work on a tiny saved model, and one clear line for bad input."""

from __future__ import annotations

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
    (["generate", "--model", "{root}/nope", "--image", "{root}/img.png"], "is not a folder"),
    (["generate", "--model", "{root}/model", "--image", "{root}/missing.png"], "does not exist"),
    (["generate", "--model", "{root}/model", "--image", "{root}/img.png", "--question", "   "], "question must be"),
    (["generate", "--model", "{root}/model", "--image", "{root}/img.png", "--top-p", "2"], "top_p"),
    (["pretrain-vit", "--n-embd", "30", "--n-head", "4", "--output-dir", "{root}/bad"], "not divisible"),
    (["frobnicate"], "unknown command"),
])
def test_bad_input_is_one_line_and_exit_code_2(tiny_model, capsys, args, message):
    code = main([a.format(root=tiny_model) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


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
    out = tiny_model / "preds.jsonl"
    code = main(["eval", "--model", str(tiny_model / "model"), "--dataset", str(tiny_model / "qa.jsonl"),
                 "--split", "test", "--output", str(out), "--max-new-tokens", "2"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(r["answers"] == ["yes"] * 10 for r in rows)
    assert "| **all** | 5 |" in capsys.readouterr().out
