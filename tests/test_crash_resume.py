"""Crash safety: a stage-1 training killed with SIGKILL at seeded random moments (one of them in the
middle of writing a checkpoint) and resumed with `--resume latest` each time ends with weights
bit-identical to an uninterrupted run. A NaN or infinite loss, or weights gone non-finite, stop
the run with a message naming the step, and the last good checkpoint stays loadable."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from mmfusion.errors import NonFiniteLossError
from mmfusion.training.loop import checkpoint_dirs, train
from mmfusion.training.setup import RunConfig

ROOT = Path(__file__).resolve().parents[1]
TOTAL, SAVE_EVERY = 120, 4
TINY = ["--image-size", "16", "--patch-size", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--batch-size", "4", "--no-progress", "--mixed-precision", "no", "--holdout", "0"]
ARGS = [*TINY, "--max-steps", str(TOTAL), "--save-every", str(SAVE_EVERY), "--keep-checkpoints", "2",
        "--warmup-steps", "5", "--dropout", "0.1"]

# Runs the stage script; with DIE_WHILE_SAVING_STEP=K it SIGKILLs itself halfway through writing
# model.safetensors of checkpoint K (into accelerate's save, the one that writes the weights).
LAUNCHER = """
import os, runpy, signal, sys
step = os.environ.get("DIE_WHILE_SAVING_STEP")
if step:
    import accelerate.utils.other as other
    from safetensors.torch import save as to_bytes
    real = other.safe_save_file

    def save_file(tensors, filename, metadata=None):
        if f".tmp_step_{step}" in str(filename):
            data = to_bytes(tensors, metadata=metadata)
            with open(filename, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tensors, filename, metadata=metadata)

    other.safe_save_file = save_file
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash_data")
    for split, n in (("train", 8), ("test", 2)):
        for c, color in enumerate(("red", "blue")):
            (root / split / color).mkdir(parents=True)
            for i in range(n):
                pixels = np.random.default_rng(100 * c + i + 50 * (split == "test")).integers(0, 60, (16, 16, 3))
                pixels[..., 2 * c] += 180
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / color / f"{i}.png")
    return root


def start(image_folder: Path, out: Path, launcher: Path, **env: str) -> subprocess.Popen:
    # One thread: tiny models run faster without OpenMP contention, and the suite shares 2 cores.
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    cmd = [sys.executable, str(launcher), str(ROOT / "training" / "pretrain_vit.py"), "--dataset", str(image_folder),
           "--output-dir", str(out), "--resume", "latest", *ARGS]
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def latest_step(out: Path) -> int:
    found = checkpoint_dirs(out)
    return int(found[-1].name.split("_")[1]) if found else 0


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while latest_step(out) < step:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before step {step}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint {step} after {timeout}s")
        time.sleep(0.005)


