"""Training stages end to end on tiny local datasets: stage 1 on parquet and an image folder,
stage 2 on JSON lines with one or several answers, exact resume, and 2-process DDP parity."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmfusion import ViT, ViTConfig
from mmfusion.config import ConfigError
from mmfusion.vlm import VLM

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ["--image-size", "16", "--patch-size", "4", "--n-layer", "2", "--n-head", "2", "--n-embd", "32"]
QUIET = ["--no-progress", "--mixed-precision", "no"]
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def make_image(color: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.full((16, 16, 3), 245, np.uint8)
    y, x = rng.integers(0, 8, size=2)
    arr[y:y + 8, x:x + 8] = COLORS[color]
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    for split, n in (("train", 24), ("test", 8)):
        for color in COLORS:
            (root / split / color).mkdir(parents=True)
            for i in range(n // 2):
                make_image(color, hash((split, color, i)) % 1000).save(root / split / color / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory) -> Path:
    import datasets

    root = tmp_path_factory.mktemp("parquet")
    rows = {"img": [], "kind": []}
    for i in range(16):
        color = list(COLORS)[i % 2]
        path = root / f"{i}.png"
        make_image(color, i).save(path)
        rows["img"].append(str(path))
        rows["kind"].append(color)
    ds = datasets.Dataset.from_dict(rows)
    ds.to_parquet(str(root / "train.parquet"))
    return root / "train.parquet"


@pytest.fixture(scope="module")
def vqa_jsonl(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vqa")
    (root / "images").mkdir()
    with open(root / "data.jsonl", "w") as f:
        for i in range(24):
            color = list(COLORS)[i % 2]
            make_image(color, i).save(root / "images" / f"{i}.png")
            answers = [color] * 8 + ["purple", "pink"] if i % 3 else [color]  # one or ten answers
            f.write(json.dumps({"image": f"images/{i}.png", "question": "what color is the square?",
                                "answers": answers}) + "\n")
    return root / "data.jsonl"


def run_stage(module: str, args: list[str], env: dict | None = None, launcher: list[str] | None = None):
    """The stage's entry script in a subprocess: for what needs processes of its own (a launch of
    several, an environment set before torch starts)."""
    cmd = (launcher or [sys.executable]) + [str(ROOT / "training" / f"{module}.py")] + args
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    result = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_here(module: str, args: list[str]) -> str:
    """The stage's main in this process, as its entry script calls it (test_architecture runs the
    scripts themselves); returns what the run printed. A subprocess paid Python's and torch's
    start-up and first-run costs again, 3-8 s a run, for runs of under a second."""
    import contextlib
    import importlib
    import io

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            importlib.import_module(f"mmfusion.training.{module}").main(args)
    except BaseException:
        sys.stdout.write(printed.getvalue()[-3000:])  # the run's log, in the failing test's report
        raise
    return printed.getvalue()


def test_upscale_note_names_the_native_size_flags():
    import datasets

    from mmfusion.training.pretrain_vit import upscale_note

    def folder(w, h):
        return datasets.Dataset.from_dict({"image": [Image.new("RGB", (w, h))]}, features=datasets.Features(
            {"image": datasets.Image()}))

    assert upscale_note(folder(8, 8), 64, 8) == (
        "note: images are 8x8, upscaled to 64x64; for their own resolution pass --image-size 8 --patch-size 2")
    assert upscale_note(folder(28, 20), 64, 8).endswith("--image-size 28 --patch-size 4")
    assert upscale_note(folder(64, 64), 64, 8) is None and upscale_note(folder(100, 30), 64, 8) is None


@pytest.mark.slow
def test_small_images_are_upscaled_with_a_note(image_folder, tmp_path):
    printed = train_here("pretrain_vit", ["--dataset", str(image_folder), "--output-dir", str(tmp_path / "vit"),
                                          "--max-steps", "1", "--batch-size", "8", *TINY_VIT, "--image-size", "32",
                                          *QUIET])
    assert "note: images are 16x16, upscaled to 32x32; for their own resolution pass --image-size 16 " \
           "--patch-size 4" in printed


@pytest.mark.slow
def test_pretrain_vit_on_image_folder(image_folder, tmp_path):
    out = tmp_path / "vit"
    printed = train_here("pretrain_vit", ["--dataset", str(image_folder), "--output-dir", str(out), "--max-steps", "20",
                                          "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2", *TINY_VIT, *QUIET])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["blue", "red"] and metrics["test_examples"] == 8
    assert metrics["shift"] == 4  # the default for one label per image
    assert metrics["test_accuracy"] == 1.0  # color of a big square: trivially learnable in 20 steps
    assert "upscaled" not in printed and "test accuracy 1.0000 on 8 images" in printed  # 16x16 at --image-size 16
    vit = ViT.from_pretrained(out / "model")
    assert vit.config.num_classes == 2 and vit.config.image_size == 16 and vit.config.class_names == ("blue", "red")
    resolved = json.loads((out / "run_config.json").read_text())
    assert resolved["run"]["max_steps"] == 20 and resolved["stage"]["dataset"] == str(image_folder)
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard logs missing"


@pytest.mark.slow
def test_pretrain_vit_on_parquet_with_custom_columns(parquet_file, tmp_path):
    out = tmp_path / "vit"
    train_here("pretrain_vit", ["--dataset", str(parquet_file), "--eval-split", "train", "--image-column", "img",
                                "--label-column", "kind", "--output-dir", str(out), "--max-steps", "4",
                                "--batch-size", "4", *TINY_VIT, *QUIET])
    assert json.loads((out / "metrics.json").read_text())["classes"] == ["blue", "red"]


def train_tiny_vqa(vqa_jsonl: Path, vit_dir: Path, out: Path, *extra: str) -> str:
    return train_here("train_vqa", ["--dataset", str(vqa_jsonl), "--train-split", "train", "--eval-split", "train",
                                    "--holdout", "0", "--vit", str(vit_dir), "--gpt", "gpt-tiny", "--block-size", "64",
                                    "--output-dir", str(out), "--batch-size", "4", "--warmup-steps", "2",
                                    "--max-new-tokens", "3", *QUIET, *extra])


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tinyvit") / "vit"
    ViT(ViTConfig(image_size=16, patch_size=4, n_layer=2, n_head=2, n_embd=32, num_classes=2)).save_pretrained(path)
    return path


@pytest.mark.slow
def test_train_vqa_on_jsonl_with_one_or_many_answers(vqa_jsonl, tiny_vit_dir, tmp_path):
    out = tmp_path / "vqa"
    train_tiny_vqa(vqa_jsonl, tiny_vit_dir, out, "--max-steps", "30", "--lr", "3e-3", "--no-freeze-vit",
                   "--lr-vit", "1e-3")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["count"] == 24
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {len(r["answers"]) for r in rows} == {1, 10}
    model = VLM.from_pretrained(out / "model")
    assert model.config.vit.num_classes == 0 and model.num_image_tokens == 5  # 4 merged patch tokens + CLS
    # 30 steps on a two-answer task: the model must at least have learned the answer vocabulary.
    assert all(r["prediction"] in ("red", "blue") for r in rows), rows[:4]


@pytest.mark.slow
def test_frozen_vit_is_unchanged_by_stage_two(vqa_jsonl, tiny_vit_dir, tmp_path):
    out = tmp_path / "vqa"
    train_tiny_vqa(vqa_jsonl, tiny_vit_dir, out, "--max-steps", "3")
    before = load_file(tiny_vit_dir / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    for k, v in before.items():
        if not k.startswith("head."):
            assert torch.equal(after[f"vit.{k}"], v), k


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def uneven_vqa(tmp_path_factory) -> Path:
    """Answers of 2 and of 12 supervised tokens (EOT included), so batches of 4 hold different counts."""
    root = tmp_path_factory.mktemp("uneven")
    (root / "images").mkdir()
    with open(root / "data.jsonl", "w") as f:
        for i in range(16):
            color = list(COLORS)[i % 2]
            make_image(color, i).save(root / "images" / f"{i}.png")
            answer = color if i % 3 else f"a large {color} square on a white background near the middle"
            f.write(json.dumps({"image": f"images/{i}.png", "question": "what is it?", "answers": [answer]}) + "\n")
    return root / "data.jsonl"


def uneven_args(uneven_vqa: Path, vit_dir: Path) -> list[str]:
    # AdamW's eps as in the DDP test: updates linear in the gradient, so rounding cannot flip signs
    return ["--dataset", str(uneven_vqa), "--train-split", "train", "--eval-split", "train", "--holdout", "0",
            "--vit", str(vit_dir), "--gpt", "gpt-tiny", "--block-size", "64", "--max-steps", "3",
            "--warmup-steps", "1", "--adam-eps", "1e-2", "--final-eval-limit", "7", "--max-new-tokens", "2", *QUIET]


class UnevenRows(torch.utils.data.Dataset):
    """Rows of 1 to 4 supervised targets (a mask), as stage 2's answers and captions differ in tokens."""

    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
        self.mask = torch.arange(4) < (1 + 3 * (torch.arange(n) % 5 == 0)).unsqueeze(1)  # (n, 4): 1 or 4 targets

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, virtual: int):
        i = virtual % len(self.x)
        return self.x[i], self.y[i], self.mask[i]


