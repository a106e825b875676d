"""A column's type in the words of the data it holds, and the DatasetError for a column of the
wrong type: the loaders' messages name "whole numbers" or "lists of text", not `datasets`'
feature reprs, and for a column of mixed kinds the first row that differs."""

from __future__ import annotations

from typing import Any

import datasets

from ..errors import DatasetError, json_kind


def is_text(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def wrong_type(source: str, column: str, feature: Any, expected: str, flag: str,
               ds: datasets.Dataset | None = None) -> DatasetError:
    """The DatasetError for a column of the wrong type, in JSON's words; for a column whose rows
    hold different kinds of value, the first row that differs from most (where `ds` is given)."""
    if isinstance(feature, datasets.Value) and feature.dtype == "null":
        return DatasetError(f"{source}: column {column!r} is null in every row; expected {expected}. "
                            f"Fill it in, or name the column that holds them with {flag}")
    listed = isinstance(feature, datasets.List | datasets.LargeList) and isinstance(feature.feature, datasets.Json)
    odd = _odd_row(ds, column, listed) if ds is not None and (listed or isinstance(feature, datasets.Json)) else None
    return DatasetError(f"{source}: column {column!r} holds {describe_feature(feature)}{odd or ''}, expected "
                        f"{expected}; fix the rows, or if another column holds that, name it with {flag}")


def describe_feature(feature: Any) -> str:
    """A `datasets` feature in the words of the data it holds: 'text', 'lists of numbers'..."""
    if isinstance(feature, datasets.Value):
        dtype = feature.dtype
        if dtype in ("string", "large_string"):
            return "text"
        if dtype.startswith(("int", "uint")):
            return "whole numbers"
        if dtype.startswith("float"):
            return "numbers"
        return {"bool": "true/false values", "binary": "bytes", "large_binary": "bytes",
                "null": "nothing (null)"}.get(dtype, dtype)
    if isinstance(feature, datasets.List | datasets.LargeList | datasets.Sequence):
        inner = feature.feature
        if isinstance(inner, datasets.Value) and inner.dtype == "null":
            return "only empty lists"
        return f"lists of {describe_feature(inner)}"
    if isinstance(feature, datasets.Json):
        return "values of different kinds from row to row"
    if isinstance(feature, dict):
        return f"objects with the keys {', '.join(map(repr, feature))}"
    return {datasets.Image: "images", datasets.ClassLabel: "class labels"}.get(type(feature), type(feature).__name__)


def _odd_row(ds: datasets.Dataset, column: str, listed: bool) -> str | None:
    """' (row 4 holds a number; most rows hold a string)' for a column of mixed kinds (`listed`:
    of lists whose items are of mixed kinds: 'a list holding a number')."""
    def kind(value: Any) -> str:
        if not listed or not isinstance(value, list) or not value:
            return json_kind(value)
        return "a list holding " + " and ".join(sorted({json_kind(v) for v in value}))

    kinds = [kind(v) for v in ds[column]]
    counts: dict[str, int] = {}
    for kind in kinds:
        if kind != "null":
            counts[kind] = counts.get(kind, 0) + 1
    if len(counts) < 2:
        return None
    most = max(counts, key=counts.__getitem__)
    row = next(i for i, kind in enumerate(kinds) if kind not in (most, "null"))
    return f" (row {row + 1} holds {kinds[row]}; most rows hold {most})"
