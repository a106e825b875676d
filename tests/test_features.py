"""A frozen ViT's features computed once per image (training/features.py): each distinct image
goes through the ViT once, every row gets its own image's features, and the collator batches
them. Stage 2 with and without them, and its resume: tests/test_training.py."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion import ViT, ViTConfig
from mmfusion.config import AdapterConfig, GPTConfig
from mmfusion.gpt import GPT
from mmfusion.processing import ImageProcessor, PromptBuilder, VQACollator
from mmfusion.training.data import Conversations
from mmfusion.training.features import FeatureRows, distinct_images
from mmfusion.training.setup import RunConfig
from mmfusion.training.train_vqa import short_run_rows
from mmfusion.training.vqa_config import VQAStageConfig
from mmfusion.vlm import VLM


def tiny_vlm() -> VLM:
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=16, patch_size=4, n_layer=2, n_head=2, n_embd=32, num_classes=0))
    gpt = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    return VLM.from_parts(vit, gpt, AdapterConfig(pixel_shuffle=2))


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def qa_dataset(image_ids: list[int]) -> datasets.Dataset:
    """One row per id; rows with the same id (>= 0) show the same image."""
    return datasets.Dataset.from_dict(
        {"image": [image(max(i, 0) * 100 + r * (i < 0)) for r, i in enumerate(image_ids)],
         "question": [f"q{r}" for r in range(len(image_ids))], "answers": [[f"a{r}"] for r in range(len(image_ids))],
         "answer_type": ["other"] * len(image_ids), "image_id": image_ids},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answers": datasets.Sequence(datasets.Value("string")),
                                    "answer_type": datasets.Value("string"), "image_id": datasets.Value("int64")}))


def counted(model: VLM) -> list[int]:
    """Batch sizes of every ViT forward from now on."""
    seen: list[int] = []
    model.vit.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    return seen


def three_processes(n: int, part) -> list:
    """As loop.across_processes over 3 processes, run one after another here: each process's
    contiguous share, the results put together in process order."""
    return [x for i in range(3) for x in part(i * n // 3, (i + 1) * n // 3)]


# ids < 0 anywhere: images are told apart by their bytes (rows 0 and 2 of the last case show one image)
@pytest.mark.parametrize("split", [None, three_processes])
@pytest.mark.parametrize("ids, distinct", [([3, 1, 3, 3, 1, 2], 3), ([-1, -1, -1, -1], 4), ([5, -1, 5], 2)])
def test_each_image_goes_through_the_vit_once_and_each_row_gets_its_own(ids, distinct, split):
    model, ds = tiny_vlm(), qa_dataset(ids)
    processor = ImageProcessor.from_config(model.config.vit)
    seen = counted(model)
    rows = FeatureRows.compute(model, ds, processor, batch_size=2, progress=False, split=split)
    assert sum(seen) == distinct and len(rows.features) == distinct
    model.eval()
    for r in range(len(ds)):
        row = rows[r]
        assert "image" not in row and row["question"] == f"q{r}" and row["image_id"] == ids[r]
        alone = model.vit_features(processor([ds[r]["image"]]))[0]  # (1+N, Dv)
        torch.testing.assert_close(row["image_features"], alone, atol=1e-5, rtol=1e-5)
    assert rows["question"] == ds["question"]  # columns pass through (Conversations reads them)


def test_features_that_do_not_fit_are_not_kept():
    model, ds = tiny_vlm(), qa_dataset([0, 1, 2])
    per_image = 17 * 32 * 4  # (1 + 16 patches) x width 32, fp32
    processor = ImageProcessor.from_config(model.config.vit)
    assert FeatureRows.compute(model, ds, processor, progress=False, limit_bytes=3 * per_image - 1) is None
    assert len(FeatureRows.compute(model, ds, processor, progress=False, limit_bytes=3 * per_image).features) == 3


def test_the_vit_is_left_in_the_mode_it_was_in():
    model, ds = tiny_vlm(), qa_dataset([0, 1])
    model.train()
    FeatureRows.compute(model, ds, ImageProcessor.from_config(model.config.vit), progress=False)
    assert model.vit.training


def test_collator_batches_features_instead_of_pixels_and_refuses_a_mix():
    model, ds = tiny_vlm(), qa_dataset([0, 1, 0])
    processor = ImageProcessor.from_config(model.config.vit)
    rows = FeatureRows.compute(model, ds, processor, progress=False)
    collate = VQACollator(processor, PromptBuilder(model.num_image_tokens, 64))
    batch = collate([rows[i] for i in range(3)])
    assert "pixel_values" not in batch and batch["image_features"].shape == (3, 17, 32)
    model.eval()
    with_pixels = collate([ds[i] for i in range(3)])
    # the same loss through either path: the features are what the ViT would have computed
    a = model(**batch).loss
    b = model(**with_pixels).loss
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mixes rows"):
        collate([rows[0], ds[1]])
    conv = Conversations(rows, turns=2, seed=0)
    assert all("image_features" in conv[i] and "image" not in conv[i] for i in range(len(conv)))
    with pytest.raises(ValueError, match="exactly one of"):
        model.encode_images()


def test_a_short_run_counts_its_rows_against_the_distinct_images():
    """train-vqa caches features only when that costs fewer ViT passes than the run makes."""
    with_ids = qa_dataset([0, 0, 1, 2, 2, 2])
    by_content = qa_dataset([-1, -1, -1]).remove_columns("image_id")  # three different images
    same = by_content.map(lambda r: {"image": image(7)})  # one image, three rows
    assert distinct_images(with_ids) == 3 and distinct_images(by_content) == 3 and distinct_images(same) == 1
    assert distinct_images(with_ids, None, by_content) == 6
    stage = VQAStageConfig()
    assert short_run_rows(stage, RunConfig(max_steps=3, batch_size=4, grad_accum=2)) == 24
    assert short_run_rows(stage, RunConfig(max_steps=3, batch_size=4, grad_accum=2), processes=2) == 48
    assert short_run_rows(stage, RunConfig(max_steps=0)) is None  # whole epochs: caching pays
    assert short_run_rows(VQAStageConfig(align_epochs=1, task="both"), RunConfig(max_steps=3)) is None


def test_one_file_name_over_different_images_is_not_one_image(tmp_path):
    """A parquet file may store different images under one file name: features follow the bytes."""
    ds = qa_dataset([-1, -1]).remove_columns("image_id")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    ds = ds.map(lambda r: {"image": {"bytes": r["image"]["bytes"], "path": "image.png"}})
    ds = ds.cast_column("image", datasets.Image())
    assert distinct_images(ds) == 2
    model = tiny_vlm()
    rows = FeatureRows.compute(model, ds, ImageProcessor.from_config(model.config.vit), progress=False)
    assert len(rows.features) == 2 and not torch.equal(rows[0]["image_features"], rows[1]["image_features"])


def test_a_column_of_file_paths_is_keyed_by_path(tmp_path):
    for i in range(2):
        image(i).save(tmp_path / f"{i}.png")
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / f"{i}.png") for i in (0, 1, 0)],
                                     "question": ["q"] * 3, "answers": [["a"]] * 3})
    assert distinct_images(ds) == 2
    model = tiny_vlm()
    rows = FeatureRows.compute(model, ds, ImageProcessor.from_config(model.config.vit), progress=False)
    assert len(rows.features) == 2 and torch.equal(rows[0]["image_features"], rows[2]["image_features"])
