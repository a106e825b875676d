"""Imports run one way: models <- data <- evaluation <- training <- CLI (and benchmarks, notebooks,
the entry scripts in training/ above all of them). Every import counts, at module level or
inside a function: a lazy import that runs upward is still a loop in the design.

Floors, bottom up. processing (images, prompts, the collator) sits with the models because the
VLM's own `answer(image, question)` builds its prompts and pixels with it.
"""

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmfusion"

FLOORS = [
    {"errors"},
    {"config", "layers", "loss", "metrics", "tokenizer", "weights"},
    {"processing", "vit", "gpt", "adapter", "static_decode", "generation", "vlm"},
    {"hf_checkpoint", "convert", "loading", "export_folder", "export"},
    {"data", "data.captions", "data.columns", "data.easy_vqa", "data.image_keys", "data.json_files", "data.local",
     "data.scenes", "data.splits", "data.vqa"},
    {"evaluation"},
    {"training", "training.args", "training.augment", "training.precision", "training.data", "training.features",
     "training.setup", "training.run_folder", "training.loop", "training.lora", "training.pretrain_vit",
     "training.vqa_config", "training.train_vqa", "training.main", "training.captions"},
    {"cli"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports (relative or absolute, at any depth of the file);
    "" is the package itself."""
    package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).split(".")
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.removeprefix("mmfusion").lstrip(".") for a in node.names
                      if a.name == "mmfusion" or a.name.startswith("mmfusion.")}
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[:len(package) - (node.level - 1)]
            origin = ".".join([*base, *(node.module.split(".") if node.module else [])])
        elif node.module == "mmfusion" or (node.module or "").startswith("mmfusion."):
            origin = node.module.removeprefix("mmfusion").lstrip(".")
        else:
            continue
        for alias in node.names:  # `from pkg import sub` imports the module pkg.sub when there is one
            sub = f"{origin}.{alias.name}" if origin else alias.name
            found.add(sub if sub in known else origin)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def floor_of(name: str) -> int:
    for i, floor in enumerate(FLOORS):
        if name in floor:
            return i
    raise AssertionError(f"mmfusion.{name} is on no floor: add it to FLOORS in {Path(__file__).name}")


def test_every_module_has_a_floor():
    for name in package_modules():
        if name:  # the package's __init__ is the top: it re-exports the public API
            floor_of(name)


def test_no_module_imports_upward():
    upward = [f"mmfusion.{a} (floor {floor_of(a)}) imports mmfusion.{b} (floor {floor_of(b)})"
              for a, targets in import_graph().items() if a for b in targets if b and floor_of(b) > floor_of(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = {a: {b for b in targets if b} for a, targets in import_graph().items() if a}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_graph_sees_lazy_and_relative_imports():
    """The checks above are only as good as the parser: it must see imports inside functions,
    relative ones at every depth, and `from pkg import module`."""
    graph = import_graph()
    assert "training.setup" in graph["training.loop"]  # from .setup import ...
    assert "errors" in graph["data.local"]  # from ..errors import ...
    assert "processing" in graph["data.local"]  # from .. import processing
    assert "training.main" in graph["cli"]  # a function-level import
    assert "convert" in graph[""]  # the package re-exports; convert attaches from_hf


@pytest.mark.parametrize("script", sorted((ROOT / "training").glob("*.py")), ids=lambda p: p.name)
def test_entry_scripts_only_call_into_the_package(script):
    tree = ast.parse(script.read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {f"mmfusion.training.{script.stem}"}, imported


@pytest.mark.slow
@pytest.mark.parametrize("how", [["-m", "training.train_vqa"], ["training/pretrain_vit.py"]], ids=["module", "path"])
def test_entry_scripts_run_from_the_repo_root(how):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, *how, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--output-dir" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("how", [["-m", "training.main", "--vit-epochs", "nan"], ["training/train_vqa.py", "--lr", "nan"]],
                         ids=["module", "path"])
def test_entry_scripts_report_bad_input_in_one_line_as_the_command_does(how, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, *how, "--output-dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"mmfusion: error: {how[-2]} must be positive (a finite number), got nan"]
    assert not (tmp_path / "out").exists()


def test_training_is_not_installed_as_a_top_level_package():
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert found["include"] == ["mmfusion*"]
    assert not (ROOT / "training" / "__init__.py").exists()
