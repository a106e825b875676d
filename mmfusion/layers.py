"""The one transformer block shared by the ViT (bidirectional) and the GPT (causal).

Notation: B batch, T query length, S key length (past + current), C width,
H heads, D head width (C = H * D), L layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":  # GPT-2's "gelu_new"
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":  # CLIP
        return QuickGELU()
    raise ConfigError(f"unknown activation {name!r}; use gelu, gelu_tanh or quick_gelu")


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class KVCache:
    """Preallocated keys and values for incremental decoding.

    Holds (L, B, H, S_max, D) tensors and the number of positions filled so far. They are
    allocated once, on the first write, in that write's dtype (so bf16 autocast gets a bf16
    cache); later writes go in place by index. Nothing grows with `torch.cat`.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int) -> None:
        self.shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.max_len = max_len
        self.length = 0  # positions filled, the same for every layer once a forward finishes

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) after the filled positions; return all keys/values (B, H, S, D)."""
        start, t = self.length, k.shape[2]
        if start + t > self.max_len:
            raise ValueError(f"KV cache is full: {start} + {t} positions > max_len {self.max_len}")
        if self.k is None or self.k.dtype != k.dtype:
            if start:
                raise ValueError(f"KV cache holds {self.k.dtype if self.k is not None else None} keys; got {k.dtype}")
            self.k = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
            self.v = torch.zeros(self.shape, device=v.device, dtype=v.dtype)
        self.k[layer, :, :, start:start + t] = k
        self.v[layer, :, :, start:start + t] = v
        return self.k[layer, :, :, :start + t], self.v[layer, :, :, :start + t]

    def advance(self, t: int) -> None:
        self.length += t


def build_attention_mask(key_padding: torch.Tensor | None, q_len: int, past_len: int, causal: bool,
                   bidirectional: torch.Tensor | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, S), True where a query may attend to a key, or None when
    SDPA's own paths suffice (no padding, no bidirectional block, and either no past keys or
    a single query, which may see every key).

    key_padding: (B, S) with 1/True for real tokens, 0/False for padding.
    bidirectional: (B, S) True for tokens (image slots) that see each other in both directions.
    A query always sees itself, so fully padded rows stay finite instead of turning into NaN.
    """
    needs_offset = causal and past_len > 0 and q_len > 1
    if key_padding is None and bidirectional is None and not needs_offset:
        return None
    for ref in (key_padding, bidirectional):
        if ref is not None:
            device = ref.device
    s = past_len + q_len
    q_pos = torch.arange(past_len, s, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(s, device=device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos) if causal else torch.ones(q_len, s, dtype=torch.bool, device=device)
    allowed = allowed[None]  # (1, T, S)
    if bidirectional is not None:
        bidi = bidirectional.bool()
        allowed = allowed | (bidi[:, past_len:, None] & bidi[:, None, :])  # (B, T, S)
    if key_padding is not None:
        allowed = allowed & key_padding.bool()[:, None, :]
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]  # (B, 1, T, S)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def upcast_attention(device_type: str, dtype: torch.dtype, needs_grad: bool) -> bool:
    """Whether attention computed in `dtype` on `device_type` should run in fp32 instead.

    torch's CPU attention kernel is slow backwards in bf16: forward and backward together took
    1.2-4x as long as in fp32 at our models' shapes on a CPU with native bf16 (AMX), and bf16
    products are slower still on AVX2-only CPUs (`benchmarks/attention.py`; docs/experiments.md,
    2026-12-01). Its forward alone is as fast as fp32's, so decoding stays in bf16; CUDA kernels
    are fast in bf16 and are left alone.
    """
    return device_type == "cpu" and dtype in LOW_PRECISION and needs_grad


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """`F.scaled_dot_product_attention` (B, H, T, D) in the dtype it would compute in (autocast's,
    if on), except where `upcast_attention` says fp32 is faster; the output keeps that dtype."""
    device_type = q.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else q.dtype  # meta tensors have no autocast
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not upcast_attention(device_type, dtype, needs_grad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
    with torch.autocast(device_type, enabled=False):  # autocast would cast the fp32 inputs back down
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal,
                                           dropout_p=dropout_p)
    return y.to(dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias and qkv_bias)  # fused q, k, v
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)  # (B, H, S, D)
        # With an explicit mask SDPA must not add its own causal mask. Without one, a causal
        # prefill over an empty cache is SDPA's fast path and a single decoded token sees all
        # keys; `build_attention_mask` builds a mask for every other case.
        is_causal = causal and mask is None and past == 0 and T > 1
        y = attention(q, k, v, mask, is_causal, self.dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.act = activation(act)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim: int, n_head: int, mlp_dim: int, act: str, eps: float,
                 dropout: float = 0.0, bias: bool = True, qkv_bias: bool = True) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, n_head, dropout, bias, qkv_bias)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act, dropout, bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask, causal, cache, layer)
        return x + self.mlp(self.ln2(x))


