"""User datasets, loaded with `datasets.load_dataset` and normalized to the easy-VQA schema.

`source` may be:
- a parquet file, or a folder of parquet files (splits from the file names, as
  `datasets` infers them: `train-*.parquet`, `test/…`; otherwise all is "train");
- a JSON lines file (`.jsonl` or `.json`); it holds exactly one split, named by
  `split`, and relative image paths are resolved against the file's folder;
- an image folder (the `imagefolder` builder: the label is the subfolder name);
- a Hugging Face Hub id (needs network access, or a warm cache).

A source given as a folder path resolves relative image paths against that folder.

The output schemas match `mmfusion.data.easy_vqa`:
- classification (here): `image` (`Image()`), `label` (`ClassLabel`);
- VQA (`mmfusion.data.vqa`): `image` (`Image()`), `question` (str), `answers` (list[str]),
  `answer_type` (str), `image_id` (int, -1 when the source has no `image_id` column);
- captions (`mmfusion.data.captions`).

Bad rows are skipped and counted in a `LoadReport` (reasons: `SKIP_REASONS`);
when more than `max_bad_fraction` of the rows are bad, or a column is missing
or of the wrong type, or the split is empty, the loaders raise `DatasetError`,
whose message names the fix (a command-line flag such as `--image-column`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .. import processing
from ..errors import DatasetError, ImageError
from .columns import describe_feature, is_text, wrong_type
from .json_files import check_json_start, check_utf8, json_problem, quiet_json_reader

logger = logging.getLogger(__name__)

SKIP_REASONS = ("missing_image", "unreadable_image", "empty_question", "empty_answer", "missing_label",
                "empty_caption")
_LOCAL_SUFFIXES = {".parquet", ".jsonl", ".json"}
# loaders are not told which flag named the split; the evaluation split is the one a folder most often lacks
_SPLIT_FLAGS = "with --eval-split or --train-split (training), or --split (mmfusion eval)"


@dataclass(frozen=True)
class LoadReport:
    """How many rows a loader read, kept, and skipped for each reason in `SKIP_REASONS`."""

    source: str
    split: str
    total: int
    kept: int
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def bad_fraction(self) -> float:
        return (self.total - self.kept) / self.total if self.total else 0.0

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{self.source} [{self.split}]: kept {self.kept} of {self.total} rows, "
                f"skipped {self.total - self.kept} ({reasons})")


# ---------------------------------------------------------------------------------------------
# Reading the source


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (one split; a DatasetDict's has dataset_dict.json)."""
    return path.is_dir() and (path / "state.json").is_file()


def unsplit_folder(path: Path) -> bool:
    """Whether `path` is a data folder whose files name no split: class subfolders alone, or data
    files not named train, test, ... `datasets` calls all of it "train"; like a single file, it is
    one split, whatever the name asked. A folder with train/ (or train.parquet) alone names its
    split, and asking it for "test" stays an error."""
    if not path.is_dir() or is_saved_dataset(path) or (path / "dataset_dict.json").is_file():
        return False
    from datasets.data_files import get_data_patterns

    try:
        patterns = get_data_patterns(str(path))
    except Exception:  # no data files it knows: loading says what is wrong
        return False
    return {str(k): v for k, v in patterns.items()} == {"train": ["**"]} and not _card_configs(path)


def _card_configs(path: Path) -> bool:
    """Whether the folder's README.md declares `configs:` (which may name splits) in its YAML header."""
    card = path / "README.md"
    if not card.is_file():
        return False
    with open(card, "rb") as f:
        head = f.read(65536).decode("utf-8", "replace")
    if not head.startswith("---"):
        return False
    header = head[3:].split("\n---", 1)[0]
    return any(line.startswith("configs:") for line in header.splitlines())


def one_part(source, split: str, why: str) -> str:
    """`split` if it asks for one part of a source of one split: its one split is read under the
    name asked for, so parts joined by + cannot each be read (and whole, they would repeat rows)."""
    if "+" in split:
        raise DatasetError(f"{source}: {why}; {split!r} joins several parts with +, which a source of one split "
                           "cannot give. Ask for one (train, or a slice such as train[:80%])")
    return split


