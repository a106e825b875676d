"""User VQA sets (`load_vqa`), read as `mmfusion.data.local` reads any source, normalized to the
easy-VQA schema: `image`, `question`, `answers` (list[str]), `answer_type`, `image_id`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import datasets

from ..errors import DatasetError
from ..metrics import normalize_answer
from .columns import is_text, wrong_type
from .image_keys import check_image_ids, given_image_ids
from .local import (
    ImageChecker,
    LoadReport,
    check_fraction,
    finish,
    load_raw,
    map_rows,
    prepare_image_column,
    require_columns,
)

ANSWER_TYPES = ("yes/no", "number", "other")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _check_answer_feature(feature: Any, source: str, column: str, ds: datasets.Dataset) -> None:
    """Accept text, a list of text, a list of {"answer": text} records, or JSON of mixed such rows."""
    if is_text(feature) or isinstance(feature, datasets.Json):
        return
    if isinstance(feature, datasets.List | datasets.LargeList):
        inner = feature.feature
        if is_text(inner) or (isinstance(inner, dict) and is_text(inner.get("answer"))):
            return
    # The legacy Sequence({"answer": ..., ...}) is a dict of lists.
    if isinstance(feature, dict) and isinstance(feature.get("answer"), datasets.List | datasets.LargeList) \
            and is_text(feature["answer"].feature):
        return
    raise wrong_type(source, column, feature,
                      'answers (a string, a list of strings, or a list of {"answer": ...} records)', "--answer-column", ds)


def _answer_strings(value: Any, source: str, column: str) -> list[str | None]:
    """One row's answers as a list; `None` entries mark missing answers."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):  # one record, or a legacy Sequence({...}) column: a dict of lists
        value = value.get("answer")
        value = value if isinstance(value, list) else [value]
    if isinstance(value, list):
        items = [a.get("answer") if isinstance(a, dict) else a for a in value]
        if all(a is None or isinstance(a, str) for a in items):
            return items
    raise DatasetError(f"{source}: column {column!r} holds {value!r}; expected a string, a list of strings, "
                       'or a list of {"answer": ...} records (write numbers as strings: "2")')


def answer_type_of(answers: list[str]) -> str:
    """"yes/no" if every answer normalizes to yes/no, "number" if every one is numeric, else "other"."""
    normalized = [normalize_answer(a) for a in answers]
    if all(a in ("yes", "no") for a in normalized):
        return "yes/no"
    if all(_NUMBER.fullmatch(a) for a in normalized):
        return "number"
    return "other"


def _vqa_columns(raw: datasets.Dataset, src: str, split: str, image_column: str, question_column: str,
                 answer_column: str | None) -> tuple[str, list[str], bool, bool]:
    """(answer column, columns to keep, whether the source's answer_type and image_id columns are
    usable); raises DatasetError for missing columns, an empty split or wrong column types."""
    if answer_column is None:
        answer_column = "answers" if "answers" in raw.column_names else "answer"
    require_columns(raw, src, {"--image-column": image_column, "--question-column": question_column,
                                "--answer-column": answer_column})
    if len(raw) == 0:
        raise DatasetError(f"{src}: split {split!r} is empty")
    if not is_text(raw.features[question_column]):
        raise wrong_type(src, question_column, raw.features[question_column], "question text", "--question-column",
                         raw)
    _check_answer_feature(raw.features[answer_column], src, answer_column, raw)
    extra = [c for c in ("answer_type", "image_id") if c in raw.column_names and c not in
             (image_column, question_column, answer_column)]
    has_type = "answer_type" in extra and is_text(raw.features["answer_type"])
    has_id = "image_id" in extra and isinstance(raw.features["image_id"], datasets.Value) and \
        raw.features["image_id"].dtype.startswith(("int", "uint"))
    return answer_column, list(dict.fromkeys([image_column, question_column, answer_column, *extra])), has_type, has_id


def load_vqa(
    source: str | Path,
    split: str,
    image_column: str = "image",
    question_column: str = "question",
    answer_column: str | None = None,
    max_bad_fraction: float = 0.01,
    cache_dir: str | None = None,
) -> tuple[datasets.Dataset, LoadReport]:
    """Load one split of a user VQA set.

    `answer_column` defaults to "answers" if the source has it, else "answer";
    it may hold a string, a list of strings, or a list of `{"answer": ...}`
    records (VQAv2). Returns `(dataset, report)`; the dataset has columns
    `image` (`Image()`), `question` (str, stripped), `answers` (list[str],
    stripped, empty ones dropped), `answer_type` (the source's non-empty
    `answer_type` value if it has that column, else `answer_type_of(answers)`)
    and `image_id` (int; -1 where the source has none). Rows with a missing or
    unreadable image, an empty question, or no non-empty answer are skipped.
    Raises `DatasetError` (see the module docstring).
    """
    check_fraction(max_bad_fraction)
    raw, base_dir = load_raw(source, split, cache_dir)
    src = str(source)
    answer_column, columns, has_type, has_id = _vqa_columns(raw, src, split, image_column, question_column,
                                                            answer_column)
    if has_id:
        given_image_ids(raw, src)  # refused before any work, past int64
    raw = prepare_image_column(raw.select_columns(columns), src, image_column)
    check = ImageChecker(base_dir)

    def normalize(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("image", "question", "answers", "answer_type", "image_id", "_skip")}
        for i, (value, question, answer) in enumerate(zip(batch[image_column], batch[question_column],
                                                          batch[answer_column])):
            image, reason = check(value)
            question = question.strip() if isinstance(question, str) else ""
            answers = [a.strip() for a in _answer_strings(answer, src, answer_column) if a and a.strip()]
            if reason is None and not question:
                reason = "empty_question"
            if reason is None and not answers:
                reason = "empty_answer"
            given = batch["answer_type"][i] if has_type else None
            out["image"].append(image)
            out["question"].append(question)
            out["answers"].append(answers)
            out["answer_type"].append(given.strip() if isinstance(given, str) and given.strip()
                                      else answer_type_of(answers) if answers else "")
            image_id = batch["image_id"][i] if has_id else None
            out["image_id"].append(-1 if image_id is None else image_id)
            out["_skip"].append(reason or "")
        return out

    common = {
        "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "answer_type": datasets.Value("string"),
        "image_id": datasets.Value("int64"),
    }
    work = datasets.Features({"image": datasets.Image(decode=False), **common, "_skip": datasets.Value("string")})
    mapped = map_rows(raw, normalize, work, f"vqa:{columns}:{base_dir}")
    features = datasets.Features({"image": datasets.Image(), **common})
    ds, report = finish(mapped, src, split, len(raw), max_bad_fraction, features)
    if has_id:
        check_image_ids(ds, src)
    return ds, report
