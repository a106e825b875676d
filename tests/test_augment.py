"""Stage 1's optional augmentations: random-resized crops, mixup, CutMix, label smoothing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.config import ConfigError
from mmfusion.processing import ImageProcessor
from mmfusion.training import augment, pretrain_vit
from mmfusion.training.pretrain_vit import ClassificationImages, ViTStageConfig

QUIET = ["--no-progress", "--mixed-precision", "no"]
TINY = ["--image-size", "16", "--patch-size", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "16"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_resized_crop_keeps_the_shape_and_zooms_in():
    ramp = torch.arange(32.0).repeat(3, 32, 1)  # (3, 32, 32), value = column
    spans = []
    for seed in range(50):
        out = augment.random_resized_crop(ramp, 0.25, gen(seed))
        assert out.shape == ramp.shape
        spans.append((out[0, 0, -1] - out[0, 0, 0]).item())  # the columns the crop covered, stretched
    assert min(spans) >= math.sqrt(0.25 * 3 / 4) * 31 - 2 and max(spans) <= 31  # >= 25% of the area, never past the edge
    assert max(spans) - min(spans) > 5  # crops differ
    assert torch.equal(augment.random_resized_crop(ramp, 0.25, gen(7)), augment.random_resized_crop(ramp, 0.25, gen(7)))


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_mixed_targets_are_the_shares_of_each_image(mixup, cutmix):
    a, b = torch.ones(3, 8, 8), -torch.ones(3, 8, 8)
    ta, tb = augment.one_hot(1, 4), augment.one_hot(3, 4)
    for seed in range(30):
        x, t = augment.mix(a, ta, b, tb, mixup, cutmix, gen(seed))
        assert t.sum().item() == pytest.approx(1.0) and t[0] == 0 and t[2] == 0
        kept = ((x + 1) / 2).mean().item()  # the share of a in the pixels, for a blend or a pasted box
        assert t[1].item() == pytest.approx(kept, abs=1e-6)


def test_mixing_needs_class_count_and_is_a_pure_function_of_seed_and_row():
    rows = [{"image": Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)), "label": i} for i in range(4)]
    processor = ImageProcessor(8, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationImages(rows, processor, mixup=0.2)
    mixed = ClassificationImages(rows, processor, seed=3, mixup=0.4, cutmix=1.0, crop_area=0.5, num_classes=4)
    for virtual in range(12):
        x, target = mixed[virtual]
        assert x.shape == (3, 8, 8) and target.shape == (4,) and target.sum().item() == pytest.approx(1.0)
        x2, target2 = mixed[virtual]
        assert torch.equal(x, x2) and torch.equal(target, target2)
    plain = ClassificationImages(rows, processor, seed=3)
    assert plain[5][1] == 1  # off: the class id as before


@pytest.mark.parametrize("flag, value, message", [
    ("crop_area", 0.0, "--crop-area must be"), ("crop_area", 1.5, "--crop-area must be"),
    ("mixup", -1.0, "--mixup must be"), ("cutmix", float("nan"), "--cutmix must be"),
    ("label_smoothing", 1.0, "--label-smoothing must be")])
def test_impossible_values_are_refused(flag, value, message):
    with pytest.raises(ConfigError, match=message):
        ViTStageConfig(**{flag: value})


def test_the_stage_trains_with_every_augmentation_and_records_them(tmp_path, capsys):
    root = tmp_path / "images"
    for split in ("train", "test"):
        for k, color in enumerate(((250, 0, 0), (0, 0, 250))):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(6):
                Image.fromarray(np.full((16, 16, 3), color, np.uint8)).save(root / split / f"c{k}" / f"{i}.png")
    out = tmp_path / "vit"
    stage, run = pretrain_vit.parse(["--dataset", str(root), "--output-dir", str(out), "--max-steps", "3",
                                     "--batch-size", "4", "--crop-area", "0.5", "--mixup", "0.2", "--cutmix", "1",
                                     "--label-smoothing", "0.1", *TINY, *QUIET])
    metrics = pretrain_vit.run(stage, run)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert ("augmentation (recipe none): flips on, shift 4, crop area 0.5, mixup 0.2, cutmix 1, label smoothing 0.1, "
            "ema 0\n") in capsys.readouterr().out
    saved = json.loads((out / "run_config.json").read_text())["stage"]
    assert (saved["crop_area"], saved["mixup"], saved["cutmix"], saved["label_smoothing"]) == (0.5, 0.2, 1.0, 0.1)


def test_a_recipe_sets_the_flags_and_explicit_flags_win(capsys):
    stage = pretrain_vit.parse(["--recipe", "small-data"])[0]
    assert stage.recipe == "small-data"
    for name, value in pretrain_vit.RECIPES["small-data"].items():
        assert getattr(stage, name) == value
    assert pretrain_vit.parse(["--recipe", "small-data", "--mixup", "0"])[0].mixup == 0.0
    assert pretrain_vit.parse(["--mixup", "0.3", "--recipe", "small-data"])[0].mixup == 0.3  # order does not matter
    plain = pretrain_vit.parse([])[0]
    assert plain.recipe == "none" and (plain.crop_area, plain.mixup, plain.cutmix, plain.label_smoothing,
                                       plain.ema) == (1.0, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(SystemExit):
        pretrain_vit.parse(["--recipe", "big"])
    assert "invalid choice: 'big'" in capsys.readouterr().err
