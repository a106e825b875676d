"""Stage 2: fine-tune the fused model on visual question answering and/or captions.

    python training/train_vqa.py --vit runs/vit/model --output-dir runs/vqa     # easy-VQA
    accelerate launch training/train_vqa.py --vit runs/vit/model ...            # many processes
    mmfusion train-vqa --dataset data.jsonl --answer-column answers --gpt gpt2  # imported GPT-2
    mmfusion train-vqa --dataset scenes --task both --align-epochs 1 ...        # captions + questions

`--task` picks the examples: questions (vqa), captions, or both mixed. `--align-epochs E`
first trains only the adapter on captions for E epochs, with the ViT and the GPT frozen
(LLaVA's feature alignment; worth it when both come pretrained), then trains the parts the
freeze flags leave open on the task. Alignment writes OUTPUT_DIR/align/ (checkpoints, model).

The ViT comes from a saved mmfusion folder, a preset name (fresh), or transformers ViT/CLIP
weights; the GPT from a preset name (fresh), a saved folder, or transformers GPT-2 weights.
The ViT is frozen by default. Writes OUTPUT_DIR/model (the whole VLM), metrics.json,
predictions.jsonl (questions) and captions.jsonl (captions), run_config.json, logs/ (tensorboard, a
folder per run) and checkpoints/ (with --save-every).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel, set_seed

from ..config import GPT_PRESETS, ConfigError
from ..data import BUILT_IN, EASY_VQA, SCENES, DatasetError, caption_rows, load_caption_dataset, load_vqa_dataset
from ..errors import run_command
from ..evaluation import predict, predict_captions, score, score_by_template, score_captions, write_jsonl
from ..loading import load_gpt, load_vit
from ..processing import ImageProcessor, PromptBuilder, VQACollator
from ..vlm import VLM
from ..weights import is_mmfusion_folder
from .args import parse_configs
from .data import (
    Conversations,
    Rows,
    answer_balance_weights,
    captions_in_any_order,
    check_targets_fit,
    evaluation_rows,
    rarest_answer_share,
    target_tokens,
)
from .features import MEMORY_LIMIT_BYTES, FeatureRows, distinct_images
from .loop import across_processes, find_resume, steps_per_epoch, train
from .lora import add_lora, merge_lora, save_lora
from .run_folder import (
    check_resume_model,
    compare_models,
    model_record,
    resumes_alignment,
    start_run_folder,
    world_size,
    write_json,
)
from .setup import (
    RunConfig,
    adamw,
    choose_precision,
    end_trackers,
    make_accelerator,
    param_groups,
    progress_flag_for_datasets,
)
from .vqa_config import VQAStageConfig

# The main job's stage 2 (easy-VQA): 3.5 epochs, because at 2.5 a rare negated question family
# could still be unlearned at the end, depending on precision and machine; the learning rate
# decays to zero, because at 5% of its peak one seed's loss still spiked at the end and left a
# family half learned (99.52%; docs/experiments.md).
STAGE_DEFAULTS = RunConfig(output_dir="runs/vqa", epochs=3.5, batch_size=64, lr=1e-3, min_lr_ratio=0.0,
                           warmup_steps=100, weight_decay=0.05, eval_samples=500)


def build_vlm(stage: VQAStageConfig) -> VLM:
    model = VLM.from_parts(load_vit(stage.vit), load_gpt(stage.gpt, stage.gpt_overrides()), stage.adapter,
                           stage.model_attention, stage.fusion, stage.cross_every)
    set_trainable_parts(model, stage)
    if not any(p.requires_grad for p in model.parameters()) and not stage.lora_rank:
        raise ConfigError("every part is frozen: nothing to train")
    return model


def set_trainable_parts(model: VLM, stage: VQAStageConfig) -> None:
    """The flags' choice of trainable parts; with LoRA the GPT's own weights stay fixed and only
    its LoRA matrices train."""
    set_trainable(model, vit=not stage.freeze_vit, adapter=not stage.freeze_adapter,
                  gpt=not stage.freeze_gpt and not stage.lora_rank)
    if stage.lora_rank:
        for name, p in model.gpt.named_parameters():
            p.requires_grad_(".lora_" in name)


def groups_of(parts: list[torch.nn.Module], lr: float, weight_decay: float) -> list[dict]:
    """param_groups over several modules (e.g. a VLM's connector: the adapter and cross blocks)."""
    return [g for part in parts for g in param_groups(part.named_parameters(), lr, weight_decay)]


def optimizer_for(model: VLM, stage: VQAStageConfig, run: RunConfig) -> torch.optim.Optimizer:
    groups = []
    for parts, lr in (([model.vit], stage.lr_vit), (model.connector(), stage.lr_adapter), ([model.gpt], stage.lr_gpt)):
        groups += groups_of(parts, lr or run.lr, run.weight_decay)
    return adamw(groups, run)


def load_splits(stage: VQAStageConfig, source: str, split: str, captions: bool, questions: bool):
    """(questions, captions) datasets of one split of `source` (None where not wanted), and their reports."""
    own = source not in BUILT_IN
    vqa, cap, reports = None, None, []
    if questions:
        columns = {"image_column": stage.image_column, "question_column": stage.question_column,
                   "answer_column": stage.answer_column, "max_bad_fraction": stage.max_bad_fraction}
        vqa, report = load_vqa_dataset(source, split, **(columns if own else {}))
        reports.append(report)
    if captions:
        columns = {"image_column": stage.image_column, "caption_column": stage.caption_column,
                   "max_bad_fraction": stage.max_bad_fraction}
        cap, report = load_caption_dataset(source, split, **(columns if own else {}))
        reports.append(report)
    return vqa, cap, reports


def load_all(stage: VQAStageConfig, captions: bool, questions: bool):
    """Training and evaluation rows: (train questions, train captions, eval questions, eval
    captions, report lines, data.EvaluationRows saying what is evaluated). Evaluation rows are a
    held-out share of the training images where the two would otherwise be the same rows
    (data.evaluation_rows); captions are one row per image here (all its references), the
    training captions become one row per caption later."""
    train_vqa, train_cap, reports = load_splits(stage, stage.dataset, stage.train_split, captions, questions)
    eval_captions = stage.task != "vqa"
    chosen = evaluation_rows(
        stage.dataset, stage.train_split, stage.eval_dataset, stage.eval_split, stage.holdout, [train_vqa, train_cap],
        lambda source: load_splits(stage, source, stage.eval_split, eval_captions, questions),
        scored=[True, eval_captions])  # captions only aligning are never scored
    train_vqa, train_cap = chosen.train
    if chosen.loaded is None:
        (eval_vqa, eval_cap), eval_reports = chosen.held, []
        eval_cap = eval_cap if eval_captions else None  # alignment-only captions are not scored
    else:
        eval_vqa, eval_cap, eval_reports = chosen.loaded
    return train_vqa, train_cap, eval_vqa, eval_cap, [f"data: {r}" for r in reports + eval_reports], chosen


def set_trainable(model: VLM, vit: bool, adapter: bool, gpt: bool) -> None:
    """`adapter` covers the whole connector: the adapter and, under cross fusion, the cross-attention blocks."""
    for parts, on in (([model.vit], vit), (model.connector(), adapter), ([model.gpt], gpt)):
        for part in parts:
            part.requires_grad_(on)


def align_plan(stage: VQAStageConfig, run_cfg: RunConfig) -> tuple[str, RunConfig]:
    """What the alignment phase does under --resume: "skip" (a checkpoint of the main phase holds
    every weight), "load" (its finished model, align/model) or "train" (fresh, or from its own
    checkpoints under align/ with --resume latest or a path inside align/), with the phase's RunConfig."""
    out = Path(run_cfg.output_dir)
    align_dir = out / "align"
    inside = resumes_alignment(run_cfg)
    phase = replace(run_cfg, output_dir=str(align_dir), epochs=stage.align_epochs, max_steps=0, eval_every=0,
                    resume=run_cfg.resume if (inside or run_cfg.resume == "latest") else None)
    if run_cfg.resume is not None and not inside and find_resume(run_cfg.resume, out, warn=False) is not None:
        return "skip", phase
    if run_cfg.resume is not None and not inside and is_mmfusion_folder(align_dir / "model"):
        return "load", phase
    return "train", phase


def check_align_resume(stage: VQAStageConfig, run_cfg: RunConfig, config) -> list[str]:
    """Refuse, before the run folder is touched, an alignment phase that would load a model built
    with other settings (its finished model or its own checkpoints); notes as check_resume_model."""
    plan, phase = align_plan(stage, run_cfg)
    if plan == "load":
        finished = Path(phase.output_dir) / "model"
        saved = model_record(VLM.load_config(finished))
        return compare_models(saved, config, f"cannot load the finished alignment {finished}")
    return check_resume_model(phase, config) if plan == "train" else []


def align(accelerator, stage: VQAStageConfig, run_cfg: RunConfig, model: VLM, captions, collate, step) -> VLM:
    """Phase 1: train only the adapter on captions (LLaVA's feature alignment); under --resume as
    align_plan says, its model checked by check_align_resume before the run started."""
    plan, phase = align_plan(stage, run_cfg)
    if plan == "skip":
        accelerator.print("alignment: skipped (resuming the main phase)")
        return model
    if plan == "load":
        model.load_state_dict(VLM.from_pretrained(Path(phase.output_dir) / "model").state_dict())
        accelerator.print(f"alignment: loaded the finished phase from {Path(phase.output_dir) / 'model'}")
        return model
    set_trainable(model, vit=False, adapter=True, gpt=False)
    optimizer = adamw(groups_of(model.connector(), stage.lr_adapter or run_cfg.lr, run_cfg.weight_decay), run_cfg)
    accelerator.print(f"alignment: adapter only, {stage.align_epochs} epochs on {len(captions)} captions")
    model = train(accelerator, phase, model, optimizer, Rows(captions), collate, step, unit="tok", tag="align")
    if accelerator.is_main_process:
        model.save_pretrained(Path(phase.output_dir) / "model")
    accelerator.free_memory()  # forget the phase's prepared model/optimizer, so save_state sees only the next
    return model


def lora_base(gpt: str) -> str | None:
    """What the LoRA adapter names as its base model, where transformers can load it: a hub id, or
    a transformers folder (absolute); None for a preset or a saved mmfusion GPT (its export is the base)."""
    path = Path(gpt).expanduser()
    if gpt in GPT_PRESETS or is_mmfusion_folder(path):
        return None
    return str(path.resolve()) if path.exists() else gpt


def vqa_step(m, batch, loss_per: str = "token") -> tuple[torch.Tensor, torch.Tensor, int]:
    """One micro-step's loss, its token count and the terms the loss averages (supervised tokens, or
    rows with loss_per="example"), by which the loop weighs it; `m` may be wrapped (DDP, compile)."""
    inner = extract_model_from_parallel(m, keep_torch_compile=False)
    for part in (inner.vit, *inner.connector(), inner.gpt):
        if not any(p.requires_grad for p in part.parameters()):
            part.eval()  # a frozen part runs without dropout
    output = m(**batch, loss_per=loss_per)
    terms = output.num_tokens if loss_per == "token" else len(batch["input_ids"])
    return output.loss, batch["attention_mask"].sum(), terms  # a tensor: the loop reads it after the step


def tasks(stage: VQAStageConfig) -> tuple[bool, bool]:
    """(questions, captions): which kinds of rows the stage needs; refuses captions easy-vqa lacks."""
    questions, captions = stage.task in ("vqa", "both"), stage.task in ("caption", "both") or stage.align_epochs > 0
    if captions and stage.dataset == EASY_VQA:
        raise DatasetError(f"--task {stage.task}" + (f" --align-epochs {stage.align_epochs}" if stage.align_epochs else "")
                           + f" needs captions, which {EASY_VQA!r} has none of: use --task vqa --align-epochs 0, the "
                           f"built-in {SCENES!r}, or your own data with a caption column")
    return questions, captions


def short_run_rows(stage: VQAStageConfig, run_cfg: RunConfig, processes: int = 1) -> int | None:
    """Rows a --max-steps run without an alignment phase trains on, over all `processes` (ViT passes
    without cached features; with them, the processes share the images' passes), else None: whole
    epochs, where easy-VQA's ~10 questions per image make caching pay many times over."""
    if run_cfg.max_steps == 0 or stage.align_epochs > 0:
        return None
    return run_cfg.max_steps * run_cfg.batch_size * run_cfg.grad_accum * processes


def shared_predictions(accelerator, stage: VQAStageConfig, m: VLM, eval_vqa, eval_cap,
                       limit: int | None) -> tuple[list[dict] | None, list[dict] | None]:
    """Predicted answers and captions for the first `limit` rows of each eval split (None: all; a
    split that is None: None), each process predicting its share; every process gets all rows."""
    def rows(dataset, predict_fn, max_new_tokens):
        if dataset is None:
            return None
        n = len(dataset) if limit is None else min(limit, len(dataset))
        return across_processes(accelerator, n, lambda first, stop: predict_fn(
            m, dataset, stop, stage.eval_batch_size, max_new_tokens, first=first))

    return (rows(eval_vqa, predict, stage.max_new_tokens),
            rows(eval_cap, predict_captions, stage.caption_max_new_tokens))


def periodic_evaluation(accelerator, stage: VQAStageConfig, run_cfg: RunConfig, eval_vqa, eval_cap, m: VLM,
                        full: bool) -> dict[str, float]:
    """The loop's evaluation: `eval_samples` rows of each eval split (all of them with full=True)."""
    answers, captions = shared_predictions(accelerator, stage, m, eval_vqa, eval_cap,
                                           None if full else run_cfg.eval_samples)
    metrics = {}
    if answers is not None:
        metrics["vqa_accuracy"] = score(answers)["accuracy"]
    if captions is not None:
        metrics.update({f"caption_{k}": v for k, v in score_captions(captions).items() if k != "count"})
    return metrics


@progress_flag_for_datasets
def run(stage: VQAStageConfig, run_cfg: RunConfig) -> dict:
    """Train and evaluate; returns the final metrics (on the main process, which saves and writes
    them; every process predicts its share of the eval rows, then the others return {})."""
    out = Path(run_cfg.output_dir)
    questions, captions = tasks(stage)
    set_seed(run_cfg.seed)
    train_vqa, train_cap, eval_vqa, eval_cap, data_lines, evaluated_on = load_all(stage, captions, questions)
    data_lines.append(evaluated_on.line)
    if train_cap is not None:
        train_cap = caption_rows(train_cap)
        if stage.caption_any_order:
            train_cap, line = captions_in_any_order(train_cap, stage.caption_any_order)
            data_lines.append(line)
    model = build_vlm(stage)
    prompts = PromptBuilder(model.prompt_slots, model.config.gpt.block_size)
    check_targets_fit(prompts, train_vqa, train_cap, f"--dataset {stage.dataset} [{stage.train_split}]")
    vocab_lines = set_output_vocab(model, stage, prompts, train_vqa, train_cap)
    # a resume's model settings, before feature caching
    vocab_lines += [] if resumes_alignment(run_cfg) else check_resume_model(run_cfg, model.config)
    vocab_lines += check_align_resume(stage, run_cfg, model.config) if stage.align_epochs > 0 else []
    processor = ImageProcessor.from_config(model.config.vit)
    cached = stage.freeze_vit and stage.cache_features
    rows = short_run_rows(stage, run_cfg, world_size())
    total = sum(len(ds) for ds in (train_vqa, train_cap) if ds is not None)  # >= the images: no hashing needed
    if cached and rows is not None and rows < total and rows < (images := distinct_images(train_vqa, train_cap)):
        cached = False  # a smoke run of a few steps would otherwise wait for every image's features
        steps = "1 step trains" if run_cfg.max_steps == 1 else f"{run_cfg.max_steps} steps train"
        data_lines.append(f"data: {steps} on {rows} rows, fewer than the {images} images caching their ViT "
                          "features would encode first: the frozen ViT runs every step instead")
    step = functools.partial(vqa_step, loss_per=stage.loss_per)
    precision = choose_precision(run_cfg)
    accelerator = make_accelerator(run_cfg, precision)
    accelerator.print("\n".join(data_lines + vocab_lines))
    if cached:
        train_vqa, train_cap = (with_features(accelerator, run_cfg, model, processor, ds) for ds in (train_vqa, train_cap))
    weights = sampling_weights(accelerator, stage, train_vqa, train_cap)
    if questions and stage.turns > 1:
        train_vqa = Conversations(train_vqa, stage.turns, run_cfg.seed)
        accelerator.print(f"data: {train_vqa}")
    if stage.task == "both":
        task_rows = torch.utils.data.ConcatDataset([train_vqa, train_cap])
    else:
        task_rows = train_vqa if stage.task == "vqa" else train_cap
    collate = VQACollator(processor, prompts)
    steps_per_epoch(len(task_rows), run_cfg, accelerator.num_processes)
    if stage.align_epochs > 0:
        steps_per_epoch(len(train_cap), run_cfg, accelerator.num_processes, "the alignment captions")
    start_run_folder(accelerator, out, "train_vqa", stage=stage, run=run_cfg, model=model.config,
                     precision=precision.to_dict())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"VLM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
                      f"({trainable / 1e6:.2f}M trainable), {model.num_image_tokens} image tokens "
                      + (f"read by cross-attention before GPT blocks {list(model.config.cross_layers)}, "
                         if model.config.fusion == "cross" else "in the prompt, ") +
                      f"precision {accelerator.mixed_precision}")

    if stage.align_epochs > 0:
        model = align(accelerator, stage, run_cfg, model, train_cap, collate, step)
    # after alignment, whose saved model stays a plain VLM
    lora = add_lora(model.gpt, stage.lora_rank, stage.lora_alpha, stage.lora_target_names) if stage.lora_rank else None
    set_trainable_parts(model, stage)
    if lora is not None:
        updates = sum(p.numel() for n, p in model.gpt.named_parameters() if ".lora_" in n)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        layers = ", ".join(sorted(stage.lora_target_names))
        accelerator.print(f"LoRA: rank {stage.lora_rank} updates of the GPT's {layers} layers, "
                          f"{updates / 1e6:.3f}M parameters; {trainable / 1e6:.3f}M trainable in all")
    optimizer = optimizer_for(model, stage, run_cfg)

    evaluate = functools.partial(periodic_evaluation, accelerator, stage, run_cfg, eval_vqa, eval_cap)
    main_run = replace(run_cfg, resume=None) if resumes_alignment(run_cfg) else run_cfg
    model = train(accelerator, main_run, model, optimizer, Rows(task_rows), collate, step, evaluate, unit="tok",
                  weights=weights, data=evaluated_on.record)
    if lora is not None:
        if accelerator.is_main_process:
            save_lora(lora, model.gpt, out / "lora", base=lora_base(stage.gpt))
        merge_lora(lora)  # the saved model is a plain VLM
    if accelerator.is_main_process:
        model.save_pretrained(out / "model")
    metrics = final_evaluation(accelerator, stage, model, eval_vqa, eval_cap, out)
    if accelerator.is_main_process:
        metrics["truncated_questions"] = prompts.truncated
        metrics["dropped_turns"] = prompts.dropped_turns
        metrics["precision"] = precision.resolved
        metrics["evaluation"] = evaluated_on.line
        write_json(out / "metrics.json", metrics)
        accelerator.print(f"model saved to {out / 'model'}")
    end_trackers(accelerator)
    return metrics


