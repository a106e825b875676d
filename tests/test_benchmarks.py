"""The benchmark script runs end to end on tiny shapes (no timing is asserted), so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mmfusion.tokenizer import get_tokenizer

pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    """benchmarks/<name>.py as a module, loaded as `python benchmarks/<name>.py` runs it: with its
    folder first on sys.path, since the scripts import their sibling modules (timing, models, ...)
    by bare name. Those stay in sys.modules; the folder leaves sys.path again."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        spec = importlib.util.spec_from_file_location(f"mmfusion_bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


def load_runner():
    return load_script("run")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    bench = load_runner()
    out = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    run = bench.main(["--smoke", "--out", str(out), "--notes", str(out.parent / "none.md")])
    return bench, run, out


@pytest.mark.slow
def test_every_benchmark_produces_its_rows(smoke):
    _, run, _ = smoke
    by_section: dict[str, list] = {}
    for row in run.rows:
        by_section.setdefault(row.section, []).append(row)
    assert set(by_section) == {"machine", "vit", "decode", "vlm", "mfu", "memory", "data", "gpu"}
    gpu = by_section["gpu"]  # the GPU section's code on tiny CPU shapes: what a GPU run will execute
    assert [r.metric for r in gpu[:4]] == ["peak GFLOP/s", "peak GFLOP/s", "train samples/s",
                                          "% of measured bf16 matmul peak (MFU)"]
    compiled = [r for r in gpu if r.case.endswith("torch.compile")]  # the gpu-compile section, after decoding
    assert [r.metric for r in compiled] == ["train samples/s", "% of measured bf16 matmul peak (MFU)"]
    assert "backend aot_eager" in compiled[0].note and all(r.ref > 0 for r in compiled)
    assert sum(r.metric == "peak GFLOP/s" for r in gpu) == 2  # measured once for both GPU sections
    decode = [r for r in gpu if "decode" in r.case]
    assert len(decode) == 6 and all("transformers' tokens: yes" in r.note for r in decode)
    assert {r.case.rsplit(", ", 1)[1] for r in decode} == {"eager", "static", "compiled"}
    assert len(by_section["machine"]) == 3  # fp32 peak, bf16 peak, copy bandwidth
    assert {(r.dtype, r.metric) for r in by_section["vit"]} == {
        ("fp32", "train images/s (fwd+bwd+AdamW)"), ("bf16", "train images/s (fwd+bwd+AdamW)")}
    decode_metrics = {r.metric for r in by_section["decode"]}
    assert decode_metrics == {"tokens/s (end to end)", "time to first token ms", "ms per decoded token",
                              "% of memory-bandwidth bound"}
    assert len(by_section["decode"]) == 4 * 2 + 1  # two batch sizes; batch 1 with the compiled decoder too
    compiled = [r for r in by_section["decode"] if r.case.endswith("compiled decoder")]
    assert len(compiled) == 1 and "same tokens as transformers: yes" in compiled[0].note
    assert {r.dtype for r in by_section["vlm"]} == {"fp32", "bf16"}
    assert len(by_section["mfu"]) == 4  # ViT fp32/bf16, VLM fp32/bf16
    assert len(by_section["memory"]) == 3 * 2  # ViT, VLM, decode; above imports and whole process
    assert len(by_section["data"]) == 3
    # Every comparison row has both sides; the transformers side generated the same tokens.
    for row in run.rows:
        if row.section != "machine" and "matmul" not in row.case:  # a machine's peak has no other side
            assert row.ref is not None, row
    assert all("same tokens as transformers: yes" in r.note for r in by_section["decode"]
               if r.metric == "tokens/s (end to end)")


@pytest.mark.slow
def test_numbers_are_finite_and_positive(smoke):
    _, run, _ = smoke
    for row in run.rows:
        for value in (row.ours, row.ref, row.ratio):
            if value is not None:
                assert math.isfinite(value) and value > 0, row


