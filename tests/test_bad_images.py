"""Bad and unusual images: each is either converted to RGB (pixel values checked) or rejected
with an ImageError that names the file and the fix; through the CLI, one line and exit code 2."""

from __future__ import annotations

import io
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from mmfusion import VLM, VLMConfig, processing
from mmfusion.cli import main
from mmfusion.config import AdapterConfig, GPTConfig, ViTConfig
from mmfusion.processing import ImageError, ImageProcessor, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def png_bytes(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    torch.manual_seed(0)
    config = VLMConfig(vit=ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=0),
                       gpt=GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64), adapter=AdapterConfig())
    path = tmp_path_factory.mktemp("vlm") / "model"
    VLM(config).save_pretrained(path)
    return path


def cli_error(capsys, args: list[str]) -> str:
    """Run the CLI; assert exit code 2 and a single stderr line without a traceback; return it."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---- unreadable files: rejected --------------------------------------------------------------

BAD_FILES = {
    "text_named_png": (lambda: b"this is a note, not a picture", "not a readable image"),
    "empty_file": (lambda: b"", "not a readable image"),
    "truncated_png": (lambda: png_bytes(Image.effect_noise((64, 64), 50))[:300], "not a readable image"),
    "truncated_jpeg": (lambda: jpeg_bytes()[:400], "not a readable image"),
    "png_header_only": (lambda: b"\x89PNG\r\n\x1a\n", "not a readable image"),
    "random_bytes": (lambda: np.random.default_rng(1).integers(0, 256, 512, dtype=np.uint8).tobytes(),
                     "not a readable image"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_unreadable_file_raises_image_error_naming_file_and_fix(case, tmp_path):
    make, message = BAD_FILES[case]
    path = tmp_path / f"{case}.png"
    path.write_bytes(make())
    with pytest.raises(ImageError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value) and "re-save it as PNG or JPEG" in str(info.value)


def test_missing_file_and_folder_raise_image_error(tmp_path):
    with pytest.raises(ImageError, match="does not exist; check the path"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path / "folder.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_fifo_is_refused_without_blocking(tmp_path, tiny_vlm, capsys):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_raises(load_image, fifo)), daemon=True)
    worker.start()
    worker.join(timeout=20)  # Image.open on a FIFO with no writer blocks forever
    assert outcome == ["not a regular file"], "load_image blocked on a FIFO or did not refuse it"
    err = cli_error(capsys, ["generate", "--model", tiny_vlm, "--image", fifo, "--question", "what?"])
    assert "not a regular file" in err and str(fifo) in err


def _raises(fn, *args) -> str:
    try:
        fn(*args)
    except ImageError as e:
        return "not a regular file" if "not a regular file" in str(e) else str(e)
    return "no error"


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_unreadable_file_through_cli_is_one_line(case, tmp_path, tiny_vlm, capsys):
    make, message = BAD_FILES[case]
    path = tmp_path / f"{case}.png"
    path.write_bytes(make())
    err = cli_error(capsys, ["generate", "--model", tiny_vlm, "--image", path, "--question", "what?"])
    assert message in err and str(path) in err


# ---- modes: converted to RGB, pixel values checked ---------------------------------------------

def palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([10, 200, 30, 250, 100, 0] + [0, 0, 0] * 254)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    if transparent:
        image.info["transparency"] = 1
    return image


def int_image(values, dtype) -> Image.Image:
    return Image.fromarray(np.array([values], dtype=dtype))


CONVERSIONS = {
    # name: (image, expected RGB of each pixel in the first row)
    "grayscale_L": (Image.new("L", (2, 1), 100), [(100, 100, 100)] * 2),
    "bilevel_1": (Image.fromarray(np.array([[True, False]])), [WHITE, (0, 0, 0)]),
    "gray_alpha_LA": (Image.new("LA", (1, 1), (100, 0)), [WHITE]),
    "rgba_opaque": (Image.new("RGBA", (1, 1), (10, 20, 30, 255)), [(10, 20, 30)]),
    "rgba_transparent_on_white": (Image.new("RGBA", (1, 1), (255, 0, 0, 0)), [WHITE]),
    "rgba_half_transparent": (Image.new("RGBA", (1, 1), (0, 0, 0, 128)), [(127, 127, 127)]),
    "palette_P": (palette_image(False), [(10, 200, 30), (250, 100, 0)]),
    "palette_with_transparency": (palette_image(True), [(10, 200, 30), WHITE]),
    "cmyk_white": (Image.new("CMYK", (1, 1), (0, 0, 0, 0)), [WHITE]),
    "cmyk_cyan": (Image.new("CMYK", (1, 1), (255, 0, 0, 0)), [(0, 255, 255)]),
    "cmyk_black": (Image.new("CMYK", (1, 1), (0, 0, 0, 255)), [(0, 0, 0)]),
    "16bit_I;16": (int_image([0, 257 * 100, 65535], np.uint16), [(0, 0, 0), (100, 100, 100), WHITE]),
    # Pillow reads 16-bit PNG/TIFF as "I" in some versions: 0..65535 maps like 16 bits.
    "16bit_values_in_I": (int_image([0, 257 * 100, 65535], np.int32), [(0, 0, 0), (100, 100, 100), WHITE]),
    "16bit_white_only_in_I": (int_image([65535, 65535], np.int32), [WHITE, WHITE]),
    "signed_I_min_max": (int_image([-1000, 0, 1000], np.int32), [(0, 0, 0), (127, 127, 127), WHITE]),
    "float_F_unit_range": (int_image([0.0, 0.5, 1.0], np.float32), [(0, 0, 0), (127, 127, 127), WHITE]),
    "float_F_min_max": (int_image([-2.0, 2.0], np.float32), [(0, 0, 0), WHITE]),
    # premultiplied La: Pillow converts it only to LA (a raw ValueError from convert("RGBA") before)
    "premultiplied_La_opaque": (Image.new("La", (1, 1), (100, 255)), [(100, 100, 100)]),
    "premultiplied_La_transparent": (Image.new("La", (1, 1), (100, 0)), [WHITE]),
}


@pytest.mark.parametrize("case", sorted(CONVERSIONS))
def test_mode_is_converted_to_rgb_with_the_right_pixels(case):
    image, expected = CONVERSIONS[case]
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert [rgb.getpixel((x, 0)) for x in range(len(expected))] == expected


@pytest.mark.parametrize("mode, values, transparent", [
    ("L", np.array([[7, 0]], np.uint8), 0),
    ("RGB", np.array([[[7, 7, 7], [0, 0, 0]]], np.uint8), (0, 0, 0)),
    ("P", np.array([[7, 0]], np.uint8), 0),
    ("I;16", np.array([[257 * 7, 1000]], np.uint16), 1000),
])
def test_a_trns_transparent_colour_in_a_png_file_comes_out_white(tmp_path, mode, values, transparent):
    """A PNG tRNS chunk (one transparent colour) was honoured for palette images only: L and RGB
    files kept the colour (black here) under their transparent pixels."""
    image = Image.fromarray(values)
    (image.convert("P") if mode == "P" else image).save(tmp_path / "t.png", transparency=transparent)
    with Image.open(tmp_path / "t.png") as f:
        assert f.mode == mode and f.info["transparency"] == transparent
    rgb = load_image(tmp_path / "t.png")
    assert [rgb.getpixel((x, 0)) for x in range(2)] == [(7, 7, 7), WHITE]


def test_16_bit_png_file_is_converted_by_its_full_range(tmp_path):
    Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)).save(tmp_path / "deep.png")
    rgb = load_image(tmp_path / "deep.png")
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), WHITE]


def test_cmyk_jpeg_file_is_converted(tmp_path):
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "print.jpg", quality=100)
    rgb = load_image(tmp_path / "print.jpg")
    assert rgb.mode == "RGB" and all(c >= 250 for c in rgb.getpixel((4, 4)))


@pytest.mark.parametrize("size", [(1, 1), (1, 37), (53, 1)])
def test_tiny_and_thin_images_become_model_sized_tensors(size):
    processor = ImageProcessor(16, (0.5,) * 3, (0.5,) * 3)
    x = processor.to_tensor(Image.new("RGB", size, RED))
    assert x.shape == (3, 16, 16)
    # A constant image stays constant through bicubic resizing: red is (1, -1, -1) after normalizing.
    assert torch.allclose(x, torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16))


def test_a_thin_image_is_resized_without_a_huge_intermediate(monkeypatch):
    """"shortest_edge" resized the whole image before cropping: 1x20000 became 16x320000 here
    (224x4480000, 4 GB, at CLIP's size) though it passes MAX_IMAGE_PIXELS easily."""
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: sizes.append(tuple(size)) or
                        resize(self, size, *a, **k))
    processor = ImageProcessor(16, (0.5,) * 3, (0.5,) * 3, resize="shortest_edge", resize_size=20)
    x = processor.to_tensor(Image.new("RGB", (1, 20000), RED))
    assert torch.allclose(x, torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16))
    assert sizes and max(w * h for w, h in sizes) <= processing.CROP_AFTER_RESIZE_LIMIT * 16 * 16


