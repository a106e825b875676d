"""Stage 1: pretrain the ViT on image classification.

    python training/pretrain_vit.py --output-dir runs/vit                 # easy-VQA, one process
    accelerate launch training/pretrain_vit.py --output-dir runs/vit      # same script, many processes
    mmfusion pretrain-vit --dataset path/to/images --label-column label  # any classification data
    mmfusion pretrain-vit --dataset scenes --output-dir runs/scenes-vit  # a label per cell of a 2x2 grid

A dataset whose `label` is a list of g*g class ids (scenes) trains a ViT with `label_grid=g`:
each cell of a g x g grid is classified from the mean of its patch tokens, so the patch
tokens learn what is where (a CLS-only objective leaves them free to forget it). Flips
mirror the label grid with the image.

Writes OUTPUT_DIR/model (config.json + model.safetensors), metrics.json, run_config.json,
logs/ (tensorboard, a folder per run) and checkpoints/ (with --save-every).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from ..config import VIT_PRESETS, ConfigError, ViTConfig, check_number, vit_preset
from ..data import load_classification
from ..data.splits import align_labels
from ..errors import OneLineErrorParser, run_command
from ..layers import init_linear_and_norm
from ..loading import load_vit
from ..metrics import top1_accuracy
from ..processing import ImageProcessor
from ..vit import ViT
from . import augment
from .args import parse_configs
from .data import (
    EVAL_DATASET_FIELD,
    HOLDOUT_FIELD,
    check_eval_choice,
    evaluation_rows,
    example_generator,
    split_index,
)
from .features import MEMORY_LIMIT_BYTES
from .loop import across_processes, steps_per_epoch, train
from .run_folder import check_resume_model, start_run_folder, write_json
from .setup import (
    RunConfig,
    adamw,
    choose_precision,
    end_trackers,
    make_accelerator,
    param_groups,
    progress_flag_for_datasets,
)

DEFAULT_SHIFT = 4  # pixels; see STAGE_DEFAULTS
DEFAULT_PRESET = "vit-tiny"
DEFAULT_VIT = vit_preset(DEFAULT_PRESET, num_classes=0)  # the classes come from the data


# Named sets of the augmentation flags; a flag given on the command line still wins.
# "small-data": the ones that helped a small ViT on 8x8 digits; crops and EMA did not
# (docs/experiments.md, 2026-11-30, stage-1 augmentations).
RECIPES: dict[str, dict[str, float]] = {
    "none": {},
    "small-data": {"label_smoothing": 0.1, "mixup": 0.2, "cutmix": 1.0},
}


@dataclass(frozen=True)
class ViTStageConfig:
    dataset: str = field(default="easy-vqa", metadata={"help": "easy-vqa, a parquet/JSONL file, an image folder or a hub id"})
    train_split: str = field(default="train", metadata={"help": "training split"})
    eval_split: str = field(default="test", metadata={"help": "evaluation split"})
    eval_dataset: str | None = field(default=None, metadata=EVAL_DATASET_FIELD)
    holdout: float | None = field(default=None, metadata=HOLDOUT_FIELD)
    image_column: str = field(default="image", metadata={"help": "column holding the images"})
    label_column: str = field(default="label", metadata={"help": "column holding the class labels"})
    max_bad_fraction: float = field(default=0.01, metadata={"help": "stop if more rows than this are unusable"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from a saved mmfusion ViT folder, or transformers ViT/CLIP weights (folder or hub id)"})
    vit: ViTConfig = field(default=DEFAULT_VIT, metadata={
        "only": ("image_size", "patch_size", "n_layer", "n_head", "n_embd", "dropout", "attention_init",
                 "patch_init_std")})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips (turn off for text or asymmetric labels)"})
    shift: int | None = field(default=None, metadata={
        "help": f"random translations by up to N pixels each way, edges replicated (default: {DEFAULT_SHIFT} "
                "for one label per image, 0 with per-cell labels, which a shift could move across cells)"})
    recipe: str = field(default="none", metadata={
        "help": "a named set of the augmentation flags below (none, small-data); explicit flags override it",
        "choices": list(RECIPES)})
    trivial_augment: bool = field(default=False, metadata={
        "help": "TrivialAugment: one of 14 operations (rotate, shear, translate, color, contrast, equalize, ...) "
                "per image at a random strength"})
    crop_area: float = field(default=1.0, metadata={
        "help": "random-resized crops covering at least this fraction of the image, resized back (1: off)"})
    mixup: float = field(default=0.0, metadata={
        "help": "mixup: blend each image and its label with another's, weight ~ Beta(a, a) (0: off)"})
    cutmix: float = field(default=0.0, metadata={
        "help": "CutMix: paste a box of another image, area ~ Beta(a, a), labels by area (0: off; "
                "with --mixup, half each)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cross-entropy label smoothing (0: off)"})
    ema: float = field(default=0.0, metadata={
        "help": "keep a moving average of the weights with this decay (e.g. 0.999) and save it as the model (0: off)"})
    cache_images: bool = field(default=True, metadata={
        "help": "keep decoded, normalized images in memory after their first use (skipped past 2 GiB)"})

    def __post_init__(self) -> None:
        # Impossible values stop here, at parse time: before any data is read or any folder written.
        check_number("--max-bad-fraction", self.max_bad_fraction, 0, 1)
        check_eval_choice(self.eval_dataset, self.holdout)
        if self.shift is not None:
            check_number("--shift", self.shift, 0, integer=True)
        check_number("--crop-area", self.crop_area, 0, 1, low_open=True)
        check_number("--mixup", self.mixup, 0)
        check_number("--cutmix", self.cutmix, 0)
        check_number("--label-smoothing", self.label_smoothing, 0, 1, high_open=True)
        check_number("--ema", self.ema, 0, 1, high_open=True)
        changed = [f"--{k.replace('_', '-')}" for k in self.__dataclass_fields__["vit"].metadata["only"]
                   if getattr(self.vit, k) != getattr(DEFAULT_VIT, k)]
        if self.init_from and changed:  # the loaded weights fix the architecture; the flags would be ignored
            raise ConfigError(f"--init-from brings its own architecture, so {', '.join(changed)} (or --preset) would "
                              "be ignored; drop them, or train a fresh ViT without --init-from")

    def model_inputs(self) -> dict[str, str | None]:
        """The model folders this stage reads (run_folder.check_keeps_inputs)."""
        return {"--init-from": self.init_from}

    def data_inputs(self) -> dict[str, str | None]:
        """The datasets this stage reads (run_folder.check_keeps_data)."""
        return {"--dataset": self.dataset, "--eval-dataset": self.eval_dataset}


def label_layout(dataset) -> tuple[list[str], int]:
    """(class names, label grid side) of a classification dataset: a `ClassLabel` column is one
    label per image (grid 1); a list of `ClassLabel` is one per cell of a square grid, whose
    side comes from the first row."""
    feature = dataset.features["label"]
    inner = getattr(feature, "feature", None)
    if inner is None:
        return feature.names, 1
    n = len(dataset[0]["label"])
    g = math.isqrt(n)
    if g * g != n:
        raise ConfigError(f"a list label needs one class per cell of a square grid; got {n} labels per image")
    return inner.names, g


# The main job's stage 1 (easy-VQA): from the mimetic attention and 0.072 patch start, 30 epochs reach
# the 99.5% target for every seed and precision measured (docs/experiments.md, 2026-12-01).
STAGE_DEFAULTS = RunConfig(output_dir="runs/vit", epochs=30, batch_size=32, lr=2e-3, warmup_steps=100,
                           weight_decay=0.05)


class ClassificationImages(torch.utils.data.Dataset):
    """A datasets.Dataset with `image` and `label` -> (pixel_values (3, H, W), label).

    Indices may be EpochSampler's virtual indices; a flip, a shift (up to `shift` pixels
    each way, edge pixels replicated into the gap), a TrivialAugment operation, a crop and a
    partner for mixing are drawn from (seed, epoch, row), in that order.
    A list label (one class per cell of a g x g grid, reading order) becomes a (g*g,) tensor,
    mirrored along with the image.
    """

    def __init__(self, dataset, processor: ImageProcessor, hflip: bool = False, seed: int = 0,
                 cache: bool = False, shift: int = 0, crop_area: float = 1.0, mixup: float = 0.0,
                 cutmix: float = 0.0, num_classes: int = 0, trivial: bool = False) -> None:
        self.dataset, self.processor, self.hflip, self.seed, self.shift = dataset, processor, hflip, seed, shift
        self.trivial = trivial
        self.crop_area, self.mixup, self.cutmix, self.num_classes = crop_area, mixup, cutmix, num_classes
        if (mixup or cutmix) and not num_classes:
            raise ValueError("mixup and CutMix need num_classes for their soft labels")
        per_image = 3 * processor.image_size**2 * 4
        self.cache: dict[int, tuple[torch.Tensor, int]] | None = None
        if cache and len(dataset) * per_image <= MEMORY_LIMIT_BYTES:
            self.cache = {}  # each image is decoded once; epochs after the first skip PNG decoding

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, i: int):
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        row = self.dataset[i]
        x, label = self.processor.to_tensor(row["image"]), row["label"]
        if isinstance(label, list):
            label = torch.tensor(label)  # (g*g,)
        if self.cache is not None:
            self.cache[i] = (x, label)
        return x, label

    def __getitem__(self, virtual: int):
        x, label = self._load(split_index(virtual, len(self.dataset))[1])
        rng = example_generator(self.seed, virtual)
        if self.hflip and torch.rand((), generator=rng) < 0.5:
            x = x.flip(-1)  # (3, H, W) mirrored left-right; a new tensor, the cache is untouched
            if isinstance(label, torch.Tensor):
                g = math.isqrt(label.numel())
                label = label.view(g, g).flip(-1).reshape(-1)  # columns swap with the image's
        if self.shift:
            s = self.shift
            dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=rng).tolist()
            padded = torch.nn.functional.pad(x[None], (s, s, s, s), mode="replicate")[0]  # (3, H+2s, W+2s)
            x = padded[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]  # (3, H, W), moved by (s - dy, s - dx)
        if self.trivial:
            x = augment.trivial_augment(x, self.processor.mean, self.processor.std, rng)
        if self.crop_area < 1:
            x = augment.random_resized_crop(x, self.crop_area, rng)
        if self.mixup or self.cutmix:  # with an unaugmented image drawn from the whole set
            other, other_label = self._load(int(torch.randint(len(self.dataset), (), generator=rng)))
            x, label = augment.mix(x, augment.one_hot(label, self.num_classes), other,
                                   augment.one_hot(other_label, self.num_classes), self.mixup, self.cutmix, rng)
        return x, label  # label: a class id, (g*g,) ids, or (K,) probabilities after mixing


def upscale_note(dataset, image_size: int, patch_size: int) -> str | None:
    """A line saying the images are smaller than the ViT's input and will be upscaled (judged
    from the first image), with the flags that train at their own size; None when they are not."""
    if not len(dataset):
        return None
    width, height = dataset[0]["image"].size
    if max(width, height) >= image_size:
        return None
    side = max(width, height)
    patch = next((p for p in (patch_size, 4, 2) if side % p == 0 and side // p >= 4), 1)  # >= 4x4 patches
    return (f"note: images are {width}x{height}, upscaled to {image_size}x{image_size}; for their own "
            f"resolution pass --image-size {side} --patch-size {patch}")


def build_vit(stage: ViTStageConfig, class_names: list[str], label_grid: int = 1) -> ViT:
    """A fresh ViT of `stage.vit`, or one initialized from saved/imported weights (`--init-from`),
    whose head names the data's classes."""
    num_classes, names = len(class_names), tuple(str(n) for n in class_names)
    if not stage.init_from:
        return ViT(stage.vit.replace(num_classes=num_classes, label_grid=label_grid, class_names=names))
    vit = load_vit(stage.init_from, flag="--init-from")
    if vit.config.num_classes != num_classes or vit.config.label_grid != label_grid:
        # a new task: a fresh head, initialized as a new ViT's (a zero head learns slower)
        vit.head = torch.nn.Linear(vit.config.n_embd, num_classes)
        init_linear_and_norm(vit.head)
    vit.config = vit.config.replace(num_classes=num_classes, label_grid=label_grid, class_names=names)
    return vit


