"""Text generation: prefill once, then decode one token at a time through the KV cache.

Sampling: greedy (temperature 0), temperature, top-k, top-p. Batches of prompts with different
lengths are left-padded; positions count real tokens only, as in training. Generation stops
per row at `<|endoftext|>` or a stop string, and for the batch when every row has stopped.

Notation: B batch, T prompt tokens, C width, V vocabulary.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields

import torch

from .config import ConfigError, check_number
from .errors import NonFiniteOutputError, PromptError
from .gpt import GPT
from .tokenizer import EOT_ID, get_tokenizer

DECODERS = ("eager", "static", "compiled")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    # "eager": attend to the filled cache, a shape per step; "static": fixed shapes over the whole
    # cache (static_decode.py); "compiled": static, through torch.compile (a CUDA graph on CUDA).
    decoder: str = "eager"

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> GenerationConfig:
        """The config of a call's keyword arguments; a ConfigError naming an unknown one (a typo
        such as max_tokens was a bare TypeError)."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ConfigError(f"unknown generation setting(s) {', '.join(unknown)}; the settings are "
                              f"{', '.join(names)}")
        return cls(**kwargs)

    def __post_init__(self) -> None:
        stops = () if self.stop_strings is None else self.stop_strings
        if isinstance(stops, str):
            stops = (stops,)  # one stop string, not one per character
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            raise ConfigError(f"stop_strings must be a list of non-empty strings, got {self.stop_strings!r}")
        object.__setattr__(self, "stop_strings", tuple(stops))  # frozen: normalized once, here
        if self.decoder not in DECODERS:
            raise ConfigError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        check_number("max_new_tokens", self.max_new_tokens, 1, integer=True)
        check_number("temperature", self.temperature, 0)
        if self.top_k is not None:
            check_number("top_k", self.top_k, 1, integer=True)
        if self.top_p is not None:
            check_number("top_p", self.top_p, 0, 1, low_open=True)
        if self.seed is not None:
            check_number("seed", self.seed, 0, 2**63 - 1, integer=True)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, then outside the smallest set whose
    probability reaches top_p (the token that crosses top_p is kept). logits: (B, V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False  # the most likely token always stays, however small top_p is
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B, N) logits -> (B,) picks: columns of N (the caller maps them to token ids)."""
    if config.temperature == 0:
        return logits.argmax(-1)
    # Shifted so the top logit is 0 first, and the temperature kept a normal fp32 number: a tiny
    # temperature then sends every other logit to -inf (greedy, ties shared) instead of making NaN.
    logits = logits.float()
    scaled = (logits - logits.amax(-1, keepdim=True)) / max(config.temperature, 1e-30)
    logits = filter_logits(scaled, config.top_k, config.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def check_finite(logits: torch.Tensor) -> None:
    """Refuse logits holding NaN or +inf, or no finite score (checked once, after the prefill): argmax
    would read NaN as token 0 and sampling would fail deep in torch, so a broken model would answer
    "!!!" silently."""
    bad = logits.isnan().any(-1) | logits.isposinf().any(-1) | ~logits.isfinite().any(-1)  # (B,)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise NonFiniteOutputError(
            f"the model's next-token scores are NaN or infinite for prompt row(s) {rows[:5]}: its weights overflow "
            "(a diverged run or a damaged checkpoint: use an earlier checkpoint) or the input holds NaN/inf")


@torch.no_grad()
def decode_stream(gpt: GPT, *, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None, bidirectional: torch.Tensor | None = None,
                  config: GenerationConfig = GenerationConfig(), eot_id: int = EOT_ID,
                  before_block=None) -> Iterator[torch.Tensor]:
    """Yield the next token (B,) for every row at each step; rows that finished yield `eot_id`.

    Prompts are (B, T) ids or (B, T, C) embeddings, left-padded, with attention_mask (B, T).
    Every row gets at most block_size - T steps, T the longest prompt (`room_groups` batches
    prompts so that this never cuts a row short). `before_block` (a cross-fusion VLM's
    cross-attention) runs before each GPT block, every step.
    """
    prompt = inputs_embeds if inputs_embeds is not None else input_ids
    B, T = prompt.shape[:2]
    room = gpt.config.block_size - T
    if room < 1:
        raise PromptError(f"a prompt of {T} tokens leaves no room to generate in the context of "
                          f"{gpt.config.block_size}; shorten the prompt or use a model with a larger block_size")
    steps = min(config.max_new_tokens, room)
    device = prompt.device
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        if bool((attention_mask[:, -1] == 0).any()):
            raise PromptError("generation needs left padding: the last prompt position of every row must be real "
                              "(mmfusion.processing.pad_batch(..., left=True))")
        mask = torch.ones(B, T + steps, dtype=torch.long, device=device)  # (B, T + steps)
        mask[:, :T] = attention_mask
    buffers = None
    if config.decoder == "compiled" and before_block is None:
        from .static_decode import compiled_length, step_buffers

        buffers = step_buffers(gpt, B, compiled_length(T + steps, gpt.config.block_size), device)
    try:
        cache = buffers.cache if buffers is not None else gpt.new_cache(B, T + steps)
        hidden = gpt.hidden_states(input_ids, None if mask is None else mask[:, :T], inputs_embeds=inputs_embeds,
                                   cache=cache, bidirectional=bidirectional, before_block=before_block)  # (B, T, C)
        logits = gpt.row_scores(hidden[:, -1])  # (B, K): the output tokens' columns only
        check_finite(logits)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        fixed = _fixed_shape_step(gpt, config, cache, attention_mask if mask is not None else None, T, before_block,
                                  buffers)
        for step in range(steps):
            token = gpt.output_token(next_token(logits, config, generator)).masked_fill(done, eot_id)  # (B,)
            yield token
            done |= token == eot_id
            if step == steps - 1 or bool(done.all()):
                return
            if fixed is not None:
                logits = fixed(token)
                continue
            # Positions come from the mask's running count of real tokens, as in the prefill.
            hidden = gpt.hidden_states(token[:, None], None if mask is None else mask[:, :T + step + 1],
                                       cache=cache, before_block=before_block)  # (B, 1, C)
            logits = gpt.row_scores(hidden[:, -1])
    finally:  # also when the caller stops early: a generator closed, or dropped, runs this
        if buffers is not None:
            buffers.release()


def _fixed_shape_step(gpt: GPT, config: GenerationConfig, cache, prompt_mask: torch.Tensor | None, T: int,
                      before_block=None, buffers=None):
    """For the static and compiled decoders: a function token (B,) -> scores (B, K) that feeds
    each decoded token through `StaticStep` over the prefilled cache, its inputs kept in buffers
    of fixed address that advance in place (the compiled decoder's `buffers`, kept on the model
    from call to call). None for the eager decoder."""
    if config.decoder == "eager":
        return None
    from .static_decode import StepBuffers, mark_static, static_step

    if before_block is not None and config.decoder == "compiled":
        raise ConfigError("the compiled decoder serves early fusion; decode a cross-fusion VLM with decoder "
                         "'static' or 'eager'")
    step = static_step(gpt, config.decoder == "compiled")
    B, S = cache.shape[1], cache.shape[3]
    device = cache.k.device
    if buffers is None:
        buffers = StepBuffers(gpt, B, S, device, cache)
    key_ok, token_buf, position, slot = buffers.key_ok, buffers.token, buffers.position, buffers.slot
    key_ok.zero_()  # the cache's later positions may hold an earlier call's keys: masked off
    key_ok[:, :T] = True if prompt_mask is None else prompt_mask.bool()
    if prompt_mask is None:  # the next token's position, counting real tokens only
        position.fill_(T)
    else:
        position.copy_(prompt_mask.long().sum(1))
    slot.fill_(T)  # the next token's cache position
    if config.decoder == "compiled":
        mark_static(cache.k, cache.v, key_ok, token_buf, position, slot)

    def feed(token: torch.Tensor) -> torch.Tensor:
        token_buf.copy_(token)
        logits = step(token_buf, position, slot, cache.k, cache.v, key_ok, before_block)
        position.add_(1)
        slot.add_(1)
        return logits

    return feed


def _cut_at_stop(text: str, stop_strings: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate(gpt: GPT, *, config: GenerationConfig = GenerationConfig(), **prompt) -> list[list[int]]:
    """Generated token ids per row, without the prompt, cut before `<|endoftext|>` and before
    the first stop string. `prompt` takes input_ids / inputs_embeds, attention_mask, bidirectional."""
    tokenizer = get_tokenizer()
    rows: list[list[int]] | None = None
    stopped: list[bool] = []
    for token in decode_stream(gpt, config=config, **prompt):
        if rows is None:
            rows, stopped = [[] for _ in range(token.shape[0])], [False] * token.shape[0]
        for i, t in enumerate(token.tolist()):
            if stopped[i]:
                continue
            if t == EOT_ID:
                stopped[i] = True
                continue
            rows[i].append(t)
            if config.stop_strings and _cut_at_stop(tokenizer.decode(rows[i]), config.stop_strings)[1]:
                stopped[i] = True
        if all(stopped):
            break
    return rows or []


def stream_text(gpt: GPT, *, config: GenerationConfig = GenerationConfig(), **prompt) -> Iterator[str]:
    """Text pieces for a single prompt (B = 1) as they are generated. Joined, they are exactly the
    text `answer` returns for the same tokens (`final_text`): stop strings cut, whitespace
    stripped, a character cut off by max_new_tokens kept as U+FFFD."""
    def ids() -> Iterator[int]:
        for token in decode_stream(gpt, config=config, **prompt):
            yield int(token[0])

    yield from stream_pieces(ids(), config.stop_strings)


def final_text(ids: list[int], stop_strings: tuple[str, ...]) -> str:
    """The text of generated ids as `answer` gives it: decoded (bytes that are no complete
    character become U+FFFD), cut before the first stop string, stripped."""
    return _cut_at_stop(get_tokenizer().decode(ids), stop_strings)[0].strip()


def stream_pieces(tokens: Iterable[int], stop_strings: tuple[str, ...] = ()) -> Iterator[str]:
    """Text pieces for a stream of generated token ids, ending at `<|endoftext|>`, a stop string
    or the end of `tokens`: same stopping rule as `generate`, and the pieces join to `final_text`.

    A piece goes out only once no later token can change it: held back are bytes of an
    incomplete character, a tail that may be the start of a stop string, and trailing whitespace
    (stripped if the text ends there)."""
    tokenizer = get_tokenizer()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ids: list[int] = []
    sure = ""  # characters whose bytes are complete
    sent = ""
    for t in tokens:
        if t == EOT_ID:
            break
        ids.append(t)
        if stop_strings and _cut_at_stop(tokenizer.decode(ids), stop_strings)[1]:
            break  # the decision `generate` makes, on the same text
        sure += decoder.decode(tokenizer.decode_bytes([t]))
        safe = sure[:len(sure) - _stop_prefix_length(sure, stop_strings)].strip()
        if len(safe) > len(sent):
            yield safe[len(sent):]
            sent = safe
    text = final_text(ids, stop_strings)
    if len(text) > len(sent):
        yield text[len(sent):]


def _stop_prefix_length(text: str, stop_strings: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that a stop string starts with (0 if none)."""
    longest = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def _check_batch(images, questions) -> tuple[list, list]:
    # a str is one image path or one question, not a sequence of them (any other iterable is)
    if isinstance(images, (str, bytes)) or isinstance(questions, (str, bytes)):
        raise PromptError("images and questions must be lists with one entry per image (got "
                          f"{type(images).__name__} and {type(questions).__name__}); for one image use answer()")
    images, questions = list(images), list(questions)
    if len(images) != len(questions):
        raise PromptError(f"got {len(images)} images but {len(questions)} questions; pass one question per image "
                          "(None asks for a caption)")
    return images, questions


