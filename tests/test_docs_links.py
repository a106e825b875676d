"""Every relative link in the README, docs/, the benchmark pages and the notebooks' text points at
a file that exists and, with #anchor, at a heading in it (GitHub's anchors: lower case, punctuation
dropped, spaces to hyphens); the repository paths those pages name in backticks exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
LINK = re.compile(r"\]\(([^)\s]+)\)")
# `mmfusion/training/loop.py`, `benchmarks/run.py`: a path into the repository with a file suffix
REPO_PATH = re.compile(r"`((?:mmfusion|training|benchmarks|tests|notebooks|docs)/[\w./-]*\.(?:py|md|ipynb|json))`")


def text(page: Path) -> str:
    """A page's prose: a markdown file, or the markdown cells of a notebook."""
    if page.suffix == ".ipynb":
        cells = json.loads(page.read_text())["cells"]
        return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return page.read_text()


def anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(page_text: str) -> list[str]:
    """Markdown headings, not the `# comment` lines of fenced code blocks."""
    found, fenced = [], False
    for line in page_text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.append(line.lstrip("#"))
    return found


def anchors(page: Path) -> set[str]:
    return {anchor(h) for h in headings(text(page))}


def test_anchor_follows_github():
    assert anchor("2026-12-01 Stage 2 draws answers balanced: every seed") == (
        "2026-12-01-stage-2-draws-answers-balanced-every-seed")
    assert anchor("Mimetic attention init: stage 1 learns faster than transformers' ViT") == (
        "mimetic-attention-init-stage-1-learns-faster-than-transformers-vit")


def test_code_comments_are_not_headings():
    page = "# Title\n\n```bash\n# many processes: 2 CPU processes\nmake run\n```\n\n## Results\n"
    assert headings(page) == [" Title", " Results"]


@pytest.mark.parametrize("page", MARKDOWN + NOTEBOOKS, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(text(page)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no file {path})")
        elif fragment and linked.suffix in (".md", ".ipynb") and fragment not in anchors(linked):
            broken.append(f"{target} (no heading #{fragment} in {linked.name})")
    assert not broken, f"{page.name}: " + "; ".join(broken)


# Dated records (docs/*.md) keep the paths of their date; docs/experiments.md says where files moved.
@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted((ROOT / "benchmarks").glob("*.md")), *NOTEBOOKS],
                         ids=lambda p: p.name)
def test_named_repository_paths_exist(page):
    missing = sorted({p for p in REPO_PATH.findall(text(page)) if not (ROOT / p).exists()})
    assert not missing, f"{page.name} names files that do not exist: {', '.join(missing)}"
