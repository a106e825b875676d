"""Strip outputs from notebooks before they go into git.

    python notebooks/strip.py              # every notebooks/*.ipynb, in place
    python notebooks/strip.py --check      # exit 1 and name the notebooks that still hold outputs
    python notebooks/strip.py a.ipynb ...  # just these

Stripped means: no outputs, no execution counts, no per-cell execution timing, no widget state.
The cell sources and the notebook's kernelspec stay as they are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
CELL_METADATA_DROPPED = ("execution", "collapsed", "scrolled")
NOTEBOOK_METADATA_DROPPED = ("widgets",)


def strip(nb: nbformat.NotebookNode) -> bool:
    """Strip `nb` in place; return whether anything changed."""
    changed = False
    for key in NOTEBOOK_METADATA_DROPPED:
        changed |= nb.metadata.pop(key, None) is not None
    for cell in nb.cells:
        for key in CELL_METADATA_DROPPED:
            changed |= cell.metadata.pop(key, None) is not None
        if cell.cell_type != "code":
            continue
        if cell.outputs or cell.execution_count is not None:
            cell.outputs, cell.execution_count = [], None
            changed = True
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: every notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any notebook holds outputs")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(HERE.glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if strip(nb):
            dirty.append(path)
            if not args.check:
                nbformat.write(nb, path)
    for path in dirty:
        print(f"{path}: {'holds outputs; run `make strip`' if args.check else 'stripped'}")
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())