def train_uneven(tmp_path: Path, batch_size: int, grad_accum: int, logged: list,
                 backward: list | None = None) -> dict[str, torch.Tensor]:
    from accelerate import Accelerator

    from mmfusion.training.loop import train
    from mmfusion.training.setup import RunConfig

    def step(m, batch):
        x, y, mask = batch
        terms = int(mask.sum())
        loss = ((m(x) - y) ** 2 * mask).sum() / terms  # the mean over this batch's terms
        if backward is not None:
            backward.append([loss.item(), terms])
        return loss, len(x), terms

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    run = RunConfig(output_dir=str(tmp_path / f"b{batch_size}x{grad_accum}"), max_steps=3, batch_size=batch_size,
                    grad_accum=grad_accum, warmup_steps=0, progress=False, lr=0.1, grad_clip=0.5, log_every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)  # updates linear in the gradient
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    accelerator.log = lambda values, step: logged.append(values["train/loss"])
    if backward is not None:  # what each micro-step back-propagates, after its mean
        plain_backward = accelerator.backward
        accelerator.backward = lambda loss: (backward[-1].append(loss.item()), plain_backward(loss))
    return {k: v.detach().clone() for k, v in train(accelerator, run, model, optimizer, UnevenRows(), None,
                                                    step).state_dict().items()}