def split_name(part: str) -> str:
    """The name of a one-part split request: test[:500] -> test."""
    return re.match(SPLIT_NAME, part).group(0)


def sliced(ds: datasets.Dataset, part: str) -> datasets.Dataset:
    """`ds` (all of one split) cut to the slice a one-part request names, as `datasets` cuts the
    splits it loads (test[:500], train[80%:]); all of it where there is none."""
    if "[" not in part:
        return ds
    name = split_name(part)
    (cut,) = datasets.ReadInstruction.from_spec(part).to_absolute({name: len(ds)})
    return ds.select(range(cut.from_, cut.to))


def as_only_split(split: str, only: str) -> str:
    """`split` (one part) asking for `only` instead, its slice kept: test[:500] -> train[:500]. A
    source with one split gives it whatever the name, as a single file does."""
    return only + split[len(split_name(split)):]


# What `datasets` takes as a split: names of \w parts joined by dots, each maybe sliced
# (test[:500], train[10%:]), several joined by + (train+test).
SPLIT_NAME = r"\w+(?:\.\w+)*"
_ONE_SPLIT = rf"{SPLIT_NAME}(\[[^\[\]]*\])?"
SPLIT = re.compile(rf"{_ONE_SPLIT}(\+{_ONE_SPLIT})*")


@quiet_json_reader()
def load_raw(source: str | Path, split: str, cache_dir: str | None) -> tuple[datasets.Dataset, Path | None]:
    """Load one split of `source`; return it and the folder that relative image paths are relative to."""
    if not str(source).strip():
        raise DatasetError("the dataset name is empty; pass easy-vqa, scenes, a file or folder, or a Hub id")
    if not SPLIT.fullmatch(split):
        raise DatasetError(f"{split!r} is not a split name (letters, digits and _, parts joined by dots, e.g. "
                           "train, test or test[:500]); pass one with --split, --train-split or --eval-split")
    path = Path(source).expanduser()
    try:
        if path.exists() and not (path.is_file() or path.is_dir()):
            raise DatasetError(f"{source}: not a regular file or folder (a FIFO, socket or device); give a "
                               ".parquet, .jsonl or .json file, an image folder, or a Hub id")
        if path.is_file():
            suffix = path.suffix.lower()
            if suffix not in _LOCAL_SUFFIXES:
                raise DatasetError(f"{source}: cannot read a {suffix or 'suffix-less'} file; "
                                   "give a .parquet, .jsonl or .json file, an image folder, or a Hub id")
            size = path.stat().st_size
            if size == 0 or (size < 4096 and not path.read_bytes().strip()):
                raise DatasetError(f"{source}: the file is empty, so split {split!r} has no rows")
            if suffix == ".parquet" and _parquet_rows(path) == 0:  # `datasets` fails on it with an arrow error
                raise DatasetError(f"{source}: split {split!r} is empty (the parquet file has no rows)")
            if suffix != ".parquet":
                check_utf8(path)  # pyarrow reads invalid UTF-8 in and fails later, on first access to the row
                check_json_start(path)
            builder = "parquet" if suffix == ".parquet" else "json"
            # A single file is exactly one split: named as asked, sliced as asked.
            name = split_name(one_part(source, split, "a single file has one split"))
            ds = datasets.load_dataset(builder, data_files={name: str(path)}, split=split, cache_dir=cache_dir)
            return ds, path.parent.resolve()
        if path.is_dir():
            if is_saved_dataset(path):  # one split, like a single file: named as asked, sliced as asked
                part = one_part(source, split, "a saved Dataset has one split")
                return sliced(datasets.load_from_disk(str(path)), part), path.resolve()
            if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: memory-mapped, no copy
                splits = datasets.load_from_disk(str(path))
                part = one_part(source, split, "a saved DatasetDict is read one split at a time")
                if split_name(part) not in splits:
                    raise DatasetError(f"{source}: no split {split_name(part)!r}; it has {sorted(splits)}. Pass one "
                                       f"of those {_SPLIT_FLAGS}")
                return sliced(splits[split_name(part)], part), path.resolve()
            _check_file_names(path)
            if unsplit_folder(path):  # one split, like a single file
                split = as_only_split(one_part(source, split, "its files name no split, so it has one"), "train")
            ds = datasets.load_dataset(str(path), split=split, cache_dir=cache_dir)
            return ds, path.resolve()
        if path.suffix.lower() in _LOCAL_SUFFIXES or str(source).startswith((".", "/", "~")):
            raise DatasetError(f"{source}: no such file or folder")
        ds = datasets.load_dataset(str(source), split=split, cache_dir=cache_dir)
        return ds, None
    except DatasetError:
        raise
    except ValueError as e:
        if "should be one of" in str(e).lower():  # datasets: 'Unknown split "x". Should be one of [...]'
            raise DatasetError(f"{source}: {str(e).rstrip('.')}. Pass one of those {_SPLIT_FLAGS}") from e
        problem = json_problem(path)  # a .json file of [] has no data for the split
        raise DatasetError(problem or f"{source}: could not load split {split!r}: {e}") from e
    except Exception as e:  # datasets raises many types here: offline, not found, malformed files
        problem = json_problem(path)
        if problem:
            raise DatasetError(problem) from e
        where = "" if path.exists() else " (not a local file or folder, so it was looked up on the Hugging Face Hub)"
        cause = e.__cause__  # DatasetGenerationError's own text says nothing of what went wrong
        why = f" ({type(cause).__name__}: {cause})" if cause is not None and str(cause) else ""
        raise DatasetError(f"{source}: could not load split {split!r}{where}: {type(e).__name__}: {e}{why}") from e


