"""Stage 1's optional augmentations: TrivialAugment (its pixel operations checked against
Pillow's), random-resized crops, mixup, CutMix, label smoothing."""

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
                                     "--batch-size", "4", "--trivial-augment", "--crop-area", "0.5", "--mixup", "0.2",
                                     "--cutmix", "1", "--label-smoothing", "0.1", *TINY, *QUIET])
    metrics = pretrain_vit.run(stage, run)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert ("augmentation (recipe none): flips on, shift 4, trivial augment on, crop area 0.5, mixup 0.2, cutmix 1, "
            "label smoothing 0.1, ema 0\n") in capsys.readouterr().out
    saved = json.loads((out / "run_config.json").read_text())["stage"]
    assert (saved["crop_area"], saved["mixup"], saved["cutmix"], saved["label_smoothing"]) == (0.5, 0.2, 1.0, 0.1)
    assert saved["trivial_augment"] is True


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


# ---- TrivialAugment ----------------------------------------------------------------------------

def photo(seed: int = 0, size: int = 24) -> tuple[Image.Image, torch.Tensor]:
    """A random RGB image with smooth and sharp parts, as PIL and as a (3, H, W) tensor in [0, 1]."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(30, 220, size)[None, :, None] * np.ones((size, 1, 3))
    pixels = (ramp + rng.integers(-30, 30, (size, size, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels), torch.from_numpy(pixels).permute(2, 0, 1).float() / 255


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


ENHANCE = {"brightness": "Brightness", "color": "Color", "contrast": "Contrast", "sharpness": "Sharpness"}


@pytest.mark.parametrize("op", sorted(ENHANCE))
@pytest.mark.parametrize("strength, sign", [(0.0, 1.0), (0.4, 1.0), (0.7, -1.0), (1.0, -1.0)])
def test_enhance_operations_match_pillow(op, strength, sign):
    from PIL import ImageEnhance

    image, x = photo()
    ours = augment.TRIVIAL_OPS[op](x, strength, sign)
    factor = 1 + sign * strength * 0.9
    theirs = as_tensor(getattr(ImageEnhance, ENHANCE[op])(image).enhance(factor))
    assert (ours - theirs).abs().max() <= 2.5 / 255  # Pillow rounds to 8 bits at each step


@pytest.mark.parametrize("seed", range(4))
def test_level_operations_match_pillow_exactly(seed):
    from PIL import ImageOps

    image, x = photo(seed)
    assert torch.equal(augment._equalize(x), as_tensor(ImageOps.equalize(image)))
    for bits in (4, 6, 8):
        assert torch.equal(augment._posterize(x, bits), as_tensor(ImageOps.posterize(image, bits)))
    for threshold in (1, 100, 200, 256):  # Pillow inverts levels >= threshold
        strength = 1 - (threshold - 0.5) / 255
        assert torch.allclose(augment.TRIVIAL_OPS["solarize"](x, strength, 1.0),
                              as_tensor(ImageOps.solarize(image, threshold)), atol=1e-6)
    assert (augment._autocontrast(x) - as_tensor(ImageOps.autocontrast(image))).abs().max() <= 1.5 / 255


def test_geometric_operations_move_the_image_as_named():
    x = torch.zeros(3, 16, 16)
    x[:, 4:6, 4:6] = 1.0  # a bright 2x2 square, up and left of the centre
    for name in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"):
        assert torch.allclose(augment.TRIVIAL_OPS[name](x, 0.0, 1.0), x, atol=1e-6), name  # strength 0: unchanged
    four_pixels = 4 / 8 / 0.9  # strength 1 shifts by 0.9 half-widths (45% of the side); a half-width is 8 px
    right = augment.TRIVIAL_OPS["translate_x"](x, four_pixels, -1.0)  # the content moves right by 4 px
    down = augment.TRIVIAL_OPS["translate_y"](x, four_pixels, -1.0)
    assert torch.allclose(right[:, 4:6, 8:10], torch.ones(3, 2, 2), atol=1e-5)
    assert torch.allclose(down[:, 8:10, 4:6], torch.ones(3, 2, 2), atol=1e-5)
    turned = augment.TRIVIAL_OPS["rotate"](torch.ones(3, 16, 16), 1.0, 1.0)
    assert torch.allclose(turned, torch.ones(3, 16, 16))  # edges replicated: no black corners


def test_trivial_augment_draws_every_operation_and_keeps_the_normalization(monkeypatch):
    drawn = []

    def recording(name, op):
        return lambda x, s, sign: (drawn.append((name, s, sign)), op(x, s, sign))[1]

    monkeypatch.setattr(augment, "TRIVIAL_OPS", {n: recording(n, op) for n, op in augment.TRIVIAL_OPS.items()})
    processor = ImageProcessor(24, (0.5,) * 3, (0.5,) * 3)
    _, pixels = photo()
    x = (pixels - processor.mean) / processor.std
    outs = [augment.trivial_augment(x, processor.mean, processor.std, gen(seed)) for seed in range(400)]
    assert all(o.shape == x.shape and o.min() >= -1 - 1e-6 and o.max() <= 1 + 1e-6 for o in outs)
    assert torch.equal(outs[7], augment.trivial_augment(x, processor.mean, processor.std, gen(7)))  # pure
    names = [n for n, _, _ in drawn[:400]]
    assert set(names) == set(augment.TRIVIAL_OPS) and max(names.count(n) for n in set(names)) < 50  # uniform
    strengths = sorted(s for _, s, _ in drawn[:400])
    assert strengths[0] < 0.02 and strengths[-1] > 0.98 and {sign for _, _, sign in drawn} == {1.0, -1.0}


@pytest.mark.slow
def test_trivial_augment_is_refused_with_cell_labels(tmp_path):
    stage, run = pretrain_vit.parse(["--dataset", "scenes", "--trivial-augment", "--output-dir", str(tmp_path / "v"),
                                     "--max-steps", "1", *QUIET])
    with pytest.raises(ConfigError, match="--trivial-augment would mix or move shapes across the 2x2 label cells"):
        pretrain_vit.run(stage, run)
    assert not (tmp_path / "v").exists()
