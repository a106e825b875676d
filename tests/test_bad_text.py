"""Bad and unusual text: empty questions are rejected (API: PromptError; CLI: one line, exit 2),
questions longer than the context are cut at their end (the image slots, the template and the
answer are kept, and the cut is logged and counted), special-token strings a user types stay
plain text, and any unicode goes through."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion import VLM, VLMConfig
from mmfusion.cli import main
from mmfusion.config import AdapterConfig, GPTConfig, ViTConfig
from mmfusion.processing import IGNORE_INDEX, ImageProcessor, PromptBuilder, PromptError, VQACollator
from mmfusion.tokenizer import EOT_ID, IMAGE_ID, get_tokenizer

tok = get_tokenizer()
M, CONTEXT = 4, 64  # image tokens of the tiny model, and its context


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny VLM (4 image tokens, context 64), saved, and an image file."""
    torch.manual_seed(0)
    config = VLMConfig(vit=ViTConfig(image_size=16, patch_size=8, n_layer=1, n_head=2, n_embd=32, num_classes=0),
                       gpt=GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=CONTEXT), adapter=AdapterConfig())
    model = VLM(config).eval()
    assert model.num_image_tokens == M
    root = tmp_path_factory.mktemp("text")
    model.save_pretrained(root / "model")
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(root / "img.png")
    return model, root


def builder(max_length: int = CONTEXT) -> PromptBuilder:
    return PromptBuilder(num_image_tokens=M, max_length=max_length)


# ---- empty and whitespace-only questions: rejected ----------------------------------------------

EMPTY = {"empty": "", "space": " ", "spaces": "     ", "newline": "\n", "tabs_and_newlines": "\t\n \r\n",
         "nbsp_and_ideographic_space": "\u00a0\u3000"}


@pytest.mark.parametrize("case", sorted(EMPTY))
def test_empty_question_raises_prompt_error(case, tiny):
    with pytest.raises(PromptError, match="question must be non-empty text"):
        builder().prompt_ids(EMPTY[case])
    model, root = tiny
    with pytest.raises(PromptError, match="question must be non-empty text"):
        model.answer(root / "img.png", EMPTY[case], max_new_tokens=1)


@pytest.mark.parametrize("case", sorted(EMPTY))
def test_empty_question_through_cli_is_one_line(case, tiny, capsys):
    _, root = tiny
    try:
        code = main(["generate", "--model", str(root / "model"), "--image", str(root / "img.png"),
                     "--question", EMPTY[case]])
    except SystemExit as e:  # argparse's own error: '' is refused for every flag
        code = e.code
    err = capsys.readouterr().err
    message = "argument --question: empty value" if EMPTY[case] == "" else "question must be non-empty text"
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("question", [42, b"what?", ["what?"]])
def test_question_that_is_not_text_raises(question):
    with pytest.raises(PromptError, match="question must be non-empty text"):
        builder().prompt_ids(question)


@pytest.mark.parametrize("answer", ["", "  \n", None])
def test_empty_answer_in_training_raises(answer):
    with pytest.raises(PromptError, match="answer must be non-empty text"):
        builder().example("what color?", answer)


# ---- questions longer than the context: cut at the end, logged and counted ----------------------

LONG = "what is the color of the shape that sits in the middle of this picture " * 20


def test_long_question_in_training_keeps_slots_template_and_answer(caplog):
    b = builder()
    with caplog.at_level(logging.WARNING, logger="mmfusion.processing"):
        ids, labels = b.example(LONG, "dark blue")
        b.example(LONG, "red")
    answer = tok.encode(" dark blue") + [EOT_ID]
    assert len(ids) == CONTEXT and ids[:M] == [IMAGE_ID] * M and ids.count(IMAGE_ID) == M
    assert ids[-len(answer):] == answer and labels == [IGNORE_INDEX] * (CONTEXT - len(answer)) + answer
    text = tok.decode(ids)
    assert text.startswith("Question: what is the color") and text.endswith("\nAnswer: dark blue")
    assert b.truncated == 2
    assert len([r for r in caplog.records if "was cut to its first" in r.message]) == 1  # logged once


def test_long_question_in_a_batch_fills_the_context_and_the_loss_is_finite(tiny):
    model, _ = tiny
    collate = VQACollator(ImageProcessor.from_config(model.config.vit), builder())
    batch = collate([{"image": Image.new("RGB", (8, 8)), "question": LONG, "answer": "red"},
                     {"image": Image.new("RGB", (8, 8)), "question": "short?", "answer": "blue"}])
    assert batch["input_ids"].shape == (2, CONTEXT)
    assert (batch["input_ids"] == IMAGE_ID).sum(1).tolist() == [M, M]
    assert torch.isfinite(model(**batch).loss)


def test_long_question_at_inference_still_answers(tiny, caplog):
    model, root = tiny
    with caplog.at_level(logging.WARNING, logger="mmfusion.processing"):
        answer = model.answer(root / "img.png", LONG, max_new_tokens=4)
    assert isinstance(answer, str) and "was cut to its first" in caplog.text


def test_answer_longer_than_the_context_raises():
    with pytest.raises(PromptError, match="does not fit the context of 64"):
        builder().example("what?", "word " * 80)


