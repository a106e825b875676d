"""Cross-entropy through the tied LM head, with both gradients formed in the forward pass.

Training supervises K tokens (the answer tokens) against V = 50,257 vocabulary rows. Written as
`F.cross_entropy(lm_head(h), t)`, autograd materializes the (K, V) logits, their log-softmax, a
zero-filled (K, V) gradient and its log-softmax backward, then a fresh (V, C) gradient for the tied
weight that is added to the embedding's: seven passes over K x V or V x C floats, most into newly
mapped memory: most of a stage-2 step on a CPU (benchmarks/NOTES.md).

`linear_cross_entropy` computes the logits transposed, (V, K) = W h^T (the layout MKL runs fastest
with few rows, as in `GPT.row_scores`), turns them into softmax - onehot in place, and forms
dL/dh and dL/dW right away; backward only scales them. Same loss and gradients as the reference up
to summation order (tests/test_loss.py); the timing is in benchmarks/ (benchmarks/loss.py).
"""

from __future__ import annotations

import torch

# The label of positions no loss is taken on (prompt, image slots, padding): PyTorch's default.
IGNORE_INDEX = -100

# Rows of logits formed at once: bounds the (V, rows) fp32 buffer to 256 MiB for any K.
CHUNK_ELEMENTS = 2**26


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                token_weights: torch.Tensor | None = None) -> torch.Tensor:
        k, vocab = hidden.shape[0], weight.shape[0]
        ctx.dtypes = hidden.dtype, weight.dtype  # the gradients go back in these, under autocast too
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None  # (K, C)
        grad_w = None  # (V, C), allocated by the first chunk's product
        acc = torch.promote_types(hidden.dtype, torch.float32)  # the softmax's dtype: fp32, or fp64 for fp64
        total = hidden.new_zeros((), dtype=acc)
        rows = max(1, CHUNK_ELEMENTS // vocab)
        for s in range(0, k, rows):
            h, t = hidden[s:s + rows], targets[s:s + rows]  # (n, C), (n,)
            cols = torch.arange(len(t), device=hidden.device)
            logits = torch.mm(weight, h.t()).to(acc)  # (V, n): one column per supervised token
            target_logit = logits[t, cols]  # (n,)
            top = logits.amax(0)  # (n,)
            probs = logits.sub_(top).exp_()  # unnormalized, in place
            norm = probs.sum(0)  # (n,)
            if token_weights is None:
                total += (norm.log() + top - target_logit).sum()
                probs.mul_((norm * k).reciprocal())  # softmax / K: the mean over all K tokens
                probs[t, cols] -= 1.0 / k  # (softmax - onehot) / K = dL/dlogits, transposed
            else:
                w = token_weights[s:s + rows].to(acc)  # (n,), summing to 1 over all K
                total += (w * (norm.log() + top - target_logit)).sum()
                probs.mul_(w / norm)
                probs[t, cols] -= w
            g = probs.to(hidden.dtype)
            if need_h:
                grad_h[s:s + rows] = torch.mm(g.t(), weight)  # (n, V) @ (V, C)
            if need_w:
                part = torch.mm(g, h)  # (V, n) @ (n, C)
                grad_w = part if grad_w is None else grad_w.add_(part)
        ctx.save_for_backward(grad_h, grad_w)
        return total / k if token_weights is None else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # In place: the saved gradients are used once, and the weight's then becomes .grad
        # without a copy (or is added to the tied embedding's).
        return (None if grad_h is None else grad_h.mul_(grad_loss).to(ctx.dtypes[0]),
                None if grad_w is None else grad_w.mul_(grad_loss).to(ctx.dtypes[1]), None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         token_weights: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, like
    `F.cross_entropy(F.linear(hidden, weight), targets)` without keeping the logits; with
    `token_weights` (K,), non-negative and summing to 1, the weighted sum instead.

    hidden (K, C), weight (V, C), targets (K,) in [0, V). The softmax runs in fp32 (fp64 for fp64
    inputs); under autocast the products run in its dtype. Not twice differentiable.
    `check=False` skips the range check of the targets, which reads them (on an accelerator,
    waiting for the device): for targets already checked on the CPU.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or targets.shape != hidden.shape[:1] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy needs hidden (K, C), weight (V, C) and targets (K,); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        raise ValueError("linear_cross_entropy needs at least one target")
    if check and bool(((targets < 0) | (targets >= weight.shape[0])).any()):
        raise ValueError(f"targets must lie in [0, {weight.shape[0]}); got values from {int(targets.min())} "
                         f"to {int(targets.max())}")
    if token_weights is not None and token_weights.shape != targets.shape:
        raise ValueError(f"token_weights must have the targets' shape {tuple(targets.shape)}, "
                         f"got {tuple(token_weights.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, targets, token_weights)
