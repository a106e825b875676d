"""LoRA (Hu et al., 2021) on the GPT through peft: each targeted Linear W gets a trainable
low-rank update B A (rank r, scaled by alpha / r, B starting at zero so the model starts
unchanged); W and every other GPT weight stay fixed. When training ends the updates are saved on
their own (`save_lora`: OUTPUT_DIR/lora, a peft adapter for transformers' GPT2LMHeadModel) and
merged into W, so the saved model is a plain VLM: same keys, same size, loads anywhere.

Targets are our GPT's module names: `qkv` and `proj` in attention, `fc` and `proj` in the MLP
(GPT-2's `c_attn`, `c_proj` and `c_fc`).
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigError

TARGETS = ("qkv", "proj", "fc")
GPT2_TARGETS = {"qkv": "c_attn", "proj": "c_proj", "fc": "c_fc"}  # the same layers in transformers' GPT-2


def add_lora(gpt: nn.Module, rank: int, alpha: float | None = None, targets: tuple[str, ...] = TARGETS):
    """Wrap `gpt`'s target layers in place; returns the peft LoraModel (for `merge_lora`)."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel
    except ImportError as e:
        raise ConfigError("--lora-rank needs peft: pip install 'mmfusion[lora]' (or pip install peft)") from e
    config = LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, target_modules=list(targets),
                        lora_dropout=0.0, bias="none")
    return LoraModel(gpt, config, "default")  # marks only the LoRA matrices trainable


def merge_lora(lora) -> nn.Module:
    """Fold every update into its weight and drop the wrappers: the GPT as a plain module."""
    return lora.merge_and_unload()


def save_lora(lora, gpt: nn.Module, folder: str | Path, base: str | None = None) -> None:
    """The updates alone, as a peft LoRA adapter of the GPT as transformers' GPT2LMHeadModel (the
    model `mmfusion export` writes, or GPT-2 itself where `base` names it):
    `PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), folder)` gives the wrapped
    GPT's outputs. adapter_model.safetensors holds each layer's `lora_A` (r, in) and `lora_B`
    (out, r) under GPT-2's module names; GPT-2's Conv1D layers store W as (in, out), hence
    `fan_in_fan_out`. Merged, W' = W + alpha / r * B @ A."""
    from peft import LoraConfig

    from ..convert import gpt2_table
    from ..weights import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = lora.peft_config["default"]
    table = gpt2_table(gpt.config, "transformer.", lm_head=True)  # our weight -> GPT-2's
    tensors = {}
    for name, p in gpt.named_parameters():
        if ".lora_" in name:  # blocks.0.attn.qkv.lora_A.default.weight
            layer, part = name.replace(".default", "").split(".lora_")
            hf_layer = table[f"{layer}.weight"].keys[0].removesuffix(".weight")
            tensors[f"base_model.model.{hf_layer}.lora_{part}"] = p.detach().contiguous()
    atomic_write(folder / "adapter_model.safetensors", lambda p: save_file(tensors, p))
    LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=0.0, bias="none", fan_in_fan_out=True,
               target_modules=sorted(GPT2_TARGETS[t] for t in config.target_modules), task_type="CAUSAL_LM",
               base_model_name_or_path=base).save_pretrained(str(folder))
