"""Impossible configs and flags are rejected before any work starts: the config dataclasses raise
ConfigError naming the field and the fix; the stage commands end with one line and exit code 2
before reading data or creating the output folder. (More config cases: tests/test_models.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmfusion.cli import main
from mmfusion.config import AdapterConfig, ConfigError, GPTConfig, ViTConfig, VLMConfig
from mmfusion.generation import GenerationConfig
from mmfusion.training.setup import RunConfig

TINY_VIT = ViTConfig(image_size=32, patch_size=8, n_layer=2, n_head=2, n_embd=32, num_classes=0)
TINY_GPT = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)

API = {
    "vit_negative_width": (lambda: ViTConfig(n_embd=-64, n_head=4), "n_embd must be a positive integer"),
    "vit_zero_heads": (lambda: ViTConfig(n_head=0), "n_head must be a positive integer"),
    "vit_negative_patch": (lambda: ViTConfig(patch_size=-16), "patch_size must be a positive integer"),
    "vit_zero_channels": (lambda: ViTConfig(num_channels=0), "num_channels must be a positive integer"),
    "vit_float_width": (lambda: ViTConfig(n_embd=768.0), "n_embd must be a positive integer, got 768.0"),
    "vit_bool_depth": (lambda: ViTConfig(n_layer=True), "n_layer must be a positive integer, got True"),
    "vit_bool_classes": (lambda: ViTConfig(num_classes=True), "num_classes must be >= 0 (an integer), got True"),
    "vit_float_classes": (lambda: ViTConfig(num_classes=10.0), "num_classes must be >= 0 (an integer), got 10.0"),
    "vit_width_not_divisible_by_heads": (lambda: ViTConfig(n_embd=100, n_head=12),
                                         "n_embd=100 is not divisible by n_head=12; pick a width"),
    "vit_patch_larger_than_image": (lambda: ViTConfig(image_size=16, patch_size=32),
                                    "patch_size=32 is larger than image_size=16"),
    "vit_negative_dropout": (lambda: ViTConfig(dropout=-0.1), "dropout must be in [0, 1)"),
    "vit_mean_wrong_length": (lambda: ViTConfig(image_mean=(0.5, 0.5)), "one value per channel"),
    "vit_unknown_final_norm": (lambda: ViTConfig(final_norm="none"), "final_norm must be 'all' or 'cls'"),
    "vit_unknown_pool": (lambda: ViTConfig(pool="max"), "pool must be 'cls' or 'mean'"),
    "gpt_huge_context": (lambda: GPTConfig(block_size=10**12), "GPTConfig would hold about 7.68e+14 parameters"),
    "gpt_huge_width": (lambda: GPTConfig(n_embd=2**20, n_head=2**10), "check these sizes"),
    "vit_huge_image": (lambda: ViTConfig(image_size=16 * 10**6), "ViTConfig would hold about 7.68e+14 parameters"),
    "gpt_zero_layers": (lambda: GPTConfig(n_layer=0), "n_layer must be a positive integer"),
    "gpt_negative_width": (lambda: GPTConfig(n_embd=-768), "n_embd must be a positive integer"),
    "gpt_width_not_divisible_by_heads": (lambda: GPTConfig(n_embd=100, n_head=12), "not divisible by n_head=12"),
    "gpt_dropout_one": (lambda: GPTConfig(dropout=1.0), "dropout must be in [0, 1)"),
    "gpt_negative_mlp": (lambda: GPTConfig(intermediate_size=-1), "intermediate_size must be a positive integer"),
    "adapter_zero_shuffle": (lambda: AdapterConfig(pixel_shuffle=0), "pixel_shuffle must be a positive integer"),
    "adapter_unknown_merge": (lambda: AdapterConfig(merge="sum"), "merge must be 'concat' or 'mean'"),
    "adapter_layer_below_minus_one": (lambda: AdapterConfig(layer=-2), "layer must be -1 (last) or a block index"),
    "adapter_bool_layer": (lambda: AdapterConfig(layer=True), "layer must be -1 (last) or a block index >= 0, got True"),
    "vlm_part_of_wrong_type": (lambda: VLMConfig(vit=TINY_GPT, gpt=TINY_GPT), "VLMConfig.vit must be a ViTConfig"),
    "vlm_image_tokens_fill_context": (lambda: VLMConfig(vit=TINY_VIT, gpt=TINY_GPT.replace(block_size=16)),
                                      "16 image tokens do not fit the GPT context of 16"),
    # the tokenizer's ids: a smaller table fails on them (IndexError), a larger head emits ids nothing decodes
    "vlm_small_vocab": (lambda: VLMConfig(vit=TINY_VIT, gpt=TINY_GPT.replace(vocab_size=1000)),
                        "VLMConfig.gpt.vocab_size=1000, but a VLM reads and writes the GPT-2 tokenizer's ids: "
                        "use vocab_size=50257"),
    "vlm_padded_vocab": (lambda: VLMConfig(vit=TINY_VIT, gpt=TINY_GPT.replace(vocab_size=50304)),
                         "VLMConfig.gpt.vocab_size=50304"),
    # PromptBuilder always writes the tokenizer's <|image|> id (50257) into the slots
    "vlm_other_image_token": (lambda: VLMConfig(vit=TINY_VIT, gpt=TINY_GPT, image_token_id=5),
                              "image_token_id must be 50257, the tokenizer's <|image|> id that PromptBuilder writes"),
    "vlm_image_token_as_text": (lambda: VLMConfig(vit=TINY_VIT, gpt=TINY_GPT, image_token_id="50257"),
                                "image_token_id must be 50257"),
    "vlm_image_token_as_float": (lambda: VLMConfig(vit=TINY_VIT, gpt=TINY_GPT, image_token_id=50257.0),
                                 "image_token_id must be 50257"),
    "generation_zero_new_tokens": (lambda: GenerationConfig(max_new_tokens=0), "max_new_tokens must be >= 1"),
    "generation_negative_temperature": (lambda: GenerationConfig(temperature=-1.0), "temperature must be >= 0"),
    "generation_zero_top_k": (lambda: GenerationConfig(top_k=0), "top_k must be >= 1"),
    "generation_zero_top_p": (lambda: GenerationConfig(top_p=0.0), r"top_p must be in (0, 1]"),
    "run_zero_batch": (lambda: RunConfig(batch_size=0), "--batch-size must be >= 1"),
    "run_negative_lr": (lambda: RunConfig(lr=-1e-3), "--lr must be positive"),
    "run_no_length": (lambda: RunConfig(epochs=0, max_steps=0), "set --epochs > 0 or --max-steps > 0"),
    "run_beta2_one": (lambda: RunConfig(beta2=1.0), "--beta2 must be in [0, 1)"),
    "run_negative_weight_decay": (lambda: RunConfig(weight_decay=-0.1), "--weight-decay must be >= 0"),
}


@pytest.mark.parametrize("case", sorted(API))
def test_impossible_config_raises_config_error(case):
    make, message = API[case]
    with pytest.raises(ConfigError) as info:
        make()
    assert message in str(info.value), str(info.value)


def _flag_fields() -> list[tuple[type, str]]:
    import dataclasses

    return [(cls, f.name) for cls in (ViTConfig, GPTConfig, AdapterConfig, VLMConfig)
            for f in dataclasses.fields(cls) if f.type == "bool"]


FLAG_FIELDS = _flag_fields()


def test_every_bool_field_is_covered():
    assert {f"{cls.__name__}.{name}" for cls, name in FLAG_FIELDS} >= {
        "ViTConfig.qkv_bias", "ViTConfig.patch_bias", "ViTConfig.pre_norm", "GPTConfig.bias",
        "AdapterConfig.keep_cls", "AdapterConfig.position_embedding"}


@pytest.mark.parametrize("value", ["false", "no", 0, 1, None])
@pytest.mark.parametrize("cls, name", FLAG_FIELDS, ids=[f"{c.__name__}.{n}" for c, n in FLAG_FIELDS])
def test_a_bool_field_refuses_anything_but_a_bool(cls, name, value):
    """"false" and "no" are truthy: a hand-edited config.json would build the layer it meant to drop."""
    with pytest.raises(ConfigError, match=f"{cls.__name__}.{name} must be true or false \\(a bool\\), got"):
        cls(**{name: value})
    for flag in (True, False):
        assert getattr(cls(**{name: flag}), name) is flag


@pytest.mark.parametrize("vocab", [50257, 50258])
def test_a_vlm_takes_the_vocabularies_the_tokenizer_covers(vocab):
    """GPT-2's 50257 ids, or those plus a row for <|image|> (the tokenizer's 50258)."""
    from mmfusion.tokenizer import IMAGE_ID, get_tokenizer

    assert get_tokenizer().vocab_size == 50258 and IMAGE_ID == 50257
    config = VLMConfig(vit=TINY_VIT, gpt=TINY_GPT.replace(vocab_size=vocab))
    assert config.gpt.vocab_size == vocab and config.image_token_id == IMAGE_ID


def run_cli(capsys, args: list[str]) -> tuple[int, str]:
    """The exit code and stderr of `mmfusion ARGS` (argparse's own errors exit through SystemExit)."""
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


VIT_FLAGS = {
    "width_not_divisible_by_heads": (["--n-embd", "100", "--n-head", "12"], "n_embd=100 is not divisible by n_head=12"),
    "patch_larger_than_image": (["--image-size", "8", "--patch-size", "16"], "patch_size=16 is larger than image_size=8"),
    "image_not_divisible_by_patch": (["--patch-size", "7"], "image_size=64 is not divisible by patch_size=7"),
    "negative_image_size": (["--image-size", "-32"], "image_size must be a positive integer, got -32"),
    "huge_image_size": (["--image-size", str(8 * 10**6)], "ViTConfig would hold about"),
    "zero_layers": (["--n-layer", "0"], "n_layer must be a positive integer"),
    "negative_heads": (["--n-head", "-2"], "n_head must be a positive integer"),
    "dropout_above_one": (["--dropout", "1.5"], "dropout must be in [0, 1)"),
    "unknown_preset": (["--preset", "vit-huge"], "unknown ViT preset 'vit-huge'"),
    "bad_fraction_above_one": (["--max-bad-fraction", "2"], "--max-bad-fraction must be in [0, 1]"),
    "zero_batch": (["--batch-size", "0"], "--batch-size must be >= 1"),
    "zero_grad_accum": (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    "negative_lr": (["--lr", "-1"], "--lr must be positive"),
    "min_lr_ratio_above_one": (["--min-lr-ratio", "1.5"], "--min-lr-ratio must be in [0, 1]"),
    "no_epochs_no_steps": (["--epochs", "0", "--max-steps", "0"], "set --epochs > 0 or --max-steps > 0"),
    "negative_save_every": (["--save-every", "-1"], "--save-every must be >= 0"),
    "zero_keep_checkpoints": (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
    "beta2_above_one": (["--beta2", "1.5"], "--beta2 must be in [0, 1)"),
    "negative_adam_eps": (["--adam-eps", "-1"], "--adam-eps must be >= 0"),
    "zero_adam_eps": (["--adam-eps", "0"], "--adam-eps must be at least 1.18e-38, got 0.0: a smaller one is 0 in float32"),
    "adam_eps_below_float32": (["--adam-eps", "1e-300"], "--adam-eps must be at least 1.18e-38, got 1e-300"),
    "negative_grad_clip": (["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    # argparse's own errors: also one line
    "unknown_precision": (["--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice: 'fp8'"),
    "batch_not_a_number": (["--batch-size", "two"], "argument --batch-size: invalid int value: 'two'"),
    "unknown_flag": (["--n-embed", "64"], "unrecognized arguments: --n-embed 64"),
}

VQA_FLAGS = {
    "zero_pixel_shuffle": (["--pixel-shuffle", "0"], "pixel_shuffle must be a positive integer"),
    "shuffle_not_dividing_grid": (["--pixel-shuffle", "3"], "pixel_shuffle=3 does not divide the ViT patch grid (8x8)"),
    "adapter_layer_below_minus_one": (["--adapter-layer", "-2"], "layer must be -1 (last) or a block index"),
    "adapter_layer_past_the_vit": (["--adapter-layer", "9"], "layer=9 but the ViT has only 4 layers"),
    "zero_block_size": (["--block-size", "0"], "--block-size must be >= 1"),
    "huge_block_size": (["--block-size", str(10**12)], "block_size=1000000000000, n_embd=128"),
    "image_tokens_fill_context": (["--block-size", "16"], "17 image tokens do not fit the GPT context of 16"),
    "block_size_for_a_loaded_gpt": (["--gpt", "some/saved/gpt", "--block-size", "64"],
                                    "--block-size applies only to a fresh GPT from a preset"),
    "init_std_for_a_loaded_gpt": (["--gpt", "some/saved/gpt", "--gpt-init-std", "0.06"],
                                  "--gpt-init-std applies only to a fresh GPT from a preset"),
    "zero_init_std": (["--gpt-init-std", "0"], "--gpt-init-std must be positive"),
    "zero_max_new_tokens": (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    "negative_part_lr": (["--lr-gpt", "-0.1"], "--lr-gpt must be positive"),
    "everything_frozen": (["--freeze-vit", "--freeze-adapter", "--freeze-gpt"], "every part is frozen"),
    "negative_align_epochs": (["--align-epochs", "-1"], "--align-epochs must be >= 0"),
    "balance_above_one": (["--balance-answers", "1.5"], "--balance-answers must be in [0, 1]"),
    "balance_nan": (["--balance-answers", "nan"], "--balance-answers must be"),
    "stage_one_flag_on_stage_two": (["--gpt", "gpt-tiny", "--n-embd", "30"], "unrecognized arguments: --n-embd 30"),
    "unknown_projection": (["--projection", "conv"], "argument --projection: invalid choice: 'conv'"),
    "unknown_attention": (["--attention", "full"], "argument --attention: invalid choice: 'full'"),
    "zero_batch": (["--batch-size", "0"], "--batch-size must be >= 1"),
}


@pytest.mark.parametrize("stage, case", [("pretrain-vit", c) for c in sorted(VIT_FLAGS)]
                         + [("train-vqa", c) for c in sorted(VQA_FLAGS)])
def test_impossible_flag_is_rejected_before_any_work(stage, case, tmp_path: Path, capsys):
    flags, message = (VIT_FLAGS if stage == "pretrain-vit" else VQA_FLAGS)[case]
    out = tmp_path / "out"
    base = [stage, "--output-dir", str(out), "--dataset", str(tmp_path / "no-data-needed.jsonl")]
    if stage == "train-vqa":
        base += ["--vit", "vit-tiny"]  # with preset parts the whole model is checked at parse time
    code, err = run_cli(capsys, [*base, *flags])
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(("mmfusion: error: ", f"mmfusion {stage}: error: ")) and message in err, err
    # Rejected at parse time: the dataset (which does not exist) was never opened, nothing was written.
    assert "no-data-needed" not in err and not out.exists()


# Refusals that need the data or the model first: still one line, still no output folder.
def _late_refusals(root: Path) -> dict[str, tuple[list[str], str]]:
    cls, qa = str(root / "cls.jsonl"), str(root / "qa.jsonl")
    quiet = ["--no-progress", "--mixed-precision", "no", "--eval-split", "train", "--holdout", "0"]
    return {
        "pretrain_batch_larger_than_data": (["pretrain-vit", "--dataset", cls, "--batch-size", "64", *quiet],
                                            "the training set (8 examples) is smaller than one global batch"),
        "vqa_batch_larger_than_data": (["train-vqa", "--vit", "vit-tiny", "--dataset", qa, "--batch-size", "64", *quiet],
                                       "the training set (8 examples) is smaller than one global batch"),
        "vit_name_mistyped": (["train-vqa", "--vit", "vit-tinny", "--dataset", qa, *quiet],
                              "--vit vit-tinny: not a preset (vit-tiny, "),
        "vit_folder_missing": (["train-vqa", "--vit", str(root / "runs/vit/model"), "--dataset", qa, *quiet],
                               "runs/vit/model does not exist"),
        "gpt_name_mistyped": (["train-vqa", "--vit", "vit-tiny", "--gpt", "gpt-tinny", "--dataset", qa, *quiet],
                              "--gpt gpt-tinny: not a preset (gpt-tiny, "),
        "mixup_with_cell_labels": (["pretrain-vit", "--dataset", "scenes", "--mixup", "0.2", *quiet],
                                   "--mixup would mix or move shapes across the 2x2 label cells"),
        "main_zero_vit_epochs": (["main", "--vit-epochs", "0"], "--vit-epochs must be positive, got 0.0"),
        "main_nan_vqa_lr": (["main", "--vqa-lr", "nan"], "--vqa-lr must be positive (a finite number), got nan"),
        "captions_negative_vit_batch": (["captions", "--vit-batch-size", "-4"], "--vit-batch-size must be positive"),
        "output_dir_is_a_file": (["main", "--output-dir", str(root / "qa.jsonl")],
                                 "qa.jsonl exists and is not a folder"),
        "output_dir_unwritable": (["train-vqa", "--vit", "vit-tiny", "--dataset", qa, "--output-dir",
                                   "/proc/mmfusion-test/run", *quiet], "/proc cannot be written"),
    }


LATE = sorted(_late_refusals(Path(".")))


@pytest.mark.parametrize("case", LATE)
def test_a_refusal_after_loading_leaves_no_folder(case, tmp_path: Path, capsys):
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "img.png")
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps({"image": "img.png", "label": "ab"[i % 2]}) + "\n"
                                                for i in range(8)))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"image": "img.png", "question": "what?", "answers": ["a"]})
                                               + "\n" for _ in range(8)))
    args, message = _late_refusals(tmp_path)[case]
    out = tmp_path / "out"
    if "--output-dir" not in args:
        args = [*args, "--output-dir", str(out)]
    code, err = run_cli(capsys, args)
    errors = [line for line in err.splitlines() if line.startswith("mmfusion")]
    assert code == 2 and len(errors) == 1 and err.rstrip("\n").endswith(errors[0]) and "Traceback" not in err, err
    assert message in errors[0], err
    assert not out.exists(), f"{case}: refused, but {out} was created"


