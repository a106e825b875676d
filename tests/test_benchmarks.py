"""The benchmark script runs end to end on tiny shapes (no timing is asserted), so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


def load_runner():
    spec = importlib.util.spec_from_file_location("mmfusion_bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    bench = load_runner()
    out = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    run = bench.main(["--smoke", "--out", str(out), "--notes", str(out.parent / "none.md")])
    return bench, run, out


def test_every_benchmark_produces_its_rows(smoke):
    _, run, _ = smoke
    by_section: dict[str, list] = {}
    for row in run.rows:
        by_section.setdefault(row.section, []).append(row)
    assert set(by_section) == {"machine", "vit", "decode", "vlm", "mfu", "memory", "data"}
    assert len(by_section["machine"]) == 3  # fp32 peak, bf16 peak, copy bandwidth
    assert {(r.dtype, r.metric) for r in by_section["vit"]} == {
        ("fp32", "train images/s (fwd+bwd+AdamW)"), ("bf16", "train images/s (fwd+bwd+AdamW)")}
    decode_metrics = {r.metric for r in by_section["decode"]}
    assert decode_metrics == {"tokens/s (end to end)", "time to first token ms", "ms per decoded token",
                              "% of memory-bandwidth bound"}
    assert len(by_section["decode"]) == 4 * 2  # two batch sizes
    assert {r.dtype for r in by_section["vlm"]} == {"fp32", "bf16"}
    assert len(by_section["mfu"]) == 4  # ViT fp32/bf16, VLM fp32/bf16
    assert len(by_section["memory"]) == 3 * 2  # ViT, VLM, decode; above imports and whole process
    assert len(by_section["data"]) == 3
    # Every comparison row has both sides; the transformers side generated the same tokens.
    for row in run.rows:
        if row.section not in ("machine",):
            assert row.ref is not None, row
    assert all("same tokens as transformers: yes" in r.note for r in by_section["decode"]
               if r.metric == "tokens/s (end to end)")


def test_numbers_are_finite_and_positive(smoke):
    _, run, _ = smoke
    for row in run.rows:
        for value in (row.ours, row.ref, row.ratio):
            if value is not None:
                assert math.isfinite(value) and value > 0, row


def test_report_is_written(smoke):
    _, run, out = smoke
    text = out.read_text()
    for heading in ("Machine limits", "1. ViT training step", "2. GPT-2 decoding", "3. VLM fine-tuning step",
                    "4. Utilization", "5. Peak memory", "6. Data pipeline"):
        assert f"## {heading}" in text
    assert "torch " in text and "Load average at start" in text
    assert f"of {sum(r.met is not None for r in run.rows)}." in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["rows"]) == len(run.rows)


def test_only_picks_benchmarks_and_rejects_unknown_names(tmp_path):
    bench = load_runner()
    run = bench.main(["--smoke", "--only", "machine", "--out", str(tmp_path / "r.md")])
    assert {r.section for r in run.rows} == {"machine"}
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--only", "nope", "--out", str(tmp_path / "r.md")])
