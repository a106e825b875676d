"""User caption datasets: one row per image with every caption written for it.

The source is anything `local.py` reads (a parquet or JSON lines file, a folder, a
`save_to_disk` folder, a Hub id). The caption column may hold a string, a list of
strings, or a list of `{"caption": ...}` / `{"raw": ...}` records (COCO-style: several
captions per image). The output schema: `image` (`Image()`), `captions` (list[str],
stripped, at least one), `image_id` (int: the source's `image_id`, else the row number, past
the source's largest id where only some rows have one; so a frozen ViT's features are computed
once per image however many captions it has).

`caption_rows` turns that into training rows, one per caption (`caption`: str).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from .columns import is_text, wrong_type
from .image_keys import check_image_ids, given_image_ids
from .local import (
    DatasetError,
    ImageChecker,
    LoadReport,
    check_fraction,
    finish,
    load_raw,
    map_rows,
    prepare_image_column,
    require_columns,
)

CAPTION_COLUMNS = ("captions", "caption")  # the default caption column: the first the source has
_RECORD_KEYS = ("caption", "raw")
FEATURES = datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string")),
                              "image_id": datasets.Value("int64")})


def _check_caption_feature(feature: Any, source: str, column: str, ds: datasets.Dataset) -> None:
    if is_text(feature) or isinstance(feature, datasets.Json):
        return
    if isinstance(feature, datasets.List | datasets.LargeList):
        inner = feature.feature
        if is_text(inner) or isinstance(inner, datasets.Json) or \
                (isinstance(inner, dict) and any(is_text(inner.get(k)) for k in _RECORD_KEYS)):
            return
    raise wrong_type(source, column, feature,
                     'captions (a string, a list of strings, or a list of {"caption": ...} records)', "--caption-column", ds)


def caption_strings(value: Any, source: str, column: str) -> list[str]:
    """One row's captions, stripped, empty ones dropped."""
    if value is None:
        return []
    items = [value] if isinstance(value, str | dict) else value
    if not isinstance(items, list):
        items = [items]
    out = []
    for item in items:
        if isinstance(item, dict):
            item = next((item[k] for k in _RECORD_KEYS if k in item), None)
        if item is None:
            continue
        if not isinstance(item, str):
            raise DatasetError(f"{source}: column {column!r} holds {value!r}; expected a string, a list of strings, "
                               'or a list of {"caption": ...} records')
        if item.strip():
            out.append(item.strip())
    return out


def load_captions(
    source: str | Path,
    split: str,
    image_column: str = "image",
    caption_column: str | None = None,
    max_bad_fraction: float = 0.01,
    cache_dir: str | None = None,
) -> tuple[datasets.Dataset, LoadReport]:
    """Load one split of a user caption set: `(dataset, report)` with columns `image`,
    `captions` and `image_id` (module docstring). `caption_column` defaults to "captions" if
    the source has it, else "caption". Rows with a missing or unreadable image or no non-empty
    caption are skipped and counted; raises `DatasetError` as the other loaders do."""
    check_fraction(max_bad_fraction)
    raw, base_dir = load_raw(source, split, cache_dir)
    src = str(source)
    if caption_column is None:
        caption_column = next((c for c in CAPTION_COLUMNS if c in raw.column_names), CAPTION_COLUMNS[1])
    require_columns(raw, src, {"--image-column": image_column, "--caption-column": caption_column})
    if len(raw) == 0:
        raise DatasetError(f"{src}: split {split!r} is empty")
    _check_caption_feature(raw.features[caption_column], src, caption_column, raw)
    has_id = "image_id" in raw.column_names and "image_id" not in (image_column, caption_column) and \
        isinstance(raw.features["image_id"], datasets.Value) and raw.features["image_id"].dtype.startswith(("int", "uint"))
    columns = [image_column, caption_column] + (["image_id"] if has_id else [])
    raw = prepare_image_column(raw.select_columns(columns), src, image_column)
    check = ImageChecker(base_dir)
    # a row without an id gets its row number, past the source's largest id: a row number equal
    # to another row's id would make two images one (their cached ViT features, for one)
    given_ids = given_image_ids(raw, src, numbered=len(raw)) if has_id else []
    offset = max(given_ids) + 1 if given_ids else 0

    def normalize(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"image": [], "captions": [], "image_id": [], "_skip": []}
        for i, (value, text) in enumerate(zip(batch[image_column], batch[caption_column])):
            image, reason = check(value)
            captions = caption_strings(text, src, caption_column)
            if reason is None and not captions:
                reason = "empty_caption"
            given = batch["image_id"][i] if has_id else None
            out["image"].append(image)
            out["captions"].append(captions)
            out["image_id"].append(offset + indices[i] if given is None or given < 0 else given)
            out["_skip"].append(reason or "")
        return out

    work = datasets.Features({"image": datasets.Image(decode=False), "captions": FEATURES["captions"],
                              "image_id": datasets.Value("int64"), "_skip": datasets.Value("string")})
    mapped = map_rows(raw, normalize, work, f"cap:{columns}:{base_dir}:{offset}", with_indices=True)
    ds, report = finish(mapped, src, split, len(raw), max_bad_fraction, FEATURES)
    if has_id:
        check_image_ids(ds, src)
    return ds, report


def caption_rows(ds: datasets.Dataset) -> datasets.Dataset:
    """Training rows: one per caption, `image`, `caption` (str) and `image_id`, in the order of
    the images and of each image's captions."""
    plain = ds.cast_column("image", datasets.Image(decode=False))  # move bytes, decode nothing

    def explode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"image": [], "caption": [], "image_id": []}
        for image, captions, image_id in zip(batch["image"], batch["captions"], batch["image_id"]):
            out["image"] += [image] * len(captions)
            out["caption"] += captions
            out["image_id"] += [image_id] * len(captions)
        return out

    features = datasets.Features({"image": datasets.Image(decode=False), "caption": datasets.Value("string"),
                                  "image_id": datasets.Value("int64")})
    rows = plain.map(explode, batched=True, batch_size=1000, remove_columns=plain.column_names, features=features,
                     desc="one row per caption")
    return rows.cast_column("image", datasets.Image())
