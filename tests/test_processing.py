"""Prompt building, the collator's label mask, and image conversion."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.processing import (
    IGNORE_INDEX,
    ImageError,
    ImageProcessor,
    PromptBuilder,
    PromptError,
    VQACollator,
    load_image,
    majority_answer,
)
from mmfusion.tokenizer import EOT_ID, IMAGE_ID, get_tokenizer

tok = get_tokenizer()


def test_example_labels_cover_exactly_the_answer_and_eot():
    builder = PromptBuilder(num_image_tokens=5, max_length=64)
    ids, labels = builder.example("what color is the shape?", "dark blue")
    answer = tok.encode(" dark blue") + [EOT_ID]
    assert ids[:5] == [IMAGE_ID] * 5 and ids.count(IMAGE_ID) == 5
    assert ids[-len(answer):] == answer
    assert labels == [IGNORE_INDEX] * (len(ids) - len(answer)) + answer
    assert tok.decode(ids[5:-len(answer)]) == "Question: what color is the shape?\nAnswer:"


def test_literal_special_tokens_in_a_question_stay_plain_text():
    builder = PromptBuilder(num_image_tokens=2, max_length=64)
    ids = builder.prompt_ids("is <|image|> or <|endoftext|> here?")
    assert ids.count(IMAGE_ID) == 2 and EOT_ID not in ids


def test_long_question_is_truncated_and_counted_keeping_template_and_answer():
    builder = PromptBuilder(num_image_tokens=4, max_length=32)
    ids, labels = builder.example("why " * 100, "yes")
    assert len(ids) == 32 and builder.truncated == 1
    assert ids[-2:] == tok.encode(" yes") + [EOT_ID] and labels[-2:] == ids[-2:]
    assert tok.decode(ids).endswith("\nAnswer: yes")


@pytest.mark.parametrize("question, answer", [("   ", "yes"), ("what?", ""), ("what?", "  ")])
def test_empty_text_is_rejected(question, answer):
    with pytest.raises(PromptError):
        PromptBuilder(num_image_tokens=1, max_length=32).example(question, answer)


def test_majority_answer_over_several_human_answers():
    assert majority_answer(["no", "yes", "yes", "no", "yes"]) == "yes"
    assert majority_answer("two") == "two"


def test_collator_pads_right_masks_padding_and_processes_images():
    builder = PromptBuilder(num_image_tokens=4, max_length=64)
    collate = VQACollator(ImageProcessor(16, (0.5,) * 3, (0.5,) * 3), builder)
    rows = [{"image": Image.new("RGB", (20, 10), "red"), "question": "what color?", "answers": ["red"]},
            {"image": Image.new("L", (8, 8), 200), "question": "is the shape on the left of the image?",
             "answer": "no"}]
    batch = collate(rows)
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    mask, labels, ids = batch["attention_mask"], batch["labels"], batch["input_ids"]
    short = int(mask[0].sum())
    assert short < ids.shape[1] and mask[1].all()
    assert (ids[0, short:] == EOT_ID).all() and (labels[0, short:] == IGNORE_INDEX).all()
    for i, answer in enumerate(["red", "no"]):
        target = tok.encode(" " + answer) + [EOT_ID]
        supervised = labels[i][labels[i] != IGNORE_INDEX].tolist()
        assert supervised == target
    assert (ids == IMAGE_ID).sum(1).tolist() == [4, 4]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_any_mode_becomes_a_normalized_rgb_tensor(mode):
    image = Image.new(mode, (13, 7))
    x = ImageProcessor(16, (0.5,) * 3, (0.5,) * 3).to_tensor(image)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert x.min() >= -1 and x.max() <= 1


def test_transparent_pixels_composite_on_white_and_16_bit_scales():
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert load_image(deep).getpixel((0, 0)) == (255, 255, 255)


def test_arrays_tensors_and_paths_are_accepted(tmp_path):
    arr = np.zeros((5, 6, 3), np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    for source in (arr, arr.astype(np.float32), torch.zeros(3, 5, 6), tmp_path / "a.png", str(tmp_path / "a.png")):
        assert load_image(source).size == (6, 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_float_tensors_give_the_float32_pixels(dtype):
    """numpy has no bfloat16: load_image raised a raw TypeError for it."""
    x = torch.tensor([0.0, 0.25, 0.5, 1.0]).view(1, 1, 4).expand(3, 2, 4)  # exact in bfloat16
    assert np.array_equal(np.asarray(load_image(x.to(dtype))), np.asarray(load_image(x)))


def test_a_tensor_dtype_numpy_lacks_is_an_image_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ComplexHalf support is experimental"
        t = torch.zeros(3, 4, 4, dtype=torch.complex32)
    with pytest.raises(ImageError, match="tensor dtype torch.complex32 is not supported; use uint8 or float"):
        load_image(t)


def test_float_pixels_a_little_outside_0_1_are_clipped_not_refused():
    """Bicubic resampling of a [0, 1] image rings to about -0.1..1.1, and rounding can pass 1 by an ulp."""
    base = np.linspace(0, 1, 48, dtype=np.float32).reshape(4, 4, 3)
    ringing = base * 1.2 - 0.1
    expected = np.asarray(load_image((np.clip(ringing, 0, 1) * 255 + 0.5).astype(np.uint8)))
    assert np.array_equal(np.asarray(load_image(ringing)), expected)
    assert np.array_equal(np.asarray(load_image(np.nextafter(np.float32(1), np.float32(2)) * np.ones((2, 2, 3),
                                                                                                     np.float32))),
                          np.full((2, 2, 3), 255, np.uint8))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 4, 2)), "not an image"),
    (np.zeros((4, 4), np.int64), "not supported"),
    # floats were clipped to [0, 1]: a 0..255 array came out white, NaN black, inf white
    (np.full((4, 4, 3), 200.0, np.float32), r"float pixels must lie in \[0, 1\], these span \[200, 200\]; divide by 255"),
    (torch.full((3, 4, 4), 128.0), "float pixels must lie in .0, 1.*divide by 255 or pass uint8"),
    (np.full((4, 4), -0.75), "float pixels must lie in"),
    (np.full((4, 4, 3), np.nan, np.float32), "float pixels include NaN or inf"),
    (torch.full((3, 4, 4), float("inf")), "float pixels include NaN or inf"),
    (Image.fromarray(np.full((4, 4), np.nan, np.float32), "F"), "float pixels include NaN or inf"),
    ("does/not/exist.png", "does not exist"),
    (42, "cannot read an image"),
])
def test_bad_images_raise_image_error(bad, message):
    with pytest.raises(ImageError, match=message):
        load_image(bad)


def test_conversation_puts_the_image_once_and_supervises_every_answer():
    builder = PromptBuilder(num_image_tokens=3, max_length=128)
    turns = [("what color?", "red"), ("how many shapes are there?", "two"), ("where is it?", "top left")]
    ids, labels = builder.conversation(turns)
    assert builder.conversation(turns[:1]) == builder.example(*turns[0])  # turn 1 is the eval format
    assert ids[:3] == [IMAGE_ID] * 3 and ids.count(IMAGE_ID) == 3 and len(ids) == len(labels)
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert supervised == [t for _, a in turns for t in tok.encode(" " + a) + [EOT_ID]]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    ends = [i for i, t in enumerate(ids) if t == EOT_ID]
    assert len(ends) == 3 and ends[-1] == len(ids) - 1
    pieces = [tok.decode(ids[a + 1:b]) for a, b in zip([2] + ends, ends)]
    assert pieces == ["Question: what color?\nAnswer: red", "Question: how many shapes are there?\nAnswer: two",
                      "Question: where is it?\nAnswer: top left"]


def test_conversation_leaves_out_whole_turns_that_overflow_and_counts_them():
    builder = PromptBuilder(num_image_tokens=4, max_length=24)
    ids, labels = builder.conversation([("what color?", "red"), ("what shape is it?", "circle"), ("size?", "big")])
    first, _ = builder.example("what color?", "red")
    assert len(ids) <= 24 and ids[:len(first)] == first
    assert builder.dropped_turns >= 1 and labels[-1] == EOT_ID
    with pytest.raises(PromptError, match="at least one"):
        builder.conversation([])
    with pytest.raises(PromptError, match="non-empty"):
        builder.conversation([("what?", "yes"), ("  ", "no")])


def test_collator_builds_conversation_rows():
    builder = PromptBuilder(num_image_tokens=2, max_length=64)
    collate = VQACollator(ImageProcessor(16, (0.5,) * 3, (0.5,) * 3), builder)
    image = Image.new("RGB", (16, 16), "blue")
    batch = collate([{"image": image, "turns": [("what color?", ["blue", "blue", "navy"]), ("is it red?", ["no"])]},
                     {"image": image, "question": "what color?", "answers": ["blue"]}])
    ids, _ = builder.conversation([("what color?", "blue"), ("is it red?", "no")])
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist() == tok.encode(" blue") + [EOT_ID] + \
        tok.encode(" no") + [EOT_ID]
    assert (batch["input_ids"] == IMAGE_ID).sum(1).tolist() == [2, 2]
