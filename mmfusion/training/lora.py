"""LoRA (Hu et al., 2021) on the GPT through peft: each targeted Linear W gets a trainable
low-rank update B A (rank r, scaled by alpha / r, B starting at zero so the model starts
unchanged); W and every other GPT weight stay fixed. When training ends the updates are merged
into W, so the saved model is a plain VLM: same keys, same size, loads anywhere.

Targets are our GPT's module names: `qkv` and `proj` in attention, `fc` and `proj` in the MLP.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError

TARGETS = ("qkv", "proj", "fc")


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
