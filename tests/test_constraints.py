"""constraints.txt, which `make run` and `make test` install with, against pyproject's floors."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def pins() -> dict[str, Version]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            found[canonicalize_name(name)] = Version(version)
    return found


def test_every_runtime_dependency_is_pinned_within_its_floor():
    pinned = pins()
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == "torch":  # TORCH pins it, so a GPU user's build is not overridden
            assert name not in pinned
            continue
        assert name in pinned, f"{name} is a dependency but constraints.txt does not pin it: run make lock"
        assert req.specifier.contains(pinned[name]), f"constraints.txt pins {name} {pinned[name]}, outside {req}"


def test_the_makefile_installs_with_the_constraints_and_lets_them_be_dropped():
    # a dry run of make prints the commands: both installs of mmfusion carry -c, and CONSTRAINTS= drops it
    def commands(*args):
        out = subprocess.run(["make", "-n", "-B", "-f", str(ROOT / "Makefile"), "-C", str(ROOT), *args, "setup"],
                             capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if re.search(r"pip install .*-e ", line)]

    pinned = commands()
    assert len(pinned) == 2 and all(line.endswith("-c constraints.txt") for line in pinned)
    assert all("-c " not in line for line in commands("CONSTRAINTS="))


def test_the_lock_script_pins_what_the_package_pulls_in_and_leaves_torch_to_make():
    import runpy

    closure = runpy.run_path(str(ROOT / ".ci" / "lock.py"))["closure"]("mmfusion")
    assert "torch" not in closure and {"transformers", "accelerate", "datasets", "numpy", "pyarrow"} <= set(closure)
    missing = sorted(set(closure) - set(pins()))
    assert not missing, f"installed with mmfusion but not in constraints.txt: {missing}; run make lock"
