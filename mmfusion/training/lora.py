"""LoRA (Hu et al., 2021) on the GPT through peft: each targeted Linear W gets a trainable
low-rank update B A (rank r, scaled by alpha / r, B starting at zero so the model starts
unchanged); W and every other GPT weight stay fixed. When training ends the updates are saved on
their own (`save_lora`: OUTPUT_DIR/lora, safetensors + JSON) and merged into W, so the saved model
is a plain VLM: same keys, same size, loads anywhere.

Targets are our GPT's module names: `qkv` and `proj` in attention, `fc` and `proj` in the MLP.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
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


def save_lora(lora, gpt: nn.Module, folder: str | Path) -> None:
    """The updates alone: adapter_model.safetensors (each targeted layer's `lora_A` (r, in) and
    `lora_B` (out, r), keyed by our GPT's module names) and adapter_config.json (rank, alpha,
    scale, targets). Merged, W' = W + scale * B @ A for each."""
    from ..weights import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = lora.peft_config["default"]
    tensors = {name.replace(".default", ""): p.detach().contiguous() for name, p in gpt.named_parameters()
               if ".lora_" in name}
    atomic_write(folder / "adapter_model.safetensors", lambda p: save_file(tensors, p))
    meta = {"rank": config.r, "alpha": config.lora_alpha, "scale": config.lora_alpha / config.r,
            "targets": sorted(config.target_modules), "merged_as": "W + scale * lora_B @ lora_A"}
    (folder / "adapter_config.json").write_text(json.dumps(meta, indent=2) + "\n")
