"""Tests run offline: hub downloads must never be attempted. Set before datasets/transformers import.

`--mixed-precision auto` is pinned to fp32, so no test depends on whether this CPU has fast
bf16; tests/test_precision.py unpins it to exercise every branch of the decision."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MMFUSION_AUTO_PRECISION", "no")
