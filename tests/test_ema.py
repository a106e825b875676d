"""The moving average of the weights (`pretrain-vit --ema`): its arithmetic, the saved model,
and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmfusion.errors import CheckpointError
from mmfusion.training import pretrain_vit
from mmfusion.training.loop import WeightEMA

QUIET = ["--no-progress", "--mixed-precision", "no"]
TINY = ["--image-size", "16", "--patch-size", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--batch-size", "4", "--warmup-steps", "1"]


def test_average_follows_the_documented_decay():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
        model.bias.fill_(0.0)
    ema = WeightEMA(model, decay=0.9)
    expected = torch.zeros(1, 2)
    for n in range(1, 30):
        with torch.no_grad():
            model.weight.fill_(float(n))
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * n
        torch.testing.assert_close(ema.shadow["weight"], expected)
    ema.copy_to(model)
    torch.testing.assert_close(model.weight.data, expected)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema_images")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k in range(2):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(8):
                arr = rng.integers(0, 80, (16, 16, 3)).astype(np.uint8)
                arr[:, :, 2 * k] += 170  # red or blue, with noise
                Image.fromarray(arr).save(root / split / f"c{k}" / f"{i}.png")
    return root


def train(folder, out, *extra):
    stage, run = pretrain_vit.parse(["--dataset", str(folder), "--output-dir", str(out), "--max-steps", "6",
                                     "--ema", "0.8", *TINY, *QUIET, *extra])
    pretrain_vit.run(stage, run)
    return load_file(str(out / "model" / "model.safetensors"))


def test_saved_model_is_the_average_and_resume_is_exact(folder, tmp_path):
    full = train(folder, tmp_path / "full", "--save-every", "3")
    ckpt = tmp_path / "full" / "checkpoints" / "step_3"
    assert (ckpt / WeightEMA.FILE).is_file()
    resumed = train(folder, tmp_path / "resumed", "--resume", str(ckpt))
    for k in full:
        assert torch.equal(full[k], resumed[k]), f"{k} differs after resume"
    stage, run = pretrain_vit.parse(["--dataset", str(folder), "--output-dir", str(tmp_path / "raw"), "--max-steps",
                                     "6", *TINY, *QUIET])
    pretrain_vit.run(stage, run)
    raw = load_file(str(tmp_path / "raw" / "model" / "model.safetensors"))
    assert any(not torch.equal(full[k], raw[k]) for k in full)  # the average, not the last weights


def test_resume_refuses_a_checkpoint_of_the_other_kind(folder, tmp_path):
    train(folder, tmp_path / "ema", "--save-every", "3")
    stage, run = pretrain_vit.parse(["--dataset", str(folder), "--output-dir", str(tmp_path / "plain"),
                                     "--max-steps", "6", "--resume", str(tmp_path / "ema" / "checkpoints" / "step_3"),
                                     *TINY, *QUIET])
    with pytest.raises(CheckpointError, match=r"saved with an average of the weights \(--ema\)"):
        pretrain_vit.run(stage, run)
