"""Property tests (hypothesis): the tokenizer round-trips any text; the prompt builder and the
collator supervise exactly the answer and end-of-text, with as many `<|image|>` slots as the
adapter yields; padding never changes another row's loss; any image in gives a normalized
tensor of the model's size out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmfusion import VLM, VLMConfig
from mmfusion.adapter import ViTAdapter
from mmfusion.config import AdapterConfig, GPTConfig, ViTConfig
from mmfusion.processing import IGNORE_INDEX, ImageProcessor, PromptBuilder, VQACollator, pad_batch
from mmfusion.tokenizer import ENDOFTEXT, EOT_ID, IMAGE, IMAGE_ID, get_tokenizer

tok = get_tokenizer()
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: OpenMP threads only add contention (10x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Text with the characters that break naive tokenizers: specials, whitespace runs, emoji, CJK, controls.
pieces = st.sampled_from([IMAGE, ENDOFTEXT, "<|", "|>", " ", "  ", "\n", "\r\n", "\t", "'s", "🙂", "👩‍👧", "中文",
                          "e\u0301", "\u200b", "\x00", "123", "?"])
texts = st.lists(st.one_of(st.text(max_size=20), pieces), max_size=12).map("".join)
words = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(lambda s: s.strip())


# ---- tokenizer ------------------------------------------------------------------------------------

@SETTINGS
@given(texts)
def test_tokenizer_round_trips_any_text(text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert EOT_ID not in ids and IMAGE_ID not in ids  # typed special strings stay plain text


@SETTINGS
@given(st.text(max_size=200))
def test_tokenizer_round_trips_arbitrary_unicode(text):
    assert tok.decode(tok.encode(text)) == text


# ---- prompts and the collator -------------------------------------------------------------------

@SETTINGS
@given(question=st.one_of(st.none(), words), answer=words, m=st.integers(1, 20))
def test_labels_cover_exactly_the_answer_and_eot(question, answer, m):
    builder = PromptBuilder(num_image_tokens=m, max_length=256)
    ids, labels = builder.example(question, answer)
    target = tok.encode(" " + answer.strip()) + [EOT_ID]
    assert len(ids) == len(labels) <= 256
    assert ids.count(IMAGE_ID) == m and ids[:m] == [IMAGE_ID] * m and ids.count(EOT_ID) == 1
    assert labels == [IGNORE_INDEX] * (len(ids) - len(target)) + target
    assert ids[-len(target):] == target


@SETTINGS
@given(question=words, answer=st.text("abcdefghij ", min_size=1, max_size=8).filter(lambda s: s.strip()),
       m=st.integers(1, 8), context=st.integers(24, 64))
def test_long_questions_fit_the_context_and_keep_the_answer(question, answer, m, context):
    builder = PromptBuilder(num_image_tokens=m, max_length=context)
    ids, labels = builder.example(question * 20, answer)
    target = tok.encode(" " + answer.strip()) + [EOT_ID]
    assert len(ids) <= context and ids.count(IMAGE_ID) == m
    assert [t for t in labels if t != IGNORE_INDEX] == target and ids[-len(target):] == target


@st.composite
def vision_setups(draw):
    """A ViT config and an adapter config that fit it."""
    patch = draw(st.sampled_from([2, 4, 8]))
    grid = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    shuffle = draw(st.sampled_from([s for s in (1, 2, 3, 4) if grid % s == 0]))
    vit = ViTConfig(image_size=patch * grid, patch_size=patch, n_layer=1, n_head=2, n_embd=8, num_classes=0)
    adapter = AdapterConfig(projection=draw(st.sampled_from(["linear", "mlp"])), keep_cls=draw(st.booleans()),
                            pixel_shuffle=shuffle)
    return vit, adapter


@SETTINGS
@given(vision_setups(), st.one_of(st.none(), words))
def test_image_slots_equal_the_adapter_token_count(setup, question):
    vit, adapter_config = setup
    config = VLMConfig(vit=vit, gpt=GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=512), adapter=adapter_config)
    adapter = ViTAdapter(adapter_config, vit.n_embd, 8)
    tokens = adapter(torch.zeros(1, 1 + vit.num_patches, vit.n_embd)).shape[1]  # (1, M, Dg)
    ids = PromptBuilder(config.num_image_tokens, 512).prompt_ids(question)
    assert ids.count(IMAGE_ID) == tokens == config.num_image_tokens


ROW = st.fixed_dictionaries({"question": st.one_of(st.none(), words), "answer": words,
                             "shade": st.integers(0, 255)})


def collate_rows(rows, model):
    collate = VQACollator(ImageProcessor.from_config(model.config.vit), PromptBuilder(model.num_image_tokens, 128))
    # A row without a question is a caption example: its target is the caption.
    return collate([{"image": Image.new("RGB", (9, 7), (r["shade"], 40, 200)), "question": r["question"],
                     "answer" if r["question"] else "caption": r["answer"]} for r in rows])


@pytest.fixture(scope="module")
def tiny_vlm():
    torch.manual_seed(0)
    config = VLMConfig(vit=ViTConfig(image_size=16, patch_size=8, n_layer=1, n_head=2, n_embd=16, num_classes=0),
                       gpt=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128), attention="prefix")
    return VLM(config).eval()


@FEW
@given(rows=st.lists(ROW, min_size=1, max_size=4))
def test_collator_masks_exactly_answers_and_eot_per_row(rows, tiny_vlm):
    batch = collate_rows(rows, tiny_vlm)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert (ids == IMAGE_ID).sum(1).tolist() == [tiny_vlm.num_image_tokens] * len(rows)
    for i, row in enumerate(rows):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()  # right padding
        target = tok.encode(" " + row["answer"].strip()) + [EOT_ID]
        supervised = (labels[i] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert supervised == list(range(n - len(target), n))  # the answer and EOT, at the end of the row
        assert labels[i, supervised].tolist() == ids[i, supervised].tolist() == target


def row_losses(model, batch) -> torch.Tensor:
    """Mean cross-entropy over each row's supervised tokens: (B,)."""
    hidden = model.hidden_states(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])  # (B, T, C)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    ce = F.cross_entropy(model.gpt.lm_head(hidden[:, :-1][keep]), targets[keep], reduction="none")  # (K,)
    rows = keep.nonzero()[:, 0]  # (K,) the row of each supervised token
    return torch.zeros(len(keep)).index_add_(0, rows, ce) / keep.sum(1)


