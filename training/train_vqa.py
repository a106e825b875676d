"""Stage 2: fine-tune the fused model on visual question answering (or captions).

    python training/train_vqa.py --vit runs/vit/model --output-dir runs/vqa     # easy-VQA
    accelerate launch training/train_vqa.py --vit runs/vit/model ...            # many processes
    mmfusion train-vqa --dataset data.jsonl --answer-column answers --gpt gpt2  # imported GPT-2

The ViT comes from a saved mmfusion folder, a preset name (fresh), or transformers ViT/CLIP
weights; the GPT from a preset name (fresh), a saved folder, or transformers GPT-2 weights.
The ViT is frozen by default. Writes OUTPUT_DIR/model (the whole VLM), metrics.json,
predictions.jsonl, run_config.json, logs/ and checkpoints/.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a plain script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmfusion.config import GPT_PRESETS, VIT_PRESETS, AdapterConfig, ConfigError, gpt_preset, vit_preset  # noqa: E402
from mmfusion.data import load_vqa_dataset  # noqa: E402
from mmfusion.generation import GenerationConfig  # noqa: E402
from mmfusion.gpt import GPT  # noqa: E402
from mmfusion.metrics import vqa_accuracy  # noqa: E402
from mmfusion.processing import ImageProcessor, PromptBuilder, VQACollator  # noqa: E402
from mmfusion.vit import ViT  # noqa: E402
from mmfusion.vlm import VLM  # noqa: E402
from mmfusion.weights import is_mmfusion_folder  # noqa: E402
from training.args import parse_configs  # noqa: E402
from training.common import (  # noqa: E402
    Rows,
    RunConfig,
    make_accelerator,
    param_groups,
    train,
    write_json,
    write_run_config,
)


@dataclass(frozen=True)
class VQAStageConfig:
    dataset: str = field(default="easy-vqa", metadata={"help": "easy-vqa, a parquet/JSONL file or folder, or a hub id"})
    train_split: str = field(default="train", metadata={"help": "training split"})
    eval_split: str = field(default="test", metadata={"help": "evaluation split"})
    image_column: str = field(default="image", metadata={"help": "column holding the images"})
    question_column: str = field(default="question", metadata={"help": "column holding the questions"})
    answer_column: str | None = field(default=None, metadata={
        "help": "column holding an answer or a list of answers (default: 'answers', else 'answer')"})
    max_bad_fraction: float = field(default=0.01, metadata={"help": "stop if more rows than this are unusable"})
    vit: str = field(default="runs/vit/model", metadata={
        "help": f"saved ViT folder, a preset ({', '.join(VIT_PRESETS)}) or transformers ViT/CLIP weights"})
    gpt: str = field(default="gpt-tiny", metadata={
        "help": f"a preset ({', '.join(GPT_PRESETS)}) for a fresh GPT, a saved GPT folder, or transformers GPT-2 weights"})
    block_size: int | None = field(default=None, metadata={"help": "override a fresh GPT's context length"})
    projection: str = field(default="mlp", metadata={"help": "adapter projection", "choices": ["linear", "mlp"]})
    adapter_layer: int = field(default=-1, metadata={"help": "ViT layer feeding the adapter (-1: last)"})
    keep_cls: bool = field(default=False, metadata={"help": "keep the ViT's CLS token as an image token"})
    pixel_shuffle: int = field(default=2, metadata={"help": "merge s x s patches into one image token"})
    attention: str = field(default="prefix", metadata={
        "help": "image tokens attend causally or bidirectionally (prefix)", "choices": ["causal", "prefix"]})
    freeze_vit: bool = field(default=True, metadata={"help": "keep the ViT's weights fixed"})
    freeze_adapter: bool = field(default=False, metadata={"help": "keep the adapter's weights fixed"})
    freeze_gpt: bool = field(default=False, metadata={"help": "keep the GPT's weights fixed"})
    lr_vit: float | None = field(default=None, metadata={"help": "ViT learning rate (default: --lr)"})
    lr_adapter: float | None = field(default=None, metadata={"help": "adapter learning rate (default: --lr)"})
    lr_gpt: float | None = field(default=None, metadata={"help": "GPT learning rate (default: --lr)"})
    max_new_tokens: int = field(default=8, metadata={"help": "answer length limit at evaluation"})
    eval_batch_size: int = field(default=256, metadata={"help": "batch size for evaluation"})


STAGE_DEFAULTS = RunConfig(output_dir="runs/vqa", epochs=2.5, batch_size=64, lr=1e-3, warmup_steps=100,
                           weight_decay=0.05, eval_samples=500)


def load_vit(spec: str) -> ViT:
    if spec in VIT_PRESETS:
        return ViT(vit_preset(spec, num_classes=0))
    if is_mmfusion_folder(spec):
        return ViT.from_pretrained(spec)
    if Path(spec).exists() and not (Path(spec) / "config.json").exists():
        raise FileNotFoundError(f"--vit {spec}: no config.json there; train stage 1 first or pass a preset")
    return ViT.from_hf(spec)


def load_gpt(spec: str, block_size: int | None) -> GPT:
    if spec in GPT_PRESETS:
        return GPT(gpt_preset(spec, **({"block_size": block_size} if block_size else {})))
    if block_size:
        raise ConfigError("--block-size applies only to a fresh GPT from a preset")
    return GPT.from_pretrained(spec) if is_mmfusion_folder(spec) else GPT.from_hf(spec)


def build_vlm(stage: VQAStageConfig) -> VLM:
    adapter = AdapterConfig(projection=stage.projection, layer=stage.adapter_layer, keep_cls=stage.keep_cls,
                            pixel_shuffle=stage.pixel_shuffle)
    model = VLM.from_parts(load_vit(stage.vit), load_gpt(stage.gpt, stage.block_size), adapter, stage.attention)
    for part, frozen in ((model.vit, stage.freeze_vit), (model.adapter, stage.freeze_adapter),
                         (model.gpt, stage.freeze_gpt)):
        part.requires_grad_(not frozen)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("every part is frozen: nothing to train")
    return model


def optimizer_for(model: VLM, stage: VQAStageConfig, run: RunConfig) -> torch.optim.Optimizer:
    groups = []
    for prefix, lr in (("vit", stage.lr_vit), ("adapter", stage.lr_adapter), ("gpt", stage.lr_gpt)):
        part = getattr(model, prefix)
        groups += param_groups(part.named_parameters(), lr or run.lr, run.weight_decay)
    return torch.optim.AdamW(groups, lr=run.lr, betas=(0.9, run.beta2), eps=run.adam_eps)


@torch.no_grad()
def predict(model: VLM, dataset, limit: int | None = None, batch_size: int = 256,
            max_new_tokens: int = 8) -> list[dict]:
    """Greedy answers for the first `limit` rows: dicts with question, prediction and answers."""
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    rows = []
    for start in range(0, n, batch_size):
        batch = dataset[start:min(n, start + batch_size)]
        answers = model.answer_batch(batch["image"], batch["question"], **config.__dict__)
        for i, pred in enumerate(answers):
            rows.append({"question": batch["question"][i], "prediction": pred, "answers": batch["answers"][i],
                         "answer_type": batch["answer_type"][i], "image_id": batch["image_id"][i]})
    return rows


def score(rows: list[dict]) -> dict:
    return vqa_accuracy([r["prediction"] for r in rows], [r["answers"] for r in rows],
                        [r["answer_type"] for r in rows])


def run(stage: VQAStageConfig, run_cfg: RunConfig) -> dict:
    out = Path(run_cfg.output_dir)
    accelerator = make_accelerator(run_cfg, "train_vqa")
    columns = {"image_column": stage.image_column, "question_column": stage.question_column,
               "answer_column": stage.answer_column, "max_bad_fraction": stage.max_bad_fraction}
    if stage.dataset == "easy-vqa":
        columns = {}
    train_ds, train_report = load_vqa_dataset(stage.dataset, stage.train_split, **columns)
    eval_ds, eval_report = load_vqa_dataset(stage.dataset, stage.eval_split, **columns)
    accelerator.print(f"data: {train_report}\ndata: {eval_report}")
    model = build_vlm(stage)
    processor = ImageProcessor.from_config(model.config.vit)
    prompts = PromptBuilder(model.num_image_tokens, model.config.gpt.block_size)
    collate = VQACollator(processor, prompts)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_run_config(out, stage=stage, run=run_cfg, model=model.config, precision=accelerator.mixed_precision)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"VLM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
                      f"({trainable / 1e6:.2f}M trainable), {model.num_image_tokens} image tokens, "
                      f"precision {accelerator.mixed_precision}")
    optimizer = optimizer_for(model, stage, run_cfg)
    frozen_vit = stage.freeze_vit

    def step(m, batch):
        if frozen_vit:
            accelerator.unwrap_model(m).vit.eval()  # a frozen ViT runs without dropout
        output = m(**batch)
        return output.loss, int(batch["attention_mask"].sum())

    def evaluate(m, full: bool) -> dict[str, float]:
        rows = predict(m, eval_ds, None if full else run_cfg.eval_samples, stage.eval_batch_size,
                       stage.max_new_tokens)
        return {"vqa_accuracy": score(rows)["accuracy"]}

    model = train(accelerator, run_cfg, model, optimizer, Rows(train_ds), collate, step, evaluate, unit="tok")
    metrics: dict = {}
    if accelerator.is_main_process:
        model.save_pretrained(out / "model")
        with accelerator.autocast():
            rows = predict(model, eval_ds, None, stage.eval_batch_size, stage.max_new_tokens)
        metrics = score(rows)
        metrics["truncated_questions"] = prompts.truncated
        with open(out / "predictions.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        write_json(out / "metrics.json", metrics)
        accelerator.print(f"VQA accuracy {metrics['accuracy']:.4f} on {metrics['count']} questions; "
                          f"model saved to {out / 'model'}")
    accelerator.end_training()
    return metrics


def parse(argv: list[str] | None = None, defaults: RunConfig = STAGE_DEFAULTS) -> tuple[VQAStageConfig, RunConfig]:
    groups = {"data and model": VQAStageConfig, "training": RunConfig}
    stage, run_cfg = parse_configs(argv, "mmfusion train-vqa", __doc__, groups, dict(defaults.__dict__))
    return stage, run_cfg


def main(argv: list[str] | None = None) -> None:
    run(*parse(argv))


if __name__ == "__main__":
    main()
