"""Decoding: cached = uncached, parity with transformers' generate, sampling controls."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mmfusion import GPT, GPTConfig
from mmfusion.config import ConfigError
from mmfusion.errors import PromptError
from mmfusion.generation import GenerationConfig, decode_stream, filter_logits, generate, next_token, room_groups
from mmfusion.processing import pad_batch
from mmfusion.tokenizer import EOT_ID


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so argmax ties cannot hide bugs
        model.wte.weight.mul_(20)
    return model


def uncached_greedy(model: GPT, ids: list[int], steps: int) -> list[int]:
    out = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
        if out[-1] == EOT_ID:
            break
    return out[len(ids):]


def test_cached_greedy_equals_uncached_greedy(gpt):
    prompts = [[5, 9, 200, 7], [11, 42], [300, 301, 302, 303, 304, 305]]
    batch = pad_batch(prompts, EOT_ID, left=True)
    mask = pad_batch([[1] * len(p) for p in prompts], 0, left=True)
    got = generate(gpt, input_ids=batch, attention_mask=mask, config=GenerationConfig(max_new_tokens=12))
    for prompt, row in zip(prompts, got):
        # generate() returns the tokens before <|endoftext|>; the reference stops after it.
        assert row == [t for t in uncached_greedy(gpt, prompt, 12) if t != EOT_ID]


def test_greedy_matches_transformers_generate_on_a_padded_batch():
    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=64, initializer_range=0.5)).eval()
    ours = GPT.from_hf(hf).eval()
    prompts = [[15, 27, 99, 1000, 4], [7, 8], [500, 501, 502]]
    ids = pad_batch(prompts, EOT_ID, left=True)
    mask = pad_batch([[1] * len(p) for p in prompts], 0, left=True)
    steps = 10
    with torch.no_grad():
        reference = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=steps,
                                min_new_tokens=steps, pad_token_id=EOT_ID, eos_token_id=None)[:, ids.shape[1]:]
    got = generate(ours, input_ids=ids, attention_mask=mask,
                   config=GenerationConfig(max_new_tokens=steps))
    assert all(EOT_ID not in r for r in reference.tolist())  # so our stop-at-EOT cannot shorten rows
    assert got == reference.tolist()


def test_seeded_sampling_repeats_and_top_k_one_is_greedy(gpt):
    ids = torch.tensor([[5, 9, 200, 7]])
    sample = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=123)
    a = generate(gpt, input_ids=ids, config=sample)
    b = generate(gpt, input_ids=ids, config=sample)
    assert a == b
    other = generate(gpt, input_ids=ids, config=GenerationConfig(max_new_tokens=8, temperature=1.0, seed=7))
    greedy = generate(gpt, input_ids=ids, config=GenerationConfig(max_new_tokens=8))
    top1 = generate(gpt, input_ids=ids, config=GenerationConfig(max_new_tokens=8, temperature=1.5, top_k=1, seed=3))
    assert top1 == greedy and other != greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # Mass strictly before each token (sorted): 0, 0.5, 0.8, 0.95. A token is kept while that mass < p.
    kept = filter_logits(logits, top_p=0.8).softmax(-1)
    assert torch.allclose(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    kept = filter_logits(logits, top_p=0.81).softmax(-1)
    assert torch.allclose(kept, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    shuffled = filter_logits(logits[:, [2, 0, 3, 1]], top_p=0.8).softmax(-1)  # order must not matter
    assert torch.allclose(shuffled, torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    assert torch.allclose(filter_logits(logits, top_k=2).softmax(-1), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(20000, -1)
    config = GenerationConfig(temperature=1.0, top_p=0.8)
    draws = next_token(logits, config, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015)


def test_stop_strings_and_finished_rows(gpt):
    ids = torch.tensor([[5, 9, 200, 7]])
    full = generate(gpt, input_ids=ids, config=GenerationConfig(max_new_tokens=6))[0]
    from mmfusion.tokenizer import get_tokenizer

    text = get_tokenizer().decode(full)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = generate(gpt, input_ids=ids, config=GenerationConfig(max_new_tokens=6, stop_strings=(stop,)))[0]
    # it stops at exactly the step whose token completes the stop string
    assert cut == full[:len(cut)] and stop in get_tokenizer().decode(cut)
    assert stop not in get_tokenizer().decode(cut[:-1])
    steps = list(decode_stream(gpt, input_ids=ids, config=GenerationConfig(max_new_tokens=3)))
    assert len(steps) == 3 and all(s.shape == (1,) for s in steps)


# ---- streaming: the pieces join to the answer's text -----------------------------------------

def _bytes_tokens() -> list[int]:
    """Tokens that make streaming hard: parts of multi-byte characters, lone UTF-8 bytes (lead and
    continuation), whitespace and newlines, words, and the end of text."""
    from mmfusion.tokenizer import get_tokenizer

    enc = get_tokenizer().enc
    pool = [t for s in [" Hello world", "🙂", "日本", " é", "  \n", "lo", " wor", "ld!", "\u00a0"] for t in enc.encode(s)]
    pool += [enc.encode_single_token(bytes([b])) for b in (0xF0, 0x9F, 0xE6, 0xA5, 0xC3, 0x80)]
    return sorted(set(pool)) + [EOT_ID]


STREAM_TOKENS = _bytes_tokens()


def stream_and_answer(monkeypatch, tokens: list[int], stops: tuple[str, ...]) -> tuple[str, str]:
    """The streamed text and the answer's text for one token sequence, through the real
    `stream_text` and `generate` (as `answer` calls it): only the model is replaced."""
    import mmfusion.generation as generation

    monkeypatch.setattr(generation, "decode_stream", lambda gpt, config, **prompt: (torch.tensor([t]) for t in tokens))
    config = GenerationConfig(max_new_tokens=max(1, len(tokens)), stop_strings=stops)
    streamed = "".join(generation.stream_text(None, config=config))
    answer = generation.final_text(generation.generate(None, config=config)[0], stops)
    return streamed, answer


@pytest.mark.parametrize("tokens, stops, expected", [
    ([18435, 995], ("lo wor",), "Hel"),               # the stop string spans two tokens
    ([18435, 995], ("o w", "ld"), "Hell"),            # the earliest of several
    ([8582, 25081, 8582], (), "🙂\ufffd"),             # cut inside a character by max_new_tokens
    ([220, 220, 18435, 220, 198], (), "Hello"),       # whitespace around: stripped, as the answer is
    ([18435, EOT_ID, 995], (), "Hello"),              # end of text
    ([33768, 98, 17312, 105], ("本",), "日"),          # a stop string made of a multi-byte character
])
def test_stream_equals_answer_examples(monkeypatch, tokens, stops, expected):
    streamed, answer = stream_and_answer(monkeypatch, tokens, stops)
    assert streamed == answer == expected


def test_stream_equals_answer_for_any_tokens_and_stop_strings(monkeypatch):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from mmfusion.tokenizer import get_tokenizer

    texts = st.lists(st.sampled_from(STREAM_TOKENS), min_size=1, max_size=12)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(tokens=texts, data=st.data())
    def check(tokens, data):
        text = get_tokenizer().decode([t for t in tokens if t != EOT_ID])
        # stop strings taken from the text itself (so they do occur), plus arbitrary ones
        spans = st.tuples(st.integers(0, len(text)), st.integers(1, 4)).map(lambda p: text[p[0]:p[0] + p[1]])
        stops = tuple(data.draw(st.lists(spans | st.text(min_size=1, max_size=3), max_size=3)))
        streamed, answer = stream_and_answer(monkeypatch, tokens, tuple(s for s in stops if s))
        assert streamed == answer

    check()


def test_vlm_stream_equals_vlm_answer_on_a_real_model():
    import numpy as np

    from mmfusion import VLM, ViTConfig, VLMConfig
    from mmfusion.config import AdapterConfig

    torch.manual_seed(0)
    vlm = VLM(VLMConfig(vit=ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=0),
                        gpt=GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64),
                        adapter=AdapterConfig())).eval()
    image = np.random.default_rng(0).random((16, 16, 3))
    for n in (1, 2, 5, 9):
        answer = vlm.answer(image, "what is it?", max_new_tokens=n)
        assert "".join(vlm.stream(image, "what is it?", max_new_tokens=n)) == answer
        if len(answer) > 2:  # a stop string from inside the answer
            stop = (answer[1:3],)
            assert "".join(vlm.stream(image, "what is it?", max_new_tokens=n, stop_strings=stop)) == \
                vlm.answer(image, "what is it?", max_new_tokens=n, stop_strings=stop)
    assert "".join(vlm.stream(image, None, max_new_tokens=6)) == vlm.caption(image, max_new_tokens=6)


# ---- fixed-shape decoding: the eager loop is the reference --------------------------------------

def _varied_gpt(seed: int) -> GPT:
    """Weights large enough that greedy decoding does not repeat one token."""
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.3)
    return gpt


def _left_padded(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50257, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids, mask


@pytest.mark.parametrize("seed", range(2))
def test_static_decoder_gives_the_eager_tokens(seed):
    gpt = _varied_gpt(seed)
    ids, mask = _left_padded(seed)
    eager = generate(gpt, input_ids=ids, attention_mask=mask, config=GenerationConfig(max_new_tokens=30))
    assert len({tuple(row) for row in eager}) == 3  # each row its own text: the padding is read right
    static = generate(gpt, input_ids=ids, attention_mask=mask,
                      config=GenerationConfig(max_new_tokens=30, decoder="static"))
    assert static == eager
    unpadded = generate(gpt, input_ids=ids[:1], config=GenerationConfig(max_new_tokens=30, decoder="static"))
    assert unpadded == generate(gpt, input_ids=ids[:1], config=GenerationConfig(max_new_tokens=30))


def test_static_decoder_on_a_vlm_prompt_with_prefix_attention():
    from mmfusion import VLM, ViTConfig, VLMConfig
    from mmfusion.config import AdapterConfig

    torch.manual_seed(0)
    vlm = VLM(VLMConfig(vit=ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=0),
                        gpt=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64),
                        adapter=AdapterConfig(pixel_shuffle=2, keep_cls=True), attention="prefix")).eval()
    with torch.no_grad():
        for p in vlm.gpt.parameters():
            p.normal_(0, 0.3)
    images = [torch.rand(3, 16, 16) for _ in range(2)]
    questions = ["what is it?", "a much longer question about the picture?"]
    eager = vlm.answer_batch(images, questions, max_new_tokens=12)
    assert vlm.answer_batch(images, questions, max_new_tokens=12, decoder="static") == eager


@pytest.mark.slow
def test_compiled_decoder_gives_the_eager_tokens():
    gpt = _varied_gpt(5)
    ids, mask = _left_padded(5)
    eager = generate(gpt, input_ids=ids, attention_mask=mask, config=GenerationConfig(max_new_tokens=20))
    compiled = GenerationConfig(max_new_tokens=20, decoder="compiled")
    assert generate(gpt, input_ids=ids, attention_mask=mask, config=compiled) == eager
    again = generate(gpt, input_ids=ids, attention_mask=mask, config=compiled)  # the kept compiled step
    assert again == eager and "cpu" in gpt.__dict__["_compiled_steps"]
    assert "_compiled_steps" not in dict(gpt.named_modules())  # not a submodule: never saved


@pytest.mark.slow
def test_compiled_decoder_keeps_its_buffers_from_call_to_call():
    """A CUDA graph reads its inputs where it was recorded, and torch records again when one moves:
    the compiled decoder keeps the KV cache and its buffers on the model, so the next decoding of
    the same batch size and rounded length writes into the same memory. A decoding that starts
    while another runs gets buffers of its own."""
    from mmfusion.generation import decode_stream

    gpt = _varied_gpt(7)
    ids, mask = _left_padded(7)
    compiled, eager = GenerationConfig(max_new_tokens=20, decoder="compiled"), GenerationConfig(max_new_tokens=20)
    first = generate(gpt, input_ids=ids, attention_mask=mask, config=compiled)
    assert first == generate(gpt, input_ids=ids, attention_mask=mask, config=eager)
    kept = gpt.__dict__["_step_buffers"]
    address = kept.cache.k.data_ptr()
    assert kept.cache.shape[3] == 64 and not kept.in_use  # 9 + 20 positions, rounded up to 64
    short_ids, short_mask = ids[:, 4:], mask[:, 4:]  # 5 prompt tokens: the same 64 positions, old keys in them
    assert (generate(gpt, input_ids=short_ids, attention_mask=short_mask, config=compiled)
            == generate(gpt, input_ids=short_ids, attention_mask=short_mask, config=eager))
    assert gpt.__dict__["_step_buffers"] is kept and kept.cache.k.data_ptr() == address

    one = decode_stream(gpt, input_ids=ids, attention_mask=mask, config=compiled)
    two = decode_stream(gpt, input_ids=ids, attention_mask=mask, config=compiled)
    steps = [(next(one), next(two))]  # both running: the second cannot share the first's cache
    assert kept.in_use and gpt.__dict__["_step_buffers"] is kept
    steps += list(zip(one, two))
    for tokens in zip(*steps):  # each decoding's tokens, row by row
        assert torch.stack(tokens, 1).tolist() == first
    assert not kept.in_use  # the first decoding ended
    stopped = decode_stream(gpt, input_ids=ids, attention_mask=mask, config=compiled)
    next(stopped)
    assert kept.in_use
    stopped.close()  # a caller that stops early frees them too
    assert not kept.in_use
    assert generate(gpt, input_ids=ids, attention_mask=mask, config=compiled) == first
    assert kept.cache.k.data_ptr() == address
    gpt.free_decoder_cache()  # its memory back; the next compiled decoding allocates again
    assert "_step_buffers" not in gpt.__dict__
    assert generate(gpt, input_ids=ids, attention_mask=mask, config=compiled) == first


@pytest.mark.slow
def test_the_compiled_step_writes_the_cache_in_place_without_copying_it():
    """Each step writes one position of each layer's cache. Written into a view (keys[i]), the
    compiler copied the layer's whole cache out and back every step, which made the compiled
    decoder slower than the eager one on a CPU (22 against 36 tokens/s for GPT-2 124M, batch 1)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=64)).eval()  # head width 8
    ids = torch.randint(0, 50000, (1, 8))
    steps = 29  # a cache of 8 + 29 = 37 positions: 2 x 37 x 8 = 592 numbers a layer, 1,184 in all
    config = GenerationConfig(max_new_tokens=steps, decoder="compiled")
    tokens, code = run_and_get_code(lambda: generate(gpt, input_ids=ids, config=config))
    assert tokens == generate(gpt, input_ids=ids, config=GenerationConfig(max_new_tokens=steps))
    code = "\n".join(code)
    assert "index_put" in code and "index_copy" not in code
    assert not re.search(r"x\d+<static_cast<int64_t>\((592|1184)L\)", code)  # no loop over a layer's cache


