"""Per-cell ViT pretraining (`ViTConfig.label_grid`): the cell head, the scenes cell labels,
flips that mirror the labels with the image, and stage 1 end to end on scenes."""

from __future__ import annotations

import json

import pytest
import torch

from mmfusion import ConfigError, ViT, ViTConfig
from mmfusion.config import vit_preset
from mmfusion.data import load_classification
from mmfusion.data import scenes as sc
from mmfusion.processing import ImageProcessor
from mmfusion.training import pretrain_vit


def test_cell_head_classifies_the_mean_of_each_cells_patches():
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=8, num_classes=5, label_grid=2))
    torch.nn.init.normal_(vit.head.weight)
    x = torch.randn(3, 3, 16, 16)
    logits = vit(x)
    assert logits.shape == (3, 4, 5)
    hidden = vit.forward_features(x)[:, 1:].view(3, 4, 4, 8)  # (B, rows, cols, C) of the 4x4 patch grid
    for cell, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):  # reading order
        mean = hidden[:, r:r + 2, c:c + 2].mean(dim=(1, 2))
        torch.testing.assert_close(logits[:, cell], vit.head(mean))


def test_cell_head_round_trips_and_rejects_grids_that_do_not_divide(tmp_path):
    vit = ViT(vit_preset("vit-tiny", num_classes=37, label_grid=2))
    vit.save_pretrained(tmp_path / "v")
    again = ViT.from_pretrained(tmp_path / "v")
    assert again.config.label_grid == 2
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(again(x), vit(x))
    with pytest.raises(ConfigError, match="label_grid=3 does not divide"):
        vit_preset("vit-tiny", label_grid=3)  # 8x8 patches
    with pytest.raises(ConfigError, match="label_grid must be a positive integer"):
        vit_preset("vit-tiny", label_grid=0)


def test_scene_cell_labels_name_what_fills_each_cell():
    assert len(sc.CELL_CLASSES) == 1 + 2 * len(sc.COLORS) * len(sc.SHAPES) and sc.CELL_CLASSES[0] == "empty"
    ds, report = load_classification("scenes", "test")
    assert report.kept == len(ds) == sc.SPLIT_SIZES["test"]
    names = ds.features["label"].feature.names
    for i in (0, 5, 17):
        scene = sc.make_scene(sc.SPLIT_SEEDS["test"], i)
        expected = ["empty"] * 4
        for s in scene.shapes:
            expected[s.cell] = f"{s.size} {s.color} {s.shape}"
        assert [names[k] for k in ds[i]["label"]] == expected


def test_flips_mirror_the_label_grid_with_the_image():
    ds = sc.load_scenes_cells("train", 64)
    vit_cfg = vit_preset("vit-tiny", label_grid=2)
    plain = pretrain_vit.ClassificationImages(ds, ImageProcessor.from_config(vit_cfg))
    flipping = pretrain_vit.ClassificationImages(ds, ImageProcessor.from_config(vit_cfg), hflip=True, seed=3)
    flipped = 0
    for i in range(len(ds)):
        x0, y0 = plain[i]
        x1, y1 = flipping[i]
        if torch.equal(x1, x0):
            assert torch.equal(y1, y0)
        else:
            flipped += 1
            torch.testing.assert_close(x1, x0.flip(-1))
            assert y1.tolist() == [y0[1], y0[0], y0[3], y0[2]]  # left and right cells swap
    assert 10 < flipped < 54


def test_stage_one_on_scenes_trains_a_cell_classifier(tmp_path, monkeypatch):
    monkeypatch.setattr(sc, "SPLIT_SIZES", {"train": 64, "test": 16})
    out = tmp_path / "vit"
    stage, run_cfg = pretrain_vit.parse(["--dataset", "scenes", "--output-dir", str(out), "--max-steps", "3",
                                         "--batch-size", "16", "--no-progress", "--n-layer", "1"])
    metrics = pretrain_vit.run(stage, run_cfg)
    assert metrics["label_grid"] == 2 and metrics["classes"] == list(sc.CELL_CLASSES)
    assert metrics["shift"] == 0  # the default with per-cell labels: a shift could move shapes across cells
    assert 0.0 <= metrics["test_accuracy"] <= metrics["test_cell_accuracy"] <= 1.0
    vit = ViT.from_pretrained(out / "model")
    assert vit.config.label_grid == 2 and vit.config.num_classes == 37
    # The metrics are the model's: recompute both accuracies by hand.
    ds = sc.load_scenes_cells("test")
    x = ImageProcessor.from_config(vit.config)(ds["image"])
    pred = vit.eval()(x).argmax(-1)
    y = torch.tensor(ds["label"])
    assert metrics["test_cell_accuracy"] == pytest.approx((pred == y).float().mean().item())
    assert metrics["test_accuracy"] == pytest.approx((pred == y).all(1).float().mean().item())
    assert json.loads((out / "metrics.json").read_text())["test_cell_accuracy"] == metrics["test_cell_accuracy"]

