"""linear_cross_entropy against torch's own F.cross_entropy(F.linear(...)): loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from mmfusion import loss as loss_module
from mmfusion.loss import linear_cross_entropy


def inputs(k=7, c=16, v=50, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(k, c, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, c, generator=g, dtype=dtype) * 2).requires_grad_()  # logits std ~8: a peaked softmax
    targets = torch.randint(0, v, (k,), generator=g)
    return hidden, weight, targets


def reference(hidden, weight, targets, scale=1.0):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = F.cross_entropy(F.linear(h, w), targets)
    (scale * loss).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_loss_and_both_gradients_match_torch_cross_entropy(dtype, tol):
    hidden, weight, targets = inputs(dtype=dtype)
    ref_loss, ref_h, ref_w = reference(hidden, weight, targets)
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert ref_loss > 1.0 and ref_h.abs().max() > 1e-2  # a non-trivial case
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(hidden.grad, ref_h, rtol=tol, atol=tol)
    torch.testing.assert_close(weight.grad, ref_w, rtol=tol, atol=tol)


def test_upstream_gradient_scales_both_gradients():
    hidden, weight, targets = inputs()
    _, ref_h, ref_w = reference(hidden, weight, targets, scale=-2.5)
    (-2.5 * linear_cross_entropy(hidden, weight, targets)).backward()
    torch.testing.assert_close(hidden.grad, ref_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight.grad, ref_w, rtol=1e-12, atol=1e-12)


def test_chunks_give_the_same_result(monkeypatch):
    """Rows are processed in chunks of CHUNK_ELEMENTS // V; several chunks, one uneven, change nothing."""
    hidden, weight, targets = inputs(k=11)
    ref_loss, ref_h, ref_w = reference(hidden, weight, targets)
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 4 * weight.shape[0])  # 4 rows a chunk: 4 + 4 + 3
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden.grad, ref_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight.grad, ref_w, rtol=1e-12, atol=1e-12)


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    hidden, weight, targets = inputs()
    _, ref_h, _ = reference(hidden, weight, targets)
    weight.requires_grad_(False)
    linear_cross_entropy(hidden, weight, targets).backward()
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, ref_h, rtol=1e-12, atol=1e-12)


def test_tied_weight_sums_the_head_and_embedding_gradients():
    """GPT-2 ties lm_head to wte: the weight's gradient is the embedding's plus the head's."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 16).double()
    ids, targets = torch.randint(0, 50, (9,)), torch.randint(0, 50, (9,))

    def run(fused: bool):
        emb.zero_grad(set_to_none=True)
        hidden = torch.tanh(emb(ids))  # (K, C)
        loss = (linear_cross_entropy(hidden, emb.weight, targets) if fused
                else F.cross_entropy(F.linear(hidden, emb.weight), targets))
        loss.backward()
        return emb.weight.grad.clone()

    torch.testing.assert_close(run(True), run(False), rtol=1e-12, atol=1e-12)


def test_under_bf16_autocast_the_loss_is_close_and_gradients_keep_the_input_dtypes():
    hidden, weight, targets = inputs(dtype=torch.float32)
    ref_loss, ref_h, _ = reference(hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert loss.dtype == torch.float32
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=0.05, atol=0.05)
    torch.testing.assert_close(hidden.grad, ref_h, rtol=0.1, atol=0.02)


@pytest.mark.parametrize("bad,match", [
    (lambda h, w, t: (h, w, t.clone().fill_(50)), r"targets must lie in \[0, 50\)"),
    (lambda h, w, t: (h, w, t.clone().fill_(-100)), r"targets must lie in \[0, 50\)"),
    (lambda h, w, t: (h[:0], w, t[:0]), "at least one target"),
    (lambda h, w, t: (h, w[:, :3], t), "needs hidden"),
    (lambda h, w, t: (h[None], w, t), "needs hidden"),
])
def test_bad_inputs_raise_one_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(*bad(*inputs()))


@pytest.mark.parametrize("rows", [1, 3, 50])  # 3: chunks that split the weights
def test_token_weights_give_the_weighted_loss_and_gradients(monkeypatch, rows):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 50 * rows)
    hidden, weight, targets = inputs()
    w = torch.rand(len(targets), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = w / w.sum()
    h, wt = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = (F.cross_entropy(F.linear(h, wt), targets, reduction="none") * w).sum()
    ref.backward()
    loss = linear_cross_entropy(hidden, weight, targets, w)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden.grad, h.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight.grad, wt.grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="token_weights must have the targets' shape"):
        linear_cross_entropy(hidden, weight, targets, w[:-1])


def test_vlm_loss_per_example_averages_each_rows_mean():
    """A caption of many tokens and a one-word answer: per example, each row counts once."""
    from mmfusion import VLM, ViTConfig, VLMConfig
    from mmfusion.config import AdapterConfig, GPTConfig
    from mmfusion.loss import IGNORE_INDEX

    torch.manual_seed(0)
    vlm = VLM(VLMConfig(vit=ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=0),
                        gpt=GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64), adapter=AdapterConfig()))
    m = vlm.num_image_tokens
    ids = torch.randint(0, 1000, (2, m + 12))
    ids[:, :m] = vlm.config.image_token_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, m + 2:] = ids[0, m + 2:]  # 10 supervised tokens
    labels[1, -1] = ids[1, -1]  # 1
    pixels = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        logits = vlm(ids, pixels).logits[:, :-1]
        per_token = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")  # 0 where ignored
        mask = labels[:, 1:] != IGNORE_INDEX
        by_row = (per_token * mask).sum(1) / mask.sum(1)
        assert torch.allclose(vlm(ids, pixels, labels=labels, loss_per="example").loss, by_row.mean(), atol=1e-5)
        assert torch.allclose(vlm(ids, pixels, labels=labels).loss, per_token[mask].mean(), atol=1e-5)
    with pytest.raises(ValueError, match="loss_per must be 'token' or 'example'"):
        vlm(ids, pixels, labels=labels, loss_per="row")