class GatedCrossAttention(nn.Module):
    """Late fusion (Flamingo): text tokens attend to image tokens, then a feed-forward layer,
    each added to the residual stream through tanh(gate) with the gates starting at 0, so a
    pretrained GPT starts out computing exactly what it did alone.

    x (B, T, C) text hidden states; image keys and values (B, H, M, D) from `image_kv`, computed
    once per image and reused for every decoded token. Every text token sees every image token.
    """

    def __init__(self, dim: int, n_head: int, mlp_dim: int, act: str, eps: float, bias: bool = True) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.ln_mlp = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act, 0.0, bias)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def image_kv(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, M, C) -> keys and values (B, H, M, D)."""
        B, M, _ = image.shape
        k, v = self.kv(image).view(B, M, 2, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q(self.ln(x)).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k, v = kv
        y = attention(q, k.to(q.dtype), v.to(q.dtype))  # (B, H, T, D)
        x = x + torch.tanh(self.attn_gate) * self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + torch.tanh(self.mlp_gate) * self.mlp(self.ln_mlp(x))


INIT_STD = 0.02  # GPT-2's and transformers' ViT's Normal init of every weight matrix


def init_linear_and_norm(module: nn.Module, std: float = INIT_STD) -> None:
    """Normal(0, std) for Linear/Embedding/Conv weights, zeros for biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def scale_residual_projections(blocks: nn.ModuleList, n_layer: int, std: float = INIT_STD) -> None:
    """GPT-2's scaled init: residual-stream projections get std / sqrt(2 * n_layer)."""
    for block in blocks:
        for proj in (block.attn.proj, block.mlp.proj):
            nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * n_layer))


def _mimetic_pair(C: int, D: int, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), each (D, C), with A^T B distributed as Q Q^T (a Z + b I): the target a Z + b I
    (Z ~ N(0, 1/C)) seen through a random D-dimensional subspace with orthonormal basis Q. Since
    Q^T Z is again Gaussian, no C x C matrix is drawn or factored; A and B get equal norms."""
    Q = torch.linalg.qr(torch.randn(C, D)).Q  # (C, D)
    right = a * torch.randn(D, C) / C**0.5 + b * Q.T  # Q^T (a Z + b I)
    s = (right.norm() / D**0.5).sqrt().clamp_min(1e-6)
    return s * Q.T, right / s


@torch.no_grad()
def mimetic_init_(attn: Attention, qk: tuple[float, float] = (0.7, 0.7), vo: tuple[float, float] = (0.4, 0.4)) -> None:
    """Mimetic attention init (Trockman & Kolter, 2023): weights whose products look like those of
    trained attention layers. Each head's W_q^T W_k starts near a Z + b I (Z ~ N(0, 1/C)) seen
    through a random D-dimensional subspace, so tokens attend to similar tokens (themselves
    first), and its W_v^T W_o^T near a Z - b I the same way (the heads' sum is a Z - b I in
    expectation). Random subspaces instead of the paper's per-head SVD: C^3 per head is seconds
    at ViT-B width, this is C * D^2. Draws from torch's global generator."""
    C = attn.proj.weight.shape[0]
    H, D = attn.n_head, attn.head_dim
    qkv = attn.qkv.weight.view(3, H, D, C)  # q, k, v rows of each head; y = x @ weight.T
    proj = attn.proj.weight.view(C, H, D)  # each head's output columns
    for h in range(H):
        q, k = _mimetic_pair(C, D, *qk)
        v, o = _mimetic_pair(C, D, vo[0], -vo[1])
        qkv[0, h], qkv[1, h], qkv[2, h] = q, k, v
        proj[:, h] = o.T  # x W_v,h^T W_o,h^T = x A^T B
