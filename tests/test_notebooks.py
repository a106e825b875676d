"""The notebooks run headless, top to bottom, and are committed without outputs.

Each notebook executes in a fresh kernel running this interpreter (`sys.executable`, so the
venv's packages), in a temporary working folder, with the notebooks' tiny settings
(MMFUSION_NB_FAST=1) and their outputs under a temporary MMFUSION_NB_OUT. Any cell error
fails the test with the cell's traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXECUTED = ["01_pretrain_vit.ipynb", "02_vqa_finetune.ipynb", "03_captions_and_answers.ipynb"]
KERNEL_NAME = "mmfusion-test"


def kernel_manager(kernels_dir: Path, env: dict[str, str]):
    """A KernelManager for a kernelspec written just now, pointing at this interpreter.

    The default "python3" spec may resolve to another Python (a user-level kernelspec, or
    "python" on PATH when the venv is not activated); an explicit spec cannot.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = kernels_dir / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "mmfusion test kernel", "language": "python", "env": env}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels_dir)]))


def execute(name: str, workdir: Path, out: Path, **extra_env: str) -> tuple[nbformat.NotebookNode, float]:
    """Run notebooks/`name` in `workdir` (`extra_env` added to its environment); returns the
    executed notebook and its wall time."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = {"MMFUSION_NB_FAST": "1", "MMFUSION_NB_OUT": str(out), "HF_HUB_OFFLINE": "1",
           # One intra-op thread unless the caller asks for more: these models are tiny, and on a
           # shared CPU two spinning OpenMP threads ran a ViT step 10-15x slower than one.
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # inline figures become image/png outputs, whatever backend the calling environment picked
           "MPLBACKEND": "module://matplotlib_inline.backend_inline", **extra_env}
    km = kernel_manager(workdir / "kernels", env)
    client = NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return nb, time.perf_counter() - start


def images_in(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(scope="module")
def notebook_out(tmp_path_factory):
    """One output folder for the module, so notebook 02 finds the ViT that 01 saved."""
    return tmp_path_factory.mktemp("notebook_runs")


@pytest.mark.slow
def test_01_pretrain_vit_runs(notebook_out, tmp_path):
    nb, seconds = execute("01_pretrain_vit.ipynb", tmp_path, notebook_out)
    print(f"01_pretrain_vit.ipynb: {seconds:.0f}s")
    assert (notebook_out / "vit" / "model" / "model.safetensors").exists()
    assert images_in(nb) >= 4  # examples, curves, misclassified, attention maps (and heads)
    assert not list(tmp_path.glob("runs")), "the notebook wrote into its working folder, not MMFUSION_NB_OUT"


@pytest.mark.slow
def test_02_vqa_finetune_runs(notebook_out, tmp_path):
    # Reuses notebook 01's ViT when that test ran first; otherwise the notebook trains a quick one.
    nb, seconds = execute("02_vqa_finetune.ipynb", tmp_path, notebook_out)
    print(f"02_vqa_finetune.ipynb: {seconds:.0f}s")
    assert (notebook_out / "vqa" / "model" / "model.safetensors").exists()
    predictions = (notebook_out / "vqa" / "predictions.jsonl").read_text().splitlines()
    assert predictions and json.loads((notebook_out / "vqa" / "metrics.json").read_text())["count"] == len(predictions)
    assert images_in(nb) >= 3  # curves, answer grid, our own image


@pytest.mark.slow
def test_03_captions_and_answers_runs(notebook_out, tmp_path):
    # No saved captions model under the temporary working folder: the notebook trains a tiny one.
    nb, seconds = execute("03_captions_and_answers.ipynb", tmp_path, notebook_out)
    print(f"03_captions_and_answers.ipynb: {seconds:.0f}s")
    assert (notebook_out / "captions" / "model" / "model.safetensors").exists()
    assert (notebook_out / "my_image.png").exists()
    # caption grid, answered scenes, sampled image, own image, attention maps, image share per block
    assert images_in(nb) >= 6
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "matches the model" in text and "seed 0 again" in text
    assert not list(tmp_path.glob("runs")), "the notebook wrote into its working folder, not MMFUSION_NB_OUT"


@pytest.mark.slow
def test_03_with_a_late_fusion_model_runs(tmp_path):
    """The same notebook on a cross-fusion model it trains itself: captions, answers, sampling,
    and the attention maps from the cross-attention blocks, recomputed and checked."""
    out = tmp_path / "out"
    nb, seconds = execute("03_captions_and_answers.ipynb", tmp_path, out, MMFUSION_NB_FUSION="cross")
    print(f"03_captions_and_answers.ipynb (cross fusion): {seconds:.0f}s")
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "cross fusion, cross-attention before blocks" in text
    assert "cross-attention blocks: matches the model" in text and "seed 0 again" in text
    assert images_in(nb) >= 6


def test_committed_notebooks_have_no_outputs():
    found = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert set(EXECUTED) <= set(found), f"missing notebooks: {sorted(set(EXECUTED) - set(found))}"
    for name in found:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{name} cell {i} holds outputs; run `make strip` (python notebooks/strip.py) before committing")
        assert "widgets" not in nb.metadata, f"{name} holds widget state; run `make strip`"


def test_every_notebook_is_executed_here():
    """A new notebook must join EXECUTED (and get a test above) so CI runs it."""
    found = {p.name for p in NOTEBOOKS.glob("*.ipynb")}
    assert found <= set(EXECUTED), f"notebooks no test executes: {sorted(found - set(EXECUTED))}"


def test_kernelspec_points_at_this_interpreter(tmp_path):
    km = kernel_manager(tmp_path / "kernels", {})
    assert km.kernel_spec.argv[0] == sys.executable
    assert os.path.exists(km.kernel_spec.argv[0])