def test_eval_output_is_checked_before_any_prediction(tmp_path: Path, capsys, monkeypatch):
    """A folder as --output was found only after every prediction was computed (a traceback)."""
    import torch

    import mmfusion.evaluation

    def no_predictions(*args, **kwargs):
        raise AssertionError("predictions were computed before --output was checked")

    monkeypatch.setattr(mmfusion.evaluation, "predict", no_predictions)
    from PIL import Image

    from mmfusion import VLM

    torch.manual_seed(0)
    config = VLMConfig(vit=TINY_VIT, gpt=GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64),
                       adapter=AdapterConfig())
    VLM(config).save_pretrained(tmp_path / "model")
    Image.new("RGB", (16, 16)).save(tmp_path / "img.png")
    (tmp_path / "qa.jsonl").write_text(json.dumps({"image": "img.png", "question": "q?", "answers": ["a"]}) + "\n")
    (tmp_path / "folder").mkdir()
    for output, message in ((tmp_path / "folder", "names a folder"),
                            (Path("/proc/predictions.jsonl"), "/proc cannot be written")):
        code, err = run_cli(capsys, ["eval", "--model", str(tmp_path / "model"), "--dataset",
                                     str(tmp_path / "qa.jsonl"), "--split", "train", "--output", str(output)])
        assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("part, value, kind", [("vit", 3, "a number"), ("gpt", None, "null"), ("adapter", "mlp", "a string"),
                                                ("vit", [], "a list")])
def test_a_vlm_config_part_that_is_not_an_object_is_named_in_json_words(part, value, kind):
    """`"vit": 3` read as "VLMConfig.vit must be a ViTConfig", and `"config": "x"` as "dictionary
    update sequence element #0 has length 1": Python's words for a JSON file's mistake."""
    data = VLMConfig(vit=TINY_VIT, gpt=GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).to_dict()
    data[part] = value
    with pytest.raises(ConfigError, match=rf"VLMConfig.{part} settings must be a JSON object .*, not {kind}$"):
        VLMConfig.from_dict(data)
    with pytest.raises(ConfigError, match="GPTConfig settings must be a JSON object of name: value pairs, not a string"):
        GPTConfig.from_dict("x")
