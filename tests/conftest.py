"""Tests run offline: hub downloads must never be attempted. Set before datasets/transformers import.

`--mixed-precision auto` is pinned to fp32, so no test depends on whether this CPU has fast
bf16; tests/test_precision.py unpins it to exercise every branch of the decision."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MMFUSION_AUTO_PRECISION", "no")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `pytest -n N`: each worker takes its share of the cores (torch reads this at import), or the
    # workers' thread pools fight over them: on 2 cores, 2 workers of 2 threads each ran slower.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) //
                                                       int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def _bad_image_files() -> dict[str, bytes]:
    """Image files that open (their headers are fine) but cannot be used: the decode, or the
    EXIF orientation read, fails. `Image.verify()` passes the first one."""
    import io

    import numpy as np
    from PIL import Image, PngImagePlugin

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    jpeg = io.BytesIO()
    noise.save(jpeg, format="JPEG")
    corrupt_exif = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(corrupt_exif, format="PNG", exif=b"garbage, not a TIFF header")
    bomb = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (4 * PngImagePlugin.MAX_TEXT_CHUNK), zip=True)  # ~4 KB that inflates to 4 MB
    Image.new("RGB", (8, 8)).save(bomb, format="PNG", pnginfo=info)
    assert len(bomb.getvalue()) < 64 * 1024  # the point of a bomb: small on disk
    return {"truncated_jpeg_rows": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
            "png_corrupt_exif": corrupt_exif.getvalue(),
            "png_ztxt_bomb": bomb.getvalue()}


@pytest.fixture(scope="session")
def bad_image_files() -> dict[str, bytes]:
    return _bad_image_files()


@pytest.fixture
def small_scenes(monkeypatch):
    """The procedural scenes at 32 training and 4 test scenes."""
    from mmfusion.data import scenes

    monkeypatch.setattr(scenes, "SPLIT_SIZES", {"train": 32, "test": 4})


@pytest.fixture
def parts(tmp_path):
    """A saved fresh vit-tiny (no head) and gpt-tiny (context 96): (vit folder, gpt folder)."""
    import torch

    from mmfusion.config import gpt_preset, vit_preset
    from mmfusion.gpt import GPT
    from mmfusion.vit import ViT

    torch.manual_seed(0)
    ViT(vit_preset("vit-tiny", num_classes=0)).save_pretrained(tmp_path / "vit")
    GPT(gpt_preset("gpt-tiny", block_size=96)).save_pretrained(tmp_path / "gpt")
    return str(tmp_path / "vit"), str(tmp_path / "gpt")
