"""Can the GPT answer the scenes questions when it is handed the scene as text?

    python benchmarks/scenes_text_qa.py --steps 1500 --predictions runs/captions/predictions.jsonl

A diagnostic for the scenes VQA gap (the image model answers lookups like "what color is the
shape at the top left?" but not searches like "is there a red circle?"). It trains the GPT alone,
with no image, on

    Caption: <the scene's true caption>.\\nQuestion: <question>\\nAnswer: <answer><|endoftext|>

(`--no-caption`: the question alone, i.e. what the answer priors give) and prints test accuracy
per question template next to the image model's, read from a `predictions.jsonl` of
`train_vqa`. An answer counts when every answer token and the end-of-text are the argmax under
teacher forcing, which is exactly when greedy decoding would produce it. If the text-only GPT
cannot search the caption either, the image side is not what is missing.

`--gpt` takes a preset (a fresh model, the default `gpt-tiny` of the captions job), a saved
mmfusion GPT folder or a transformers GPT-2 (folder or hub id), to test a pretrained one.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
import torch.nn.functional as F

from mmfusion.data.scenes import SPLIT_SEEDS, caption, make_scene, question_template, questions
from mmfusion.evaluation import score_by_template
from mmfusion.loading import load_gpt
from mmfusion.loss import IGNORE_INDEX
from mmfusion.processing import pad_batch
from mmfusion.tokenizer import EOT_ID, get_tokenizer
from mmfusion.training.setup import param_groups, warmup_cosine


def examples(split: str, num_scenes: int, with_caption: bool) -> list[dict]:
    """Token ids, labels (-100 but on the answer and EOT) and the question, per question."""
    tokenizer, seed, rows = get_tokenizer(), SPLIT_SEEDS[split], []
    for i in range(num_scenes):
        scene = make_scene(seed, i)
        context = f"Caption: {caption(scene)}.\n" if with_caption else ""
        for question, answer, _ in questions(scene, seed):
            prompt = tokenizer.encode(f"{context}Question: {question}\nAnswer:")
            target = tokenizer.encode(" " + answer) + [EOT_ID]
            rows.append({"ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target,
                         "question": question})
    return rows


def collate(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = pad_batch([r["ids"] for r in rows], EOT_ID)
    mask = pad_batch([[1] * len(r["ids"]) for r in rows], 0)
    return ids, mask, pad_batch([r["labels"] for r in rows], IGNORE_INDEX)


def loss_and_hits(model, rows: list[dict]) -> tuple[torch.Tensor, list[bool]]:
    """Mean loss over answer tokens, and per row whether every answer token is the argmax."""
    ids, mask, labels = collate(rows)
    hidden = model.hidden_states(input_ids=ids, attention_mask=mask)[:, :-1]  # (B, T-1, C)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[keep])  # (K, V): only the supervised positions
    right = torch.zeros_like(targets, dtype=torch.bool)
    right[keep] = logits.argmax(-1) == targets[keep]
    hits = ((right | ~keep).all(dim=1)).tolist()
    return F.cross_entropy(logits.float(), targets[keep]), hits


def by_template(questions_: list[str], correct: list[bool]) -> dict[str, dict]:
    """Accuracy and count per question template, shaped like mmfusion.evaluation.score_by_template."""
    groups: dict[str, list[bool]] = collections.defaultdict(list)
    for q, ok in zip(questions_, correct):
        groups[question_template(q)].append(bool(ok))
    return {k: {"accuracy": sum(v) / len(v), "count": len(v)} for k, v in sorted(groups.items())}


def image_model_results(path: str) -> dict[str, dict]:
    """The VLM's accuracy per template from its predictions.jsonl, scored as `mmfusion eval` does."""
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    if not rows or not all(k in rows[0] for k in ("question", "prediction", "answers")):
        raise SystemExit(f"{path}: not a predictions.jsonl of train_vqa (rows need question, prediction, answers)")
    return score_by_template(rows)


def evaluate(model, rows: list[dict], batch_size: int = 256) -> list[bool]:
    model.eval()
    hits: list[bool] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            hits += loss_and_hits(model, rows[i:i + batch_size])[1]
    model.train()
    return hits


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpt", default="gpt-tiny", help="a preset, a saved mmfusion GPT or a transformers GPT-2")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--train-scenes", type=int, default=5000)
    parser.add_argument("--test-scenes", type=int, default=500)
    parser.add_argument("--caption", action=argparse.BooleanOptionalAction, default=True,
                        help="give the true caption as text (--no-caption: the question alone)")
    parser.add_argument("--predictions", default=None, help="the image model's predictions.jsonl to compare with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-std", type=float, default=None,
                        help="a fresh GPT's initializer_range (default: the preset's, GPT-2's 0.02)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train = examples("train", args.train_scenes, args.caption)
    test = examples("test", args.test_scenes, args.caption)
    model = load_gpt(args.gpt, None if args.init_std is None else {"initializer_range": args.init_std})
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), args.lr, args.weight_decay),
                                  lr=args.lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps, args.warmup_steps, 0.05))
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{args.gpt}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"{len(train)} train / {len(test)} test questions, caption given: {args.caption}", flush=True)
    t0, curve = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        batch = torch.randint(len(train), (args.batch_size,), generator=generator).tolist()
        loss, _ = loss_and_hits(model, [train[i] for i in batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % args.eval_every == 0 or step == args.steps:
            accuracy = sum(evaluate(model, test)) / len(test)
            curve.append((step, accuracy))
            print(f"step {step}: loss {loss.item():.3f}, test accuracy {accuracy:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)

    text = by_template([r["question"] for r in test], evaluate(model, test))
    image = image_model_results(args.predictions) if args.predictions else {}
    print(f"\n| question template | text-only GPT ({len(test)} q) |" + (" image model |" if image else ""))
    print("|---|---:|" + ("---:|" if image else ""))
    for template, m in text.items():
        other = image.get(template)
        other = f" {100 * other['accuracy']:.1f}% ({other['count']}) |" if other else (" - |" if image else "")
        print(f"| {template} | {100 * m['accuracy']:.1f}% ({m['count']}) |{other}")
    return {"curve": curve, "by_template": text, "image_by_template": image,
            "accuracy": sum(m["accuracy"] * m["count"] for m in text.values()) / len(test)}


if __name__ == "__main__":
    main()