def _check_file_names(folder: Path) -> None:
    """A DatasetError for a file name in `folder` that `datasets` cannot read: one not UTF-8 (it
    failed with a UnicodeEncodeError naming no file) or holding a line break (silently left out)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in [*dirs, *files]:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(os.path.join(root, name))
                raise DatasetError(f"{folder}: the file name {shown!r} is not UTF-8 text, which datasets cannot "
                                   "read; rename it (e.g. convmv -f latin1 -t utf8)") from None
            if "\n" in name or "\r" in name:
                raise DatasetError(f"{folder}: the file name {os.path.join(root, name)!r} holds a line break, "
                                   "which datasets leaves out; rename it")


def _parquet_rows(path: Path) -> int | None:
    """Rows in a parquet file, from its footer; None when it cannot be read (`datasets` then says why)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # not parquet at all: left to datasets' own error
        return None


def require_columns(ds: datasets.Dataset, source: str, wanted: dict[str, str]) -> None:
    """`wanted` maps a command-line flag to the column name it selects."""
    for flag, column in wanted.items():
        if column not in ds.column_names:
            if ignored := _files_an_image_folder_ignored(ds, source):
                raise DatasetError(f"{source}: no column {column!r}; the columns are {ds.column_names}: its split "
                                   "folders hold more images than data files, so it was read as an image folder and "
                                   f"its data files were ignored ({', '.join(map(str, ignored[:3]))}). Move the "
                                   "images out of the split folders, or point --dataset at a data file such as "
                                   f"{ignored[0]}")
            raise DatasetError(f"{source}: no column {column!r}; the columns are {ds.column_names}. "
                               f"Name the right one with {flag}")


def _files_an_image_folder_ignored(ds: datasets.Dataset, source: str) -> list[Path]:
    """The data files of a folder that `datasets` read as an image folder (it picks the builder by
    the most common file suffix), leaving them out; metadata.* files it reads, so they are not named."""
    path = Path(source).expanduser()
    if ds.info.builder_name != "imagefolder" or not path.is_dir():
        return []
    return sorted(f for f in path.rglob("*") if f.suffix.lower() in _LOCAL_SUFFIXES and f.stem != "metadata")