def test_a_step_follows_the_mean_over_its_micro_batches_terms(tmp_path):
    """Fast tier, in process: batch 4 and 2 micro-batches of 2 whose target counts differ train the
    same weights and log the same loss (averaging the micro-batches' means weighed a target of a
    batch with few of them more); gradient clipping sees the rescaled gradients."""
    whole_loss, accum_loss = [], []
    whole = train_uneven(tmp_path, 4, 1, whole_loss)
    accum = train_uneven(tmp_path, 2, 2, accum_loss)
    for k in whole:
        torch.testing.assert_close(whole[k], accum[k], rtol=0, atol=1e-6, msg=k)
    assert accum_loss == pytest.approx(whole_loss, abs=1e-6) and len(whole_loss) == 3


def test_a_micro_step_back_propagates_its_mean_times_its_terms_per_row(tmp_path):
    """Not times its terms (up to ~1,000 tokens in a stage-2 batch): under fp16 the loss scale would
    overflow and skip steps until it had shrunk by as much."""
    backward = []
    train_uneven(tmp_path, 2, 2, [], backward)
    assert len(backward) == 6 and {terms for _, terms, _ in backward} >= {2, 5}  # 1 or 4 targets a row
    for mean, terms, propagated in backward:
        assert propagated == pytest.approx(mean * terms / 2, rel=1e-6)


@pytest.mark.slow
def test_gradient_accumulation_matches_the_whole_batch_when_token_counts_differ(uneven_vqa, tiny_vit_dir, tmp_path):
    """The loss is the mean over a step's supervised tokens: batch 8 and 2 micro-batches of 4 train the
    same weights. (Averaging each micro-batch's mean instead differed by 2.6e-4.)"""
    from mmfusion.training import train_vqa

    args = uneven_args(uneven_vqa, tiny_vit_dir)
    train_vqa.main([*args, "--batch-size", "8", "--output-dir", str(tmp_path / "whole")])
    train_vqa.main([*args, "--batch-size", "4", "--grad-accum", "2", "--output-dir", str(tmp_path / "accum")])
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "accum")
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(image_folder, tmp_path):
    args = ["--dataset", str(image_folder), "--max-steps", "8", "--batch-size", "4", "--dropout", "0.1",
            "--warmup-steps", "2", *TINY_VIT, *QUIET]
    train_here("pretrain_vit", [*args, "--output-dir", str(tmp_path / "full"), "--save-every", "4"])
    # 24 images / batch 4 = 6 steps per epoch: step 4 is mid-epoch, and the resumed run crosses an epoch.
    ckpt = tmp_path / "full" / "checkpoints" / "step_4"
    assert ckpt.exists(), list((tmp_path / "full" / "checkpoints").iterdir())
    train_here("pretrain_vit", [*args, "--output-dir", str(tmp_path / "resumed"), "--resume", str(ckpt)])
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