def set_output_vocab(model: VLM, stage: VQAStageConfig, prompts: PromptBuilder, questions, captions) -> list[str]:
    """--output-vocab: restrict the LM head to the training targets' tokens (and those it already
    scores), or check that a head saved with a restricted set can produce them. Returns log lines."""
    have = model.config.gpt.output_tokens
    vocab = model.config.gpt.vocab_size
    mode = stage.output_vocab
    if mode == "auto":
        mode = "data" if stage.gpt in GPT_PRESETS else "all"
    if mode == "all" and have is None:
        return []  # every token scored: nothing to restrict or check, so the targets are not tokenized
    needed = target_tokens(prompts, questions, captions)
    if mode == "data":
        model.restrict_output(set(needed) | set(have or ()))
        return [f"LM head: scores the {len(model.config.gpt.output_tokens)} tokens of the training targets "
                f"(of {vocab:,}; --output-vocab {stage.output_vocab})"]
    missing = sorted(set(needed) - set(have))
    if missing:
        example = prompts.tokenizer.decode(missing[:5])
        raise ConfigError(f"the GPT scores only its {len(have)} output tokens (GPTConfig.output_tokens), and the "
                          f"training targets hold {len(missing)} others (e.g. {example!r}); pass --output-vocab data "
                          "to add them")
    return [f"LM head: scores the model's {len(have)} output tokens (of {vocab:,})"]