@pytest.mark.slow
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


def test_a_run_cut_short_keeps_the_sections_it_finished(tmp_path, monkeypatch):
    """The report is rewritten after every section, so a time limit (a lent GPU's) loses only
    the section it cut, and the report says which did not run."""
    bench = load_runner()

    def cut(run, s):
        raise KeyboardInterrupt  # as a time limit's signal would stop the run

    monkeypatch.setitem(bench.SECTIONS, "data", cut)
    out = tmp_path / "r.md"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--smoke", "--only", "machine,data", "--out", str(out)])
    text = out.read_text()
    assert "## Machine limits" in text and "**Partial: written before data ran" in text
    assert json.loads(out.with_suffix(".json").read_text())["unfinished"] == ["data"]
    assert not list(tmp_path.glob("*.tmp"))
    bench.main(["--smoke", "--only", "machine", "--out", str(out)])
    assert "Partial" not in out.read_text()


def test_the_gpu_section_alone_writes_its_own_report_and_leaves_the_cpu_one():
    bench = load_runner()
    gpu_only = bench.parse_args(["--only", "gpu", "--device", "cpu"])[0].out
    assert Path(gpu_only).name == "RESULTS_gpu.md" and Path(gpu_only).parent == BENCHMARKS
    assert Path(bench.parse_args(["--only", "gpu,gpu-compile", "--device", "cpu"])[0].out).name == "RESULTS_gpu.md"
    assert Path(bench.parse_args(["--only", "gpu,data", "--device", "cpu"])[0].out).name == "RESULTS.md"
    assert Path(bench.parse_args(["--device", "cpu"])[0].out).name == "RESULTS.md"
    assert Path(bench.parse_args(["--smoke"])[0].out).name == "RESULTS.md"  # every section, GPU one on the CPU
    assert bench.parse_args(["--only", "gpu", "--out", "x.md"])[0].out == "x.md"


def test_gpu_decode_rows_say_where_the_tokens_part():
    gpu = load_script("gpu")
    assert gpu.agreeing_tokens([1, 2, 3], [1, 2, 3]) == 3 and gpu.agreeing_tokens([1, 5, 3], [1, 2, 3]) == 1
    assert gpu.tokens_note(128, 128, "bf16") == "transformers' tokens: yes"
    assert gpu.tokens_note(6, 128, "bf16").startswith("transformers' tokens for the first 6 of 128")
    assert gpu.tokens_note(6, 128, "fp32") == "transformers' tokens: NO, they part at token 6"


def test_cuda_graph_recordings_are_counted_and_the_patch_is_undone():
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

    gpu = load_script("gpu")
    original = CUDAGraphTreeManager.record_function
    recordings = gpu.CudaGraphRecordings()
    assert CUDAGraphTreeManager.record_function is not original
    recordings.original = lambda manager, *args, **kwargs: "recorded"  # no GPU here: a stand-in recorder
    assert CUDAGraphTreeManager.record_function(None, "step") == "recorded"
    recordings.original = original
    assert recordings.stop().startswith("CUDA graph recordings while timed: 1")
    assert CUDAGraphTreeManager.record_function is original


