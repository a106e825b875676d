"""Datasets for both training stages, normalized to one schema per task.

- classification: `image` (`Image()`), `label` (`ClassLabel`)
- VQA: `image` (`Image()`), `question` (str), `answers` (list[str]),
  `answer_type` (str), `image_id` (int)

- captions: `image` (`Image()`), `captions` (list[str], one or more per image), `image_id` (int);
  `caption_rows` makes training rows of them, one per caption (`caption`: str)

`load_classification` / `load_vqa_dataset` take either the name "easy-vqa" (the
embedded default dataset, `easy_vqa.py`), "scenes" (procedural shapes with
captions and questions, `scenes.py`; VQA and captions) or a user source
(`local.py`: a parquet or JSON lines file, a folder, or a Hub id) and return
`(dataset, report)`. `load_caption_dataset` takes "scenes" or a user source
(`captions.py`).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import datasets

from .captions import caption_rows, load_captions
from .easy_vqa import CLASS_NAMES, easy_vqa_classification, load_easy_vqa_classification, load_easy_vqa_vqa
from .local import DatasetError, LoadReport, load_image_classification
from .scenes import SCENES, load_scenes_captions, load_scenes_cells, load_scenes_vqa
from .vqa import answer_type_of, load_vqa

EASY_VQA = "easy-vqa"

__all__ = ["EASY_VQA", "CLASS_NAMES", "SCENES", "DatasetError", "LoadReport", "answer_type_of", "caption_rows",
           "load_caption_dataset", "load_captions",
           "load_classification", "load_easy_vqa_classification", "load_easy_vqa_vqa", "load_image_classification",
           "load_scenes_captions", "load_scenes_cells", "load_scenes_vqa", "load_vqa", "load_vqa_dataset"]
BUILT_IN = (EASY_VQA, SCENES)


def _reject_column_overrides(loader, kwargs: dict) -> None:
    """easy-vqa has fixed columns: a column option that differs from its default is a mistake, so say so."""
    defaults = {name: p.default for name, p in inspect.signature(loader).parameters.items()}
    unknown = sorted(set(kwargs) - defaults.keys())
    if unknown:
        raise TypeError(f"unexpected options {unknown}")
    changed = [f"--{k.replace('_', '-')}" for k, v in kwargs.items() if k.endswith("_column") and v != defaults[k]]
    if changed:
        raise DatasetError(f"the built-in datasets ({EASY_VQA}, {SCENES}) have fixed columns; "
                           f"drop {', '.join(changed)} or load your own data")


def load_classification(name_or_path: str | Path, split: str, **kwargs) -> tuple[datasets.Dataset, LoadReport]:
    """Image classification data: "easy-vqa" (24 color-shape classes), "scenes" (a label per
    cell of a 2x2 grid: `label` is a list of 4 class ids) or a user source.

    `kwargs` go to `load_image_classification` (column names, `max_bad_fraction`,
    `cache_dir`); for easy-vqa only their defaults are allowed for the columns.
    Returns `(dataset, report)` with columns `image`, `label`.
    """
    if str(name_or_path) == EASY_VQA:
        _reject_column_overrides(load_image_classification, kwargs)
        return easy_vqa_classification(split)
    if str(name_or_path) == SCENES:
        _reject_column_overrides(load_image_classification, kwargs)
        ds = load_scenes_cells(split)
        return ds, LoadReport(source=SCENES, split=split, total=len(ds), kept=len(ds))
    return load_image_classification(name_or_path, split, **kwargs)


def load_vqa_dataset(name_or_path: str | Path, split: str, **kwargs) -> tuple[datasets.Dataset, LoadReport]:
    """VQA data: "easy-vqa", "scenes" or a user source.

    `kwargs` go to `load_vqa`; for easy-vqa only their defaults are allowed for
    the columns. Returns `(dataset, report)` with columns `image`, `question`,
    `answers`, `answer_type`, `image_id`.
    """
    if str(name_or_path) == EASY_VQA:
        _reject_column_overrides(load_vqa, kwargs)
        ds = load_easy_vqa_vqa(split)
        return ds, LoadReport(source=EASY_VQA, split=split, total=len(ds), kept=len(ds))
    if str(name_or_path) == SCENES:
        _reject_column_overrides(load_vqa, kwargs)
        ds = load_scenes_vqa(split)
        return ds, LoadReport(source=SCENES, split=split, total=len(ds), kept=len(ds))
    return load_vqa(name_or_path, split, **kwargs)


def load_caption_dataset(name_or_path: str | Path, split: str, **kwargs) -> tuple[datasets.Dataset, LoadReport]:
    """Caption data: "scenes" (one caption per image) or a user source (`load_captions`, which
    `kwargs` go to; for scenes only their defaults are allowed for the columns). Returns
    `(dataset, report)` with columns `image`, `captions` (list[str]), `image_id`."""
    if str(name_or_path) == EASY_VQA:
        raise DatasetError(f"{EASY_VQA!r} has no captions; caption the built-in {SCENES!r} or your own data "
                           "(a caption column), or train with --task vqa")
    if str(name_or_path) == SCENES:
        _reject_column_overrides(load_captions, kwargs)
        ds = load_scenes_captions(split).map(lambda c: {"captions": [[x] for x in c]}, input_columns=["caption"],
                                             batched=True, remove_columns=["caption"])
        return ds, LoadReport(source=SCENES, split=split, total=len(ds), kept=len(ds))
    return load_captions(name_or_path, split, **kwargs)