def sampling_weights(accelerator, stage: VQAStageConfig, questions, captions) -> torch.Tensor | None:
    """--balance-answers' weight per training row (questions first, then captions at weight 1,
    the order of the stage's rows), or None to sample uniformly; says what it changed."""
    if not stage.balance_answers or questions is None:
        return None
    if stage.turns > 1:
        accelerator.print(f"data: --balance-answers {stage.balance_answers:g} weights single questions, not "
                          f"conversations (--turns {stage.turns}): rows are drawn as a permutation")
        return None
    texts, answers = list(questions["question"]), list(questions["answers"])
    weights = answer_balance_weights(texts, answers, stage.balance_answers)
    if torch.allclose(weights, torch.ones_like(weights)):
        accelerator.print(f"data: --balance-answers {stage.balance_answers:g} changes nothing here (each question "
                          "text's answers are already equally common, or it has one): rows are drawn as a permutation")
        return None
    before, after = rarest_answer_share(texts, answers), rarest_answer_share(texts, answers, weights)
    accelerator.print(f"data: answers balanced within each question text (--balance-answers {stage.balance_answers:g}): "
                      f"a text's rarest answer gets {after:.1%} of its draws, not {before:.1%} (median over texts)")
    if stage.task == "both":
        weights = torch.cat([weights, torch.ones(len(captions), dtype=weights.dtype)])
    return weights