@pytest.mark.slow
@pytest.mark.parametrize("caps", ["on", "off"])
def test_bf16_caps_follow_the_decision_either_way(caps, smoke, tmp_path):
    """The capped bf16 cases run where bf16 is slow (AVX2-only CPUs); both branches run on any machine:
    the smoke run's auto decision took one of them, whose rows are checked there, and `--bf16-caps`
    forces the other (a second run of the vit and vlm sections took 6 s)."""
    bench, smoke_run, _ = smoke
    forced = bench.main(["--smoke", "--only", "machine", "--bf16-caps", caps, "--out", str(tmp_path / "m.md")])
    assert forced.slow_bf16 is (caps == "on")  # the flag decides, whatever this machine's peaks say
    if smoke_run.slow_bf16 is (caps == "on"):
        run = smoke_run
    else:
        run = bench.main(["--smoke", "--only", "vit,vlm", "--bf16-caps", caps, "--out", str(tmp_path / "r.md")])
    vit = {r.dtype: r for r in run.rows if r.section == "vit"}
    vlm = {r.dtype: r for r in run.rows if r.section == "vlm"}
    batch_fp32, batch_bf16 = (int(r.note.split()[1].rstrip(";")) for r in (vit["fp32"], vit["bf16"]))
    if caps == "on":
        assert batch_bf16 < batch_fp32 and "(bf16 cap)" in vlm["bf16"].note
    else:
        assert batch_bf16 == batch_fp32 and "cap" not in vlm["bf16"].note + vit["bf16"].note
    assert "cap" not in vlm["fp32"].note


def test_bf16_caps_auto_compares_the_measured_peaks():
    Run = load_script("results").Run
    assert Run(smoke=True, machine={"bf16_peak": 1.3, "fp32_peak": 50.0}).bf16_is_slow()  # AVX2-only, 2026-11-22
    assert not Run(smoke=True, machine={"bf16_peak": 428.0, "fp32_peak": 197.0}).bf16_is_slow()  # AVX512-BF16


def load_text_qa():
    return load_script("scenes_text_qa")


class _Oracle(torch.nn.Module):
    """Hidden state = one-hot of the next input token (or of `wrong` at the last real position),
    lm_head = identity: the argmax is the next token, so every answer token is right."""

    def __init__(self, wrong_rows=()):
        super().__init__()
        self.wrong_rows = set(wrong_rows)
        self.lm_head = torch.nn.Identity()

    def hidden_states(self, input_ids, attention_mask):
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        for r in self.wrong_rows:
            last = int(attention_mask[r].sum()) - 2  # the position that predicts the final EOT
            nxt[r, last] = 0
        return torch.nn.functional.one_hot(nxt, 50257).float()


def test_text_qa_counts_an_answer_only_when_every_token_is_the_argmax():
    qa = load_text_qa()
    rows = qa.examples("test", 2, with_caption=True)[:3]
    assert all(r["ids"][-1] == 50256 and r["labels"][-1] == 50256 for r in rows)  # answers end with EOT
    first = rows[0]
    prompt = get_tokenizer().decode([t for t, lab in zip(first["ids"], first["labels"]) if lab == -100])
    assert prompt.startswith("Caption: a ") and f"\nQuestion: {first['question']}\nAnswer:" in prompt
    loss, hits = qa.loss_and_hits(_Oracle(), rows)
    assert hits == [True, True, True] and math.isfinite(loss.item())
    _, hits = qa.loss_and_hits(_Oracle(wrong_rows=[1]), rows)  # row 1 misses only its EOT
    assert hits == [True, False, True]
    no_caption = qa.examples("test", 1, with_caption=False)[0]
    assert get_tokenizer().decode(no_caption["ids"]).startswith("Question: ")


def test_text_qa_runs_and_tables_both_models(tmp_path, capsys):
    qa = load_text_qa()
    predictions = tmp_path / "predictions.jsonl"
    rows = [{"question": "is there a red circle?", "prediction": "Yes.", "answers": ["yes"]},  # normalized
            {"question": "is there a blue square?", "prediction": "yes", "answers": ["no"]},
            {"question": "what shape is at the top left?", "prediction": "circle", "answers": ["circle"]}]
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = qa.main(["--steps", "4", "--eval-every", "2", "--train-scenes", "8", "--test-scenes", "4",
                      "--batch-size", "4", "--init-std", "0.1", "--predictions", str(predictions)])
    assert [s for s, _ in result["curve"]] == [2, 4]
    assert result["image_by_template"] == {"is there a C S?": {"accuracy": 0.5, "count": 2},
                                           "what shape is at the P?": {"accuracy": 1.0, "count": 1}}
    assert sum(m["count"] for m in result["by_template"].values()) == 24  # 4 scenes x 6 questions
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in result["by_template"].values())
    table = capsys.readouterr().out
    assert "| is there a C S? |" in table and "50.0% (2)" in table
    with pytest.raises(SystemExit, match="not a predictions.jsonl"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"caption": "x"}) + "\n")
        qa.main(["--steps", "1", "--train-scenes", "2", "--test-scenes", "1", "--batch-size", "2",
                 "--predictions", str(bad)])