def prepare_image_column(ds: datasets.Dataset, source: str, column: str) -> datasets.Dataset:
    """Make the image column yield raw values (path str, bytes, or {bytes, path}), never decoded images."""
    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary", "large_binary"):
        return ds
    if isinstance(feature, dict) and {"bytes", "path"} & feature.keys():
        data = feature.get("bytes")
        if data is not None and not (isinstance(data, datasets.Value) and
                                     data.dtype in ("binary", "large_binary", "null")):
            raise DatasetError(f"{source}: column {column!r} holds {{\"bytes\": {describe_feature(data)}, ...}}; \"bytes\" "
                               "must be the image file's binary data, not text or numbers (JSON holds no binary: base64 stays "
                               "text). Give each image as a file path, or decode the base64 and save as parquet")
        return ds
    raise wrong_type(source, column, feature, "images (an Image feature, file paths, bytes, or {bytes, path})",
                      "--image-column", ds)


class ImageChecker:
    """Turn one raw image value into `({bytes, path}, None)` or `(None, skip reason)`.

    Relative paths are resolved against `base_dir`. Each file is decoded in full once, by the
    same guarded open training uses (`verify()` alone passes a JPEG whose pixel rows are cut
    off, which then crashed the feature cache); verdicts are cached by path, since VQA sets
    repeat images.
    """

    def __init__(self, base_dir: Path | None):
        self.base_dir = base_dir
        self._verdicts: dict[str, str | None] = {}

    @staticmethod
    def _verify(fp: Any) -> str | None:
        try:
            processing.open_image(fp, "image")
        except ImageError:
            return "unreadable_image"
        return None

    def _resolve(self, path: str) -> str:
        p = Path(path).expanduser()
        if not p.is_absolute() and self.base_dir is not None:
            p = self.base_dir / p
        return str(p)

    def __call__(self, value: Any) -> tuple[dict | None, str | None]:
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, bytes | bytearray):
            data, path = bytes(value), None
        else:
            data, path = None, value
        if data:
            reason = self._verify(io.BytesIO(data))
            return (None, reason) if reason else ({"bytes": data, "path": path}, None)
        if not isinstance(path, str) or not path.strip():
            return None, "missing_image"
        path = self._resolve(path.strip())
        if path not in self._verdicts:
            self._verdicts[path] = self._verify(path) if Path(path).is_file() else "missing_image"
        reason = self._verdicts[path]
        return (None, reason) if reason else ({"bytes": None, "path": path}, None)


def finish(ds: datasets.Dataset, source: str, split: str, total: int, max_bad_fraction: float,
            features: datasets.Features) -> tuple[datasets.Dataset, LoadReport]:
    """Drop rows whose `_skip` is set, check the bad fraction, and cast to the output `features`."""
    reasons = ds["_skip"][:]
    keep = [i for i, r in enumerate(reasons) if not r]
    skipped: dict[str, int] = {}
    for r in reasons:
        if r:
            skipped[r] = skipped.get(r, 0) + 1
    report = LoadReport(source=str(source), split=split, total=total, kept=len(keep), skipped=skipped)
    if report.bad_fraction > max_bad_fraction:
        raise DatasetError(f"{report}: {report.bad_fraction:.1%} of the rows are bad, more than the "
                           f"limit of {max_bad_fraction:.1%}; fix the data or raise the limit with --max-bad-fraction")
    if not keep:
        raise DatasetError(f"{report}: no usable rows left")
    if skipped:  # after the checks: an error already says it, once
        logger.warning("%s", report)
    if len(keep) < total:
        ds = ds.select(keep)
    return ds.remove_columns("_skip").cast(features), report


def map_rows(ds: datasets.Dataset, fn, features: datasets.Features, tag: str,
             with_indices: bool = False) -> datasets.Dataset:
    # An explicit fingerprint: the closures hold caches, which `datasets` would otherwise hash.
    # Never reuse a cached result: files on disk may have been fixed (or broken) since.
    fingerprint = hashlib.sha256(f"{ds._fingerprint}:{tag}".encode()).hexdigest()[:16]
    return ds.map(fn, batched=True, batch_size=1000, remove_columns=ds.column_names, features=features,
                  with_indices=with_indices, new_fingerprint=fingerprint, load_from_cache_file=False,
                  desc="checking rows")


