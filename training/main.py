"""The main job: pretrain the ViT, fine-tune the VLM on VQA, evaluate, report.

    mmfusion main --output-dir runs/main

Everything lands in one folder: vit/ (stage 1: model, metrics, logs), vqa/ (stage 2: model,
metrics, predictions.jsonl, logs) and results.md (the table printed at the end). The stages'
defaults are the recipe, chosen for the accuracy targets on easy-VQA (offline, 2-core CPU); the
README's "Main job results" has the measured accuracy and time per machine, precision and seed.
`--mixed-precision` sets both stages' precision (default auto: each stage times its own step).
Any stage flag can be overridden: `--vit-epochs`, `--vqa-epochs`, `--vit-lr`, `--vqa-lr`, ...;
`--no-keep-cls` feeds stage 2 the patch tokens without the ViT's CLS token; `--gpt-init-std`
sets the fresh GPT's init (gpt-tiny: 0.1; GPT-2's 0.02 learns the yes/no questions much later).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import pretrain_vit, train_vqa  # noqa: E402
from training.precision import PRECISIONS  # noqa: E402


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="mmfusion main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/main")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vit-epochs", type=float, default=None, help="stage-1 epochs (default: the stage default)")
    parser.add_argument("--vqa-epochs", type=float, default=None, help="stage-2 epochs (default: the stage default)")
    parser.add_argument("--vit-max-steps", type=int, default=0)
    parser.add_argument("--vqa-max-steps", type=int, default=0)
    parser.add_argument("--vit-lr", type=float, default=None)
    parser.add_argument("--vqa-lr", type=float, default=None)
    parser.add_argument("--keep-cls", action=argparse.BooleanOptionalAction, default=True,
                        help="stage 2 feeds the ViT's CLS token to the adapter next to the patch tokens")
    parser.add_argument("--gpt-init-std", type=float, default=None,
                        help="std of the fresh GPT's Normal init in stage 2 (default: gpt-tiny's 0.1; GPT-2's is 0.02)")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", *PRECISIONS],
                        help="both stages' precision (default: auto, each stage's step timed; training/precision.py)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--examples", type=int, default=8, help="example answers to print")
    return parser.parse_args(argv)


def stage_run(run, args, name: str):
    """A stage's default RunConfig with the main job's output folder, seed and overrides."""
    return replace(run, output_dir=str(Path(args.output_dir) / name), seed=args.seed, progress=args.progress,
                   mixed_precision=args.mixed_precision,
                   max_steps=getattr(args, f"{name}_max_steps"), epochs=getattr(args, f"{name}_epochs") or run.epochs,
                   lr=getattr(args, f"{name}_lr") or run.lr)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    out = Path(args.output_dir)
    t0 = time.perf_counter()

    vit_stage, vit_run = pretrain_vit.parse([])
    vit_run = stage_run(vit_run, args, "vit")
    print(f"== stage 1: ViT pretraining on {vit_stage.dataset} -> {vit_run.output_dir}", flush=True)
    vit_metrics = pretrain_vit.run(vit_stage, vit_run)
    t1 = time.perf_counter()

    vqa_stage, vqa_run = train_vqa.parse([])
    # The ViT's CLS token joins the 16 patch tokens: stage 1 trained it to name the shape and color.
    # The fresh gpt-tiny starts from std 0.1 (its preset), not GPT-2's 0.02, with which the yes/no
    # questions stayed near chance for much longer (docs/2026-11-24-main-job-recipe.md).
    vqa_stage = replace(vqa_stage, vit=str(out / "vit" / "model"), keep_cls=args.keep_cls,
                        gpt_init_std=args.gpt_init_std)
    vqa_run = stage_run(vqa_run, args, "vqa")
    print(f"== stage 2: VQA fine-tuning on {vqa_stage.dataset} -> {vqa_run.output_dir}", flush=True)
    vqa_metrics = train_vqa.run(vqa_stage, vqa_run)
    t2 = time.perf_counter()

    from mmfusion.cli import format_vqa_table

    lines = [
        "# mmfusion main job",
        "",
        "| stage | metric | test examples | precision | wall time |",
        "|---|---|---:|---|---:|",
        f"| 1: ViT pretraining | top-1 accuracy {100 * vit_metrics['test_accuracy']:.2f}% | "
        f"{vit_metrics['test_examples']} images | {vit_metrics['precision']} | {t1 - t0:.0f}s |",
        f"| 2: VQA fine-tuning | VQA accuracy {100 * vqa_metrics['accuracy']:.2f}% | "
        f"{vqa_metrics['count']} questions | {vqa_metrics['precision']} | {t2 - t1:.0f}s |",
        "",
        format_vqa_table(vqa_metrics),
        "",
        "Example answers (test split):",
        "",
    ]
    with open(out / "vqa" / "predictions.jsonl") as f:
        rows = [json.loads(line) for line in f]
    step = max(1, len(rows) // max(1, args.examples))
    for r in rows[::step][:args.examples]:
        mark = "ok " if r["prediction"] in r["answers"] else "XX "
        lines.append(f"- {mark} image {r['image_id']}: {r['question']} -> {r['prediction']!r} (true: {r['answers'][0]})")
    lines += ["", f"Total {t2 - t0:.0f}s. Models: {out / 'vit' / 'model'}, {out / 'vqa' / 'model'}."]
    report = "\n".join(lines)
    (out / "results.md").write_text(report + "\n")
    print("\n" + report)
    return {"vit": vit_metrics, "vqa": vqa_metrics, "seconds": t2 - t0}


if __name__ == "__main__":
    main()
