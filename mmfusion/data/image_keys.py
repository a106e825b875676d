"""One key per row naming its image (a digest of its bytes), and the check that a source's
`image_id` column agrees with them: what hold-outs, the feature cache and conversations group by."""

from __future__ import annotations

import hashlib
import os
import stat

import datasets

from ..errors import DatasetError


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


INT64_MAX = 2**63 - 1  # image_id is stored as int64


def given_image_ids(raw: datasets.Dataset, source: str, numbered: int = 0) -> list[int]:
    """The source's `image_id` values (>= 0); a DatasetError when one is past int64, or leaves no
    room for `numbered` row numbers after the largest (the caption loader numbers rows without one)."""
    ids = [i for i in raw["image_id"][:] if i is not None and i >= 0]
    if ids and max(ids) + numbered > INT64_MAX:
        why = ("past the 64-bit signed integer range" if max(ids) > INT64_MAX else
               f"too close to the 64-bit signed integer limit to number {numbered} rows after it (rows without an id "
               "get numbers past the largest)")
        raise DatasetError(f"{source}: column 'image_id' holds {max(ids)}, {why} (at most {INT64_MAX}); renumber the "
                           "ids, or drop the column (each image is then told by its bytes)")
    return ids


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