def test_decoder_must_be_known():
    with pytest.raises(ValueError, match="decoder must be one of"):
        GenerationConfig(decoder="graphs")


# ---- settings at their edges, and batches whose prompts fill the context -------------------------

def test_one_stop_string_given_as_text_is_one_stop_string(gpt):
    assert GenerationConfig(stop_strings="END").stop_strings == ("END",)  # not "E", "N", "D"
    assert GenerationConfig(stop_strings=None).stop_strings == ()
    ids = torch.tensor([[5, 9, 200, 7]])
    full = generate(gpt, input_ids=ids, config=GenerationConfig(max_new_tokens=8))
    from mmfusion.tokenizer import get_tokenizer

    first = get_tokenizer().decode(full[0])[0]  # one character of the text, never a stop string of "xyz" + it
    assert generate(gpt, input_ids=ids, config=GenerationConfig(max_new_tokens=8, stop_strings="xyz" + first)) == full
    for bad in ([1, 2], [""], 7):
        with pytest.raises(ConfigError, match="stop_strings must be a list of non-empty strings"):
            GenerationConfig(stop_strings=bad)


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 5e-324])
def test_a_vanishing_temperature_is_greedy(gpt, temperature):
    ids = torch.tensor([[5, 9, 200, 7]])
    greedy = generate(gpt, input_ids=ids, config=GenerationConfig(max_new_tokens=8))
    assert generate(gpt, input_ids=ids, config=GenerationConfig(max_new_tokens=8, temperature=temperature,
                                                                seed=0)) == greedy


