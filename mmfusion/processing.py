"""Images and prompts into tensors.

Images: any PIL mode, a path, a numpy array or a tensor -> RGB -> resize -> normalize ->
pixel_values (3, H, W). Prompts: one documented template, with exactly as many `<|image|>`
slots as the adapter yields, and labels that supervise only the answer and `<|endoftext|>`.

The prompt template (question answering, then captioning)::

    <|image|> x M  "Question: {question}\\nAnswer:"  " {answer}<|endoftext|>"
    <|image|> x M  "Caption:"                         " {caption}<|endoftext|>"

A conversation (several questions about one image, `PromptBuilder.conversation`) puts the
image slots once and then the turns one after another, each "Question: ...\nAnswer: ...<|endoftext|>";
its first turn is exactly the single-question example above.
Only the part after the prompt is supervised; everything else is -100.
Notation: B batch, T tokens, M image tokens.

Bad input raises `ImageError` (unreadable, truncated or non-image files, images over
`MAX_IMAGE_PIXELS`) or `PromptError` (empty text, a context too small for the template).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import ViTConfig
from .errors import ImageError, PromptError, SlotCountError
from .loss import IGNORE_INDEX
from .tokenizer import EOT_ID, IMAGE_ID, Tokenizer, get_tokenizer

QUESTION_PREFIX = "Question:"
ANSWER_PREFIX = "\nAnswer:"
CAPTION_PROMPT = "Caption:"
# Images with more pixels than this are refused before decoding: a guard against decompression
# bombs (a small file that expands to gigabytes). Pillow's own default; raise it for trusted files.
MAX_IMAGE_PIXELS = 89_478_485
# "shortest_edge" resizes the whole image and then crops, as transformers does (the same pixels),
# while that intermediate holds at most this many outputs (images up to about 16:1); a thinner image
# resizes only the crop box, or a 1x20000 PNG would grow to gigabytes before the crop.
CROP_AFTER_RESIZE_LIMIT = 16
# Float pixels this far outside [0, 1] are clipped (resampling overshoot); farther, refused as 0..255 data.
FLOAT_OVERSHOOT = 0.5

logger = logging.getLogger(__name__)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: EXIF orientation applied, alpha (or a tRNS transparent colour, in any
    mode) composited on white, CMYK/palette/LA converted. Deep grayscale goes to 8 bits by a fixed
    scale where the range is known: 16-bit ("I;16", and "I" holding values in [0, 65535], which is how
    Pillow reads 16-bit PNG/TIFF) by 255/65535, float "F" in [0, 1] by 255; other "I"/"F"
    values are rescaled from their min..max. NaN or inf pixels raise ImageError."""
    _load_pixels(image)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as e:  # corrupt EXIF makes Pillow raise SyntaxError, ValueError, struct.error, ...
        raise ImageError(f"the image's EXIF metadata is corrupt ({type(e).__name__}: {e}), so its orientation "
                         "is unknown; re-save the image without EXIF (or fix its orientation tag)") from e
    # Pillow's meaning, and transformers' CLIP processor's: after image.convert("RGB") of a palette
    # image, every pixel of the transparent index's colour counts as transparent.
    transparent = image.info.get("transparency")
    if image.mode == "RGB" and transparent is None:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageError("the image's float pixels include NaN or inf; fix where the image was computed "
                             "(np.nan_to_num if they stand for 0)")
        lo, hi = float(arr.min()), float(arr.max())
        if image.mode.startswith("I") and 0.0 <= lo and hi <= 65535.0:
            lo, hi = 0.0, 65535.0
        elif image.mode == "F" and 0.0 <= lo and hi <= 1.0:
            lo, hi = 0.0, 1.0
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        if isinstance(transparent, (int, float)):  # tRNS names one value: transparent, so white
            scaled[arr == transparent] = 255.0
        return Image.fromarray(scaled.clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "La":  # Pillow converts premultiplied La only to LA
        image = image.convert("LA")
    if transparent is not None or image.mode in ("RGBA", "LA", "PA", "RGBa"):
        image = image.convert("RGBA")  # a tRNS colour (L, RGB, P, 1) becomes alpha 0 here
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _load_pixels(image: Image.Image) -> None:
    """Decode a lazy PIL image (from Image.open) under its own guard, so that a truncated or closed
    file is reported as such rather than as the EXIF read that would decode it next."""
    try:
        image.load()
    except Exception as e:  # noqa: BLE001 -- Pillow's decoders raise OSError, SyntaxError, ValueError, ...
        if getattr(image, "fp", "") is None:  # Pillow drops `fp` when `with Image.open(...)` ends
            raise ImageError("the image's file was closed before its pixels were read; call image.load() inside "
                             "the `with Image.open(...)` block, or pass the path instead") from e
        raise ImageError(f"the image's pixels cannot be read ({type(e).__name__}: {e}); the file may be truncated "
                         "or corrupt: re-save it as PNG or JPEG, or leave it out") from e


def _check_size(image: Image.Image, name: str) -> None:
    pixels = image.width * image.height
    if pixels > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name} is {image.width}x{image.height} = {pixels} pixels, more than the limit of {MAX_IMAGE_PIXELS} "
            "(mmfusion.processing.MAX_IMAGE_PIXELS, a guard against decompression bombs); downscale it, "
            "or raise the limit if you trust the file")


