"""Benchmarks: mmfusion against the same models composed from transformers, and against this
machine's own limits (matrix-multiply peak, memory bandwidth).

    python benchmarks/run.py                 # full run, writes benchmarks/RESULTS.md (+ RESULTS.json)
    python benchmarks/run.py --smoke         # tiny shapes, one repeat: checks that it all runs
    python benchmarks/run.py --only decode   # machine, vit, decode, vlm, memory, data, gpu, gpu-compile
    python benchmarks/run.py --device cuda   # the GPU sections (gpu.py), to RESULTS_gpu.md; auto picks
                                             # them where CUDA is present

Method: both sides run in the same process with the same weights (transformers models are built
from configs with random weights and converted with `ViT.from_hf` / `GPT.from_hf`), alternating
(the order flips every repeat), after a warm-up; every number is a median over repeats.
Peak memory is the RSS high-water mark of a fresh child process that builds one model and runs
its step (`--child`), so the two sides cannot share allocator state.
Nothing is downloaded.

The pieces: timing.py (alternating medians, machine limits and description), models.py (sizes,
both sides' models and steps), sections.py (the measured sections), memory.py (the children),
results.py (rows), report.py (RESULTS.md / RESULTS.json). Run it as a script, as above: its
folder is then first on sys.path, which is how it imports them; the repository root comes next,
so the mmfusion it measures is this checkout's, installed or not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's mmfusion, installed or not

from gpu import bench_gpu, bench_gpu_compiled
from memory import bench_memory, child_main
from models import shapes
from report import write_report
from results import Run
from sections import bench_data, bench_decode, bench_machine, bench_vit, bench_vlm
from timing import machine_info

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("machine", "vit", "decode", "vlm", "memory", "data", "gpu", "gpu-compile")
GPU_BENCHMARKS = ("gpu", "gpu-compile")  # gpu-compile: the VLM step through torch.compile, minutes of compiling
CPU_BENCHMARKS = tuple(b for b in BENCHMARKS if b not in GPU_BENCHMARKS)
SECTIONS = {"machine": bench_machine, "vit": bench_vit, "decode": bench_decode, "vlm": bench_vlm,
            "memory": bench_memory, "data": bench_data}
GPU_SECTIONS = {"gpu": bench_gpu, "gpu-compile": bench_gpu_compiled}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The arguments, and the benchmarks chosen by --only (all by default), in run order."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (for CI)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BENCHMARKS)} (mfu: vit,vlm)")
    p.add_argument("--out", default=None, help="Markdown report to write, after each section (default: RESULTS.md "
                                               "here; RESULTS_gpu.md for GPU sections alone, which leaves the CPU "
                                               "report as it is)")
    p.add_argument("--notes", default=str(HERE / "NOTES.md"),
                   help="Markdown appended to the report as its notes section (skipped if missing)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="cpu: the CPU sections; cuda: the GPU sections (gpu.py); auto: cuda where CUDA is present. "
                        "--smoke runs every section, the GPU ones on tiny shapes on the CPU")
    p.add_argument("--bf16-caps", default="auto", choices=["auto", "on", "off"],
                   help="smaller bf16 cases where bf16 matmuls are slow: auto decides from this run's matmul peaks "
                        "(on where bf16 is slower than fp32, as on AVX2-only CPUs)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    only = [y for x in only for y in (("vit", "vlm") if x == "mfu" else (x,))]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)} or mfu")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    default = BENCHMARKS if args.smoke else GPU_BENCHMARKS if args.device == "cuda" else CPU_BENCHMARKS
    chosen = [b for b in BENCHMARKS if (b in only if only else b in default)]
    if args.out is None:
        args.out = str(HERE / ("RESULTS_gpu.md" if set(chosen) <= set(GPU_BENCHMARKS) else "RESULTS.md"))
    return args, chosen


def main(argv: list[str] | None = None) -> Run:
    args, chosen = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return Run(smoke=True)
    load = os.getloadavg()
    info = machine_info()
    print(f"{info['cpu']} x{info['cores']}, torch {info['torch']}, transformers {info['transformers']}, "
          f"load {load[0]:.2f}", flush=True)
    s = shapes(args.smoke)
    run = Run(smoke=args.smoke, slow_bf16={"auto": None, "on": True, "off": False}[args.bf16_caps])
    t0 = time.perf_counter()
    out = Path(args.out)

    def report(unfinished: list[str]) -> None:
        header = {"args": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
                  "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "wall": time.perf_counter() - t0,
                  "load": load, "unfinished": unfinished}
        write_report(run, info | ({"gpu": run.machine["gpu"]} if "gpu" in run.machine else {}), header, out)

    for i, name in enumerate(chosen):
        if name in GPU_SECTIONS:
            GPU_SECTIONS[name](run, args.smoke, torch.device("cuda" if args.device == "cuda" else "cpu"))
        else:
            SECTIONS[name](run, s)
        if i < len(chosen) - 1:  # a run cut short (a time limit on a lent GPU) keeps what it measured
            report(chosen[i + 1:])
    notes = Path(args.notes)
    if notes.exists() and not args.smoke:
        run.notes.append(notes.read_text().strip())
    report([])
    print(f"wrote {out}", flush=True)
    return run


if __name__ == "__main__":
    main()