CPU_ONLY = {"ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
# AdamW's first updates are about lr * sign(g): with the default eps, fp rounding in near-zero
# gradients (a different reduction order) flips signs and becomes lr-sized noise. A large eps
# makes the update linear in the gradient, so the DDP tests compare sharding and gradient averaging.
DDP_STAGE_1 = ["--max-steps", "4", "--warmup-steps", "1", "--no-hflip", "--adam-eps", "1e-2", *TINY_VIT, *QUIET]


def two_processes() -> list[str]:
    """`accelerate launch` of 2 processes. With CPU_ONLY they are CPU processes (gloo), whatever
    accelerators this machine has: with one GPU a 2-process launch would leave rank 1 without a device."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(29500 + os.getpid() % 1000)]


TWO_STAGES = """
import sys
from mmfusion.training import pretrain_vit
from mmfusion.training.main import after_stage_1
for name in ("a", "b"):  # as the main job: two stages, one launch
    pretrain_vit.run(*pretrain_vit.parse([*sys.argv[2:], "--output-dir", f"{sys.argv[1]}/{name}"]))
    after_stage_1()
"""


@pytest.fixture(scope="module")
def two_process_stage_1(image_folder, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One 2-process launch that trains stage 1 twice, into a/ then b/, as the main job's launch
    trains its two stages; batch 4 a process. (The launch's result, its folder.) The DDP parity
    test and the two-stage test both read it: a launch costs 7-9 s."""
    out = tmp_path_factory.mktemp("two_processes")
    (out / "two_stages.py").write_text(TWO_STAGES)
    cmd = [*two_processes(), str(out / "two_stages.py"), str(out), "--dataset", str(image_folder), *DDP_STAGE_1,
           "--batch-size", "4"]
    env = {**os.environ, **CPU_ONLY, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300), out


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(image_folder, two_process_stage_1, tmp_path):
    launched, two = two_process_stage_1
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-3000:]
    run_stage("pretrain_vit", ["--dataset", str(image_folder), *DDP_STAGE_1, "--batch-size", "8", "--output-dir",
                               str(tmp_path / "one")], env=CPU_ONLY)
    a, b = weights(tmp_path / "one"), weights(two / "a")
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    assert a["head.bias"].abs().sum() > 0  # the zero-initialized head bias trained: the runs did real steps
    # the test images split between the two processes, their predictions gathered: the same score
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "one", two / "a"))
    assert (two["test_accuracy"], two["test_examples"]) == (one["test_accuracy"], one["test_examples"])


@pytest.mark.slow
def test_two_process_launch_trains_two_stages(two_process_stage_1):
    """accelerate's end_training destroys the process group: a job's second stage in the same two
    processes then failed ('Default process group has not been initialized')."""
    result, out = two_process_stage_1
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("2 process(es) (MULTI_CPU)") == 2
    assert (out / "a" / "model").is_dir() and (out / "b" / "model").is_dir()


