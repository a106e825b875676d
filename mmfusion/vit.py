"""Vision Transformer: the GPT block made bidirectional.

pixel_values (B, 3, H, W) -> conv patch embedding -> (B, N, C) -> prepend CLS -> (B, N+1, C)
-> + learned positions -> L bidirectional blocks -> LayerNorm -> head(CLS or mean of patches)
-> (B, num_classes),
or with `label_grid` g > 1: head(mean of each cell's patches) -> (B, g*g, num_classes).

Notation: B batch, N patches, C width, P patch size, G grid side (N = G * G).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ViTConfig
from .layers import INIT_STD, Block, init_linear_and_norm, mimetic_init_
from .weights import PretrainedMixin


class ViT(PretrainedMixin, nn.Module):
    """`ViT.from_hf(source)` imports a transformers ViT / CLIP vision tower (instance, folder or hub id);
    mmfusion.convert attaches it (the converter imports this module, not the other way round)."""

    config_class = ViTConfig
    model_type = "vit"

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Conv2d(c.num_channels, c.n_embd, kernel_size=c.patch_size, stride=c.patch_size,
                                     bias=c.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.n_embd))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.n_embd))
        self.pre_norm = nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps) if c.pre_norm else nn.Identity()
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.mlp_dim, c.activation, c.layer_norm_eps, c.dropout, qkv_bias=c.qkv_bias)
            for _ in range(c.n_layer)
        )
        self.norm = nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps)
        self.head = nn.Linear(c.n_embd, c.num_classes) if c.num_classes else None
        self._init_weights()

    def _init_weights(self) -> None:
        """transformers' ViT init: Normal(0, 0.02) for every linear and conv weight, the
        classifier included, zero biases, unit LayerNorms, truncated normal 0.02 for the CLS
        token and the position table; then the patch projection N(0, `patch_init_std`) and, with
        `attention_init="mimetic"`, attention weights that start like trained ones
        (mmfusion.layers.mimetic_init_). With `patch_init_std=0.02, attention_init="normal"` it is
        transformers' start exactly. Measured one difference at a time (benchmarks/vit_learning.py,
        docs/experiments.md): a zero classifier, GPT-2's 1/sqrt(2L) residual scaling and a sin-cos
        position start each slowed learning; the mimetic start and the wider patch projection
        sped it up."""
        self.apply(init_linear_and_norm)
        with torch.no_grad():  # scaled, not redrawn: every later tensor's draw stays as it was
            self.patch_embed.weight.mul_(self.config.patch_init_std / INIT_STD)
        nn.init.trunc_normal_(self.cls_token, std=INIT_STD)
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        if self.config.attention_init == "mimetic":
            for block in self.blocks:
                mimetic_init_(block.attn)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N+1, C): patches, CLS first, positions added."""
        c = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(
                f"pixel_values must have shape (B, {c.num_channels}, {c.image_size}, {c.image_size}), "
                f"got {tuple(pixel_values.shape)}; resize images with mmfusion.processing.ImageProcessor"
            )
        x = self.patch_embed(pixel_values)  # (B, C, G, G)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N+1, C)
        return self.pre_norm(self.dropout(x))

    def forward_features(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        """Hidden states (B, N+1, C) after the final norm (CLIP-style configs: before it).

        With `output_hidden_states`, also returns a tuple of L+1 tensors (B, N+1, C): the
        embeddings, then each block's raw output, as transformers does.
        """
        x = self.embed(pixel_values)
        states = [x]
        for block in self.blocks:
            x = block(x)
            if output_hidden_states:
                states.append(x)
        if self.config.final_norm == "all":
            x = self.norm(x)
        return (x, tuple(states)) if output_hidden_states else x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the classifier reads (B, C): the CLS token, or the mean of the patch tokens (`pool`)."""
        pooled = hidden[:, 1:].mean(dim=1) if self.config.pool == "mean" else hidden[:, 0]
        return self.norm(pooled) if self.config.final_norm == "cls" else pooled

    def pool_cells(self, hidden: torch.Tensor) -> torch.Tensor:
        """Mean of the patch tokens in each cell of the label grid, in reading order: (B, g*g, C)."""
        g, G = self.config.label_grid, self.config.grid_size
        B, _, C = hidden.shape
        patches = hidden[:, 1:].view(B, g, G // g, g, G // g, C)  # (B, rows, row-in-cell, cols, col-in-cell, C)
        cells = patches.mean(dim=(2, 4)).reshape(B, g * g, C)
        return self.norm(cells) if self.config.final_norm == "cls" else cells

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes); with `label_grid` g > 1, per cell (B, g*g, num_classes)."""
        if self.head is None:
            raise RuntimeError("this ViT has no classifier (num_classes=0); use forward_features")
        hidden = self.forward_features(pixel_values)
        if self.config.label_grid > 1:
            return self.head(self.pool_cells(hidden))
        return self.head(self.pool(hidden))
