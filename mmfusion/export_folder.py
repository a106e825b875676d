"""An export folder: written aside, moved into place whole, an earlier export replaced exactly.

An export lists what it wrote at the top of its folder in MARKER; a later export into the same
folder replaces or removes exactly those entries, and refuses to replace anything else there (a
training run's vit/, a user's README.md). A failure at any point, even halfway through the final
moves, leaves the folder as it was; what an export killed outright left behind, the next export
into the folder clears first, putting the earlier export back where the kill came mid-move.
Hidden folders are named for their process and machine (.export-PID.HOST-*): on a folder shared
between machines, a process id says nothing about another machine's export.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ConfigError
from .weights import EXPORT_MARKER, check_writable, is_mmfusion_folder, read_json

# What an export writes at the top of its folder: a VLM's parts, or a GPT's / ViT's transformers files.
VLM_PARTS = ("llava", "gpt2", "vit", "adapter", "README.md")
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
            "preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")
SHARDS = "model-*-of-*.safetensors"
MARKER = EXPORT_MARKER


def is_export_entry(name: str) -> bool:
    return name in VLM_PARTS or name in HF_FILES or fnmatch.fnmatch(name, SHARDS)


def write_folder(folder: Path, planned: Iterable[str], write: Callable[[Path], list[str]]) -> list[str]:
    """Run write(staging) into a new hidden folder inside `folder`, then move what it wrote into
    `folder` (move_in); returns write's notes and move_in's. `planned` (the names it will write)
    is checked against `folder` before any work. A folder holding a saved mmfusion model is
    refused (ConfigError): the transformers files have the same names."""
    check_writable(folder, "--output", folder=True)
    if is_mmfusion_folder(folder):
        raise ConfigError(f"{folder} holds a saved mmfusion model, which the export would overwrite: choose "
                          "another folder (a new one, or an earlier export)")
    cleared = remove_stopped_exports(folder) if folder.is_dir() else []  # may restore the earlier export
    refuse_clash(folder, planned, earlier_export(folder))  # before any work; again once the names are known
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".export-{owner_tag()}-", dir=folder))
    try:
        notes = cleared + write(staging)
        entries = sorted(p.name for p in staging.iterdir())
        (staging / MARKER).write_text(json.dumps({"entries": entries}) + "\n")
        notes += move_in(staging, folder, [*entries, MARKER])
    except BaseException:
        shutil.rmtree(folder if created else staging, ignore_errors=True)
        raise
    staging.rmdir()
    return notes


def remove_stopped_exports(folder: Path) -> list[str]:
    """Clear what an export killed before it could clean up (SIGKILL, power loss) left in `folder`:
    its hidden staging folder (.export-PID.HOST-*: a whole model's weights, kept forever out of sight)
    and, when it died moving its files in, the earlier export it had set aside (.export-old-PID.HOST-*),
    which goes back in place of the files it had moved in: the folder is as it was before that
    export. (Its MARKER moves in last: a staging folder still holding it had not finished.) Only
    for a process of this machine that no longer runs (names without HOST, from before it was
    added, count as this machine's); another machine's are left, with a note. Returns a note for
    each stopped export and each other machine's."""
    stopped: dict[int, list[Path]] = {}
    elsewhere = []
    here = host_tag()
    for entry in sorted(folder.iterdir()):
        owner = export_owner(entry.name)
        if owner is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid, host = owner
        if host is not None and host != here:
            elsewhere.append(entry.name)
        elif not process_runs(pid):
            stopped.setdefault(pid, []).append(entry)
    notes = []
    for pid, entries in stopped.items():
        asides = [e for e in entries if e.name.startswith(".export-old-")]
        stagings = [e for e in entries if e not in asides]
        unfinished = bool(asides) and all((s / MARKER).exists() for s in stagings)
        if unfinished:  # what it moved in goes (its staging's MARKER lists it), the earlier export returns
            for staging in stagings:
                for name in [*listed(staging), MARKER]:
                    if not os.path.lexists(staging / name) and os.path.lexists(folder / name):
                        remove(folder / name)
            for aside in asides:
                for entry in sorted(aside.iterdir()):
                    if (entry.name == MARKER or is_export_entry(entry.name)) and not os.path.lexists(folder / entry.name):
                        os.replace(entry, folder / entry.name)
        for entry in entries:
            shutil.rmtree(entry, ignore_errors=True)
        done = ("put back the earlier export it was replacing" if unfinished else
                "its files were all in place; removed what it had set aside" if asides else
                "removed the files it had written")
        notes.append(f"an export into {folder} was stopped before it finished (process {pid} is gone): {done}")
    if elsewhere:
        notes.append(f"left {', '.join(elsewhere)} in {folder}: an export from another machine, running or stopped "
                     "(its process cannot be checked from here); once no export into the folder runs, remove it by hand")
    return notes


def owner_tag() -> str:
    """This process's part of a hidden folder's name: PID.HOST."""
    return f"{os.getpid()}.{host_tag()}"


def host_tag() -> str:
    """Eight hex digits naming this machine (its host name hashed: host names hold dashes and dots)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def export_owner(name: str) -> tuple[int, str | None] | None:
    """(process id, host tag or None) from an export's hidden folder name (.export-PID.HOST-x,
    .export-old-PID.HOST-x; .export-PID-x from before the host tag), else None."""
    rest = name.removeprefix(".export-old-") if name.startswith(".export-old-") else name.removeprefix(".export-")
    owner, dash, _ = rest.partition("-")
    pid, dot, host = owner.partition(".")
    tagged = len(host) == 8 and all(c in "0123456789abcdef" for c in host)
    ascii_pid = pid.isascii() and pid.isdigit() and 0 < int(pid) < 2**31  # os.kill takes a C int; 0 is the group
    if rest == name or not dash or not ascii_pid or (dot and not tagged):
        return None
    return int(pid), (host if dot else None)


def process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


def listed(folder: Path) -> list[str]:
    """The entries `folder`'s MARKER lists (export-layout names only; [] without a readable one:
    a FIFO or a huge file under its name is not read, so the export neither blocks nor stalls)."""
    try:
        data = read_json(folder / MARKER, ConfigError)
    except (ConfigError, OSError):
        return []
    entries = data.get("entries") if isinstance(data, dict) else None
    return [e for e in entries if isinstance(e, str) and is_export_entry(e)] if isinstance(entries, list) else []


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def earlier_export(folder: Path) -> set[str]:
    """The entries an earlier export into `folder` listed in its MARKER (export-layout names only)."""
    return set(listed(folder))


def refuse_clash(folder: Path, names: Iterable[str], earlier: set[str]) -> None:
    """A ConfigError if `folder` holds one of `names` that no earlier export wrote."""
    clash = [n for n in names if n != MARKER and os.path.lexists(folder / n) and n not in earlier]
    if clash:
        shown = ", ".join(f"{n}/" if (folder / n).is_dir() else n for n in clash[:4])
        raise ConfigError(f"--output {folder} already holds {shown}, which no mmfusion export wrote there (a training "
                          "run's folder, your own files, or an export from before exports listed their files); the "
                          "export would replace it: choose a new folder, or remove it first")


def move_in(staging: Path, folder: Path, new: list[str]) -> list[str]:
    """Put `staging`'s entries (`new`) in `folder` in place of an earlier export's; a note names the
    earlier entries removed. The earlier ones are moved aside first and moved back if anything fails."""
    earlier = earlier_export(folder)
    refuse_clash(folder, new, earlier)
    old = sorted(n for n in earlier | {MARKER} if os.path.lexists(folder / n))
    stale = [f"{n}/" if (folder / n).is_dir() else n for n in old if n not in new]
    aside = Path(tempfile.mkdtemp(prefix=f".export-old-{owner_tag()}-", dir=folder))
    moved: list[str] = []
    placed: list[str] = []
    try:
        for name in old:
            os.replace(folder / name, aside / name)
            moved.append(name)
        for name in new:
            os.replace(staging / name, folder / name)
            placed.append(name)
    except BaseException:
        for name in placed:
            os.replace(folder / name, staging / name)
        for name in moved:
            os.replace(aside / name, folder / name)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside)
    if not stale:
        return []
    return [f"removed the earlier export's {', '.join(stale)} from {folder}: this export does not write it, "
            "and left there it would hold the earlier model"]
