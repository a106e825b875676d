"""A ViT or a GPT from what a user names: a preset (a fresh model), a folder written by
`save_pretrained`, or a transformers checkpoint (a folder or a hub id; mmfusion.convert).

The stages and the CLI take `--vit` / `--gpt` / `--init-from` through these two functions.
"""

from __future__ import annotations

from pathlib import Path

from .config import GPT_PRESETS, VIT_PRESETS, gpt_preset, vit_preset
from .convert import gpt_from_hf, vit_from_hf
from .errors import ConfigError, ConversionError
from .gpt import GPT
from .vit import ViT
from .weights import CONFIG_NAME, folder_kind, is_mmfusion_folder


def _check_folder(spec: str, flag: str) -> None:
    # A local folder without a config.json is a mistake (a run folder, an unfinished run), not a hub id.
    if Path(spec).exists() and not (Path(spec) / CONFIG_NAME).exists():
        kind = folder_kind(spec)
        raise FileNotFoundError(f"{flag} {spec}: no {CONFIG_NAME} there; " +
                                (f"{kind}" if kind else "train that stage first or pass a preset"))


def _name_the_options(spec: str, flag: str, presets, error: ConversionError) -> ConversionError:
    """The converter's error, with the flag and the presets a mistyped name may have meant."""
    return ConversionError(f"{flag} {spec}: not a preset ({', '.join(presets)}), and {error}")


def load_vit(spec: str, flag: str = "--vit") -> ViT:
    """A fresh headless ViT from a preset, a saved mmfusion ViT, or transformers ViT/CLIP weights."""
    if spec in VIT_PRESETS:
        return ViT(vit_preset(spec, num_classes=0))
    if is_mmfusion_folder(spec):
        return ViT.from_pretrained(spec)
    _check_folder(spec, flag)
    try:
        return vit_from_hf(spec)
    except ConversionError as e:
        raise (e if Path(spec).is_dir() else _name_the_options(spec, flag, VIT_PRESETS, e)) from e


def load_gpt(spec: str, overrides: dict | None = None) -> GPT:
    """A fresh GPT from a preset (with `overrides` of its config fields), a saved mmfusion GPT,
    or transformers GPT-2 weights."""
    if spec in GPT_PRESETS:
        return GPT(gpt_preset(spec, **(overrides or {})))
    if overrides:
        raise ConfigError(f"{', '.join(overrides)} apply only to a fresh GPT from a preset, not {spec!r}")
    if is_mmfusion_folder(spec):
        return GPT.from_pretrained(spec)
    _check_folder(spec, "--gpt")
    try:
        return gpt_from_hf(spec)
    except ConversionError as e:
        raise (e if Path(spec).is_dir() else _name_the_options(spec, "--gpt", GPT_PRESETS, e)) from e
