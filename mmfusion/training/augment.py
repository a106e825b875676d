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


# ---- TrivialAugment (Mueller & Hutter, 2021): one operation per image, at a uniform strength ----
# Each entry maps a strength s in [0, 1] (and a random sign) to the operation on an image in [0, 1].
# Ranges are RandAugment's standard ones; translations are a fraction of the side, so they mean the
# same on 8x8 digits as on 224x224 photos. Geometric operations replicate the edge pixels into the
# gap, as the stage's shifts do.

def _affine(x: torch.Tensor, matrix: list[list[float]]) -> torch.Tensor:
    """(C, H, W) -> (C, H, W) through the 2x3 affine `matrix` in normalized [-1, 1] coordinates."""
    theta = torch.tensor(matrix, dtype=x.dtype)[None]  # (1, 2, 3)
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (1, H, W) luminance (ITU-R 601-2, as PIL's "L"); one channel stays itself."""
    if x.shape[0] == 1:
        return x
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


def _blend(x: torch.Tensor, other: torch.Tensor, factor: float) -> torch.Tensor:
    return (other + factor * (x - other)).clamp(0, 1)


def _sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    C, H, W = x.shape
    if H < 3 or W < 3:
        return x
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype) / 13
    smooth = F.conv2d(x[:, None], kernel[None, None])[:, 0]  # (C, H-2, W-2)
    blurred = x.clone()
    blurred[:, 1:-1, 1:-1] = smooth  # the border keeps its pixels, as PIL's filter does
    return _blend(x, blurred, factor)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    low = x.amin(dim=(1, 2), keepdim=True)
    high = x.amax(dim=(1, 2), keepdim=True)
    span = high - low
    return torch.where(span > 0, (x - low) / span.clamp_min(1e-12), x)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalization per channel on 256 levels, PIL's lookup table (ImageOps.equalize)."""
    levels = (x * 255).round().long().clamp(0, 255)  # (C, H, W)
    out = torch.empty_like(x)
    for c in range(x.shape[0]):
        hist = torch.bincount(levels[c].flatten(), minlength=256)
        used = hist[hist > 0]
        step = (int(used.sum()) - int(used[-1])) // 255 if len(used) > 1 else 0
        if step == 0:  # one level, or too few pixels to spread
            out[c] = x[c]
            continue
        before = torch.cumsum(hist, 0) - hist  # pixels below each level
        lut = ((step // 2 + before) // step).clamp(max=255)
        out[c] = lut[levels[c]].to(x.dtype) / 255
    return out


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    return _affine(x, [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]])


def _posterize(x: torch.Tensor, bits: int) -> torch.Tensor:
    step = 2 ** (8 - bits)
    return torch.floor((x * 255).round() / step) * step / 255


def _signed(s: float, sign: float, limit: float) -> float:
    return sign * s * limit


TRIVIAL_OPS = {
    "identity": lambda x, s, sign: x,
    "shear_x": lambda x, s, sign: _affine(x, [[1, _signed(s, sign, 0.3), 0], [0, 1, 0]]),
    "shear_y": lambda x, s, sign: _affine(x, [[1, 0, 0], [_signed(s, sign, 0.3), 1, 0]]),
    "translate_x": lambda x, s, sign: _affine(x, [[1, 0, _signed(s, sign, 0.9)], [0, 1, 0]]),  # 0.9 = 45% of the side
    "translate_y": lambda x, s, sign: _affine(x, [[1, 0, 0], [0, 1, _signed(s, sign, 0.9)]]),
    "rotate": lambda x, s, sign: _rotate(x, _signed(s, sign, 30.0)),
    "brightness": lambda x, s, sign: _blend(x, torch.zeros_like(x), 1 + _signed(s, sign, 0.9)),
    "color": lambda x, s, sign: _blend(x, _gray(x).expand_as(x), 1 + _signed(s, sign, 0.9)),
    "contrast": lambda x, s, sign: _blend(x, _gray(x).mean().expand_as(x), 1 + _signed(s, sign, 0.9)),
    "sharpness": lambda x, s, sign: _sharpness(x, 1 + _signed(s, sign, 0.9)),
    "posterize": lambda x, s, sign: _posterize(x, 8 - round(4 * s)),  # 8 bits (no change) to 4
    "solarize": lambda x, s, sign: torch.where(x > 1 - s, 1 - x, x),  # invert above a threshold
    "autocontrast": lambda x, s, sign: _autocontrast(x),
    "equalize": lambda x, s, sign: _equalize(x),
}


def trivial_augment(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """(C, H, W) normalized as (pixels - mean) / std -> the same, after one operation of
    TRIVIAL_OPS drawn uniformly, at a strength drawn uniformly from [0, 1] (and a random sign)."""
    names = list(TRIVIAL_OPS)
    name = names[int(torch.randint(len(names), (), generator=rng))]
    strength = uniform(rng)
    sign = 1.0 if torch.rand((), generator=rng) < 0.5 else -1.0
    pixels = (x * std + mean).clamp(0, 1)
    return (TRIVIAL_OPS[name](pixels, strength, sign) - mean) / std
