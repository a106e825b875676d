"""Stage-1 augmentations beyond flips and shifts, each a pure function of a torch.Generator
(drawn per example from (seed, epoch, row)), so resumed and multi-process runs see the same ones.

Notation: C channels, H x W image, K classes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def uniform(rng: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=rng).item()


def beta(rng: torch.Generator, alpha: float) -> float:
    """A Beta(alpha, alpha) draw, seeded from `rng` (torch's Beta takes no generator)."""
    return float(np.random.default_rng(int(torch.randint(2**62, (), generator=rng))).beta(alpha, alpha))


def random_resized_crop(x: torch.Tensor, min_area: float, rng: torch.Generator) -> torch.Tensor:
    """(C, H, W) -> (C, H, W): a crop covering a uniform fraction in [min_area, 1] of the image, with
    aspect ratio log-uniform in [3/4, 4/3] (clipped to the image), resized back (bilinear)."""
    C, H, W = x.shape
    area = uniform(rng, min_area, 1.0) * H * W
    ratio = math.exp(uniform(rng, math.log(3 / 4), math.log(4 / 3)))
    h = min(H, max(1, round(math.sqrt(area / ratio))))
    w = min(W, max(1, round(math.sqrt(area * ratio))))
    top = int(torch.randint(H - h + 1, (), generator=rng))
    left = int(torch.randint(W - w + 1, (), generator=rng))
    crop = x[None, :, top:top + h, left:left + w]  # (1, C, h, w)
    return F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False)[0]


def one_hot(label: int, num_classes: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(label), num_classes).float()  # (K,)


def mix(x: torch.Tensor, target: torch.Tensor, other: torch.Tensor, other_target: torch.Tensor,
        mixup: float, cutmix: float, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (a weighted sum of two images) or CutMix (a box of the other image pasted in), half
    each when both are on; the targets (K,) mix in the proportion of each image that is kept.
    lam ~ Beta(alpha, alpha) of the chosen method."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand((), generator=rng) < 0.5)
    lam = beta(rng, cutmix if use_cutmix else mixup)
    if use_cutmix:
        _, H, W = x.shape
        h, w = round(H * math.sqrt(1 - lam)), round(W * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(H, (), generator=rng)), int(torch.randint(W, (), generator=rng))
        top, bottom = max(cy - h // 2, 0), min(cy + (h + 1) // 2, H)
        left, right = max(cx - w // 2, 0), min(cx + (w + 1) // 2, W)
        x = x.clone()
        x[:, top:bottom, left:right] = other[:, top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (H * W)  # the share of the image really kept
    else:
        x = lam * x + (1 - lam) * other
    return x, lam * target + (1 - lam) * other_target
