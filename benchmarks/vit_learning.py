"""Learning speed: mmfusion's ViT against transformers' ViTForImageClassification of the same
shape, trained on the same data with the same loop, optimizer, schedule and seeds.

    python benchmarks/vit_learning.py --dataset digits --epochs 20
    python benchmarks/vit_learning.py --dataset easy-vqa --epochs 10 --variants ours,transformers
    python benchmarks/vit_learning.py --dataset digits --variants ours,ours+zero-head,transformers
    python benchmarks/vit_learning.py --write-digits-folder digits/  # for mmfusion pretrain-vit --dataset digits/

Prints test accuracy after every epoch (mean over --seeds) and writes them as JSON (--out).
`ours` is a fresh mmfusion ViT as `ViT(config)` builds it; `ours+X` changes one thing, so each
difference can be measured alone (docs/experiments.md has the results):
    normal-attention  transformers' N(0, 0.02) attention weights instead of the mimetic start
                      (ViTConfig.attention_init="normal")
    normal-patch      transformers' N(0, 0.02) patch projection instead of N(0, 0.072)
                      (ViTConfig.patch_init_std=0.02; with normal-attention too, ours starts exactly
                      as transformers')
    patch-std-S       the patch projection starts N(0, S) (ViTConfig.patch_init_std=S)
    zero-head         the classifier starts at zero (uniform logits)              } choices of the
    scaled-residual   GPT-2's 1/sqrt(2L) init of the residual projections         } init before
    sincos-pos        the position table starts as 0.1 x a 2D sin-cos table       } 2026-11-30
    mean-pool         the classifier reads the mean of the patch tokens, not CLS (ViTConfig.pool)
    mimetic-svd       the mimetic targets factored per head by SVD (the paper's best rank-D
                      approximation) instead of mmfusion.layers.mimetic_init_'s random subspaces
    lecun-patch       the patch projection starts N(0, 1/fan_in) (LeCun, as big_vision's ViT):
                      0.072 for 8x8 RGB patches, 0.5 for digits' 2x2 gray ones

Datasets (nothing is downloaded): `digits`, scikit-learn's 1,797 8x8 grayscale digits at their
native size (patch 2; a fixed 75/25 split, seed 1234); `easy-vqa`, the 24 shape x colour classes
of the embedded default at 64x64 (patch 8, as the main job's stage 1); `scenes`, the captions
job's stage 1 (64x64, patch 8, one label per cell of the 2x2 grid; transformers' ViTModel gets
the same per-cell head, an image counts as right when all four cells are); `synthetic`, ten noisy
8x8 patterns (the CI regression test's task).
The loop: AdamW (betas 0.9/0.99, weight decay on weight matrices only), linear warmup then
cosine to 5%, gradient clipping 1.0; random flips (easy-vqa, scenes) and shifts (easy-vqa) drawn from the seed, and
pretrain-vit's --crop-area / --mixup / --cutmix / --label-smoothing / --ema when given, for both models.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmfusion import ViT
from mmfusion.config import ViTConfig
from mmfusion.layers import INIT_STD, scale_residual_projections
from mmfusion.training import augment as aug
from mmfusion.training.loop import WeightEMA

VARIANT_CHANGES = ("normal-attention", "normal-patch", "zero-head", "scaled-residual", "sincos-pos", "mean-pool",
                   "mimetic-svd", "lecun-patch")
POS_INIT_SCALE = 0.1  # the old sin-cos start's scale


def mimetic_(attn: nn.Module, n_head: int, gen: torch.Generator, qk: tuple[float, float] = (0.7, 0.7),
             vo: tuple[float, float] = (0.4, 0.4)) -> None:
    """Set one Attention's q/k/v/proj weights so each head's x W_q^T W_k x'^T starts near
    a x (Z x') + b x . x' (attend to similar tokens) and the value-output map near a Z - b I."""
    C = attn.proj.weight.shape[0]
    d = C // n_head
    w = attn.qkv.weight  # (3C, C): q heads, k heads, v heads; y = x @ w.T
    for h in range(n_head):
        a, b = qk
        M = a * torch.randn(C, C, generator=gen) / C**0.5 + b * torch.eye(C)
        U, S, Vh = torch.linalg.svd(M)
        root = S[:d].sqrt()
        w[h * d:(h + 1) * d] = (U[:, :d] * root).T  # W_q,h (d, C) so that W_q,h^T W_k,h ~ M
        w[C + h * d:C + (h + 1) * d] = (Vh[:d].T * root).T  # W_k,h
    a, b = vo
    M = a * torch.randn(C, C, generator=gen) / C**0.5 - b * torch.eye(C)
    U, S, Vh = torch.linalg.svd(M)
    root = S.sqrt()
    w[2 * C:] = (U * root).T  # W_v (C, C): x W_v^T W_o^T ~ x M
    attn.proj.weight.copy_((root[:, None] * Vh).T)  # W_o


def sincos_positions(dim: int, grid: int) -> torch.Tensor:
    """(1, 1 + G*G, dim): zeros for CLS, then sin/cos of x and of y at dim/4 frequencies each
    (widths not divisible by 4 are zero-padded): the old position start."""
    q = dim // 4
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")  # (G, G) each
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float32) / max(q, 1))  # (q,)
    x, y = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega  # (N, q)
    table = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)  # (N, 4q)
    table = F.pad(table, (0, dim - 4 * q))  # (N, dim)
    return torch.cat([torch.zeros(1, dim), table])[None]  # (1, N+1, dim)


@dataclass(frozen=True)
class Task:
    name: str
    train: tuple[torch.Tensor, torch.Tensor]  # (images (N, C, H, W) normalized to [-1, 1], labels (N,))
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    patch_size: int
    shift: int  # augmentation: shifts by up to this many pixels (0: none)
    flip: bool = False  # augmentation: random horizontal flips
    label_grid: int = 1  # g > 1: labels (N, g*g), one per cell of a g x g grid (scenes)


def digits_task() -> Task:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("the digits task needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # (1797, 1, 8, 8), 0..16 -> [-1, 1]
    y = torch.tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    cut = int(0.75 * len(x))
    return Task("digits", (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]]), 10, 2, 0)


def write_digits_folder(root: str) -> None:
    """The digits task's split as an image folder (ROOT/{train,test}/{0..9}/N.png, 8x8 grayscale),
    for `mmfusion pretrain-vit --dataset ROOT --image-size 8 --patch-size 2`."""
    from pathlib import Path

    from PIL import Image

    task = digits_task()
    for split, (x, y) in (("train", task.train), ("test", task.test)):
        for n, (image, label) in enumerate(zip(x, y.tolist())):
            folder = Path(root) / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = ((image[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(folder / f"{n}.png")
    print(f"wrote {len(task.train[1])} training and {len(task.test[1])} test images under {root}")


def easy_vqa_task() -> Task:
    from mmfusion.data import load_classification
    from mmfusion.processing import ImageProcessor

    processor = ImageProcessor(64, (0.5,) * 3, (0.5,) * 3)

    def tensors(split: str):
        ds, _ = load_classification("easy-vqa", split)
        return torch.stack([processor.to_tensor(im) for im in ds["image"]]), torch.tensor(ds["label"])

    names = load_classification("easy-vqa", "train")[0].features["label"].names
    return Task("easy-vqa", tensors("train"), tensors("test"), len(names), 8, 4, flip=True)


def scenes_task() -> Task:
    """The captions job's stage 1: 64x64 scenes, patch 8, one label per cell of the 2x2 grid,
    flips (labels mirrored with the image) and no shift, as `mmfusion captions` trains it."""
    from mmfusion.data.scenes import CELL_CLASSES, load_scenes_cells
    from mmfusion.processing import ImageProcessor

    processor = ImageProcessor(64, (0.5,) * 3, (0.5,) * 3)

    def tensors(split: str):
        ds = load_scenes_cells(split)
        return torch.stack([processor.to_tensor(im) for im in ds["image"]]), torch.tensor(ds["label"])

    return Task("scenes", tensors("train"), tensors("test"), len(CELL_CLASSES), 8, 0, flip=True, label_grid=2)


def synthetic_task(train_size: int = 600, test_size: int = 300, noise: float = 0.8) -> Task:
    """Ten classes of 8x8 grayscale images: a fixed random +-1 pattern per class in Gaussian
    noise. Generated from a fixed seed; needs nothing installed."""
    gen = torch.Generator().manual_seed(0)
    patterns = torch.randn(10, 1, 8, 8, generator=gen).sign()  # (10, 1, 8, 8)

    def draw(n: int):
        y = torch.randint(0, 10, (n,), generator=gen)
        return (patterns[y] + noise * torch.randn(n, 1, 8, 8, generator=gen)).clamp(-1, 1), y

    return Task("synthetic", draw(train_size), draw(test_size), 10, 2, 0)


TASKS: dict[str, Callable[[], Task]] = {"digits": digits_task, "easy-vqa": easy_vqa_task, "scenes": scenes_task,
                                        "synthetic": synthetic_task}


class CellHead(nn.Module):
    """transformers' ViTModel with a per-cell classifier, as `ViTConfig.label_grid` builds ours:
    the linear head reads the mean of each cell's final patch tokens (transformers' init: N(0, 0.02))."""

    def __init__(self, backbone: nn.Module, width: int, num_classes: int, grid: int, label_grid: int) -> None:
        super().__init__()
        self.backbone, self.grid, self.label_grid = backbone, grid, label_grid
        self.head = nn.Linear(width, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 1:]  # (B, N, C)
        g, G = self.label_grid, self.grid
        B, _, C = hidden.shape
        cells = hidden.view(B, g, G // g, g, G // g, C).mean(dim=(2, 4)).reshape(B, g * g, C)
        return self.head(cells)  # (B, g*g, classes)


def build(variant: str, task: Task, width: int, layers: int, heads: int, seed: int) -> tuple[nn.Module, Callable]:
    """(model, forward pixel_values -> logits) for `transformers` or `ours[+change...]`."""
    x = task.train[0]
    torch.manual_seed(seed)
    if variant == "transformers":
        from transformers import ViTConfig as HFViTConfig
        from transformers import ViTForImageClassification, ViTModel

        hf_config = HFViTConfig(
            image_size=x.shape[-1], patch_size=task.patch_size, num_channels=x.shape[1], hidden_size=width,
            num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * width,
            num_labels=task.num_classes, layer_norm_eps=1e-6)
        if task.label_grid > 1:
            grid = x.shape[-1] // task.patch_size
            return CellHead(ViTModel(hf_config, add_pooling_layer=False), width, task.num_classes, grid,
                            task.label_grid), lambda m, px: m(px)
        hf = ViTForImageClassification(hf_config)
        return hf, lambda m, px: m(pixel_values=px).logits
    name, *changes = variant.split("+")
    stds = [c.removeprefix("patch-std-") for c in changes if c.startswith("patch-std-")]
    changes = [c for c in changes if not c.startswith("patch-std-")]
    if len(stds) + ("normal-patch" in changes) + ("lecun-patch" in changes) > 1:
        raise SystemExit(f"variant {variant!r}: give at most one of patch-std-S, normal-patch, lecun-patch")
    if name != "ours" or set(changes) - set(VARIANT_CHANGES):
        raise SystemExit(f"unknown variant {variant!r}: transformers, or ours[+{'|+'.join(VARIANT_CHANGES)}"
                         "|+patch-std-S]")
    patch_std = ViTConfig.patch_init_std
    if stds:
        try:
            patch_std = float(stds[0])
        except ValueError:
            raise SystemExit(f"variant {variant!r}: patch-std-S needs a number S, e.g. patch-std-0.05") from None
    if "normal-patch" in changes:
        patch_std = INIT_STD
    if "lecun-patch" in changes:
        patch_std = (x.shape[1] * task.patch_size**2) ** -0.5
    config = ViTConfig(image_size=x.shape[-1], patch_size=task.patch_size, num_channels=x.shape[1], n_layer=layers,
                       n_head=heads, n_embd=width, num_classes=task.num_classes, layer_norm_eps=1e-6,
                       image_mean=(0.5,) * x.shape[1], image_std=(0.5,) * x.shape[1],
                       pool="mean" if "mean-pool" in changes else "cls", label_grid=task.label_grid,
                       attention_init="normal" if "normal-attention" in changes else "mimetic",
                       patch_init_std=patch_std)
    vit = ViT(config)
    with torch.no_grad():
        if "zero-head" in changes:
            vit.head.weight.zero_()
        if "scaled-residual" in changes:
            scale_residual_projections(vit.blocks, layers)
        if "mimetic-svd" in changes:
            gen = torch.Generator().manual_seed(seed)
            for block in vit.blocks:
                mimetic_(block.attn, heads, gen)
        if "sincos-pos" in changes:
            vit.pos_embed.copy_(sincos_positions(width, config.grid_size) * POS_INIT_SCALE)
    return vit, lambda m, px: m(px)


def augment(x: torch.Tensor, y: torch.Tensor, task: Task, args: argparse.Namespace,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same augmentation for both models: flips and shifts by up to `task.shift` pixels (edges
    replicated), then the stage's optional TrivialAugment, crops and mixing (mmfusion.training.augment), the
    partner image drawn from the whole training set, as `mmfusion pretrain-vit` does."""
    if task.flip:
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if task.label_grid > 1:  # the cells' columns swap with the image's
            g = task.label_grid
            y = torch.where(flip[:, None], y.view(-1, g, g).flip(-1).reshape(len(y), -1), y)
    if task.shift:
        dy, dx = torch.randint(0, 2 * task.shift + 1, (2, len(x)), generator=gen)
        padded = F.pad(x, (task.shift,) * 4, mode="replicate")
        H, W = x.shape[-2:]
        x = torch.stack([p[:, a:a + H, b:b + W] for p, a, b in zip(padded, dy.tolist(), dx.tolist())])
    if args.trivial_augment:  # images are normalized with mean 0.5, std 0.5, as the stage's
        half = torch.full((x.shape[1], 1, 1), 0.5)
        x = torch.stack([aug.trivial_augment(image, half, half, gen) for image in x])
    if args.crop_area < 1:
        x = torch.stack([aug.random_resized_crop(image, args.crop_area, gen) for image in x])
    if args.mixup or args.cutmix:
        images, labels = task.train
        mixed = []
        for image, label in zip(x, y.tolist()):
            j = int(torch.randint(len(images), (), generator=gen))
            mixed.append(aug.mix(image, aug.one_hot(label, task.num_classes), images[j],
                                 aug.one_hot(int(labels[j]), task.num_classes), args.mixup, args.cutmix, gen))
        x, y = torch.stack([m[0] for m in mixed]), torch.stack([m[1] for m in mixed])
    return x, y


