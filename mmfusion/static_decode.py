"""Decoding steps of fixed shapes, for torch.compile and CUDA graphs.

The eager loop (`generation.decode_stream`) attends each new token to the keys filled so far, a
slice that grows by one every step: a new shape per step, which a CUDA graph cannot replay.
`StaticStep` attends to the whole preallocated cache instead (B, H, S_max, D) with a key mask,
writes the new key and value at a position given as a tensor, and takes the position ids as a
tensor too, so every step has the same shapes and no Python value changes between steps. Then
`torch.compile(step, mode="reduce-overhead")` captures one CUDA graph and replays it per token:
at batch 1 decoding is bound by kernel launches, not by the GPU's arithmetic. The graph reads its
inputs where it was recorded, so the compiled decoder keeps them on the model (`StepBuffers`).

Masked keys get no weight, so the logits equal the eager loop's up to summation order; the tests
compare the greedy tokens (tests/test_generation.py).

Notation: B batch, L layers, H heads, S_max cache positions, D head width, C width, V vocabulary.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from .gpt import GPT


class StaticStep(nn.Module):
    """One decoding step of `gpt` over a fixed-size KV cache, all inputs tensors of fixed shape.

    forward(token (B,), position (B,), slot (1,), keys, values (L, B, H, S_max, D), key_ok (B, S_max))
    -> scores (B, K) (`GPT.row_scores`). Writes the token's key and value at cache position `slot` (in place) and
    sets key_ok[:, slot]; key_ok marks the cache positions each row may attend to (its real
    prompt tokens and the tokens decoded so far).
    """

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor, key_ok: torch.Tensor, before_block=None) -> torch.Tensor:
        gpt = self.gpt
        B = token.shape[0]
        key_ok.index_fill_(1, slot, True)
        mask = key_ok[:, None, None, :]  # (B, 1, 1, S_max)
        x = gpt.wte(token[:, None]) + gpt.wpe(position[:, None])  # (B, 1, C)
        # Where the new keys go, as indices into the whole cache: an in-place write into a view
        # (keys[i]) the compiler turns into a copy of the layer's cache and back, every step.
        L, _, H = keys.shape[:3]
        layer = torch.arange(L, device=keys.device).view(L, 1, 1, 1)
        rows = (torch.arange(B, device=keys.device).view(B, 1, 1), torch.arange(H, device=keys.device).view(1, H, 1),
                slot.view(1, 1, 1))
        for i, block in enumerate(gpt.blocks):
            if before_block is not None:  # a cross-fusion VLM's cross-attention (eager only)
                x = before_block(i, x)
            attn = block.attn
            q, k, v = attn.qkv(block.ln1(x)).view(B, 1, 3, attn.n_head, attn.head_dim).permute(2, 0, 3, 1, 4)
            keys.index_put_((layer[i], *rows), k.to(keys.dtype))  # (B, H, 1, D) at [i, :, :, slot]
            values.index_put_((layer[i], *rows), v.to(values.dtype))
            y = F.scaled_dot_product_attention(q, keys[i].to(q.dtype), values[i].to(q.dtype), attn_mask=mask)
            x = x + attn.proj(y.transpose(1, 2).reshape(B, 1, -1))
            x = x + block.mlp(block.ln2(x))
        return gpt.row_scores(gpt.ln_f(x)[:, -1])  # (B, K)


def static_step(gpt: GPT, compiled: bool) -> nn.Module:
    """The step module for `gpt`; compiled once per model (mode reduce-overhead on CUDA, where it
    captures a CUDA graph; the default mode elsewhere) and kept on the model for later calls."""
    if not compiled:
        return StaticStep(gpt)
    device = next(gpt.parameters()).device.type
    steps = gpt.__dict__.setdefault("_compiled_steps", {})  # a plain dict: not a submodule, not saved
    if device not in steps:
        steps[device] = torch.compile(StaticStep(gpt), mode="reduce-overhead" if device == "cuda" else None,
                                      fullgraph=True)
    return steps[device]


# The compiled decoder's cache length is rounded up to a multiple of this (at most block_size), so
# prompts of nearby lengths share one compiled step (and one CUDA graph).
LENGTH_STEP = 64


class StepBuffers:
    """The compiled step's inputs, kept on the model from one call to the next: the KV cache and
    the key mask, token, position and slot buffers. A CUDA graph reads its inputs at the addresses
    it was recorded with, so buffers allocated afresh per call would make it re-record every call
    (torch re-records when a static input moves). One set per model, for the last (device, batch,
    length); a second decoding that starts while the first is still running gets its own. The
    static decoder passes the cache it prefilled, and keeps nothing."""

    def __init__(self, gpt: GPT, batch: int, length: int, device: torch.device, cache=None) -> None:
        self.key = (str(device), batch, length)
        self.cache = cache if cache is not None else gpt.new_cache(batch, length)
        self.key_ok = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.in_use = False

    def start(self) -> StepBuffers:
        """Claim the buffers for a decoding: an empty cache that keeps its tensors (the prefill writes
        into them in place while its dtype stays the same)."""
        self.in_use = True
        self.cache.length = 0
        return self

    def release(self) -> None:
        self.in_use = False


def step_buffers(gpt: GPT, batch: int, length: int, device: torch.device) -> StepBuffers:
    """The model's kept StepBuffers for (device, batch, length) if free, else new ones (kept in
    their place unless the old ones are in use)."""
    with _CLAIM:  # two threads decoding with one model must not both take the kept set
        kept = gpt.__dict__.get("_step_buffers")  # a plain attribute: not a submodule, not saved
        if kept is not None and kept.key == (str(device), batch, length) and not kept.in_use:
            return kept.start()
        fresh = StepBuffers(gpt, batch, length, device)
        if kept is None or not kept.in_use:
            gpt.__dict__["_step_buffers"] = fresh  # one set per model: the memory of one cache
        return fresh.start()


_CLAIM = threading.Lock()


def compiled_length(needed: int, block_size: int) -> int:
    """The cache length the compiled decoder allocates for `needed` positions."""
    return min(block_size, -(-needed // LENGTH_STEP) * LENGTH_STEP)


def mark_static(*tensors: torch.Tensor) -> None:
    """Tell the compiler these buffers keep their address across steps, so a CUDA graph may
    write into them in place."""
    for t in tensors:
        torch._dynamo.mark_static_address(t)