# Files whose header opens: the failure comes from the pixel data or the metadata, which the
# old loader read outside its guard (corrupt EXIF, a zTXt bomb) or not at all (verify()).
OPENABLE = {"truncated_jpeg_rows": "is not a readable image", "png_ztxt_bomb": "is not a readable image",
            "png_corrupt_exif": "EXIF metadata is corrupt"}


@pytest.mark.parametrize("case", sorted(OPENABLE))
def test_bad_pixels_or_metadata_raise_image_error(case, tmp_path, bad_image_files, tiny_vlm, capsys):
    path = tmp_path / f"{case}.png"
    path.write_bytes(bad_image_files[case])
    with pytest.raises(ImageError, match=OPENABLE[case]) as info:
        load_image(path)
    assert str(path) in str(info.value) and "re-save" in str(info.value)
    err = cli_error(capsys, ["generate", "--model", tiny_vlm, "--image", path, "--question", "what?"])
    assert OPENABLE[case] in err and str(path) in err


def test_an_image_object_whose_pixels_cannot_be_read_is_not_blamed_on_exif(tmp_path, bad_image_files):
    """A lazy Image.open(...) object was first decoded inside the EXIF guard, so a truncated or
    closed file was reported as "EXIF metadata is corrupt"."""
    with Image.open(io.BytesIO(bad_image_files["truncated_jpeg_rows"])) as image:
        with pytest.raises(ImageError, match=r"pixels cannot be read \(OSError: image file is truncated.*re-save"):
            load_image(image)
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    with Image.open(tmp_path / "ok.png") as image:
        pass
    with pytest.raises(ImageError, match=r"file was closed before its pixels were read; call image.load\(\)"):
        load_image(image)


