"""Stage-2 variants side by side in one process: early fusion, late (cross-attention) fusion
early fusion with LoRA on the GPT, and early fusion whose LM head scores only the training
targets' tokens (`--output-vocab data`): trainable parameters, context tokens per prompt, the
training step and greedy decoding.

    python benchmarks/fusion.py                      # the main job's stage-2 shapes (easy-VQA)
    python benchmarks/fusion.py --preset captions    # the captions job's (scenes)
    python benchmarks/fusion.py --smoke              # tiny shapes, one repeat (CI)

The models are built the way `mmfusion train-vqa` builds them (vit-tiny + gpt-tiny, random
weights, the stage's adapter): `--fusion early`, `--output-vocab data`, `--fusion cross`,
`--lora-rank 8`; the step is
the stage's own (cached ViT features, the collator's batch, fused AdamW), on easy-VQA / scenes
questions; decoding is `decode_stream` for a fixed number of tokens. Medians of alternating runs
(timing.alternate). Accuracy comes from the training runs themselves (docs/experiments.md).
"""

from __future__ import annotations

import argparse
import json

import torch

from mmfusion.config import AdapterConfig
from mmfusion.data import caption_rows
from mmfusion.generation import GenerationConfig, decode_stream, vlm_prompts
from mmfusion.processing import ImageProcessor, PromptBuilder, VQACollator
from mmfusion.training import train_vqa
from mmfusion.training.data import target_tokens
from mmfusion.training.lora import add_lora
from mmfusion.training.setup import RunConfig

from timing import alternate

PRESETS = {
    "easy-vqa": ("easy-vqa", train_vqa.VQAStageConfig().adapter, "prefix"),
    "captions": ("scenes", AdapterConfig(pixel_shuffle=4, position_embedding=True), "prefix"),
}


VARIANTS = {"early": {"fusion": "early"}, "early-data-vocab": {"fusion": "early", "output_vocab": "data"},
            "cross": {"fusion": "cross"}, "lora8": {"fusion": "early", "lora_rank": 8}}


def build(variant: str, adapter: AdapterConfig, attention: str, smoke: bool):
    stage = train_vqa.VQAStageConfig(vit="vit-tiny", gpt="gpt-tiny", adapter=adapter, attention=attention,
                                     block_size=64 if smoke else None, **VARIANTS[variant])
    torch.manual_seed(0)
    model = train_vqa.build_vlm(stage)
    if stage.lora_rank:
        add_lora(model.gpt, stage.lora_rank, stage.lora_alpha)
    train_vqa.set_trainable_parts(model, stage)
    return model, stage


def training_targets(dataset: str, prompts: PromptBuilder) -> tuple[int, ...]:
    """--output-vocab data's tokens: those of the training split's answers (and captions)."""
    from mmfusion.data import load_caption_dataset, load_vqa_dataset

    questions, _ = load_vqa_dataset(dataset, "train")
    captions = caption_rows(load_caption_dataset(dataset, "train")[0]) if dataset == "scenes" else None
    return target_tokens(prompts, questions, captions)


def rows_of(dataset: str, n: int) -> list[dict]:
    from mmfusion.data import load_vqa_dataset

    ds, _ = load_vqa_dataset(dataset, "test")
    return [ds[i] for i in range(n)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="easy-vqa")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per decode (batch 1)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.new_tokens, args.repeats = 4, 2, 1
    dataset, adapter, attention = PRESETS[args.preset]
    rows = rows_of(dataset, args.batch_size)
    run_cfg = RunConfig(output_dir="unused", lr=1e-3)
    steps, decodes, info = {}, {}, {}
    for fusion in VARIANTS:
        model, stage = build(fusion, adapter, attention, args.smoke)
        processor = ImageProcessor.from_config(model.config.vit)
        prompts = PromptBuilder(model.prompt_slots, model.config.gpt.block_size)
        if stage.output_vocab == "data":
            model.restrict_output(training_targets(dataset, prompts))
        collate = VQACollator(processor, prompts)
        batch = collate(rows)
        with torch.no_grad():
            batch["image_features"] = model.vit_features(batch.pop("pixel_values"))
        optimizer = train_vqa.optimizer_for(model, stage, run_cfg)  # the stage's own groups and AdamW

        def step(model=model, batch=batch, optimizer=optimizer) -> None:
            model.train()
            loss = train_vqa.vqa_step(model, batch)[0]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        prompt = vlm_prompts(model, [rows[0]["image"]], [rows[0]["question"]])
        config = GenerationConfig(max_new_tokens=args.new_tokens)

        @torch.no_grad()
        def decode(model=model, prompt=prompt, config=config) -> None:
            model.eval()
            fused = model.fuse(prompt["input_ids"], prompt["pixel_values"])
            for _ in decode_stream(model.gpt, config=config, eot_id=-1, **fused):
                pass

        steps[fusion], decodes[fusion] = step, decode
        info[fusion] = {"trainable_M": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
                        "context_tokens": int(prompt["input_ids"].shape[1]),
                        "mean_train_tokens": float(batch["attention_mask"].sum(1).float().mean()),
                        "scored_tokens": len(model.config.gpt.output_tokens or range(model.config.gpt.vocab_size))}
    step_s = alternate(steps, args.repeats)
    decode_s = alternate(decodes, args.repeats)
    for fusion in info:
        info[fusion]["step_ms"] = step_s[fusion] * 1000
        info[fusion]["decode_tokens_per_s"] = args.new_tokens / decode_s[fusion]
    print(f"{args.preset}: batch {args.batch_size}, {args.new_tokens} greedy tokens at batch 1, torch threads "
          f"{torch.get_num_threads()}")
    print("| variant | trainable params | context tokens (first prompt) | tokens per training example | "
          "LM-head tokens | step ms | decode tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for fusion, r in info.items():
        print(f"| {fusion} | {r['trainable_M']:.2f}M | {r['context_tokens']} | {r['mean_train_tokens']:.1f} | "
              f"{r['scored_tokens']:,} | "
              f"{r['step_ms']:.0f} | {r['decode_tokens_per_s']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": info}, f, indent=1)
    return info


if __name__ == "__main__":
    main()
