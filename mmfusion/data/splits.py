"""Evaluation rows that are not training rows.

A single file (or a `Dataset.save_to_disk` folder, or a folder whose files name no split: class
subfolders alone) has one split: asked for "train" and for "test" it gives the same rows, so a run would
report its accuracy on what it trained on.
`same_rows` says when that would happen; `hold_out` then takes a share of the rows out of
training, by image (a VQA set asks several questions about one image: they go to the same
side), with a choice that depends on the data only -- not on the seed, not on row order.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import datasets

from . import BUILT_IN
from .local import DatasetError, is_saved_dataset, unsplit_folder


def single_split(source: str) -> bool:
    """Whether every split name gives the same rows of `source`: a single file, a saved Dataset, or
    a folder whose files name no split."""
    if source in BUILT_IN:
        return False
    path = Path(source).expanduser()
    return path.is_file() or is_saved_dataset(path) or unsplit_folder(path)


def same_source(a: str, b: str) -> bool:
    """Whether two --dataset values name the same data: the same string, or the same local file
    or folder however spelled (./x, an absolute path, a symbolic link, ~). Built-in names and hub
    ids compare as strings."""
    if a == b:
        return True
    if a in BUILT_IN or b in BUILT_IN:
        return False
    try:
        return os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:  # one of them is not a local path (a hub id): different strings, different data
        return False


def same_rows(source: str, train_split: str, eval_source: str | None, eval_split: str) -> bool:
    """Whether evaluating on (eval_source or source, eval_split) would reuse the training rows. In a
    source of one split the names do not matter but slices do: train[:80%] and test[80%:] of a
    file are disjoint rows; test and train[:80%], or train[:90%] and test[80%:], share rows."""
    if eval_source is not None and not same_source(eval_source, source):
        return False
    if train_split == eval_split:
        return True
    if not single_split(source):
        return False
    a, b = _row_range(train_split), _row_range(eval_split)
    return a is None or b is None or a[2] != b[2] or (a[0] < b[1] and b[0] < a[1])


_SLICE = re.compile(r"^\w+(?:\.\w+)*\[(\d*)(%?):(\d*)(%?)\]$")


def _row_range(split: str) -> tuple[float, float, str] | None:
    """(from, to, unit) of a one-part split's slice with non-negative bounds in one unit ("%" or
    rows): train[80%:] -> (80, inf, "%"). None where it cannot be told apart from every other
    request without the row count (no slice, negative bounds, mixed units, several parts)."""
    m = _SLICE.match(split)
    if m is None or (m.group(1) and m.group(3) and m.group(2) != m.group(4)):
        return None
    unit = m.group(2) or m.group(4)
    return float(m.group(1) or 0), float(m.group(3) or "inf"), unit


def image_keys(ds: datasets.Dataset, column: str = "image") -> list[str]:
    """One key per row naming its image: a digest of the image's bytes, read from its file where
    the row holds only a path. Not the path: a parquet file may store many different images under
    one file name, and a path names the folder the data sits in, so the same files moved or
    cloned elsewhere would split differently. The same picture under two names is one image."""
    raw = ds.select_columns([column])
    if isinstance(raw.features[column], datasets.Image):
        raw = raw.cast_column(column, datasets.Image(decode=False))  # paths and bytes, nothing decoded
    keys = []
    for batch in raw.iter(batch_size=1000):  # a batch of bytes at a time, not the whole set
        for value in batch[column]:
            if isinstance(value, str):  # a column of file paths
                value = {"path": value}
            path = value.get("path") if isinstance(value, dict) else None
            data = value.get("bytes") if isinstance(value, dict) else value
            keys.append(_bytes_key(data) if data or not path else _file_key(path))
    return keys


def check_image_ids(ds: datasets.Dataset, source: str) -> None:
    """A DatasetError when rows that share an `image_id` (>= 0) show different images (different
    bytes, as image_keys tells them). Training trusts the ids: it computes one image's features
    for all rows of an id and groups them as turns about one picture. The same image under
    several ids is fine. Reads only the rows whose id repeats (files once each, memoized)."""
    ids = ds["image_id"][:]
    counts: dict[int, int] = {}
    for image_id in ids:
        counts[image_id] = counts.get(image_id, 0) + 1
    shared = [row for row, image_id in enumerate(ids) if image_id >= 0 and counts[image_id] > 1]
    if not shared:
        return
    rows = ds.select(shared)
    first: dict[int, tuple[int, str]] = {}
    for at, (row, key) in enumerate(zip(shared, image_keys(rows))):
        seen_at, seen_key = first.setdefault(ids[row], (at, key))
        if seen_key != key:
            names = [_image_name(rows, i) for i in (seen_at, at)]
            raise DatasetError(f"{source}: column 'image_id' gives id {ids[row]} to different images ({names[0]} and "
                               f"{names[1]}), so training would use one image for every row of that id. Correct "
                               "the column so that one id names one image, or drop it: without it images are keyed "
                               "by their bytes")


def _image_name(rows: datasets.Dataset, i: int) -> str:
    value = rows.cast_column("image", datasets.Image(decode=False))[i]["image"]
    return repr(value["path"]) if value.get("path") else "an image given as bytes"


def _bytes_key(data: bytes | None) -> str:
    return "sha256:" + hashlib.sha256(data or b"").hexdigest()


def _file_key(path: str) -> str:
    """The digest of a regular file's bytes; for anything else (not there, a pipe: rows no loader
    checked) its path. Opened without blocking and checked on the open file, so a pipe put in
    its place cannot hang the read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return f"path:{path}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a folder, a pipe
            return f"path:{path}"
        # the hold-out, the short-run check and the feature cache each ask for every image's key
        version = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # ctime: any rewrite
        if (known := _DIGESTS.get(version)) is None:
            digest = hashlib.sha256()
            while chunk := os.read(fd, 2**20):
                digest.update(chunk)
            known = _DIGESTS[version] = "sha256:" + digest.hexdigest()
            if len(_DIGESTS) > 2**17:  # a bound on memory: the oldest first
                del _DIGESTS[next(iter(_DIGESTS))]
        return known
    except OSError:
        return f"path:{path}"
    finally:
        os.close(fd)