def kill(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed (code {proc.returncode}):\n{output[-3000:]}"
    return output


def finish(proc: subprocess.Popen) -> str:
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    return output


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_identical_weights(image_folder, tmp_path):
    import accelerate.utils.other

    assert hasattr(accelerate.utils.other, "safe_save_file"), "the mid-write hook needs accelerate's save_file alias"
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    rng = random.Random(6)
    events = []

    # The uninterrupted run goes alongside the interrupted ones (they share nothing but the CPU).
    reference = start(image_folder, tmp_path / "reference", launcher)

    out = tmp_path / "crashed"
    # 1: killed a random moment after checkpoint 8 was written
    proc = start(image_folder, out, launcher)
    wait_for_step(proc, out, 8)
    time.sleep(rng.uniform(0.0, 0.3))
    kill(proc)
    events.append(f"killed at random after step {latest_step(out)}")

    # 2: killed halfway through writing the weights of a checkpoint
    target = latest_step(out) + SAVE_EVERY * rng.randint(1, 3)
    proc = start(image_folder, out, launcher, DIE_WHILE_SAVING_STEP=str(target))
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == -signal.SIGKILL, output[-3000:]
    partial = out / "checkpoints" / f".tmp_step_{target}"
    assert (partial / "model.safetensors").exists() and not (partial / "progress.json").exists()
    with pytest.raises(SafetensorError):
        load_file(partial / "model.safetensors")  # really half-written
    assert latest_step(out) == target - SAVE_EVERY and not (out / "checkpoints" / f"step_{target}").exists()
    events.append(f"killed while writing checkpoint {target}")

    # 3: resumed (over the half-written folder), killed at random again a few checkpoints later
    proc = start(image_folder, out, launcher)
    wait_for_step(proc, out, target + 2 * SAVE_EVERY)
    assert not partial.exists(), "the leftover of the interrupted save was not cleaned up"
    time.sleep(rng.uniform(0.0, 0.3))
    kill(proc)
    events.append(f"killed at random after step {latest_step(out)}")

    # 4: killed at a random moment after launch: during start-up, loading or training
    proc = start(image_folder, out, launcher)
    delay = rng.uniform(0.2, 2.0)
    time.sleep(delay)
    kill(proc)
    events.append(f"killed {delay:.2f}s after launch (latest checkpoint then: step {latest_step(out)})")

    # 5: resumed to the end
    output = finish(start(image_folder, out, launcher))
    assert "resumed from" in output and f"step_{TOTAL}" in str(checkpoint_dirs(out)[-1])
    assert "lr_scheduler.step()" not in output  # the schedule replay on resume warns no more
    finish(reference)
    print("\n" + "; ".join(events))

    a = load_file(tmp_path / "reference" / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"


# ---- NaN / inf --------------------------------------------------------------------------------


class Cycle(torch.utils.data.Dataset):
    """Tiny regression rows, served by the trainer's virtual indices."""

    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, virtual: int):
        i = virtual % len(self.x)
        return self.x[i], self.y[i]


def run_toy(tmp_path: Path, poison) -> tuple[NonFiniteLossError, dict[int, dict[str, torch.Tensor]], RunConfig]:
    """Train a linear model for 8 steps with a checkpoint every 2; `poison(call, model, loss)` may
    corrupt the loss. Expects the run to stop; returns the error, the weights before each
    step_fn call (1-based), and the run config."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    run = RunConfig(output_dir=str(tmp_path / "toy"), max_steps=8, batch_size=2, warmup_steps=1, save_every=2,
                    keep_checkpoints=2, progress=False, lr=1e-2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr)
    before: dict[int, dict[str, torch.Tensor]] = {}

    def step(m, batch):
        call = len(before) + 1
        before[call] = {k: v.detach().clone() for k, v in m.state_dict().items()}
        x, y = batch
        return poison(call, m, torch.nn.functional.mse_loss(m(x), y)), len(x)

    accelerator = Accelerator(cpu=True)
    with pytest.raises(NonFiniteLossError) as info:
        train(accelerator, run, model, optimizer, Cycle(), None, step)
    return info.value, before, run


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, bad):
    error, before, run = run_toy(tmp_path, lambda call, m, loss: loss * bad if call == 5 else loss)
    message = str(error)
    assert f"loss is {bad} at step 5" in message
    assert "the last good checkpoint" in message and "step_4" in message and "--resume latest" in message
    kept = checkpoint_dirs(run.output_dir)
    assert [p.name for p in kept] == ["step_2", "step_4"]
    weights = load_checkpoint(kept[-1])
    assert weights.keys() == before[5].keys()
    assert all(torch.equal(weights[k], before[5][k]) for k in weights)  # exactly the state after step 4
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """A finite loss with a NaN gradient (sqrt at 0) turns the weights to NaN at step 4: the
    checkpoint of step 4 is refused, the one of step 2 is kept."""
    def nan_gradient(call, m, loss):
        if call != 4:
            return loss
        w = m.weight
        return loss + (w - w.detach()).abs().sqrt().sum()  # value unchanged, d/dw = inf * 0 = nan

    error, _, run = run_toy(tmp_path, nan_gradient)
    assert "weights became NaN or infinite (weight" in str(error) and "at step 4" in str(error)
    assert "step_2" in str(error)
    assert [p.name for p in checkpoint_dirs(run.output_dir)] == ["step_2"]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(checkpoint_dirs(run.output_dir)[0]).values())


@pytest.mark.slow
def test_non_finite_loss_through_cli_is_one_line(image_folder, tmp_path):
    """An absurd learning rate blows the loss up at step 2: one line, the step, the checkpoint kept."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "nan"
    result = subprocess.run([sys.executable, "-m", "mmfusion.cli", "pretrain-vit", "--dataset", str(image_folder),
                             "--output-dir", str(out), *TINY, "--save-every", "1", "--max-steps", "20",
                             "--lr", "1e30", "--warmup-steps", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("mmfusion: error: ")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "at step 2" in errors[0] and "step_1" in errors[0] and "Lower --lr" in errors[0]
    assert [p.name for p in checkpoint_dirs(out)] == ["step_1"]
