"""Write constraints.txt: the exact version of every package the main job installs, read from the
.venv that `make setup` built. `make run` and `make test` install with it, so a fresh clone gets the
environment the README's numbers came from (pip otherwise takes the newest releases the floors
allow, and the main job's digits moved with them on 2026-12-02). torch is left out: TORCH pins it.

    .venv/bin/python .ci/lock.py    # after a setup without constraints: make setup CONSTRAINTS=
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SKIP = {"torch"}  # and what only torch pulls in: a GPU user's torch brings its own


def closure(root: str) -> dict[str, str]:
    """name -> installed version of `root`'s runtime requirements, transitively, extras left out."""
    found: dict[str, str] = {}
    todo = [root]
    while todo:
        dist = metadata.distribution(todo.pop())
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonicalize_name(req.name)
            if name in SKIP or name in found:
                continue
            found[name] = metadata.version(name)
            todo.append(name)
    return found


def main() -> int:
    pins = closure("mmfusion")
    python = ".".join(map(str, sys.version_info[:2]))
    lines = [f"# Written by .ci/lock.py from a .venv on Python {python}: what `make run` and `make test` install.",
             "# `make run CONSTRAINTS=` installs without it (the newest releases pyproject's floors allow).",
             *(f"{name}=={version}" for name, version in sorted(pins.items()))]
    Path(__file__).resolve().parent.parent.joinpath("constraints.txt").write_text("\n".join(lines) + "\n")
    print(f"constraints.txt: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
