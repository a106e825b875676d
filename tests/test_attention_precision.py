"""Attention under bf16 on CPU: computed in fp32 where a backward pass will follow (torch's CPU
attention backward is slow in bf16), left in bf16 where it will not (decoding) and on other
devices. Both branches run here: the device decision is injected."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfusion import ViT, ViTConfig, layers
from mmfusion.layers import attention, upcast_attention

BF16 = torch.bfloat16


@pytest.mark.parametrize(("device", "dtype", "needs_grad", "expected"), [
    ("cpu", torch.bfloat16, True, True),
    ("cpu", torch.float16, True, True),
    ("cpu", torch.bfloat16, False, False),  # decoding: bf16's forward is as fast as fp32's
    ("cpu", torch.float32, True, False),
    ("cuda", torch.bfloat16, True, False),
    ("cuda", torch.float16, True, False),
])
def test_which_attention_is_upcast(device, dtype, needs_grad, expected):
    assert upcast_attention(device, dtype, needs_grad) is expected


@pytest.fixture
def seen_dtypes(monkeypatch):
    """The dtypes of q, k, v every scaled_dot_product_attention call receives."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def qkv(requires_grad: bool, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 7, 8, generator=g, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_training_under_bf16_autocast_attends_in_fp32(seen_dtypes, causal):
    q, k, v = qkv(True)
    with torch.autocast("cpu", dtype=BF16):
        y = attention(q.to(BF16), k.to(BF16), v.to(BF16), is_causal=causal)
    assert seen_dtypes == [(torch.float32,) * 3]
    assert y.dtype == BF16  # what autocast's bf16 attention would have returned
    expected = F.scaled_dot_product_attention(q.to(BF16).float(), k.to(BF16).float(), v.to(BF16).float(),
                                              is_causal=causal).to(BF16)
    assert torch.equal(y, expected)
    y.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_bf16_tensors_without_autocast_are_upcast_too(seen_dtypes):
    q, k, v = qkv(True, BF16)
    y = attention(q, k, v, mask=torch.ones(7, 7, dtype=torch.bool).tril())
    assert seen_dtypes == [(torch.float32,) * 3] and y.dtype == BF16
    y.sum().backward()
    assert q.grad.dtype == BF16


def test_decoding_in_bf16_stays_in_bf16(seen_dtypes):
    q, k, v = qkv(False)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        y = attention(q.to(BF16), k.to(BF16), v.to(BF16))
    assert seen_dtypes == [(BF16,) * 3] and y.dtype == BF16
    seen_dtypes.clear()
    q, k, v = qkv(True)  # grad mode off wins over tensors that require grad
    with torch.no_grad():
        attention(q.to(BF16), k.to(BF16), v.to(BF16))
    assert seen_dtypes == [(BF16,) * 3]


def test_fp32_attention_is_untouched(seen_dtypes):
    q, k, v = qkv(True)
    y = attention(q, k, v, is_causal=True)
    assert seen_dtypes == [(torch.float32,) * 3]
    assert torch.equal(y, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_where_no_upcast_is_wanted_autocast_computes_in_bf16(seen_dtypes, monkeypatch):
    """The CUDA branch, taken on this CPU by injecting the decision."""
    monkeypatch.setattr(layers, "upcast_attention", lambda device, dtype, needs_grad: False)
    q, k, v = qkv(True)
    with torch.autocast("cpu", dtype=BF16):
        y = attention(q.to(BF16), k.to(BF16), v.to(BF16))
    assert seen_dtypes == [(BF16,) * 3] and y.dtype == BF16


def test_a_vit_trained_under_bf16_attends_in_fp32_and_lands_near_fp32(seen_dtypes):
    """A whole training step: every block's attention is fp32, and the gradients stay close to
    an fp32 step's (bf16 matmuls elsewhere still round)."""
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=16, patch_size=8, n_layer=2, n_head=2, n_embd=32, num_classes=3))
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])

    def grads(precision: str) -> torch.Tensor:
        vit.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16, enabled=precision == "bf16"):
            loss = F.cross_entropy(vit(x).float(), y)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in vit.parameters()])

    fp32 = grads("fp32")
    seen_dtypes.clear()
    bf16 = grads("bf16")
    assert seen_dtypes == [(torch.float32,) * 3] * 2
    assert torch.linalg.vector_norm(bf16 - fp32) < 0.05 * torch.linalg.vector_norm(fp32)


def test_tensors_on_a_device_without_autocast_pass_through():
    """Shape-only runs on the meta device (no autocast there) still work."""
    q = torch.empty(1, 2, 3, 4, device="meta", dtype=BF16, requires_grad=True)
    y = attention(q, q, q)
    assert y.shape == (1, 2, 3, 4) and y.device.type == "meta" and y.dtype == BF16
