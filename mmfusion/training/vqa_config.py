"""Stage 2's own settings (`train-vqa`'s flags beyond the shared RunConfig): the data, the parts
and how they are built, frozen and fused, and the final evaluation. Checked at parse time."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import (
    GPT_PRESETS,
    VIT_PRESETS,
    AdapterConfig,
    ConfigError,
    VLMConfig,
    check_number,
    gpt_preset,
    vit_preset,
)
from ..data import BUILT_IN, SCENES
from .data import EVAL_DATASET_FIELD, HOLDOUT_FIELD, check_eval_choice
from .lora import TARGETS


@dataclass(frozen=True)
class VQAStageConfig:
    dataset: str = field(default="easy-vqa", metadata={
        "help": "easy-vqa, scenes (with captions), a parquet/JSONL file or folder, or a hub id (captions from "
                "--caption-column)"})
    task: str = field(default="vqa", metadata={
        "help": "train on questions, captions, or both mixed", "choices": ["vqa", "caption", "both"]})
    loss_per: str = field(default="token", metadata={
        "help": "average the loss over every supervised token of a step's global batch (all micro-batches and "
                "processes), or per example first (a one-word answer then weighs as much as a caption)",
        "choices": ["token", "example"]})
    # 0.5 in the main job's recipe: at 0 a seed could leave "is there a <color> shape?" (yes 1 time in 8)
    # answered "no" to the end (94.6% VQA); 0.5 gave 99.8% on that seed (docs/experiments.md).
    balance_answers: float = field(default=0.5, metadata={
        "help": "draw training questions so the answers to each question text are evened out: 0 keeps the data's "
                "shares, 1 makes them equal, 0.5 halfway in log space (templated yes/no questions whose rare answer "
                "a run may otherwise never learn); each question text keeps its share of the epoch, rows are drawn "
                "with replacement"})
    caption_any_order: float = field(default=0.0, metadata={
        "help": "scenes only: the share of training scenes whose caption names the shapes in a random order "
                "instead of reading order, so writing 'at the P' means finding the shape just named (the "
                "captions job: 0.25); evaluation captions keep reading order"})
    turns: int = field(default=1, metadata={
        "help": "questions per training example: up to N questions about one image in one sequence "
                "(a conversation; the image is encoded once and every answer is supervised)"})
    align_epochs: float = field(default=0.0, metadata={
        "help": "first train only the adapter on captions for this many epochs (0: no alignment phase)"})
    train_split: str = field(default="train", metadata={"help": "training split"})
    eval_split: str = field(default="test", metadata={"help": "evaluation split"})
    eval_dataset: str | None = field(default=None, metadata=EVAL_DATASET_FIELD)
    holdout: float | None = field(default=None, metadata=HOLDOUT_FIELD)
    image_column: str = field(default="image", metadata={"help": "column holding the images"})
    question_column: str = field(default="question", metadata={"help": "column holding the questions"})
    answer_column: str | None = field(default=None, metadata={
        "help": "column holding an answer or a list of answers (default: 'answers', else 'answer')"})
    caption_column: str | None = field(default=None, metadata={
        "help": "column holding a caption or a list of captions per image, COCO-style (default: 'captions', "
                "else 'caption')"})
    max_bad_fraction: float = field(default=0.01, metadata={"help": "stop if more rows than this are unusable"})
    vit: str = field(default="runs/vit/model", metadata={
        "help": f"saved ViT folder, a preset ({', '.join(VIT_PRESETS)}) or transformers ViT/CLIP weights"})
    gpt: str = field(default="gpt-tiny", metadata={
        "help": f"a preset ({', '.join(GPT_PRESETS)}) for a fresh GPT, a saved GPT folder, "
                "or transformers GPT-2 weights (a folder or hub id, e.g. gpt2)"})
    block_size: int | None = field(default=None, metadata={"help": "override a fresh GPT's context length"})
    gpt_init_std: float | None = field(default=None, metadata={
        "help": "override a fresh GPT's initializer_range, the std of its Normal init (GPT-2: 0.02)"})
    # The main job's stage 2 adapter: CLS kept (stage 1 trained it to name the shape and color).
    adapter: AdapterConfig = field(default=AdapterConfig(pixel_shuffle=2, keep_cls=True), metadata={
        "only": ("projection", "layer", "keep_cls", "pixel_shuffle", "merge", "position_embedding"),
        "flags": {"layer": "adapter_layer", "position_embedding": "image_positions"}})
    attention: str = field(default="prefix", metadata={
        "help": "early fusion: image tokens attend causally or bidirectionally (prefix); cross fusion is causal",
        "choices": ["causal", "prefix"]})
    fusion: str = field(default="early", metadata={
        "help": "early: image tokens in the prompt's <|image|> slots; cross: gated cross-attention blocks in the GPT "
                "read them (Flamingo; the text holds no slots)", "choices": ["early", "cross"]})
    cross_every: int = field(default=1, metadata={"help": "cross fusion: a cross-attention block before every "
                                                          "K-th GPT block"})
    # auto -> data for a fresh GPT: it can only learn the targets' tokens anyway, and scoring 50,257
    # rows was most of a stage-2 step on a CPU (benchmarks/fusion.py).
    output_vocab: str = field(default="auto", metadata={
        "help": "tokens the LM head scores: data (only the tokens of the training answers and captions: the loss "
                "and decoding get much cheaper, and no other token is ever produced), all (the model's own set: the "
                "whole GPT-2 vocabulary unless it was saved with fewer), or auto (data for a fresh GPT from a "
                "preset, all for a saved or pretrained one)", "choices": ["auto", "all", "data"]})
    freeze_vit: bool = field(default=True, metadata={"help": "keep the ViT's weights fixed"})
    cache_features: bool = field(default=True, metadata={
        "help": "with a frozen ViT, compute each training image's ViT features once, before training "
                "(the same numbers; saves the ViT and the image decoding every step); skipped when --max-steps "
                "trains on fewer rows than there are images"})
    freeze_adapter: bool = field(default=False, metadata={"help": "keep the adapter's weights fixed"})
    freeze_gpt: bool = field(default=False, metadata={"help": "keep the GPT's weights fixed"})
    lora_rank: int = field(default=0, metadata={
        "help": "train rank-R LoRA updates of the GPT's attention and MLP layers instead of its weights, merged "
                "into them at the end (0: off; needs peft)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scale numerator (default: 2 x rank)"})
    lora_targets: str = field(default=",".join(TARGETS), metadata={
        "help": "comma-separated GPT layers LoRA updates: qkv and proj (attention), fc and proj (MLP)"})
    lr_vit: float | None = field(default=None, metadata={"help": "ViT learning rate (default: --lr)"})
    lr_adapter: float | None = field(default=None, metadata={"help": "adapter learning rate (default: --lr)"})
    lr_gpt: float | None = field(default=None, metadata={"help": "GPT learning rate (default: --lr)"})
    max_new_tokens: int = field(default=8, metadata={"help": "answer length limit at evaluation"})
    caption_max_new_tokens: int = field(default=48, metadata={"help": "caption length limit at evaluation"})
    final_eval_limit: int | None = field(default=None, metadata={
        "help": "score only the first N questions and N captions at the end (default: the whole split)"})
    eval_batch_size: int = field(default=256, metadata={"help": "batch size for evaluation"})

    def __post_init__(self) -> None:
        # Impossible values stop here, at parse time: before any data is read or any folder written.
        for name in ("turns", "max_new_tokens", "caption_max_new_tokens", "eval_batch_size", "block_size",
                     "final_eval_limit"):
            if getattr(self, name) is not None:
                check_number(f"--{name.replace('_', '-')}", getattr(self, name), 1, integer=True)
        for name in ("lr_vit", "lr_adapter", "lr_gpt", "gpt_init_std"):
            if getattr(self, name) is not None:
                check_number(f"--{name.replace('_', '-')}", getattr(self, name), 0, low_open=True)
        check_number("--max-bad-fraction", self.max_bad_fraction, 0, 1)
        check_number("--balance-answers", self.balance_answers, 0, 1)
        check_number("--caption-any-order", self.caption_any_order, 0, 1)
        if self.caption_any_order and self.dataset != SCENES:
            raise ConfigError(f"--caption-any-order reorders the built-in {SCENES!r} captions, not --dataset "
                              f"{self.dataset!r}'s; pass --caption-any-order 0")
        check_number("--lora-rank", self.lora_rank, 0, integer=True)
        if self.lora_alpha is not None:
            check_number("--lora-alpha", self.lora_alpha, 0, low_open=True)
        unknown = sorted(set(self.lora_target_names) - set(TARGETS)) or ([] if self.lora_target_names else ["(none)"])
        if unknown:
            raise ConfigError(f"--lora-targets {self.lora_targets!r}: {', '.join(unknown)} is not a GPT layer LoRA "
                              f"can update; choose from {', '.join(TARGETS)}")
        check_eval_choice(self.eval_dataset, self.holdout)
        check_number("--align-epochs", self.align_epochs, 0)
        if self.block_size is not None and self.gpt not in GPT_PRESETS:
            raise ConfigError("--block-size applies only to a fresh GPT from a preset")
        if self.gpt_init_std is not None and self.gpt not in GPT_PRESETS:
            raise ConfigError(f"--gpt-init-std applies only to a fresh GPT from a preset, not {self.gpt!r}")
        if self.freeze_vit and self.freeze_adapter and self.freeze_gpt and not self.lora_rank:
            raise ConfigError("every part is frozen: nothing to train")
        check_number("--cross-every", self.cross_every, 1, integer=True)
        self._check_unused_flags()
        if self.vit in VIT_PRESETS and self.gpt in GPT_PRESETS:  # the whole model is known without reading files
            gpt = gpt_preset(self.gpt, **self.gpt_overrides())
            VLMConfig(vit=vit_preset(self.vit, num_classes=0), gpt=gpt, adapter=self.adapter,
                      attention=self.model_attention, fusion=self.fusion, cross_every=self.cross_every)

    def _check_unused_flags(self) -> None:
        """A flag this configuration would ignore is a ConfigError, not a silent no-op."""
        builtin = self.dataset in BUILT_IN and (self.eval_dataset is None or self.eval_dataset in BUILT_IN)
        own_data = "the built-in datasets name their own columns and have no bad rows: it applies to your data"
        unused = tuple((f"--{name.replace('_', '-')}", builtin and getattr(self, name) != self.__dataclass_fields__[name].default,
                        own_data) for name in ("image_column", "question_column", "answer_column", "caption_column",
                                               "max_bad_fraction"))
        unused += (  # (flag, ignored here, what would make it count)
            ("--lora-alpha", self.lora_alpha is not None and not self.lora_rank, "add --lora-rank R"),
            ("--lora-targets", self.lora_targets != ",".join(TARGETS) and not self.lora_rank, "add --lora-rank R"),
            ("--cross-every", self.cross_every != 1 and self.fusion != "cross", "add --fusion cross"),
            ("--lr-vit", self.lr_vit is not None and self.freeze_vit, "the ViT is frozen: add --no-freeze-vit"),
            ("--lr-adapter", self.lr_adapter is not None and self.freeze_adapter and not self.align_epochs,
             "the adapter is frozen: drop --freeze-adapter or add --align-epochs"),
            ("--lr-gpt", self.lr_gpt is not None and self.freeze_gpt and not self.lora_rank,
             "the GPT is frozen: drop --freeze-gpt or add --lora-rank R"),
        )
        for flag, ignored, fix in unused:
            if ignored:
                raise ConfigError(f"{flag} would be ignored here ({fix}), or drop it")

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def model_attention(self) -> str:
        """The model's attention: --attention under early fusion; causal under cross (no image slots)."""
        return self.attention if self.fusion == "early" else "causal"

    def model_inputs(self) -> dict[str, str | None]:
        """The model folders this stage reads (run_folder.check_keeps_inputs)."""
        return {"--vit": self.vit, "--gpt": self.gpt}

    def data_inputs(self) -> dict[str, str | None]:
        """The datasets this stage reads (run_folder.check_keeps_data)."""
        return {"--dataset": self.dataset, "--eval-dataset": self.eval_dataset}

    def gpt_overrides(self) -> dict:
        """The preset fields a fresh GPT's flags override."""
        return {k: v for k, v in (("block_size", self.block_size), ("initializer_range", self.gpt_init_std))
                if v is not None}