def open_image(fp, name: str) -> Image.Image:
    """A file path or binary file object -> an RGB image, decoded in full. Everything Pillow can
    raise for a bad file (truncated pixel data, corrupt EXIF, a zTXt chunk that decompresses too
    far, a decompression bomb) becomes one ImageError naming `name`: the one guarded open that
    both `load_image` and the dataset row check use, so a row that passes the check decodes."""
    try:
        with Image.open(fp) as f:
            _check_size(f, name)  # the header alone gives the size
            f.load()
            image = to_rgb(f)  # orientation, alpha and modes, still under the guard
            return f.copy() if image is f else image
    except ImageError as e:
        if str(e).startswith(name):
            raise
        raise ImageError(f"{name}: {e}") from e
    except Image.DecompressionBombError as e:  # Pillow's own limit, when set lower than ours
        raise ImageError(f"{name} is too large to decode safely ({e}); downscale it, or raise "
                         "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from e
    except Exception as e:  # noqa: BLE001 -- Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error...
        raise ImageError(f"{name} is not a readable image ({e}); re-save it as PNG or JPEG, or leave it out") from e


def load_image(image) -> Image.Image:
    """A PIL image, a path, a numpy array (H, W[, C], uint8 or float in [0, 1]) or a tensor
    (C, H, W) / (H, W) in [0, 1] -> an RGB PIL image (see `to_rgb` for the conversions).

    Raises ImageError for a missing, unreadable or truncated file, an unsupported array, float
    pixels outside [0, 1] or not finite, or an image larger than MAX_IMAGE_PIXELS (checked before
    its pixels are decoded)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise ImageError(f"image file {path} does not exist; check the path")
        if not path.is_file():  # a FIFO would block Image.open forever
            raise ImageError(f"{path} is not a regular file (a folder, FIFO or device); pass an image file")
        return open_image(path, str(path))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.float()  # numpy has no bfloat16 or float8
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)  # (H, W, C)
        try:
            image = t.numpy()
        except TypeError as e:  # complex32, quantized and other dtypes numpy lacks
            raise ImageError(f"tensor dtype {t.dtype} is not supported; use uint8 or float in [0, 1]") from e
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise ImageError(f"array of shape {arr.shape} is not an image; expected (H, W), (H, W, 3) or (H, W, 4)")
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.floating):
                raise ImageError(f"array dtype {arr.dtype} is not supported; use uint8 or float in [0, 1]")
            arr = _unit_floats_to_uint8(arr)
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise ImageError(f"cannot read an image from {type(image).__name__}; pass a PIL image, path, array or tensor")
    if image.width < 1 or image.height < 1:
        raise ImageError(f"image has size {image.size}; it must be at least 1x1")
    _check_size(image, "image")
    return to_rgb(image)


def _unit_floats_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8; an overshoot of up to FLOAT_OVERSHOOT (bicubic resampling
    rings to about -0.1..1.1) is clipped. Others are refused: floats in 0..255 (what
    `np.asarray(image).astype(np.float32)` gives) would come out white, and NaN black."""
    if not np.isfinite(arr).all():
        raise ImageError("float pixels include NaN or inf; fix where the image was computed "
                         "(np.nan_to_num if they stand for 0)")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < -FLOAT_OVERSHOOT or hi > 1.0 + FLOAT_OVERSHOOT:
        raise ImageError(f"float pixels must lie in [0, 1], these span [{lo:.6g}, {hi:.6g}]; divide by 255 "
                         "or pass uint8 if they are 0..255, or clip them")
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class ImageProcessor:
    """RGB (or grayscale for a 1-channel ViT), resized as the weights were trained (the whole
    image to (size, size), or the short side to `resize_size` and the centre cropped; bicubic or
    bilinear), scaled to [0, 1], normalized. With a transformers checkpoint's settings it gives
    the pixels its image processor gives (tests/test_parity.py), except for images thinner than
    about 16:1 under "shortest_edge": those resize only the crop box (CROP_AFTER_RESIZE_LIMIT)."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], resize: str = "square",
                 resize_size: int | None = None, resample: str = "bicubic") -> None:
        self.image_size, self.resize, self.resize_size = image_size, resize, resize_size or image_size
        self.filter = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[resample]
        self.channels = len(mean)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @classmethod
    def from_config(cls, config: ViTConfig) -> ImageProcessor:
        return cls(config.image_size, config.image_mean, config.image_std, config.resize, config.resize_size,
                   config.resample)

    def _resize(self, image: Image.Image) -> Image.Image:
        size = self.image_size
        if self.resize == "square":
            return image if image.size == (size, size) else image.resize((size, size), self.filter)
        w, h = image.size
        short = self.resize_size
        # the short side to `short`, the long one in proportion (truncated, as transformers does)
        new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2  # transformers' centre: the floor
        if new[0] * new[1] > CROP_AFTER_RESIZE_LIMIT * size * size:
            # only the crop box, in source pixels: not bit-identical to resize-then-crop (a level or so)
            sx, sy = w / new[0], h / new[1]
            box = (left * sx, top * sy, min(w, (left + size) * sx), min(h, (top + size) * sy))
            return image.resize((size, size), self.filter, box=box)
        if new != image.size:
            image = image.resize(new, self.filter)
        return image.crop((left, top, left + size, top + size))

    def to_tensor(self, image) -> torch.Tensor:
        """One image of any supported kind -> (C, H, W) float32, normalized."""
        image = self._resize(load_image(image))
        if self.channels == 1:
            image = image.convert("L")
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W[, 3])
        x = (x[..., None] if x.ndim == 2 else x).permute(2, 0, 1).float().div_(255.0)  # (C, H, W)
        return (x - self.mean) / self.std

    def __call__(self, images) -> torch.Tensor:
        """One image, or a sequence of images (list, tuple, a datasets column) -> (B, 3, H, W)."""
        if isinstance(images, (str, Path, bytes, Image.Image, np.ndarray, torch.Tensor, dict)):
            images = [images]
        return torch.stack([self.to_tensor(im) for im in images])


def majority_answer(answers: Sequence[str] | str) -> str:
    """The training target among several human answers: the most frequent (first on ties)."""
    if isinstance(answers, str):
        return answers
    answers = [a for a in answers if a and a.strip()]
    if not answers:
        raise PromptError("no non-empty answer to train on")
    return Counter(a.strip() for a in answers).most_common(1)[0][0]


@dataclass
class PromptBuilder:
    """Builds token ids for the documented template, with `num_image_tokens` image slots.

    Questions longer than the context are truncated from the end of the question (the
    template and the answer are kept), and `truncated` counts how often that happened.
    """

    num_image_tokens: int
    max_length: int
    tokenizer: Tokenizer | None = None
    truncated: int = 0
    dropped_turns: int = 0

    def __post_init__(self) -> None:
        self.tokenizer = self.tokenizer or get_tokenizer()
        t = self.tokenizer
        self._question_prefix = t.encode(QUESTION_PREFIX)
        self._answer_prefix = t.encode(ANSWER_PREFIX)
        self._caption_prompt = t.encode(CAPTION_PROMPT)

    def _question_tokens(self, question) -> list[int]:
        if not isinstance(question, str) or not question.strip():
            raise PromptError(f"question must be non-empty text, got {question!r}")
        return self.tokenizer.encode(" " + question.strip())

    def prompt_ids(self, question: str | None = None, reserve: int = 0) -> list[int]:
        """Image slots + the question template (or the caption prompt when question is None).
        `reserve` tokens are kept free after the prompt (for the answer)."""
        slots = [IMAGE_ID] * self.num_image_tokens
        if question is None:
            if len(slots) + len(self._caption_prompt) + reserve > self.max_length:
                raise PromptError(f"no room for a caption: {self.num_image_tokens} image tokens + the caption "
                                  f"prompt + {reserve} caption tokens exceed the context of {self.max_length}; "
                                  "use a model with a larger block_size or fewer image tokens")
            return slots + self._caption_prompt
        q = self._question_tokens(question)
        budget = self.max_length - len(slots) - len(self._question_prefix) - len(self._answer_prefix) - reserve
        if budget < 1:
            raise PromptError(
                f"no room for a question: {self.num_image_tokens} image tokens + template + {reserve} answer "
                f"tokens exceed the context of {self.max_length}"
            )
        if len(q) > budget:
            if not self.truncated:
                logger.warning("a question of %d tokens was cut to its first %d to fit the context of %d "
                               "(PromptBuilder.truncated counts them; only the first is logged)",
                               len(q), budget, self.max_length)
            q = q[:budget]
            self.truncated += 1
        return slots + self._question_prefix + q + self._answer_prefix

    def target_ids(self, answer: str) -> list[int]:
        if not isinstance(answer, str) or not answer.strip():
            raise PromptError(f"answer must be non-empty text, got {answer!r}")
        return self.tokenizer.encode(" " + answer.strip()) + [EOT_ID]

    def room(self, question: bool) -> int:
        """The most target tokens (answer or caption, with EOT) one example holds: the context less
        the image slots, the template and one token (for a question, at least one of its own)."""
        template = len(self._caption_prompt)
        if question:
            template = max(template, len(self._question_prefix) + len(self._answer_prefix))
        return self.max_length - self.num_image_tokens - template - 1

    def example(self, question: str | None, answer: str) -> tuple[list[int], list[int]]:
        """input_ids and labels (same length): labels are -100 except on the answer tokens and EOT."""
        target = self.target_ids(answer)
        if len(target) > (room := self.room(question is not None)):
            what = "caption" if question is None else "answer"
            raise PromptError(f"{what} of {len(target)} tokens (with EOT) does not fit the context of "
                              f"{self.max_length}: {self.num_image_tokens} image slots and the template leave {room}")
        prompt = self.prompt_ids(question, reserve=len(target))
        return prompt + target, [IGNORE_INDEX] * len(prompt) + target

    def conversation(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """Several (question, answer) turns about one image in one sequence: the image slots,
        then each turn's template and answer. Labels supervise every answer and its EOT.

        The first turn is `example(question, answer)`, byte for byte. Later turns that would
        overflow the context are left out whole and counted in `dropped_turns` (logged once).
        """
        if not turns:
            raise PromptError("a conversation needs at least one (question, answer) turn")
        ids, labels = self.example(*turns[0])
        for question, answer in turns[1:]:
            prompt = self._question_prefix + self._question_tokens(question) + self._answer_prefix
            target = self.target_ids(answer)
            if len(ids) + len(prompt) + len(target) > self.max_length:
                if not self.dropped_turns:
                    logger.warning("conversation turns that overflow the context of %d tokens are left out "
                                   "(PromptBuilder.dropped_turns counts them; only the first is logged)",
                                   self.max_length)
                self.dropped_turns += 1
                continue
            ids += prompt + target
            labels += [IGNORE_INDEX] * len(prompt) + target
        return ids, labels


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """(K,) flat indices into (B, T-1) where labels[:, 1:] is supervised: VLM.forward's
    `label_positions`, found on the host so the training step need not read them off the device."""
    return (labels[:, 1:] != IGNORE_INDEX).flatten().nonzero().squeeze(1)


def pad_batch(sequences: list[list[int]], pad_value: int, left: bool = False) -> torch.Tensor:
    """Pad to the longest sequence: (B, T)."""
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), pad_value, dtype=torch.long)
    for i, s in enumerate(sequences):
        if left:
            out[i, longest - len(s):] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class VQACollator:
    """Rows {image, question, answers | answer | caption} -> a training batch.

    Returns input_ids (B, T) right-padded with `<|endoftext|>`, attention_mask (B, T),
    labels (B, T) with -100 on image slots, prompt and padding, label_positions (K,) (the
    supervised positions of labels[:, 1:] as flat indices) and slots_per_row (int, the image
    slots counted in every row): with these `VLM.forward` runs without waiting for the device.
    Then pixel_values (B, 3, H, W), or
    image_features (B, 1+N, Dv) where the rows carry a frozen ViT's features instead of images.
    The image slots of every row are checked here, on the CPU.
    A row without a question (None or missing) is a caption example; a row with `turns`
    (a list of (question, answers) pairs) is a conversation about its image.
    """

    def __init__(self, processor: ImageProcessor, prompts: PromptBuilder) -> None:
        self.processor = processor
        self.prompts = prompts

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels = [], []
        for row in rows:
            if "turns" in row:
                i, l = self.prompts.conversation([(q, majority_answer(a)) for q, a in row["turns"]])
            else:
                target = row.get("caption") if row.get("question") is None else majority_answer(
                    row["answers"] if "answers" in row else row["answer"])
                i, l = self.prompts.example(row.get("question"), target)
            ids.append(i)
            labels.append(l)
        slots = [sum(t == IMAGE_ID for t in i) for i in ids]
        if any(n != self.prompts.num_image_tokens for n in slots):
            raise SlotCountError(f"a training row has {slots} image slots, not {self.prompts.num_image_tokens}")
        batch = {
            "input_ids": pad_batch(ids, EOT_ID),
            "attention_mask": pad_batch([[1] * len(i) for i in ids], 0),
            "labels": pad_batch(labels, IGNORE_INDEX),
        }
        batch["label_positions"] = supervised_positions(batch["labels"])  # (K,)
        batch["slots_per_row"] = self.prompts.num_image_tokens
        with_features = ["image_features" in row for row in rows]
        if all(with_features):  # a frozen ViT's features, computed once (training.features)
            batch["image_features"] = torch.stack([row["image_features"] for row in rows])  # (B, 1+N, Dv)
        elif any(with_features):
            raise ValueError("a batch mixes rows with precomputed image_features and rows with images")
        else:
            batch["pixel_values"] = self.processor([row["image"] for row in rows])
        return batch
