"""The captions job: train one VLM to caption and answer on the procedural scenes, evaluate, report.

    mmfusion captions --output-dir runs/captions

It is stage 2 (`training/train_vqa.py`) with the scenes defaults below: a fresh ViT and a
fresh GPT trained end to end on captions and questions mixed. Everything lands in
OUTPUT_DIR: model/, metrics.json, captions.jsonl, predictions.jsonl, logs/ and results.md
(the table printed at the end). Any stage flag can be passed through after `--`:

    mmfusion captions --output-dir runs/c -- --epochs 1 --align-epochs 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import train_vqa  # noqa: E402
from training.common import RunConfig  # noqa: E402

# Chosen by measurement on the 2-core CPU (see the README): the whole job trains in under
# 15 minutes there. Both parts are fresh, so there is no pretrained GPT for an adapter-only
# alignment phase to align to; --align-epochs is available for pretrained parts.
STAGE_ARGS = ["--dataset", "scenes", "--task", "both", "--vit", "vit-tiny", "--no-freeze-vit"]
RUN_DEFAULTS = RunConfig(output_dir="runs/captions", epochs=2.0, batch_size=32, lr=1e-3, warmup_steps=100,
                         weight_decay=0.05, eval_samples=300)


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="mmfusion captions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=RUN_DEFAULTS.output_dir)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--examples", type=int, default=6, help="example captions to print")
    parser.add_argument("stage_args", nargs="*", help="stage-2 flags after --, e.g. -- --epochs 1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    out = Path(args.output_dir)
    stage, run_cfg = train_vqa.parse(
        [*STAGE_ARGS, "--output-dir", str(out), "--seed", str(args.seed),
         *([] if args.progress else ["--no-progress"]), *args.stage_args],
        defaults=RUN_DEFAULTS)
    print(f"== captions and questions on {stage.dataset} -> {out}", flush=True)
    t0 = time.perf_counter()
    metrics = train_vqa.run(stage, run_cfg)
    seconds = time.perf_counter() - t0

    from mmfusion.cli import format_caption_table, format_vqa_table

    lines = ["# mmfusion captions job", "", f"Scenes test split, after {seconds:.0f}s of training and evaluation.",
             "", format_caption_table(metrics["captions"]), "", format_vqa_table(metrics), "",
             "Example captions (test split):", ""]
    with open(out / "captions.jsonl") as f:
        rows = [json.loads(line) for line in f]
    step = max(1, len(rows) // max(1, args.examples))
    for r in rows[::step][:args.examples]:
        mark = "ok " if r["prediction"] == r["caption"] else "XX "
        lines.append(f"- {mark} scene {r['image_id']}: {r['prediction']!r}" +
                     ("" if mark == "ok " else f" (true: {r['caption']!r})"))
    lines += ["", f"Model: {out / 'model'}."]
    report = "\n".join(lines)
    (out / "results.md").write_text(report + "\n")
    print("\n" + report)
    return {**metrics, "seconds": seconds}


if __name__ == "__main__":
    main()