_DIGESTS: dict[tuple, str] = {}


def held_out_digest(keys) -> str:
    """A short digest of the held-out images' keys: the same data and fraction give the same one,
    so a run's record names its evaluation images."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:12]


def align_labels(ds: datasets.Dataset, names: list[str], what: str) -> datasets.Dataset:
    """`ds`'s class labels renumbered to `names` (the training set's classes), by name: another
    file's ids follow its own classes. A class the training set lacks is a DatasetError."""
    feature = ds.features["label"]
    inner = getattr(feature, "feature", feature)  # a list of labels per cell, or one
    if list(inner.names) == list(names):
        return ds
    unknown = sorted(set(inner.names) - set(names))
    if unknown:
        raise DatasetError(f"{what} has classes the training data lacks: {unknown[:5]}; a model cannot be scored on "
                           "them. Evaluate on data with the training classes")
    new_id = [names.index(n) for n in inner.names]
    target = datasets.ClassLabel(names=list(names))
    features = ds.features.copy()
    features["label"] = target if inner is feature else datasets.Sequence(target)

    def renumber(batch):
        batch["label"] = [[new_id[i] for i in v] if isinstance(v, list) else new_id[v] for v in batch["label"]]
        return batch

    return ds.map(renumber, batched=True, features=features, desc="matching classes")


def hold_out(ds: datasets.Dataset, fraction: float, what: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training rows, held-out rows): the images whose key hashes lowest, about `fraction` of
    the distinct images (at least one), with every row of each; `what` names the data in errors."""
    return hold_out_all([ds], fraction, what)[0][0]


def hold_out_all(sets: list, fraction: float, what: str,
                 scored: list[bool] | None = None) -> tuple[list[tuple], str]:
    """`hold_out` over several kinds of rows of one source at once (questions, captions; None for
    a kind not used, which gives (None, None)): the held-out images are chosen from all kinds'
    images together, so an image is held out of every kind or of none -- its questions are never
    trained on while its caption is scored, even where the kinds cover different images. A kind
    not `scored` (captions used only to align) may be left with no held-out rows. Returns the
    (kept, held) pairs and the held-out images' digest (held_out_digest)."""
    keys = [image_keys(ds) if ds is not None else None for ds in sets]
    images = sorted(set().union(*(k for k in keys if k is not None)), key=lambda k: hashlib.sha256(k.encode()).digest())
    n = max(1, round(fraction * len(images)))
    if n >= len(images):
        raise DatasetError(f"{what}: {len(images)} distinct image(s) cannot be split into training and held-out "
                           "rows; name evaluation data with --eval-dataset, or pass --holdout 0 to evaluate on "
                           "the training rows knowingly")
    held = set(images[:n])
    pairs: list[tuple] = []
    for ds, k, needs_held in zip(sets, keys, scored or [True] * len(sets)):
        if ds is None:
            pairs.append((None, None))
            continue
        out = [i for i, key in enumerate(k) if key in held]
        kept = [i for i, key in enumerate(k) if key not in held]
        if (needs_held and not out) or not kept:
            side, fix = ("none of its images is", "raise") if not out else ("all of its images are", "lower")
            raise DatasetError(f"{what}: {side} among the {n} held-out image(s) in a set of {len(ds)} rows, so it "
                               f"could not be both trained and evaluated; {fix} --holdout, or name evaluation "
                               "data with --eval-dataset")
        pairs.append((ds.select(kept), ds.select(out)))
    return pairs, held_out_digest(held)
