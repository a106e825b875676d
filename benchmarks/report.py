"""The report of a run: RESULTS.md (a table per section, the targets met, the notes) and
RESULTS.json next to it (the machine, the run's header and every row)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from results import Run


def fmt(x: float | None) -> str:
    if x is None:
        return ""
    if x == 0 or abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) >= 1 else f"{x:.3g}"


SECTION_TITLES = {
    "machine": ("Machine limits (measured in this run)", None),
    "vit": ("1. ViT training step", "transformers"),
    "decode": ("2. GPT-2 decoding (greedy, KV cache)", "transformers"),
    "vlm": ("3. VLM fine-tuning step", "transformers (composed)"),
    "mfu": ("4. Utilization (model FLOPs / step time / matmul peak)", "transformers"),
    "memory": ("5. Peak memory (fresh process per side)", "transformers"),
    "data": ("6. Data pipeline alone", "training step consumes"),
    "gpu": ("7. On the GPU (benchmarks/gpu.py)", "transformers"),
}


def markdown(run: Run, info: dict, header: dict) -> str:
    out = ["# Benchmark results", ""]
    out.append(f"Written by `python benchmarks/run.py{header['args']}` on {header['date']} in {header['wall']:.0f} s.")
    if header.get("unfinished"):
        out.append(f"**Partial: written before {', '.join(header['unfinished'])} ran; a finished run rewrites it.**")
    out.append("")
    out.append(f"- Machine: {info['cpu']}, {info['cores']} cores ({info['isa']}), torch threads {info['threads']}; "
               f"GPU: {info.get('gpu') or ('yes' if info['cuda'] else 'none lent to this run')}")
    out.append(f"- torch {info['torch']}, transformers {info['transformers']}, Python {info['python']}")
    out.append(f"- Load average at start (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in header['load'])}; "
               "other jobs may share the cores, which is why both sides alternate in one process")
    out.append("- Ratio = mmfusion / reference; for times and memory lower is better, so a target reads `<=`.")
    out.append("")
    for section, (title, ref_name) in SECTION_TITLES.items():
        rows = [r for r in run.rows if r.section == section]
        if not rows:
            continue
        out += [f"## {title}", ""]
        if ref_name is None:
            out += ["| measurement | dtype | quantity | value |", "|---|---|---|---:|"]
            out += [f"| {r.case} | {r.dtype} | {r.metric} | {fmt(r.ours)} |" for r in rows]
        else:
            out += [f"| case | dtype | metric | mmfusion | {ref_name} | ratio | target | met | notes |",
                    "|---|---|---|---:|---:|---:|---|---|---|"]
            for r in rows:
                met = "" if r.met is None else ("yes" if r.met else "**no**")
                out.append(f"| {r.case} | {r.dtype} | {r.metric} | {fmt(r.ours)} | {fmt(r.ref)} | "
                           f"{'' if r.ratio is None else f'{r.ratio:.2f}x'} | {r.target} | {met} | {r.note} |")
        out.append("")
    targets = [r for r in run.rows if r.met is not None]
    out.append(f"**Targets met: {sum(r.met for r in targets)} of {len(targets)}.**")
    out.append("")
    out += [*run.notes, ""]
    return "\n".join(out)



def write_report(run: Run, info: dict, header: dict, out: Path) -> None:
    """`out` (Markdown) and the same path with .json: the machine, `header` and every row."""
    out.parent.mkdir(parents=True, exist_ok=True)
    texts = {out: markdown(run, info, header), out.with_suffix(".json"): json.dumps(
        {"machine": info, **header, "rows": [{**asdict(r), "ratio": r.ratio} for r in run.rows]}, indent=1)}
    for path, text in texts.items():  # whole files only: it is rewritten after every section, and a run may be cut
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