def test_corrupt_exif_on_an_image_object_is_an_image_error(bad_image_files):
    with Image.open(io.BytesIO(bad_image_files["png_corrupt_exif"])) as image:
        image.load()
        with pytest.raises(ImageError, match="EXIF metadata is corrupt.*re-save the image without EXIF"):
            ImageProcessor(16, (0.5,) * 3, (0.5,) * 3)([image])


# ---- EXIF orientation: applied -----------------------------------------------------------------

def exif_photo(path, orientation: int) -> None:
    """A 4x2 image whose left column is red and the rest blue, tagged with an EXIF orientation."""
    image = Image.new("RGB", (4, 2), BLUE)
    for y in range(2):
        image.putpixel((0, y), RED)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)


@pytest.mark.parametrize("orientation, size, red, blue", [
    (1, (4, 2), [(0, 0), (0, 1)], [(3, 0)]),   # as stored
    (3, (4, 2), [(3, 0), (3, 1)], [(0, 0)]),   # upside down: the red column moves right
    (6, (2, 4), [(0, 0), (1, 0)], [(0, 3)]),   # shown turned 90 degrees clockwise: red on top
    (8, (2, 4), [(0, 3), (1, 3)], [(0, 0)]),   # turned 90 degrees counter-clockwise: red at the bottom
])
def test_exif_orientation_is_applied(tmp_path, orientation, size, red, blue):
    exif_photo(tmp_path / "photo.png", orientation)
    rgb = load_image(tmp_path / "photo.png")
    assert rgb.size == size
    assert all(rgb.getpixel(p) == RED for p in red) and all(rgb.getpixel(p) == BLUE for p in blue)


# ---- decompression bombs: rejected before decoding ---------------------------------------------

def test_documented_limit_is_pillows_default():
    assert processing.MAX_IMAGE_PIXELS == 89_478_485


@pytest.mark.parametrize("source", ["file", "pil"])
def test_image_over_the_pixel_limit_is_rejected(tmp_path, monkeypatch, source):
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    image = tmp_path / "big.png" if source == "file" else Image.new("RGB", (20, 20))
    with pytest.raises(ImageError, match=r"20x20 = 400 pixels, more than the limit of 100 .*MAX_IMAGE_PIXELS.*"
                                         r"downscale it"):
        load_image(image)
    assert load_image(Image.new("RGB", (10, 10))).size == (10, 10)  # at the limit: fine


def test_the_limit_is_checked_before_pixels_are_decoded(tmp_path, monkeypatch):
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    with pytest.raises(ImageError, match="more than the limit"):
        load_image(tmp_path / "big.png")
    assert decoded == []
    Image.new("RGB", (5, 5)).save(tmp_path / "small.png")
    Image.open(tmp_path / "small.png").load()
    assert decoded == [(5, 5)]  # the patch does see decoding


def test_pillows_own_bomb_error_becomes_an_image_error(tmp_path, monkeypatch):
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow raises past twice its limit
    with pytest.raises(ImageError, match="too large to decode safely.*PIL.Image.MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "big.png")


def test_image_over_the_limit_through_cli_is_one_line(tmp_path, monkeypatch, tiny_vlm, capsys):
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    err = cli_error(capsys, ["generate", "--model", tiny_vlm, "--image", tmp_path / "big.png"])
    assert "more than the limit of 100" in err


def test_a_caption_prompt_with_no_room_is_a_prompt_error(tmp_path, capsys):
    """16 image tokens + "Caption:" fill a context of 19: a ValueError traceback from the decoder."""
    from mmfusion.errors import PromptError

    config = VLMConfig(vit=ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=0),
                       gpt=GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=19), adapter=AdapterConfig())
    vlm = VLM(config)
    image = Image.new("RGB", (16, 16))
    with pytest.raises(PromptError, match="no room for a caption: 16 image tokens"):
        vlm.caption(image)
    with pytest.raises(PromptError, match="no room for a caption"):
        list(vlm.stream(image))
    vlm.save_pretrained(tmp_path / "model")
    image.save(tmp_path / "img.png")
    err = cli_error(capsys, ["generate", "--model", tmp_path / "model", "--image", tmp_path / "img.png"])
    assert "no room for a caption" in err
