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
from pathlib import Path

import datasets

from . import BUILT_IN
from .image_keys import image_keys
from .local import SPLIT_NAME, DatasetError, is_saved_dataset, unsplit_folder


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


_SLICE = re.compile(rf"^{SPLIT_NAME}\[(\d*)(%?):(\d*)(%?)\]$")


def _row_range(split: str) -> tuple[float, float, str] | None:
    """(from, to, unit) of a one-part split's slice with non-negative bounds in one unit ("%" or
    rows): train[80%:] -> (80, inf, "%"). None where it cannot be told apart from every other
    request without the row count (no slice, negative bounds, mixed units, several parts)."""
    m = _SLICE.match(split)
    if m is None or (m.group(1) and m.group(3) and m.group(2) != m.group(4)):
        return None
    unit = m.group(2) or m.group(4)
    return float(m.group(1) or 0), float(m.group(3) or "inf"), unit


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