def check_fraction(max_bad_fraction: float) -> None:
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise DatasetError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")


# ---------------------------------------------------------------------------------------------
# Classification

# Integer labels are class ids, so the largest sets the class count. The bound is on the largest
# id, not a ratio to the ids present: an evaluation file or a slice holds few of a large label
# set's ids, and its classes are matched to the training set's by name.
MAX_LABEL_ID = 2**20 - 1  # over a million classes: ids, hashes or timestamps, not classes


def _label_names(ds: datasets.Dataset, source: str, column: str) -> tuple[list[str], str]:
    """Return the class names and how raw labels map to ids: "id" (already ids) or "name"."""
    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), "id"
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        ids = [v for v in ds.unique(column) if v is not None and v >= 0]
        if ids and max(ids) > MAX_LABEL_ID:
            raise DatasetError(f"{source}: column {column!r} holds integer labels up to {max(ids)} ({len(ids)} distinct "
                               f"ones); as class ids 0..{max(ids)} they would make {max(ids) + 1} classes (at most "
                               f"{MAX_LABEL_ID + 1} are allowed). If they are ids or codes, write them as strings "
                               f"(\"{max(ids)}\"): each distinct string is one class")
        return [str(i) for i in range(max(ids) + 1)] if ids else [], "id"
    if is_text(feature):
        names = sorted({v.strip() for v in ds.unique(column) if isinstance(v, str) and v.strip()})
        return names, "name"
    raise wrong_type(source, column, feature, "class labels (ClassLabel, integers or strings)", "--label-column", ds)


def load_image_classification(
    source: str | Path,
    split: str,
    image_column: str = "image",
    label_column: str = "label",
    max_bad_fraction: float = 0.01,
    cache_dir: str | None = None,
) -> tuple[datasets.Dataset, LoadReport]:
    """Load one split of a user image-classification set.

    Returns `(dataset, report)`; the dataset has columns `image` (`Image()`) and
    `label` (`ClassLabel`: the source's own names, `"0".."K-1"` for plain
    integers, or the sorted distinct strings for string labels). Rows with a
    missing or unreadable image or a null/empty/negative label are skipped.
    Raises `DatasetError` (see the module docstring), also for an integer label
    over `MAX_LABEL_ID` (2,000,000 among 4 labels would make 2,000,001 classes).
    """
    check_fraction(max_bad_fraction)
    raw, base_dir = load_raw(source, split, cache_dir)
    src = str(source)
    require_columns(raw, src, {"--image-column": image_column, "--label-column": label_column})
    if len(raw) == 0:
        raise DatasetError(f"{src}: split {split!r} is empty")
    raw = prepare_image_column(raw.select_columns([image_column, label_column]), src, image_column)
    names, mode = _label_names(raw, src, label_column)
    if not names:
        raise DatasetError(f"{src}: column {label_column!r} has no usable labels")
    index = {n: i for i, n in enumerate(names)}
    check = ImageChecker(base_dir)

    def normalize(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"image": [], "label": [], "_skip": []}
        for value, label in zip(batch[image_column], batch[label_column]):
            image, reason = check(value)
            if mode == "name":
                label_id = index.get(label.strip()) if isinstance(label, str) else None
            else:
                label_id = label if label is not None and 0 <= label < len(names) else None
            if reason is None and label_id is None:
                reason = "missing_label"
            out["image"].append(image)
            out["label"].append(label_id)
            out["_skip"].append(reason or "")
        return out

    work = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64"),
                              "_skip": datasets.Value("string")})
    mapped = map_rows(raw, normalize, work, f"cls:{image_column}:{label_column}:{base_dir}")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return finish(mapped, src, split, len(raw), max_bad_fraction, features)