@pytest.mark.slow
def test_two_process_stage_two_matches_one_process_when_token_counts_differ(uneven_vqa, tiny_vit_dir, tmp_path):
    """Each process's batch holds its own number of supervised tokens: the step follows the mean over all
    of them, as one process with the whole batch (averaging the processes' means differed by 2.6e-4)."""
    args = uneven_args(uneven_vqa, tiny_vit_dir)
    run_stage("train_vqa", [*args, "--batch-size", "8", "--output-dir", str(tmp_path / "one")], env=CPU_ONLY)
    two = run_stage("train_vqa", [*args, "--batch-size", "4", "--output-dir", str(tmp_path / "two")], env=CPU_ONLY,
                    launcher=two_processes())
    assert "data: ViT features of 15 images" in two.stdout  # computed half by each process, then gathered
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    # The final evaluation's 7 rows, 3 predicted by one process and 4 by the other, come back whole
    # and in order: the same file as one process writes.
    one, two = ([json.loads(line) for line in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    assert len(one) == 7 and two == one


def test_shares_of_the_evaluation_cover_every_row_once_in_order(monkeypatch):
    """loop.across_processes: each process computes one contiguous share; in process order the shares
    are rows 0..n-1, each once, also with fewer rows than processes. (accelerate's gather, which puts
    them together, runs in the 2-process test above.)"""
    import accelerate.utils

    from mmfusion.training.loop import across_processes

    class Process:
        def __init__(self, index: int, n: int) -> None:
            self.process_index, self.num_processes = index, n

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda share: ("gathered", share))
    for rows, n in [(7, 2), (1, 2), (10, 3), (2, 4)]:
        shares = [across_processes(Process(i, n), rows, lambda first, stop: list(range(first, stop)))
                  for i in range(n)]
        assert all(tag == "gathered" for tag, _ in shares)
        assert [row for _, share in shares for row in share] == list(range(rows))
        assert max(len(s) for _, s in shares) - min(len(s) for _, s in shares) <= 1  # an even split
    assert across_processes(Process(0, 1), 5, lambda first, stop: [(first, stop)]) == [(0, 5)]  # no gather


def test_optimizer_groups_and_schedule():
    from mmfusion.training.setup import param_groups, warmup_cosine

    vit = ViT(ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=2))
    groups = param_groups(vit.named_parameters(), lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in vit.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert {"cls_token", "pos_embed", "norm.weight", "head.bias", "blocks.0.ln1.weight"} <= plain
    assert decayed == {"patch_embed.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                       "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight", "head.weight"}
    f = warmup_cosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_shift_augmentation_moves_the_image_within_bounds_repeatably():
    from mmfusion.processing import ImageProcessor
    from mmfusion.training.pretrain_vit import ClassificationImages, ViTStageConfig

    arr = np.full((16, 16, 3), 250, np.uint8)
    arr[6:10, 6:10] = 0  # a dark 4x4 square on a light background
    rows = [{"image": Image.fromarray(arr), "label": 1}]
    processor = ImageProcessor(16, (0.5,) * 3, (0.5,) * 3)
    plain = ClassificationImages(rows, processor)
    shifted = ClassificationImages(rows, processor, shift=3, seed=4)
    corners = set()
    for virtual in range(40):
        x, label = shifted[virtual]
        assert x.shape == (3, 16, 16) and label == 1
        dark = (x[0] < 0).nonzero()
        assert len(dark) == 16  # the whole square, moved, never cut: replicated edges are background
        (y0, x0), (y1, x1) = dark.min(0).values.tolist(), dark.max(0).values.tolist()
        assert (y1 - y0, x1 - x0) == (3, 3) and 3 <= y0 <= 9 and 3 <= x0 <= 9
        corners.add((y0, x0))
        assert torch.equal(x, shifted[virtual][0])  # a pure function of (seed, epoch, row)
    assert len(corners) > 10 and (6, 6) in {tuple((plain[0][0][0] < 0).nonzero().min(0).values.tolist())}
    with pytest.raises(ConfigError, match="--shift must be"):
        ViTStageConfig(shift=-1)


@pytest.mark.parametrize("flags, message", [
    (["--shift", "2"], "--shift 2 could move shapes across the 2x2 label cells"),
    (["--mixup", "0.2", "--crop-area", "0.5"], "--crop-area, --mixup would mix or move shapes across the 2x2 label cells"),
    (["--cutmix", "1"], "--cutmix would mix or move shapes across the 2x2 label cells")])
def test_moving_augmentations_are_refused_with_per_cell_labels(tmp_path, flags, message):
    from mmfusion.training import pretrain_vit

    stage, run = pretrain_vit.parse(["--dataset", "scenes", "--preset", "vit-tiny", *flags,
                                     "--output-dir", str(tmp_path / "v"), *QUIET])
    with pytest.raises(ConfigError, match=re.escape(message)):
        pretrain_vit.run(stage, run)
    assert not (tmp_path / "v" / "model").exists()
    assert pretrain_vit.parse(["--shift", "3"])[0].shift == 3 and pretrain_vit.parse([])[0].shift is None


def test_conversations_group_every_row_once_by_image():
    import datasets

    from mmfusion.training.data import Conversations

    image_ids = [0, 1, 0, 2, 0, -1, 1, 0, 0, -1]
    ds = datasets.Dataset.from_dict({"image": [f"img{i}" for i in image_ids], "image_id": image_ids,
                                     "question": [f"q{i}" for i in range(10)],
                                     "answers": [[f"a{i}"] for i in range(10)]})
    conv = Conversations(ds, turns=3, seed=0)
    groups = [sorted(int(q[1:]) for q, _ in conv[i]["turns"]) for i in range(len(conv))]
    assert sorted(r for g in groups for r in g) == list(range(10))  # nothing lost, nothing twice
    assert sorted(groups) == sorted([[0, 2, 4], [7, 8], [1, 6], [3], [5], [9]])  # chunks of <= 3, -1 alone
    for i in range(len(conv)):
        item = conv[i]
        rows = [int(q[1:]) for q, _ in item["turns"]]
        assert {ds[r]["image"] for r in rows} == {item["image"]}
        assert all(a == [f"a{r}"] for r, (_, a) in zip(rows, item["turns"]))
    orders = {repr(conv[0]["turns"]) for conv in (Conversations(ds, 3, seed) for seed in range(8))}
    assert len(orders) > 1 and Conversations(ds, 3, 5).groups == Conversations(ds, 3, 5).groups
    # --turns on rows without an image_id groups nothing: said, not silent
    assert repr(conv).endswith("; 2 rows have no image_id and stay single questions: --turns groups rows by that "
                               "column, so add it to group them"), repr(conv)
    assert "image_id" not in repr(Conversations(ds.filter(lambda r: r["image_id"] >= 0), 3, 0))
    assert "image_id" not in repr(Conversations(ds, 1, 0))


@pytest.mark.slow
def test_train_vqa_on_parquet_with_imported_transformers_weights(tmp_path, vqa_jsonl):
    """Stage 2 on a parquet dataset, starting from transformers ViT and GPT-2 folders."""
    import datasets
    from transformers import GPT2Config, GPT2LMHeadModel, ViTModel
    from transformers import ViTConfig as HFViTConfig

    rows = [json.loads(line) for line in vqa_jsonl.read_text().splitlines()]
    for r in rows:
        r["image"] = str(vqa_jsonl.parent / r["image"])
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "qa.parquet"))
    torch.manual_seed(0)
    ViTModel(HFViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "hf_vit")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(tmp_path / "hf_gpt2")
    out = tmp_path / "vqa"
    train_here("train_vqa", ["--dataset", str(tmp_path / "qa.parquet"), "--eval-split", "train", "--holdout", "0",
                             "--vit", str(tmp_path / "hf_vit"), "--gpt", str(tmp_path / "hf_gpt2"),
                             "--output-dir", str(out), "--batch-size", "4", "--max-steps", "2",
                             "--max-new-tokens", "2", *QUIET])
    model = VLM.from_pretrained(out / "model")
    assert model.config.gpt.n_embd == 32 and model.config.gpt.block_size == 64 and model.config.vit.n_embd == 32
    assert json.loads((out / "metrics.json").read_text())["count"] == 24


