"""Checks on a user's JSON and JSON lines files that `datasets` does not make, or makes without
saying where: text that is not UTF-8, a first value that would crash its reader, and, when its
reader fails, the line that made it fail."""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DatasetError, json_kind

JSON_SUFFIXES = (".json", ".jsonl")


def check_json_start(path: Path) -> None:
    """A DatasetError unless the first value in a JSON/JSONL file opens an object or a list of them:
    `datasets`' JSON reader crashes the whole process (a segmentation fault) on a leading null."""
    with open(path, "rb") as f:
        head = f.read(2**16)
    text = head.decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    item = text[1:].lstrip(" \t\r\n")[:1] if text[:1] == "[" else "{"
    if text and (text[0] not in "{[" or item not in "{]"):  # `datasets` reads [1, 2] as a column 'text'
        line = head[:len(head) - len(head.lstrip(b"\xef\xbb\xbf \t\r\n"))].count(b"\n") + 1
        first = text.split("\n", 1)[0][:40]
        raise DatasetError(f"{path}: line {line} is {first!r}, not a JSON object; each line of a .jsonl file (or "
                           "the .json file's list) must hold objects such as {\"image\": ..., ...}")


def check_utf8(path: Path, chunk: int = 2**20) -> None:
    """A DatasetError naming the line and byte when a JSON file is not UTF-8 text."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                at = e.start - pending  # in `data`; negative when the cut character is the bad one
                bad = offset + at
                line = lines + data[:max(at, 0)].count(b"\n") + 1
                raise DatasetError(f"{path}: line {line} is not UTF-8 text (byte {bad}: {e.reason}); re-save the "
                                   "file as UTF-8, or fix or remove that line") from e
            if not data:
                return
            offset += len(data)
            lines += data.count(b"\n")


@contextlib.contextmanager
def quiet_json_reader() -> Iterator[None]:
    """`datasets`' JSON reader logs an error before raising it; the loader explains the failure
    itself (explain_json_failure), in one line."""
    reader = logging.getLogger("datasets.packaged_modules.json.json")
    level = reader.level
    reader.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        reader.setLevel(level)


def explain_json_failure(path: Path) -> str | None:
    """Why `datasets` could not read the JSON or JSON lines file `path`, naming the line: the first
    line that is not JSON, or a row that is not an object. None when neither is found (a column
    whose type changes between rows is no failure: `datasets` reads it as a Json column)."""
    rows = 0
    try:
        for where, row in _rows(path):
            rows += 1
            if not isinstance(row, dict):
                return f"{where} is {json_kind(row)}, not a JSON object such as {{\"image\": ..., ...}}; fix or remove it"
    except _BadLine as e:
        return str(e)
    return None if rows else "it holds no rows (an empty list, or only blank lines)"


class _BadLine(Exception):
    pass


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:  # json.loads keeps the last one silently; `datasets`' reader fails on it
            raise _BadLine(f"key {key!r} appears twice in one object")
        seen.add(key)
    return dict(pairs)


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, value) for each row: the items of a .json file holding one JSON list, else each line."""
    if path.suffix.lower() == ".json":  # one JSON document, read whole, or JSON lines
        text = path.read_text(encoding="utf-8", errors="replace").lstrip("\ufeff")
        try:
            document = json.loads(text, object_pairs_hook=_no_repeated_keys)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("[") and e.msg != "Extra data":  # not a list followed by more lines
                raise _BadLine(f"line {e.lineno} is not valid JSON ({e.msg} at column {e.colno}); fix that line") from e
        else:
            if not isinstance(document, list):
                raise _BadLine(f"it holds one JSON document, {json_kind(document)}, not rows (one object per line, "
                               "or a list of objects)")
            yield from ((f"item {i} of the list", item) for i, item in enumerate(document, 1))
            return
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n").lstrip("\ufeff" if number == 1 else ""),
                                   object_pairs_hook=_no_repeated_keys)
            except _BadLine as e:
                raise _BadLine(f"line {number}: {e}; fix that line") from e
            except json.JSONDecodeError as e:
                raise _BadLine(f"line {number} is not valid JSON ({e.msg} at column {e.colno}); each line of "
                               "a .jsonl file holds one whole object: fix or remove that line") from e
            yield f"line {number}", value


def json_problem(path: Path) -> str | None:
    """The first problem explain_json_failure finds in the JSON file `path`, or in a folder's JSON
    files, named with its file; None where there is none to name."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in JSON_SUFFIXES and p.is_file())
    else:
        files = [path] if path.suffix.lower() in JSON_SUFFIXES and path.is_file() else []
    for file in files:
        problem = explain_json_failure(file)
        if problem:
            folder = ("; every .json and .jsonl file in a --dataset folder is read as rows: move it out, or pass "
                      "the data file itself" if path.is_dir() else "")
            return f"{file}: {problem}{folder}"
    return None
