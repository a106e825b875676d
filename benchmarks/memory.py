"""Peak memory: each side in a fresh child process (`run.py --child`) that builds one model and
runs its step, so the two sides cannot share allocator state; both children run at once (RSS is
per process)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from mmfusion import GPT, VLM, ViT
from mmfusion.config import AdapterConfig, VLMConfig

from models import (
    ComposedVLM,
    Shapes,
    decode_fn,
    hf_gpt_config,
    hf_vit_config,
    shapes,
    vit_step,
    vlm_batch,
    vlm_configs,
    vlm_step,
)
from results import Run, target_row
from timing import rss_high_water_mib, rss_now_mib

RUNNER = Path(__file__).resolve().with_name("run.py")  # its --child flag runs child_main


def child_main(spec: dict) -> None:
    """In a fresh process: for each kind, build one model (one side only) and its inputs, run its
    step twice, and print one JSON line of RSS figures in MiB: the high-water mark, and the
    resident size after the imports and after building, so imports (transformers is large) can be
    told apart from the model and its step."""
    s = shapes(spec["smoke"])
    side = spec["side"]
    if side == "transformers":
        import transformers
    imports = rss_now_mib()
    for kind in spec["kinds"]:
        torch.manual_seed(0)
        if kind == "vit":
            c = s.vit[0][1]
            model = ViT(c) if side == "mmfusion" else transformers.ViTForImageClassification(hf_vit_config(c))
            step = vit_step(model, side, s.vit[0][2], c, "fp32")
        elif kind == "vlm":
            vit_c, gpt_c = vlm_configs(s)
            if side == "mmfusion":
                model = VLM(VLMConfig(vit=vit_c, gpt=gpt_c, adapter=AdapterConfig(projection="linear")))
            else:
                model = ComposedVLM(transformers.ViTModel(hf_vit_config(vit_c), add_pooling_layer=False),
                                    nn.Linear(vit_c.n_embd, gpt_c.n_embd),
                                    transformers.GPT2LMHeadModel(hf_gpt_config(gpt_c)))
            step = vlm_step(model, side, vlm_batch(vit_c, gpt_c, s.vlm_batch, s.vlm_text, s.vlm_answer), "fp32")
        else:  # decode at the largest batch
            b = max(s.decode_batches)
            model = (GPT(s.gpt) if side == "mmfusion" else transformers.GPT2LMHeadModel(hf_gpt_config(s.gpt))).eval()
            ids = torch.randint(0, s.gpt.vocab_size - 1, (b, s.prompt_len))
            step = decode_fn(model, side, ids, s.new_tokens, [])
        gc.collect()
        built = rss_now_mib()
        step()
        step()
        print(json.dumps({"kind": kind, "peak_mib": rss_high_water_mib(), "imports_mib": imports,
                          "built_mib": built}), flush=True)
        del model, step
        gc.collect()



def measure_children(kinds: list[str], smoke: bool) -> dict[str, dict[str, dict]]:
    """Run one child per side at the same time (RSS is per process, so they cannot disturb each
    other's numbers); {side: {kind: figures}}."""
    procs = {}
    for side in ("mmfusion", "transformers"):
        spec = json.dumps({"kinds": kinds, "side": side, "smoke": smoke})
        procs[side] = subprocess.Popen([sys.executable, str(RUNNER), "--child", spec],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    got = {}
    for side, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"memory child {kinds}/{side} failed:\n{stderr[-3000:]}")
        got[side] = {r["kind"]: r for r in (json.loads(x) for x in stdout.splitlines() if x.startswith("{"))}
    return got


def bench_memory(run: Run, s: Shapes) -> None:
    cases = {
        "vit": f"ViT train {s.vit[0][0]}, batch {s.vit[0][2]}",
        "vlm": f"VLM train, batch {s.vlm_batch}",
        "decode": f"GPT-2 decode, batch {max(s.decode_batches)}",
    }
    got: dict[str, dict[str, dict]] = {"mmfusion": {}, "transformers": {}}
    if run.smoke:  # one process per side for all kinds: it checks the code paths, fast
        got = measure_children(list(cases), True)
    else:
        for kind, case in cases.items():
            print(f"memory: {case} (a fresh process per side)", flush=True)
            for side, figures in measure_children([kind], False).items():
                got[side].update(figures)
    for kind, case in cases.items():
        res = {side: got[side][kind] for side in got}
        target_row(run, "memory", case, "fp32", "peak RSS above imports MiB",
                   {k: v["peak_mib"] - v["imports_mib"] for k, v in res.items()}, 1.0, higher_is_better=False,
                   note="model + inputs + optimizer + step; RSS high-water mark (VmHWM) minus RSS after imports")
        target_row(run, "memory", case, "fp32", "peak RSS of the process MiB", {k: v["peak_mib"] for k, v in res.items()},
                   None, higher_is_better=False, note="includes imports (transformers only on its side)")