@pytest.mark.slow
def test_stage_two_trains_to_the_same_weights_with_or_without_precomputed_features(vqa_jsonl, tiny_vit_dir, tmp_path):
    cached = train_tiny_vqa(vqa_jsonl, tiny_vit_dir, tmp_path / "cached", "--max-steps", "6")
    plain = train_tiny_vqa(vqa_jsonl, tiny_vit_dir, tmp_path / "plain", "--max-steps", "6", "--no-cache-features")
    # 21 distinct pictures: three of the 24 files repeat another's square (same color, same place),
    # and images are known by their bytes, so each repeat shares its twin's features
    assert "ViT features of 21 images for 24 rows" in cached
    assert "ViT features of" not in plain and "model saved to" in plain
    short = train_tiny_vqa(vqa_jsonl, tiny_vit_dir, tmp_path / "short", "--max-steps", "2")  # 8 rows, 21 images
    assert "2 steps train on 8 rows, fewer than the 21 images caching" in short
    assert "ViT features of" not in short
    a, b = weights(tmp_path / "cached"), weights(tmp_path / "plain")
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    assert max(diffs[k] for k in diffs if k.startswith("adapter.")) < 1e-5
    assert a["adapter.proj.0.bias"].abs().max() > 0  # zero-initialized: the runs did train


@pytest.mark.slow
def test_stage_two_resume_with_precomputed_features_is_exact(vqa_jsonl, tiny_vit_dir, tmp_path):
    args = ["--max-steps", "8"]  # 24 rows / batch 4: step 4 is mid-epoch; the resumed run crosses an epoch
    train_tiny_vqa(vqa_jsonl, tiny_vit_dir, tmp_path / "full", *args, "--save-every", "4")
    ckpt = tmp_path / "full" / "checkpoints" / "step_4"
    assert ckpt.exists()
    train_tiny_vqa(vqa_jsonl, tiny_vit_dir, tmp_path / "resumed", *args, "--resume", str(ckpt))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
