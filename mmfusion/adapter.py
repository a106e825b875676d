"""ViTAdapter: ViT hidden states (B, 1+N, Dv) -> image tokens in GPT width (B, M, Dg).

Steps: pick the configured ViT layer, keep or drop CLS, optionally merge each s x s block of
the patch grid into one token (M = N / s^2 patch tokens), by pixel shuffle (each s^2 * Dv
wide) or by their mean (Dv wide), optionally add a learned embedding per image token, then
project (linear or MLP).

Notation: B batch, N patches, G grid side (N = G * G), s shuffle factor, Dv ViT width,
Dg GPT width, M image tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import AdapterConfig, ConfigError


def pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """Merge each s x s block of patch tokens into one token: (B, N, D) -> (B, N / s^2, s^2 * D)."""
    if s == 1:
        return x
    B, N, D = x.shape
    g = int(round(N**0.5))
    if g * g != N or g % s:
        raise ConfigError(f"pixel shuffle by {s} needs a square patch grid divisible by {s}, got {N} patches; "
                          "choose a pixel_shuffle that divides the ViT's grid side")
    x = x.view(B, g // s, s, g // s, s, D)  # (B, G/s, s, G/s, s, D): rows, row-in-block, cols, col-in-block
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, G/s, G/s, s, s, D)
    return x.reshape(B, (g // s) ** 2, s * s * D)  # (B, M, s^2 D)


def mean_pool(x: torch.Tensor, s: int) -> torch.Tensor:
    """Average each s x s block of patch tokens: (B, N, D) -> (B, N / s^2, D)."""
    B, _, D = x.shape
    return pixel_shuffle(x, s).view(B, -1, s * s, D).mean(dim=2)  # (B, M, s^2, D) -> (B, M, D)


class ViTAdapter(nn.Module):
    """ViT hidden states (B, 1+N, Dv) -> image tokens (B, M, Dg) in the GPT's width, as the module
    docstring describes; AdapterConfig picks the layer, CLS, merge, position embedding and projection."""

    def __init__(self, config: AdapterConfig, vit_dim: int, gpt_dim: int, num_tokens: int = 0) -> None:
        """`num_tokens` (M) is needed only with `config.position_embedding`."""
        super().__init__()
        self.config = config
        d_in = vit_dim * (config.pixel_shuffle**2 if config.merge == "concat" else 1)
        if config.projection == "linear":
            self.proj = nn.Sequential(nn.Linear(d_in, gpt_dim))
        else:
            self.proj = nn.Sequential(nn.Linear(d_in, gpt_dim), nn.GELU(), nn.Linear(gpt_dim, gpt_dim))
        self.dropout = nn.Dropout(config.dropout)
        for m in self.proj:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=d_in**-0.5 if m.in_features == d_in else gpt_dim**-0.5)
                nn.init.zeros_(m.bias)
        self.pos_embed = None
        if config.position_embedding:
            if num_tokens < 1:
                raise ConfigError("ViTAdapter with position_embedding needs num_tokens, the image tokens it yields "
                                  "(AdapterConfig.num_tokens(num_patches))")
            # Unit scale, like the LayerNorm'd ViT features it is added to: at the GPT's own
            # position scale (0.01) it would drown in image features of norm ~1 and take
            # hundreds of steps to matter.
            self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, d_in))  # (1, M, d_in)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, 1+N, Dv) from the chosen ViT layer -> image embeddings (B, M, Dg)."""
        s = self.config.pixel_shuffle
        cls, patches = hidden[:, :1], hidden[:, 1:]  # (B, 1, Dv), (B, N, Dv)
        merge = mean_pool if self.config.merge == "mean" else pixel_shuffle
        x = merge(patches, s)  # (B, N/s^2, d_in): d_in is s^2 Dv (concat) or Dv (mean)
        if self.config.keep_cls:
            # The CLS token is tiled to the merged width so one projection serves every token.
            x = torch.cat([cls.repeat(1, 1, x.shape[-1] // cls.shape[-1]), x], dim=1)  # (B, M, d_in)
        if self.pos_embed is not None:
            x = x + self.pos_embed  # which image token is which, whatever the ViT features keep of it
        return self.proj(self.dropout(x))  # (B, M, Dg)
