"""GPT-2 from scratch: token + learned position embeddings, causal pre-LN blocks, tied LM head.

Notation: B batch, T tokens this call, S keys (cached + current), C width, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .config import GPTConfig
from .layers import Block, KVCache, build_attention_mask, init_linear_and_norm, scale_residual_projections
from .weights import PretrainedMixin


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, S) that count only real tokens, so a left-padded row starts at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class GPT(PretrainedMixin, nn.Module):
    """`GPT.from_hf(source)` imports a transformers GPT-2 (instance, folder or hub id);
    mmfusion.convert attaches it (the converter imports this module, not the other way round)."""

    config_class = GPTConfig
    model_type = "gpt"

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.mlp_dim, c.activation, c.layer_norm_eps, c.dropout, c.bias)
            for _ in range(c.n_layer)
        )
        self.ln_f = nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self._init_weights()
        self._set_output_buffers()

    def _set_output_buffers(self) -> None:
        """output_ids (K,): the rows the LM head scores; output_index (V,): token -> its place among
        them, -1 for the rest. Not saved: config.output_tokens is the record."""
        ids = self.config.output_tokens
        device = self.wte.weight.device
        if ids is None:
            self.register_buffer("output_ids", None, persistent=False)
            self.register_buffer("output_index", None, persistent=False)
            return
        out = torch.tensor(ids, dtype=torch.long, device=device)
        index = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=device)
        index[out] = torch.arange(len(ids), device=device)
        self.register_buffer("output_ids", out, persistent=False)
        self.register_buffer("output_index", index, persistent=False)

    def restrict_output(self, token_ids) -> None:
        """Let the LM head score only `token_ids` (None: every token again). The weights stay as
        they are; the other tokens get logit -inf and are never produced."""
        ids = None if token_ids is None else tuple(sorted({int(i) for i in token_ids}))
        self.config = self.config.replace(output_tokens=ids)
        self._set_output_buffers()

    def output_weight(self) -> torch.Tensor:
        """The LM head's rows that are scored: (V, C), or (K, C) under output_tokens."""
        w = self.lm_head.weight
        return w if self.output_ids is None else w.index_select(0, self.output_ids)

    def output_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Token ids -> rows of `output_weight()` (-1 for a token the head does not score)."""
        return targets if self.output_index is None else self.output_index[targets]

    def _scatter_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the output tokens (..., K) -> over the vocabulary (..., V), -inf elsewhere."""
        if self.output_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.output_ids, logits)

    def _init_weights(self) -> None:
        """GPT-2's scheme: Normal(0, initializer_range) everywhere (GPT-2: 0.02), zero biases, unit
        LayerNorms, and the residual projections scaled by 1/sqrt(2L) so the residual stream's
        variance stays flat."""
        std = self.config.initializer_range
        self.apply(functools.partial(init_linear_and_norm, std=std))
        scale_residual_projections(self.blocks, self.config.n_layer, std=std)

    def free_decoder_cache(self) -> None:
        """Drop the KV cache the compiled decoder keeps between calls (static_decode.StepBuffers):
        the memory of the last compiled decoding's cache, until a later one allocates it again."""
        self.__dict__.pop("_step_buffers", None)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` rows and up to `max_len` positions."""
        c = self.config
        max_len = max_len or c.block_size
        if max_len > c.block_size:
            raise ValueError(f"cache of {max_len} positions exceeds the context of {c.block_size}")
        return KVCache(c.n_layer, batch_size, c.n_head, max_len, c.n_embd // c.n_head)

    def hidden_states(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                      inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      cache: KVCache | None = None, bidirectional: torch.Tensor | None = None,
                      before_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, C).

        input_ids (B, T) or inputs_embeds (B, T, C): this call's tokens.
        attention_mask (B, S): 1 for real tokens, 0 for padding, over cached + current tokens.
        position_ids (B, T): default counts real tokens (from `attention_mask`) after the cache.
        bidirectional (B, S): tokens (image slots) that attend to each other in both directions.
        before_block(i, x) -> x: runs before block i (a VLM's cross-attention to its image).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds the GPT context of {self.config.block_size}; "
                "shorten the input or use a model with a larger block_size"
            )
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(
                f"attention_mask must have shape (B, cached + new) = {(B, past + T)}, got {tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, past:]  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=x.device)[None]  # (1, T)
        padding = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        mask = build_attention_mask(padding, T, past, True, bidirectional, x.device)
        x = self.dropout(x + self.wpe(position_ids))
        for i, block in enumerate(self.blocks):
            if before_block is not None:
                x = before_block(i, x)
            x = block(x, mask, True, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)

    def row_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits of the tokens the head scores, (B, K) (K = V without output_tokens), for
        one position per row, hidden (B, C): the decoding step. `output_token` maps a column to
        its token id; decoding picks among the K columns and never builds the (B, V) row.

        Computed as (W h^T)^T, which equals lm_head(h) up to summation order: with a few rows
        against the (V, C) weight, MKL runs `W @ h.T` as one streaming pass while nn.Linear's
        `h @ W.T` is slower for a few rows (benchmarks/NOTES.md).
        """
        return (self.output_weight() @ hidden.T).T  # (K, B) -> (B, K)

    def output_token(self, column: torch.Tensor) -> torch.Tensor:
        """Columns of `row_scores` -> token ids."""
        return column if self.output_ids is None else self.output_ids[column]

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """Logits (B, T, V) (-inf for tokens outside config.output_tokens). Keyword arguments as in
        `hidden_states`."""
        return self.logits(self.hidden_states(input_ids, attention_mask, **kwargs))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits (..., V) of final hidden states (..., C)."""
        return self._scatter_logits(nn.functional.linear(hidden, self.output_weight()))
