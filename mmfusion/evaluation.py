"""Evaluation: greedy predictions over a dataset, their scores, prediction files and report tables.

Used by the training stages (final evaluation), the `mmfusion eval` command, the jobs' reports
and the benchmarks. Rows are plain dicts, written one per line to JSON lines files:
questions {question, prediction, answers, answer_type, image_id}; captions {image_id,
prediction, captions} (every reference caption of the image).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .data.scenes import question_template
from .generation import GenerationConfig
from .metrics import caption_metrics, vqa_accuracy
from .vlm import VLM
from .weights import atomic_write


@torch.no_grad()
def predict(model: VLM, dataset, limit: int | None = None, batch_size: int = 256,
            max_new_tokens: int = 8, first: int = 0) -> list[dict]:
    """Greedy answers for rows `first` to `limit` - 1 (limit None: to the end): dicts with
    question, prediction and answers."""
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    rows = []
    for start in range(first, n, batch_size):
        batch = dataset[start:min(n, start + batch_size)]
        answers = model.answer_batch(batch["image"], batch["question"], **config.__dict__)
        for i, pred in enumerate(answers):
            rows.append({"question": batch["question"][i], "prediction": pred, "answers": batch["answers"][i],
                         "answer_type": batch["answer_type"][i], "image_id": batch["image_id"][i]})
    return rows


@torch.no_grad()
def predict_captions(model: VLM, dataset, limit: int | None = None, batch_size: int = 256,
                     max_new_tokens: int = 48, first: int = 0) -> list[dict]:
    """Greedy captions for images `first` to `limit` - 1 (limit None: to the end): dicts with
    image_id, prediction and captions."""
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    rows = []
    for start in range(first, n, batch_size):
        batch = dataset[start:min(n, start + batch_size)]
        preds = model.caption_batch(batch["image"], max_new_tokens=max_new_tokens)
        rows += [{"image_id": i, "prediction": p, "captions": c}
                 for i, p, c in zip(batch["image_id"], preds, batch["captions"])]
    return rows


def score(rows: list[dict]) -> dict:
    """VQA accuracy of prediction rows: accuracy, count and per_type (answer types)."""
    return vqa_accuracy([r["prediction"] for r in rows], [r["answers"] for r in rows],
                        [r["answer_type"] for r in rows])


def score_by_template(rows: list[dict]) -> dict[str, dict]:
    """Scenes only: accuracy and count per question template ("is there a C S?"), which tells
    lookups ("what shape is at the P?") from searches that answer types lump together."""
    return vqa_accuracy([r["prediction"] for r in rows], [r["answers"] for r in rows],
                        [question_template(r["question"]) for r in rows])["per_type"]


def score_captions(rows: list[dict]) -> dict:
    """Caption exact match, token F1, BLEU-4 and CIDEr-D of caption rows."""
    return caption_metrics([r["prediction"] for r in rows], [r["captions"] for r in rows])


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Written whole or not at all (a temporary name, then a rename), into folders made as needed;
    through a symbolic link to its target, as `>` in a shell writes, not over the link."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in rows)))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---- report tables (markdown) -------------------------------------------------------------


def format_vqa_table(metrics: dict) -> str:
    lines = ["| answer type | questions | VQA accuracy |", "|---|---:|---:|"]
    for kind, m in sorted(metrics["per_type"].items()):
        lines.append(f"| {kind} | {m['count']} | {100 * m['accuracy']:.2f}% |")
    lines.append(f"| **all** | {metrics['count']} | **{100 * metrics['accuracy']:.2f}%** |")
    return "\n".join(lines)


def format_template_table(per_template: dict) -> str:
    """Scenes: VQA accuracy per question template, lookups first (the ones written with P)."""
    lines = ["| question (C color, S shape, P position) | questions | VQA accuracy |", "|---|---:|---:|"]
    for template, m in sorted(per_template.items(), key=lambda kv: ("P" not in kv[0], kv[0])):
        lines.append(f"| {template} | {m['count']} | {100 * m['accuracy']:.2f}% |")
    return "\n".join(lines)


def format_caption_table(metrics: dict) -> str:
    return "\n".join(["| captions | exact match | token F1 | BLEU-4 | CIDEr-D |", "|---:|---:|---:|---:|---:|",
                      f"| {metrics['count']} | {100 * metrics['exact_match']:.2f}% | {metrics['token_f1']:.4f} "
                      f"| {metrics['bleu4']:.4f} | {metrics['cider']:.3f} |"])


def format_examples(rows: list[dict], n: int) -> list[str]:
    """About n rows spread evenly over a prediction file, as markdown list items marked ok / XX."""
    lines = []
    for r in rows[::max(1, len(rows) // max(1, n))][:n]:
        if "captions" in r:
            ok = r["prediction"] in r["captions"]
            lines.append(f"- {'ok ' if ok else 'XX '} image {r['image_id']}: {r['prediction']!r}"
                         + ("" if ok else f" (true: {r['captions'][0]!r})"))
        else:
            mark = "ok " if r["prediction"] in r["answers"] else "XX "
            lines.append(f"- {mark} image {r['image_id']}: {r['question']} -> {r['prediction']!r} "
                         f"(true: {r['answers'][0]})")
    return lines
