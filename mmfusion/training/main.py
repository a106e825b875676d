"""The main job: pretrain the ViT, fine-tune the VLM on VQA, evaluate, report.

    mmfusion main --output-dir runs/main

Everything lands in one folder: vit/ (stage 1: model, metrics, logs), vqa/ (stage 2: model,
metrics, predictions.jsonl, logs) and results.md (the table printed at the end). The stages'
defaults are the recipe, chosen for the accuracy targets on easy-VQA (offline, 2-core CPU); the
README's Results section has the measured accuracy and time per machine, precision and seed.
`--mixed-precision` sets both stages' precision (default auto: bf16 on GPUs that have it, else fp32).
The flags below override the stages' settings (`--vit-epochs`, `--vqa-epochs`, `--vit-lr`,
`--vqa-lr`, ...); for any other stage flag run the stages themselves, `mmfusion pretrain-vit` then
`mmfusion train-vqa --vit DIR/vit/model`, which repeat this job with their defaults. Stage 1 starts
the ViT as the stage command does: attention mimetic, patch projection N(0, 0.072)
(`--vit-attention-init normal --vit-patch-init-std 0.02` gives transformers' start, with which the
job ran 50 epochs and still had one row under its targets). `--no-keep-cls` feeds stage 2 the patch
tokens without the ViT's CLS token; `--gpt-init-std` sets the fresh GPT's init (gpt-tiny: 0.1;
GPT-2's 0.02 learns the yes/no questions much later).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from accelerate import PartialState

from ..config import ATTENTION_INITS, check_number
from ..errors import OneLineErrorParser, run_command
from ..evaluation import format_examples, format_vqa_table, read_jsonl
from . import pretrain_vit, train_vqa
from .precision import PRECISIONS
from .run_folder import check_output_dir, job_parts
from .setup import RunConfig


def parse(argv: list[str] | None):
    vit, vqa = pretrain_vit.STAGE_DEFAULTS, train_vqa.STAGE_DEFAULTS
    parser = OneLineErrorParser(prog="mmfusion main", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--output-dir", default="runs/main", help="where both stages and results.md go (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of both stages (default: %(default)s)")
    add("--vit-epochs", type=float, default=None, help=f"stage-1 epochs (default: {vit.epochs:g})")
    add("--vit-attention-init", default=pretrain_vit.DEFAULT_VIT.attention_init, choices=ATTENTION_INITS,
        help="how the fresh ViT's attention starts (default: %(default)s; normal: transformers' start)")
    add("--vit-patch-init-std", type=float, default=pretrain_vit.DEFAULT_VIT.patch_init_std,
        help="std of the fresh ViT's patch projection (default: %(default)s; transformers': 0.02)")
    add("--vqa-epochs", type=float, default=None, help=f"stage-2 epochs (default: {vqa.epochs:g})")
    add("--vit-max-steps", type=int, default=0, help="stage-1 step limit (default: 0, by epochs)")
    add("--vqa-max-steps", type=int, default=0, help="stage-2 step limit (default: 0, by epochs)")
    add("--vit-lr", type=float, default=None, help=f"stage-1 peak learning rate (default: {vit.lr:g})")
    add("--vqa-lr", type=float, default=None, help=f"stage-2 peak learning rate (default: {vqa.lr:g})")
    add("--vqa-balance-answers", type=float, default=None,
        help=f"stage 2: even out each question's answers in sampling, 0 (the data's shares) to 1 (equal) "
             f"(default: {train_vqa.VQAStageConfig().balance_answers:g})")
    add("--vqa-output-vocab", default=None, choices=["auto", "all", "data"],
        help=f"stage 2: the tokens the LM head scores (default: {train_vqa.VQAStageConfig().output_vocab}: the "
             "training answers' tokens, for the fresh GPT; see mmfusion train-vqa --help)")
    add("--keep-cls", action=argparse.BooleanOptionalAction, default=True,
        help="stage 2 feeds the ViT's CLS token to the adapter next to the patch tokens (default: %(default)s)")
    add("--fusion", default="early", choices=["early", "cross"],
        help="stage 2: image tokens in the prompt (early) or read by cross-attention blocks (cross; late "
             "fusion) (default: %(default)s)")
    add("--gpt-init-std", type=float, default=None,
        help="std of the fresh GPT's Normal init in stage 2 (default: gpt-tiny's 0.1; GPT-2's is 0.02)")
    add("--mixed-precision", default="auto", choices=["auto", *PRECISIONS],
        help="both stages' precision (default: auto, bf16 on GPUs that have it, else fp32; mmfusion/training/precision.py)")
    add("--compile", action=argparse.BooleanOptionalAction, default=False,
        help="train both stages through torch.compile (default: %(default)s)")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars (default: %(default)s)")
    add("--examples", type=int, default=8, help="example answers to print (default: %(default)s)")
    args = parser.parse_args(argv)
    check_stage_flags(args, "vit", "vqa")
    if args.vqa_balance_answers is not None:
        check_number("--vqa-balance-answers", args.vqa_balance_answers, 0, 1)
    check_number("--vit-patch-init-std", args.vit_patch_init_std, 0, low_open=True)
    args.output_dir = check_output_dir(args.output_dir, parts=job_parts("vit", "vqa"))  # refused before stage 1
    return args


def check_stage_flags(args, *stages: str) -> None:
    """The per-stage overrides checked under their own names, before any work (the stage's own
    check would name --epochs for --vit-epochs)."""
    # flag: (must be > 0 rather than >= 0, an integer)
    rules = {"epochs": (True, False), "lr": (True, False), "max_steps": (False, True), "batch_size": (True, True)}
    for s in stages:
        for flag, (positive, integer) in rules.items():
            value = getattr(args, f"{s}_{flag}", None)
            if value is not None:
                check_number(f"--{s}-{flag.replace('_', '-')}", value, 0, low_open=positive, integer=integer)
    check_number("--examples", args.examples, 0, integer=True)


def announce(line: str) -> None:
    """Print a job's line once under several processes. From the launcher's RANK: PartialState() here,
    before a stage's Accelerator, would set the processes up without the stage's settings."""
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


def after_stage_1() -> None:
    """Under several processes, hold each one until the main process has evaluated and saved stage 1:
    stage 2 loads that ViT (the others, done training, would load an earlier run's or none)."""
    PartialState().wait_for_everyone()


def stage_run(run: RunConfig, args, output_dir: Path, epochs: float | None, max_steps: int,
              lr: float | None) -> RunConfig:
    """A stage's default RunConfig with the main job's output folder, seed, precision and overrides."""
    return replace(run, output_dir=str(output_dir), seed=args.seed, progress=args.progress,
                   mixed_precision=args.mixed_precision, compile=args.compile, max_steps=max_steps,
                   epochs=run.epochs if epochs is None else epochs, lr=run.lr if lr is None else lr)


def stage_configs(args) -> tuple:
    """(stage-1 config, its run, stage-2 config, its run): the stage commands' defaults, so
    `mmfusion pretrain-vit` then `mmfusion train-vqa --vit DIR/model` repeat this job (tested)."""
    out = Path(args.output_dir)
    vit_stage = pretrain_vit.ViTStageConfig(vit=pretrain_vit.DEFAULT_VIT.replace(
        attention_init=args.vit_attention_init, patch_init_std=args.vit_patch_init_std))
    vit_run = stage_run(pretrain_vit.STAGE_DEFAULTS, args, out / "vit", args.vit_epochs, args.vit_max_steps, args.vit_lr)
    # The fresh gpt-tiny starts from std 0.1, its preset (docs/experiments.md: GPT init scale).
    default = train_vqa.VQAStageConfig()
    balance = default.balance_answers if args.vqa_balance_answers is None else args.vqa_balance_answers
    vqa_stage = replace(default, vit=str(out / "vit" / "model"), gpt_init_std=args.gpt_init_std, balance_answers=balance,
                        adapter=replace(default.adapter, keep_cls=args.keep_cls), fusion=args.fusion,
                        output_vocab=args.vqa_output_vocab or default.output_vocab)
    vqa_run = stage_run(train_vqa.STAGE_DEFAULTS, args, out / "vqa", args.vqa_epochs, args.vqa_max_steps, args.vqa_lr)
    return vit_stage, vit_run, vqa_stage, vqa_run


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    out = Path(args.output_dir)
    t0 = time.perf_counter()

    vit_stage, vit_run, vqa_stage, vqa_run = stage_configs(args)
    announce(f"== stage 1: ViT pretraining on {vit_stage.dataset} -> {vit_run.output_dir}")
    vit_metrics = pretrain_vit.run(vit_stage, vit_run)
    after_stage_1()
    t1 = time.perf_counter()
    announce(f"== stage 2: VQA fine-tuning on {vqa_stage.dataset} -> {vqa_run.output_dir}")
    vqa_metrics = train_vqa.run(vqa_stage, vqa_run)
    t2 = time.perf_counter()
    if not PartialState().is_main_process:
        return {}  # the stages score and save on the main process, which writes the report

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
        *format_examples(read_jsonl(out / "vqa" / "predictions.jsonl"), args.examples),
        "",
        f"Total {t2 - t0:.0f}s. Models: {out / 'vit' / 'model'}, {out / 'vqa' / 'model'}.",
    ]
    report = "\n".join(lines)
    (out / "results.md").write_text(report + "\n")
    print("\n" + report)
    return {"vit": vit_metrics, "vqa": vqa_metrics, "seconds": t2 - t0}


def script() -> None:
    """`python training/main.py` and `python -m`: bad input as one line, exit code 2, as `mmfusion`."""
    sys.exit(run_command(main))


if __name__ == "__main__":
    script()
