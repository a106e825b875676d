"""KV-cache decoding against the uncached forward pass, which stays the reference."""

from __future__ import annotations

import pytest
import torch

from mmfusion import GPT, GPTConfig

ATOL = 1e-5
VOCAB = 101


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=48, n_layer=2, n_head=4, n_embd=32))
    with torch.no_grad():  # larger weights than the init: sharper attention, logits of order 1
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded_mask(lengths: list[int], T: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
    return mask


@torch.no_grad()
def test_prefill_then_one_token_at_a_time_matches_full_forward(gpt):
    x = ids(2, 20)
    full = gpt(x)  # (B, T, V)
    assert full.abs().max() > 0.5
    cache = gpt.new_cache(2, 20)
    prefill = gpt(x[:, :6], cache=cache)
    torch.testing.assert_close(prefill, full[:, :6], atol=ATOL, rtol=0)
    for t in range(6, 20):
        step = gpt(x[:, t:t + 1], cache=cache)  # (B, 1, V)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=ATOL, rtol=0)
    assert cache.length == 20


@torch.no_grad()
def test_decoding_from_an_empty_cache_one_token_at_a_time(gpt):
    x = ids(1, 10, seed=1)
    full = gpt(x)
    cache = gpt.new_cache(1, 10)
    for t in range(10):
        torch.testing.assert_close(gpt(x[:, t:t + 1], cache=cache)[:, 0], full[:, t], atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padded_batch_with_attention_mask(gpt):
    T, lengths = 18, [18, 11, 5]
    x = ids(3, T, seed=2)
    mask = left_padded_mask(lengths, T)
    full = gpt(x, attention_mask=mask)
    real = mask.bool()
    # The padded reference itself equals each row run alone, unpadded.
    for row, n in enumerate(lengths):
        torch.testing.assert_close(full[row, T - n:], gpt(x[row:row + 1, T - n:])[0], atol=ATOL, rtol=0)

    cache = gpt.new_cache(3, T)
    P = 8  # row 2 is still all padding after the prefill
    prefill = gpt(x[:, :P], attention_mask=mask[:, :P], cache=cache)
    torch.testing.assert_close(prefill[real[:, :P]], full[:, :P][real[:, :P]], atol=ATOL, rtol=0)
    for t in range(P, T):
        step = gpt(x[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache)[:, 0]  # (B, V)
        rows = real[:, t]
        torch.testing.assert_close(step[rows], full[rows, t], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_multi_token_chunks_after_a_non_empty_cache(gpt, padded):
    T, chunks = 21, [4, 5, 1, 7, 4]
    x = ids(3, T, seed=3)
    mask = left_padded_mask([21, 15, 9], T) if padded else None
    full = gpt(x, attention_mask=mask)
    real = mask.bool() if padded else torch.ones(3, T, dtype=torch.bool)
    cache = gpt.new_cache(3, T)
    start = 0
    for n in chunks:
        end = start + n
        out = gpt(x[:, start:end], attention_mask=None if mask is None else mask[:, :end], cache=cache)
        keep = real[:, start:end]
        torch.testing.assert_close(out[keep], full[:, start:end][keep], atol=ATOL, rtol=0)
        start = end
    assert cache.length == T


@torch.no_grad()
def test_inputs_embeds_with_cache_match_ids(gpt):
    x = ids(2, 9, seed=4)
    full = gpt(x)
    cache = gpt.new_cache(2, 9)
    head = gpt(inputs_embeds=gpt.wte(x[:, :5]), cache=cache)
    tail = gpt(x[:, 5:], cache=cache)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_cache_overflow_and_context_limit_raise(gpt):
    cache = gpt.new_cache(1, 4)
    gpt(ids(1, 3), cache=cache)
    with pytest.raises(ValueError, match="full"):
        gpt(ids(1, 2), cache=cache)
    with pytest.raises(ValueError, match="context"):
        gpt(ids(1, 49))
    with pytest.raises(ValueError, match="exceeds"):
        gpt.new_cache(1, 49)