def with_features(accelerator, run_cfg: RunConfig, model: VLM, processor: ImageProcessor, dataset):
    """The dataset's rows with the frozen ViT's features in place of images (FeatureRows), or the
    dataset itself when there is none or the features would not fit in memory."""
    if dataset is None:
        return None
    rows = FeatureRows.compute(model, dataset, processor, device=accelerator.device, autocast=accelerator.autocast,
                               progress=run_cfg.progress and accelerator.is_local_main_process,
                               split=functools.partial(across_processes, accelerator))
    accelerator.print(f"data: {rows}" if rows is not None else
                      f"data: the ViT features of {len(dataset)} rows would not fit in "
                      f"{MEMORY_LIMIT_BYTES / 2**30:.0f} GiB; the ViT runs every step")
    return dataset if rows is None else rows


def final_evaluation(accelerator, stage: VQAStageConfig, model: VLM, eval_vqa, eval_cap, out: Path) -> dict:
    """Score the whole eval split, each process predicting its share; the main process writes
    predictions.jsonl / captions.jsonl and returns the metrics (the others: {}). VQA metrics sit at
    the top level (accuracy, count, per_type), caption metrics under "captions"."""
    with accelerator.autocast():
        answers, captions = shared_predictions(accelerator, stage, model, eval_vqa, eval_cap, stage.final_eval_limit)
    if not accelerator.is_main_process:
        return {}
    metrics: dict = {}
    if answers is not None:
        metrics.update(score(answers))
        if stage.dataset == SCENES:
            metrics["per_template"] = score_by_template(answers)
        write_jsonl(out / "predictions.jsonl", answers)
        accelerator.print(f"VQA accuracy {metrics['accuracy']:.4f} on {metrics['count']} questions")
    if captions is not None:
        metrics["captions"] = score_captions(captions)
        write_jsonl(out / "captions.jsonl", captions)
        m = metrics["captions"]
        accelerator.print(f"captions: exact match {m['exact_match']:.4f}, token F1 {m['token_f1']:.4f}, "
                          f"BLEU-4 {m['bleu4']:.4f}, CIDEr-D {m['cider']:.3f} on {m['count']} images")
    return metrics


def parse(argv: list[str] | None = None, stage: VQAStageConfig | None = None,
          run: RunConfig = STAGE_DEFAULTS) -> tuple[VQAStageConfig, RunConfig]:
    """The stage's configs from command-line flags over the defaults given (a job's, or the stage's)."""
    defaults = {"data and model": stage or VQAStageConfig(), "training": run}
    stage, run_cfg = parse_configs(argv, "mmfusion train-vqa", __doc__, defaults)
    return stage, run_cfg


def main(argv: list[str] | None = None) -> None:
    run(*parse(argv))


def script() -> None:
    """`python training/train_vqa.py` and `python -m`: bad input as one line, exit code 2, as `mmfusion`."""
    sys.exit(run_command(main))


if __name__ == "__main__":
    script()