def train(variant: str, task: Task, args: argparse.Namespace, seed: int) -> dict:
    model, forward = build(variant, task, args.width, args.layers, args.heads, seed)
    decay = [p for p in model.parameters() if p.ndim in (2, 4)]  # linear and conv weights; not CLS / positions
    rest = [p for p in model.parameters() if p.ndim not in (2, 4)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99))
    (x, y), (xt, yt) = task.train, task.test
    per_epoch = math.ceil(len(x) / args.batch_size)
    total = per_epoch * args.epochs
    warmup = min(args.warmup, total // 5)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ema = WeightEMA(model, args.ema) if args.ema else None
    gen = torch.Generator().manual_seed(seed)
    accuracy, start = [], time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            images, target = augment(x[idx], y[idx], task, args, gen)
            logits = forward(model, images)  # (B, classes) or per cell (B, g*g, classes)
            if task.label_grid > 1:
                logits, target = logits.flatten(0, 1), target.flatten()
            loss = F.cross_entropy(logits, target, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
        judged = model
        if ema is not None:  # evaluate the average, as the stage saves it
            judged = copy.deepcopy(model)
            ema.copy_to(judged)
        judged.eval()
        with torch.no_grad():
            pred = torch.cat([forward(judged, xt[i:i + 500]).argmax(-1) for i in range(0, len(xt), 500)])
        right = pred == yt  # (N,) or per cell (N, g*g): an image counts when every cell is right
        accuracy.append((right.all(-1) if right.ndim > 1 else right).float().mean().item())
    return {"accuracy": accuracy, "last_loss": loss.item(), "seconds": time.perf_counter() - start}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=sorted(TASKS), default="digits")
    p.add_argument("--variants", default="ours,transformers", help="comma-separated: transformers, ours[+change]")
    p.add_argument("--seeds", type=int, default=3, help="seeds F..F+N-1 (F: --first-seed); every number is their mean")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed, to add seeds to an earlier run")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100, help="warmup steps (at most a fifth of the run)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--trivial-augment", action="store_true", help="as pretrain-vit's")
    p.add_argument("--crop-area", type=float, default=1.0, help="as pretrain-vit's (1: off)")
    p.add_argument("--mixup", type=float, default=0.0, help="as pretrain-vit's (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="as pretrain-vit's (0: off)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="as pretrain-vit's (0: off)")
    p.add_argument("--ema", type=float, default=0.0, help="as pretrain-vit's; each epoch evaluates the average (0: off)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--write-digits-folder", metavar="DIR", help="only write the digits split as an image folder")
    args = p.parse_args(argv)
    for flag, value, low in (("--seeds", args.seeds, 1), ("--first-seed", args.first_seed, 0), ("--epochs", args.epochs, 1)):
        if value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.write_digits_folder:
        write_digits_folder(args.write_digits_folder)
        return {}
    torch.set_num_threads(args.threads)
    task = TASKS[args.dataset]()
    if task.label_grid > 1 and (args.trivial_augment or args.crop_area < 1 or args.mixup or args.cutmix):
        raise SystemExit("per-cell labels (scenes): crops, TrivialAugment and mixing would move content across "
                         "cells; pretrain-vit refuses them too")
    results = {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        runs = [{"seed": seed, **train(variant, task, args, seed)}
                for seed in range(args.first_seed, args.first_seed + args.seeds)]
        mean = [sum(r["accuracy"][e] for r in runs) / len(runs) for e in range(args.epochs)]
        worst = [min(r["accuracy"][e] for r in runs) for e in range(args.epochs)]
        results[variant] = {"mean_accuracy": mean, "worst_accuracy": worst, "runs": runs,
                            "seconds": sum(r["seconds"] for r in runs) / len(runs)}
        print(f"{variant:28s} " + " ".join(f"{a * 100:5.1f}" for a in mean)
              + f"   {results[variant]['seconds']:.0f} s/run", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