@torch.no_grad()
def accuracies(accelerator, model: ViT, dataset: ClassificationImages, limit: int | None = None,
               batch_size: int = 256) -> tuple[float, float]:
    """(image accuracy, cell accuracy) on the first `limit` images, each process predicting its share
    (loop.across_processes): equal for one label per image; for grid labels an image counts only if
    every cell is right, and cell accuracy is over all cells."""
    model.eval()
    device = next(model.parameters()).device

    def share(first: int, stop: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for start in range(first, stop, batch_size):
            items = [dataset[i] for i in range(start, min(stop, start + batch_size))]
            x = torch.stack([x for x, _ in items]).to(device)
            out.append((model(x).argmax(-1).cpu(), torch.stack([torch.as_tensor(y) for _, y in items])))
        return out

    n = len(dataset) if limit is None else min(limit, len(dataset))
    parts = across_processes(accelerator, n, share)
    pred, label = torch.cat([p for p, _ in parts]), torch.cat([y for _, y in parts])  # (n,) or (n, g*g)
    if pred.ndim == 1:
        acc = top1_accuracy(pred, label)
        return acc, acc
    return (pred == label).all(dim=1).float().mean().item(), top1_accuracy(pred.flatten(), label.flatten())


@progress_flag_for_datasets
def run(stage: ViTStageConfig, run_cfg: RunConfig) -> dict:
    """Train and evaluate; returns the final metrics. The model lands in OUTPUT_DIR/model.
    Under several processes each evaluates its share of the test images and the main process
    saves; the others return {} without waiting for it (a caller that reads the outputs next waits
    first: main.after_stage_1)."""
    out = Path(run_cfg.output_dir)
    set_seed(run_cfg.seed)
    columns = {"image_column": stage.image_column, "label_column": stage.label_column,
               "max_bad_fraction": stage.max_bad_fraction}
    train_ds, train_report = load_classification(stage.dataset, stage.train_split, **columns)
    chosen = evaluation_rows(
        stage.dataset, stage.train_split, stage.eval_dataset, stage.eval_split, stage.holdout, [train_ds],
        lambda source: load_classification(source, stage.eval_split, **columns))
    (train_ds,), eval_line = chosen.train, chosen.line
    eval_ds, eval_report = (chosen.held[0], f"{len(chosen.held[0])} held-out rows") if chosen.loaded is None \
        else chosen.loaded
    class_names, label_grid = label_layout(train_ds)
    eval_ds = align_labels(eval_ds, class_names, f"{stage.eval_dataset or stage.dataset} [{stage.eval_split}]")
    if stage.shift and label_grid > 1:
        raise ConfigError(f"--shift {stage.shift} could move shapes across the {label_grid}x{label_grid} label "
                          "cells of this dataset; use --shift 0 with per-cell labels")
    spatial = {"--trivial-augment": stage.trivial_augment, "--crop-area": stage.crop_area < 1,
               "--mixup": stage.mixup > 0, "--cutmix": stage.cutmix > 0}
    if label_grid > 1 and any(spatial.values()):
        raise ConfigError(f"{', '.join(k for k, on in spatial.items() if on)} would mix or move shapes across the "
                          f"{label_grid}x{label_grid} label cells of this dataset; leave them off with per-cell labels")
    shift = (DEFAULT_SHIFT if label_grid == 1 else 0) if stage.shift is None else stage.shift
    vit = build_vit(stage, class_names, label_grid)
    resume_notes = check_resume_model(run_cfg, vit.config)  # before any slow work
    processor = ImageProcessor.from_config(vit.config)
    train_set = ClassificationImages(train_ds, processor, hflip=stage.hflip, seed=run_cfg.seed,
                                     cache=stage.cache_images, shift=shift, trivial=stage.trivial_augment,
                                     crop_area=stage.crop_area,
                                     mixup=stage.mixup, cutmix=stage.cutmix, num_classes=len(class_names))
    eval_set = ClassificationImages(eval_ds, processor, cache=stage.cache_images)

    def step(model, batch):
        x, y = batch
        logits = model(x).float()  # (B, K) or (B, g*g, K)
        target = y if y.is_floating_point() else y.flatten()  # mixed (B, K) probabilities, or class ids
        return F.cross_entropy(logits.flatten(0, -2), target, label_smoothing=stage.label_smoothing), len(y)

    precision = choose_precision(run_cfg)
    accelerator = make_accelerator(run_cfg, precision)
    accelerator.print(f"data: {train_report}\ndata: {eval_report}\n{eval_line}")
    accelerator.print(f"augmentation (recipe {stage.recipe}): flips {'on' if stage.hflip else 'off'}, shift {shift}, "
                      f"trivial augment {'on' if stage.trivial_augment else 'off'}, crop area {stage.crop_area:g}, "
                      f"mixup {stage.mixup:g}, cutmix {stage.cutmix:g}, label smoothing {stage.label_smoothing:g}, "
                      f"ema {stage.ema:g}")
    for note in [upscale_note(train_ds, vit.config.image_size, vit.config.patch_size), *resume_notes]:
        if note:
            accelerator.print(note)
    steps_per_epoch(len(train_set), run_cfg, accelerator.num_processes)
    start_run_folder(accelerator, out, "pretrain_vit", stage=stage, run=run_cfg, model=vit.config,
                     precision=precision.to_dict())
    accelerator.print(f"ViT: {sum(p.numel() for p in vit.parameters()) / 1e6:.2f}M parameters, "
                      f"{len(class_names)} classes, precision {accelerator.mixed_precision}, "
                      f"{accelerator.num_processes} process(es) ({accelerator.distributed_type.value})")
    optimizer = adamw(param_groups(vit.named_parameters(), run_cfg.lr, run_cfg.weight_decay), run_cfg)

    def evaluate(model, full: bool) -> dict[str, float]:
        image, cell = accuracies(accelerator, model, eval_set, None if full else run_cfg.eval_samples)
        return {"accuracy": image, **({"cell_accuracy": cell} if label_grid > 1 else {})}

    vit = train(accelerator, run_cfg, vit, optimizer, train_set, None, step, evaluate, unit="img", ema_decay=stage.ema,
                data=chosen.record)
    metrics = {}
    with accelerator.autocast():
        image, cell = accuracies(accelerator, vit, eval_set)
    if accelerator.is_main_process:
        metrics = {"test_accuracy": image, "test_examples": len(eval_set),
                   "train_examples": len(train_set), "classes": class_names, "shift": shift,
                   "evaluation": eval_line,
                   "precision": precision.resolved}
        if label_grid > 1:
            metrics.update(test_cell_accuracy=cell, label_grid=label_grid)
        vit.save_pretrained(out / "model")
        write_json(out / "metrics.json", metrics)
        accelerator.print(f"test accuracy {metrics['test_accuracy']:.4f} on {len(eval_set)} images; "
                          f"model saved to {out / 'model'}")
    end_trackers(accelerator)
    return metrics


def parse(argv: list[str] | None = None, stage: ViTStageConfig | None = None,
          run: RunConfig = STAGE_DEFAULTS) -> tuple[ViTStageConfig, RunConfig]:
    """The stage's configs from command-line flags over the defaults given (a job's, or the stage's).
    `--preset NAME` swaps in that preset's ViT before the size flags apply."""
    stage = stage or ViTStageConfig()
    presets = OneLineErrorParser(prog="mmfusion pretrain-vit", add_help=False)
    presets.add_argument("--preset")
    presets.add_argument("--recipe", choices=list(RECIPES))
    first = presets.parse_known_args(argv)[0]
    if first.preset is not None:
        stage = replace(stage, vit=vit_preset(first.preset, num_classes=0))
    if first.recipe is not None:  # the recipe's values become the defaults the flags then override
        stage = replace(stage, recipe=first.recipe, **RECIPES[first.recipe])

    def preset_flag(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"architecture preset ({', '.join(VIT_PRESETS)}); "
                            "the size flags override its fields (default: %(default)s)")

    configs = parse_configs(argv, "mmfusion pretrain-vit", __doc__, {"data and model": stage, "training": run},
                            extra=preset_flag)
    return configs[0], configs[1]


def main(argv: list[str] | None = None) -> None:
    run(*parse(argv))


def script() -> None:
    """`python training/pretrain_vit.py` and `python -m`: bad input as one line, exit code 2, as `mmfusion`."""
    sys.exit(run_command(main))


if __name__ == "__main__":
    script()