def test_context_too_small_for_the_template_raises():
    with pytest.raises(PromptError, match="no room for a question"):
        PromptBuilder(num_image_tokens=M, max_length=M + 3).prompt_ids("what?")


# ---- special-token strings typed by a user: plain text -------------------------------------------

SPECIAL = {
    "image_token": "is there an <|image|> here?",
    "many_image_tokens": "<|image|><|image|><|image|> count these",
    "endoftext": "stop<|endoftext|>here?",
    "both": "<|endoftext|><|image|>",
    "near_misses": "<|image| <image> <|IMAGE|> |endoftext|>",
}


@pytest.mark.parametrize("case", sorted(SPECIAL))
def test_special_token_strings_in_a_question_stay_plain_text(case, tiny):
    question = SPECIAL[case]
    ids = builder().prompt_ids(question)
    assert ids.count(IMAGE_ID) == M and EOT_ID not in ids
    assert tok.decode(ids[M:]) == f"Question: {question}\nAnswer:"
    model, root = tiny
    assert isinstance(model.answer(root / "img.png", question, max_new_tokens=2), str)  # no slot-count error


@pytest.mark.parametrize("case", sorted(SPECIAL))
def test_special_token_strings_in_an_answer_stay_plain_text(case):
    ids, labels = builder().example("what?", SPECIAL[case])
    target = [t for t in labels if t != IGNORE_INDEX]
    assert target[-1] == EOT_ID and target.count(EOT_ID) == 1 and IMAGE_ID not in target
    assert tok.decode(target[:-1]) == " " + SPECIAL[case]


def test_special_token_question_through_cli(tiny, capsys):
    _, root = tiny
    code = main(["generate", "--model", str(root / "model"), "--image", str(root / "img.png"),
                 "--question", "<|image|> <|endoftext|>", "--max-new-tokens", "2"])
    assert code == 0 and capsys.readouterr().err == ""


# ---- unicode and emoji: go through unchanged -------------------------------------------------------

UNICODE = {
    "accents": "¿De qué color es la forma? café naïve",
    "cjk": "这个形状是什么颜色？",
    "emoji": "is the 🟥 a 🙂 or a 👩‍👩‍👧‍👦?",
    "rtl_and_combining": "ما لون الشكل؟ e\u0301",
    "zero_width_and_controls": "what\u200bcolor\u0007?",
    "astral_math": "𝔀𝓱𝓪𝓽 𝓬𝓸𝓵𝓸𝓻?",
}


@pytest.mark.parametrize("case", sorted(UNICODE))
def test_unicode_questions_and_answers_round_trip(case):
    text = UNICODE[case]
    ids, labels = builder(256).example(text, text)
    assert tok.decode(ids[M:]) == f"Question: {text}\nAnswer: {text}"
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == " " + text


def test_emoji_cut_mid_character_by_truncation_gives_valid_ids():
    b = builder(M + 12)
    ids = b.prompt_ids("👩‍👩‍👧‍👦" * 20)
    assert b.truncated == 1 and len(ids) == M + 12 and all(0 <= t < 50257 for t in ids[M:])
    assert tok.decode(ids[M:]).startswith("Question: ")  # undecodable bytes become U+FFFD, never an error


@pytest.mark.parametrize("case", ["emoji", "cjk"])
def test_unicode_question_through_cli(case, tiny, capsys):
    _, root = tiny
    code = main(["generate", "--model", str(root / "model"), "--image", str(root / "img.png"),
                 "--question", UNICODE[case], "--max-new-tokens", "2"])
    assert code == 0 and capsys.readouterr().err == ""


@pytest.mark.parametrize("task, column", [("vqa", "answers"), ("caption", "caption")])
def test_a_training_target_too_long_for_the_context_is_refused_before_training(task, column, tmp_path, capsys):
    """The collator refused it only when its batch came up: hundreds of steps in, the run lost.
    Checked at the limit: one token less fits (PromptBuilder.room), one more is refused."""
    import json

    from PIL import Image

    from mmfusion.processing import PromptBuilder

    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "img.png")
    slots = 17  # vit-tiny: 64 patches pooled to 16 + CLS
    room = PromptBuilder(slots, 32).room(question=task == "vqa")
    for extra, refused in ((0, False), (1, True)):
        words = "word" + " word" * (room - 1 + extra - 1)  # n words: n tokens, + EOT
        rows = [{"image": "img.png", "question": f"q{i}?", column: ["yes"] if task == "vqa" else "a cat"}
                for i in range(8)]
        rows[-1][column] = [words] if task == "vqa" else words
        if task == "caption":
            rows = [{k: v for k, v in r.items() if k != "question"} for r in rows]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / f"out{extra}"
        code = main(["train-vqa", "--vit", "vit-tiny", "--dataset", str(tmp_path / "rows.jsonl"), "--task", task,
                     "--holdout", "0", "--block-size", "32", "--max-steps", "1", "--batch-size", "4", "--no-progress",
                     "--output-dir", str(out)])
        err = capsys.readouterr().err
        if refused:
            kind = "answer" if task == "vqa" else "caption"
            assert code == 2 and f"1 of the 8 training {kind}s" in err and f"is {room + 1} tokens with EOT" in err, err
            assert f"leaves {room}" in err and not out.exists()
        else:
            assert code == 0, err