def _prompt_ids(vlm, questions: list[str | None]) -> list[list[int]]:
    from .processing import PromptBuilder

    builder = PromptBuilder(vlm.prompt_slots, vlm.config.gpt.block_size)
    return [builder.prompt_ids(q, reserve=1) for q in questions]


def _padded(vlm, images: list, ids: list[list[int]]) -> dict[str, torch.Tensor]:
    from .processing import ImageProcessor, pad_batch

    device = next(vlm.parameters()).device
    return {
        "input_ids": pad_batch(ids, EOT_ID, left=True).to(device),
        "attention_mask": pad_batch([[1] * len(i) for i in ids], 0, left=True).to(device),
        "pixel_values": ImageProcessor.from_config(vlm.config.vit)(images).to(device),
    }


def vlm_prompts(vlm, images, questions: list[str | None]) -> dict[str, torch.Tensor]:
    """Images and questions (None: caption) -> left-padded input_ids, attention_mask, pixel_values."""
    images, questions = _check_batch(images, questions)
    return _padded(vlm, images, _prompt_ids(vlm, questions))


def room_groups(lengths: list[int], block_size: int, max_new_tokens: int) -> list[list[int]]:
    """Row indices grouped so that generating each group together gives every row the tokens it
    would get alone. A batch generates at most block_size - (its longest prompt) tokens, so a
    prompt that leaves less room than max_new_tokens is batched only with prompts of its own length."""
    fits = block_size - max_new_tokens  # prompts up to this long get all max_new_tokens anyway
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n if n > fits else -1, []).append(i)
    return list(groups.values())


def vlm_generate_text(vlm, images, questions: list[str | None], config: GenerationConfig) -> list[str]:
    """Answers (or captions, where the question is None) for a batch of images; each row's text is
    what it would be alone (see `room_groups`)."""
    images, questions = _check_batch(images, questions)
    ids = _prompt_ids(vlm, questions)
    texts: list[str] = [""] * len(ids)
    for group in room_groups([len(i) for i in ids], vlm.config.gpt.block_size, config.max_new_tokens):
        rows = vlm.generate(**_padded(vlm, [images[i] for i in group], [ids[i] for i in group]), config=config)
        for i, row in zip(group, rows):
            texts[i] = final_text(row, config.stop_strings)
    return texts
