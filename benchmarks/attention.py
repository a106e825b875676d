"""Attention in bf16 on CPU: torch's kernel in bf16 against fp32, and what `mmfusion.layers.attention` does.

    python benchmarks/attention.py            # our models' attention shapes, 10 alternating repeats
    python benchmarks/attention.py --smoke    # tiny shapes, for the test suite

For each shape, times `F.scaled_dot_product_attention` forward + backward on fp32 inputs, on bf16
inputs, and `attention` on bf16 inputs (which computes in fp32 where a backward follows on CPU);
then the forward alone for decoding shapes, where `attention` stays in bf16. All sides alternate in
one process (timing.py's `alternate`, medians). "error" is the largest difference of the output
from the fp32 result, in units of the largest fp32 output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfusion.layers import attention

from timing import alternate, repeat_args  # the sibling timing.py: medians, sides interleaved, order flipped each repeat

BF16 = torch.bfloat16
# (where the shape comes from, B, H, T query, S keys, D, causal)
TRAIN_SHAPES = [
    ("stage 1: vit-tiny @64, batch 32", 32, 4, 65, 65, 16, False),
    ("stage 2: gpt-tiny, batch 64, 35 tokens", 64, 4, 35, 35, 32, True),
    ("ViT-S/16 @224, batch 8", 8, 6, 197, 197, 64, False),
    ("VLM benchmark: GPT-2, batch 2, 260 tokens", 2, 12, 260, 260, 64, True),
]
DECODE_SHAPES = [
    ("GPT-2 decoding, batch 1, 256 keys", 1, 12, 1, 256, 64, False),
    ("GPT-2 decoding, batch 8, 256 keys", 8, 12, 1, 256, 64, False),
]
SMOKE_TRAIN = [("smoke", 2, 2, 9, 9, 8, True)]
SMOKE_DECODE = [("smoke decoding", 2, 2, 1, 9, 8, False)]


def inputs(b: int, h: int, t: int, s: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=g), torch.randn(b, h, s, d, generator=g),
            torch.randn(b, h, s, d, generator=g))


def side(fn, q, k, v, causal: bool, dtype: torch.dtype, backward: bool):
    """A step: fn on (q, k, v) in `dtype`, with a backward pass if asked; returns the fp32 output."""
    leaves = [x.to(dtype).requires_grad_(backward) for x in (q, k, v)]
    grad = torch.randn_like(leaves[0]) if backward else None

    def step() -> torch.Tensor:
        with torch.set_grad_enabled(backward):
            y = fn(*leaves, is_causal=causal)
            if backward:
                y.backward(grad)
        return y.detach().float()

    return step


def main(argv: list[str] | None = None) -> list[dict]:
    args = repeat_args(__doc__, 10, argv)
    repeats = args.repeats
    sdpa = F.scaled_dot_product_attention
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {repeats} alternating repeats "
          "after one warm-up")
    print("| shape | pass | fp32 ms | bf16 ms | mmfusion bf16 ms | mmfusion / bf16 | bf16 error | mmfusion error |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    cases = [(s, True) for s in (SMOKE_TRAIN if args.smoke else TRAIN_SHAPES)]
    cases += [(s, False) for s in (SMOKE_DECODE if args.smoke else DECODE_SHAPES)]
    for (name, b, h, t, s, d, causal), backward in cases:
        q, k, v = inputs(b, h, t, s, d)
        steps = {"fp32": side(sdpa, q, k, v, causal, torch.float32, backward),
                 "bf16": side(sdpa, q, k, v, causal, BF16, backward),
                 "mmfusion": side(attention, q, k, v, causal, BF16, backward)}
        outs = {key: step() for key, step in steps.items()}
        scale = outs["fp32"].abs().max().item()
        t_ = alternate(steps, repeats)
        row = {"shape": name, "pass": "forward + backward" if backward else "forward",
               **{f"{key}_s": sec for key, sec in t_.items()},
               "bf16_error": (outs["bf16"] - outs["fp32"]).abs().max().item() / scale,
               "mmfusion_error": (outs["mmfusion"] - outs["fp32"]).abs().max().item() / scale}
        rows.append(row)
        print(f"| {name} | {row['pass']} | {1e3 * row['fp32_s']:.2f} | {1e3 * row['bf16_s']:.2f} | "
              f"{1e3 * row['mmfusion_s']:.2f} | {row['mmfusion_s'] / row['bf16_s']:.2f}x | "
              f"{row['bf16_error']:.1e} | {row['mmfusion_error']:.1e} |")
    return rows


if __name__ == "__main__":
    main()