def test_a_vanishing_top_p_keeps_the_most_likely_token(gpt):
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.equal(filter_logits(logits, top_p=1e-300).softmax(-1), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    ids = torch.tensor([[5, 9, 200, 7]])
    greedy = generate(gpt, input_ids=ids, config=GenerationConfig(max_new_tokens=8))
    assert generate(gpt, input_ids=ids, config=GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=1e-300,
                                                                seed=0)) == greedy


def test_room_groups_batch_only_prompts_that_keep_their_room():
    # block 64, 8 new tokens: prompts up to 56 tokens get all 8 in any batch; longer ones only beside their own length
    assert room_groups([5, 10, 60, 61, 60, 3], 64, 8) == [[0, 1, 5], [2, 4], [3]]
    assert room_groups([5, 10, 60], 64, 10**18) == [[0], [1], [2]]
    assert room_groups([], 64, 8) == []


@pytest.mark.parametrize("fusion, attention", [("early", "causal"), ("early", "prefix"), ("cross", "causal")])
def test_a_rows_answer_does_not_depend_on_the_other_prompts_in_its_batch(fusion, attention):
    import numpy as np

    from mmfusion import VLM, ViTConfig, VLMConfig
    from mmfusion.config import AdapterConfig

    torch.manual_seed(0)
    vlm = VLM(VLMConfig(vit=ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=0),
                        gpt=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64), adapter=AdapterConfig(),
                        attention=attention, fusion=fusion)).eval()
    with torch.no_grad():
        for p in vlm.gpt.parameters():
            p.normal_(0, 0.3)
    images = [np.full((16, 16, 3), v, np.uint8) for v in (0, 120, 250)]
    questions = ["what?", "what colour is the big shape in the middle?", "where " * 60 + "?"]  # the last fills the context
    alone = [vlm.answer(i, q, max_new_tokens=20) for i, q in zip(images, questions)]
    assert len(alone[0]) > len(alone[2])  # the long prompt leaves room for less
    assert vlm.answer_batch(images, questions, max_new_tokens=20) == alone
    assert vlm.caption_batch([], max_new_tokens=4) == [] and vlm.answer_batch([], []) == []
    with pytest.raises(PromptError, match="must be lists"):
        vlm.answer_batch(images[:1], "what?")  # a string is one question, not five
    # any other sequence of questions is one per image: a datasets column, an array, a generator
    import datasets

    column = datasets.Dataset.from_dict({"question": questions})["question"]
    for given in (column, np.array(questions), (q for q in questions)):
        assert vlm.answer_batch(images, given, max_new_tokens=20) == alone