@FEW
@given(rows=st.lists(ROW, min_size=2, max_size=4))
def test_padding_never_changes_another_rows_loss(rows, tiny_vlm):
    with torch.no_grad():
        together = row_losses(tiny_vlm, collate_rows(rows, tiny_vlm))
        alone = torch.cat([row_losses(tiny_vlm, collate_rows([r], tiny_vlm)) for r in rows])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@FEW
@given(rows=st.lists(ROW, min_size=2, max_size=4))
def test_left_padding_never_changes_next_token_logits(rows, tiny_vlm):
    """Generation pads on the left; positions count real tokens, so each row's logits match its own."""
    builder = PromptBuilder(tiny_vlm.num_image_tokens, 128)
    prompts = [builder.prompt_ids(r["question"], reserve=1) for r in rows]
    pixels = ImageProcessor.from_config(tiny_vlm.config.vit)([Image.new("RGB", (5, 5), (r["shade"], 0, 0))
                                                              for r in rows])
    def last_logits(ids, pixel_values, mask=None):  # (B, V): the LM head on the last position only
        return tiny_vlm.gpt.lm_head(tiny_vlm.hidden_states(ids, pixel_values, mask)[:, -1])

    with torch.no_grad():
        ids = pad_batch(prompts, EOT_ID, left=True)
        mask = pad_batch([[1] * len(p) for p in prompts], 0, left=True)
        together = last_logits(ids, pixels, mask)
        alone = torch.cat([last_logits(torch.tensor([p]), pixels[i:i + 1]) for i, p in enumerate(prompts)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


# ---- images -------------------------------------------------------------------------------------

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "HSV", "LAB", "I;16", "I", "F", "array_gray",
         "array_rgb", "array_rgba", "array_float", "tensor_chw", "tensor_gray"]


@st.composite
def any_image(draw):
    mode = draw(st.sampled_from(MODES))
    w, h = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**20), 2**20, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray((rng.standard_normal((h, w)) * 1e3).astype(np.float32))
    if mode == "array_gray":
        return rgb[:, :, 0]
    if mode == "array_rgb":
        return rgb
    if mode == "array_rgba":
        return np.concatenate([rgb, rng.integers(0, 256, (h, w, 1), dtype=np.uint8)], axis=2)
    if mode == "array_float":
        return rng.random((h, w, 3))  # floats in [0, 1]; others are refused (tests/test_bad_images.py)
    if mode == "tensor_chw":
        return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    if mode == "tensor_gray":
        return torch.rand(h, w, generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
    return Image.fromarray(rgb).convert(mode)


@SETTINGS
@given(image=any_image(), size=st.sampled_from([8, 16, 24, 32]),
       stats=st.sampled_from([((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
def test_any_image_becomes_a_normalized_tensor_of_the_model_size(image, size, stats):
    mean, std = stats
    x = ImageProcessor(size, mean, std).to_tensor(image)
    assert x.shape == (3, size, size) and x.dtype == torch.float32 and torch.isfinite(x).all()
    lo = (0 - torch.tensor(mean)) / torch.tensor(std)
    hi = (1 - torch.tensor(mean)) / torch.tensor(std)
    assert (x >= lo.view(3, 1, 1) - 1e-5).all() and (x <= hi.view(3, 1, 1) + 1e-5).all()
