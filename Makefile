# Two commands do everything (see README Quickstart):
#   make run    set up .venv, then run the main job (pretrain ViT, fine-tune VQA, evaluate)
#   make test   set up .venv, then run the whole test suite
# TORCH pins torch; a GPU user overrides it: make run TORCH=2.9.1 (or any torch spec). On the project's
# machines pip's config finds a local CPU wheel of 2.13.0; elsewhere PyPI's Linux wheel is the CUDA
# build, and TORCH_INDEX=https://download.pytorch.org/whl/cpu fetches the CPU one instead.
PYTHON ?= python3
TORCH ?= 2.13.0
TORCH_INDEX ?=
# The exact releases the README's numbers came from (.ci/lock.py writes it); CONSTRAINTS= drops it.
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
VENV := .venv
PY := $(VENV)/bin/python
OUT ?= runs/main

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test lint bench strip lock clean

# The main job needs only the package; the tests and notebooks add their tools (~20 s more).
$(VENV)/.core: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e . $(PIN)
	touch $@

$(VENV)/.installed: $(VENV)/.core
	$(PY) -m pip install --quiet -e ".[dev,notebooks]" $(PIN)
	touch $@

setup: $(VENV)/.installed

run: $(VENV)/.core
	$(VENV)/bin/mmfusion main --output-dir $(OUT)

# pytest-xdist: one worker per core, at most 8 (each holds its own torch and models in memory), each
# with its share of the threads (tests/conftest.py); a test file stays on one worker so its module
# fixtures are built once. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(8, len(os.sched_getaffinity(0))))")

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/run.py

# After changing a dependency: rebuild without the old pins, then write the new ones.
lock:
	rm -rf $(VENV)
	$(MAKE) setup CONSTRAINTS=
	$(PY) .ci/lock.py

# Notebooks go into git without outputs (tests/test_notebooks.py checks it).
strip: setup
	$(PY) notebooks/strip.py

clean:
	rm -rf $(VENV) runs