@pytest.mark.slow
def test_loss_benchmark_runs_and_both_sides_agree():
    rows = load_script("loss").main(["--smoke"])
    assert [r["case"].split(",")[0] for r in rows] == ["loss fwd+bwd", "stage-2 training step (fwd+bwd+AdamW)"]
    assert all(r["ref_s"] > 0 and r["ours_s"] > 0 for r in rows)
    assert all(r["loss_diff"] < 1e-5 for r in rows)  # the same loss from the same weights
    assert rows[0]["grad_diff"] < 1e-5


@pytest.mark.slow
def test_stage2_variants_benchmark_runs(tmp_path):
    out = tmp_path / "fusion.json"
    info = load_script("fusion").main(["--smoke", "--out", str(out)])
    assert set(info) == {"early", "early-data-vocab", "cross", "lora8"}
    assert info["early-data-vocab"]["trainable_M"] == info["early"]["trainable_M"]  # the same weights, fewer scored
    assert info["early"]["scored_tokens"] == 50257 and 10 < info["early-data-vocab"]["scored_tokens"] < 100
    assert info["cross"]["context_tokens"] == info["early"]["context_tokens"] - 17  # no image slots
    assert info["lora8"]["trainable_M"] < info["early"]["trainable_M"] / 10
    assert all(r["step_ms"] > 0 and r["decode_tokens_per_s"] > 0 for r in info.values())
    assert json.loads(out.read_text())["results"] == info


@pytest.mark.slow
def test_attention_benchmark_runs_and_both_sides_agree():
    rows = load_script("attention").main(["--smoke"])
    assert [r["pass"] for r in rows] == ["forward + backward", "forward"]
    assert all(r[f"{side}_s"] > 0 for r in rows for side in ("fp32", "bf16", "mmfusion"))
    train, decode = rows
    assert train["mmfusion_error"] < 1e-2 and train["bf16_error"] < 1e-2  # both round to bf16 once
    assert decode["mmfusion_error"] == decode["bf16_error"]  # decoding stays bf16: the same kernel


@pytest.mark.parametrize("script", ["attention", "loss"])
def test_side_by_side_scripts_refuse_zero_repeats(script, capsys):
    with pytest.raises(SystemExit):
        load_script(script).main(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_the_vlm_benchmarks_feed_mmfusion_batches_as_training_does():
    """Without the collator's label positions and slot count, mmfusion's forward reads both off
    the device: graph breaks under torch.compile, and a wait every step on a GPU."""
    load_script("run")  # puts the benchmark modules in sys.modules
    models = sys.modules["models"]
    gpu = load_script("gpu")
    s = gpu.gpu_shapes(smoke=True)
    pair = models.vlm_pair(s.vit, s.gpt, adapter=gpu.AdapterConfig(projection="mlp", keep_cls=True))
    batch = models.vlm_batch(s.vit, s.gpt, s.batch, s.text, s.answer, image_tokens=s.vit.num_patches + 1)
    ours = models.for_side(batch, "mmfusion")
    assert models.for_side(batch, "transformers") is batch
    assert ours["slots_per_row"] == s.vit.num_patches + 1 and ours["label_positions"].numel() == s.batch * s.answer
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda b: pair["mmfusion"](**b).loss)(ours)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert torch._dynamo.explain(lambda b: pair["mmfusion"](**b).loss)(batch).graph_break_count > 0  # the plain batch
