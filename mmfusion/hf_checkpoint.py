"""Reading a transformers checkpoint for import (mmfusion.convert): the model from an instance, a
folder or a hub id, its config mapped onto ours (refusing options our models lack), and the
image normalization its preprocessor_config.json gives.

Any problem raises ConversionError naming the source and what to do.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .config import ConfigError, GPTConfig, ViTConfig
from .errors import ConversionError
from .layers import INIT_STD
from .weights import is_mmfusion_folder, read_json

PREPROCESSOR_NAME = "preprocessor_config.json"
# Normalization the checkpoints were trained with, used when no preprocessor_config.json is found.
VIT_MEAN = VIT_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers' `hidden_act` / `activation_function` -> ours. Anything else is refused:
# "gelu_fast", "gelu_accurate" and friends are different approximations, not the same function.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
# The oldest transformers whose key names the tables follow: before 5.9 ViT's attention was
# attention.attention.query/key/value (before 5.6 CLIPVisionModel's keys began vision_model.).
TABLES_NEED_TRANSFORMERS = (5, 9)


@dataclass(frozen=True)
class Source:
    family: str  # "vit", "clip" or "gpt2": which table
    prefix: str  # where the tower's keys start in the source state dict
    ignore: tuple[str, ...]


# For a saved config without `architectures`: the class that loads every checkpoint of the type.
DEFAULT_ARCHITECTURE = {"vit": "ViTModel", "clip": "CLIPModel", "clip_vision_model": "CLIPVisionModel",
                        "gpt2": "GPT2LMHeadModel"}


def key_list(keys: Iterable[Any], limit: int = 10) -> str:
    keys = sorted(str(k) for k in keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def ignored(key: str, ignore: Iterable[str]) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in ignore)


# ----------------------------------------------------------------------------- configs


def _activation(name: Any, where: str) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ConversionError(
            f"{where} uses activation {name!r}; mmfusion supports {sorted(ACTIVATIONS)} "
            "(mapped to gelu, gelu_tanh, quick_gelu)"
        )
    return ACTIVATIONS[name]


def _square(value: Any, name: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"{where}.{name}={value!r} is not square; mmfusion's ViT needs square images/patches")
        value = value[0]
    return int(value)


def _make(kind: type, where: str, **fields: Any):
    try:
        return kind(**fields)
    except ConfigError as e:
        raise ConversionError(f"{where} does not map to a valid {kind.__name__}: {e}") from e


def vit_config_from_hf(hf_config: Any, family: str, num_classes: int = 0,
                       image_mean: tuple[float, ...] | None = None, image_std: tuple[float, ...] | None = None,
                       dropout: float = 0.0, resizing: dict | None = None) -> ViTConfig:
    """A transformers ViTConfig (family "vit") or CLIPVisionConfig ("clip") -> our ViTConfig.
    `resizing` (resize, resize_size, resample; see `resizing`) defaults to the family's processor's."""
    where = type(hf_config).__name__
    n_embd, n_head = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and head_dim * n_head != n_embd:
        raise ConversionError(f"{where}.head_dim={head_dim} * {n_head} heads != hidden_size {n_embd}; unsupported")
    default_mean, default_std = (CLIP_MEAN, CLIP_STD) if family == "clip" else (VIT_MEAN, VIT_STD)
    channels = hf_config.num_channels
    if channels != len(default_mean) and image_mean is None:
        if family == "clip":
            raise ConversionError(f"{where} has {channels} channels and no preprocessor_config.json; CLIP's "
                                  "normalization is defined for 3. Save the image processor with the model")
        # ViT's 0.5 / 0.5 is the same for every channel, so a grayscale ViT gets one of each
        default_mean, default_std = (VIT_MEAN[0],) * channels, (VIT_STD[0],) * channels
    fields = dict(
        image_size=_square(hf_config.image_size, "image_size", where),
        patch_size=_square(hf_config.patch_size, "patch_size", where),
        num_channels=hf_config.num_channels, n_layer=hf_config.num_hidden_layers, n_head=n_head, n_embd=n_embd,
        intermediate_size=hf_config.intermediate_size, num_classes=num_classes, dropout=dropout,
        layer_norm_eps=hf_config.layer_norm_eps, activation=_activation(hf_config.hidden_act, where),
        image_mean=tuple(image_mean or default_mean), image_std=tuple(image_std or default_std),
        **(resizing or FAMILY_RESIZING[family]),
        # pretrained weights replace the init: skip the mimetic one's work, and name transformers' start
        attention_init="normal", patch_init_std=INIT_STD,
    )
    if family == "clip":
        return _make(ViTConfig, where, **fields, qkv_bias=True, patch_bias=False, pre_norm=True, final_norm="cls")
    return _make(ViTConfig, where, **fields, qkv_bias=bool(hf_config.qkv_bias),
                 class_names=class_names(hf_config, num_classes))


def class_names(hf_config: Any, num_classes: int) -> tuple[str, ...] | None:
    """A classifier's id2label as class names in id order; None for transformers' placeholders
    (LABEL_0, LABEL_1, ...) or a table that does not name every class once (ImageNet's names
    "crane" and "maillot" twice each)."""
    labels = getattr(hf_config, "id2label", None) or {}
    names = tuple(str(labels.get(i, labels.get(str(i), ""))) for i in range(num_classes))
    if not num_classes or not all(names) or len(set(names)) < num_classes or \
            names == tuple(f"LABEL_{i}" for i in range(num_classes)):
        return None
    return names


def gpt_config_from_hf(hf_config: Any, dropout: float = 0.0) -> GPTConfig:
    """A transformers GPT2Config -> our GPTConfig; refuses options our GPT does not implement."""
    where = type(hf_config).__name__
    if getattr(hf_config, "add_cross_attention", False):
        raise ConversionError(f"{where}.add_cross_attention=True: cross-attention blocks are not supported")
    if not getattr(hf_config, "scale_attn_weights", True):
        raise ConversionError(f"{where}.scale_attn_weights=False: unscaled attention is not supported")
    if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
        raise ConversionError(f"{where}.scale_attn_by_inverse_layer_idx=True: per-layer scaling is not supported")
    # reorder_and_upcast_attn only changes the precision of the attention scores, not the function.
    return _make(GPTConfig, where, vocab_size=hf_config.vocab_size, block_size=hf_config.n_positions,
                 n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd,
                 intermediate_size=hf_config.n_inner, layer_norm_eps=hf_config.layer_norm_epsilon,
                 activation=_activation(hf_config.activation_function, where), bias=True, dropout=dropout,
                 initializer_range=getattr(hf_config, "initializer_range", 0.02))


# How each family's image processor resizes, when a checkpoint comes without preprocessor_config.json.
FAMILY_RESIZING = {"vit": {"resize": "square", "resize_size": None, "resample": "bilinear"},
                   "clip": {"resize": "shortest_edge", "resize_size": None, "resample": "bicubic"}}
# transformers stores `resample` as PIL's enum value
PIL_FILTERS = {2: "bilinear", 3: "bicubic"}


def _read_preprocessor(preprocessor: Path) -> dict:
    data = read_json(preprocessor, ConversionError)
    if not isinstance(data, dict):
        raise ConversionError(f"{preprocessor} holds a JSON {type(data).__name__}, not an object; "
                              "save the image processor again")
    return data


def _side(value: Any, key: str, where: Path, shortest: bool = False) -> int:
    """A processor size (an int, or a dict with height = width, or shortest_edge) as one side."""
    if isinstance(value, dict):
        value = value.get("shortest_edge") if shortest else (value.get("height") if value.get("height") ==
                                                              value.get("width") else None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConversionError(f"{where}: {key} must be a positive size (or a square height/width), got {value!r}")
    return value


def resizing(preprocessor: Path | None, family: str, hf_config: Any) -> dict:
    """ViTConfig's resize, resize_size and resample from a preprocessor_config.json, so imported
    weights see the pixels transformers' processor gives them; the family's defaults without one.
    Settings whose output is not image_size x image_size are refused."""
    out = dict(FAMILY_RESIZING[family])
    if preprocessor is None or not preprocessor.is_file():
        return out
    image_size = _square(hf_config.image_size, "image_size", type(hf_config).__name__)
    data = _read_preprocessor(preprocessor)
    if "resample" in data:
        if data["resample"] not in PIL_FILTERS:
            raise ConversionError(f"{preprocessor}: resample {data['resample']!r} is not supported (mmfusion "
                                  f"resizes with {sorted(PIL_FILTERS.values())}, PIL's {sorted(PIL_FILTERS)})")
        out["resample"] = PIL_FILTERS[data["resample"]]
    size = data.get("size")
    crop = data.get("do_center_crop", False)
    if isinstance(size, dict) and "shortest_edge" in size:
        out["resize"], short = "shortest_edge", _side(size, "size", preprocessor, shortest=True)
        out["resize_size"] = None if short == image_size else short
        if not crop:
            raise ConversionError(f"{preprocessor}: resizing the short side without a centre crop gives "
                                  "non-square images; mmfusion's ViT takes squares")
        size_out = _side(data.get("crop_size", image_size), "crop_size", preprocessor)
    elif size is not None:
        out["resize"], size_out = "square", _side(size, "size", preprocessor)
        if crop and _side(data.get("crop_size", size_out), "crop_size", preprocessor) != size_out:
            raise ConversionError(f"{preprocessor}: a square resize followed by a smaller centre crop is not "
                                  "supported")
    else:
        return out
    if size_out != image_size:
        raise ConversionError(f"{preprocessor}: the processor gives {size_out}x{size_out} images, the model "
                              f"takes {image_size}x{image_size}")
    return out


def normalization(preprocessor: Path | None, num_channels: int) -> tuple[tuple[float, ...] | None, ...]:
    """image_mean/std from a preprocessor_config.json, or (None, None) when there is none.

    transformers feeds (x * rescale_factor - mean) / std for x in [0, 255], and our processor's
    pixels are x / 255, so a rescale other than 1/255 (or do_rescale false, a factor of 1) is folded
    into the mean and std: both divided by 255 * rescale_factor."""
    if preprocessor is None or not preprocessor.is_file():
        return None, None
    data = _read_preprocessor(preprocessor)
    scale = 255.0 * _rescale_factor(data, preprocessor)  # 1 for transformers' default of 1/255
    if data.get("do_normalize", True) is False:  # pixels are fed as they are, after the rescale
        return (0.0,) * num_channels, (1.0 / scale,) * num_channels

    def per_channel(value: Any, key: str) -> tuple[float, ...] | None:
        if value is None:
            if scale != 1.0:  # the family's default would be used unscaled
                raise ConversionError(f"{preprocessor} sets a rescale other than 1/255 but no {key}; add the "
                                      f"{key} the model was trained with to it")
            return None
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConversionError(f"{preprocessor}: {key} must be a number or a list of numbers, got {value!r}")
        values = values if isinstance(value, (list, tuple)) else values * num_channels
        return tuple(float(v) / scale for v in values)

    return per_channel(data.get("image_mean"), "image_mean"), per_channel(data.get("image_std"), "image_std")


def _rescale_factor(data: dict, preprocessor: Path) -> float:
    """The factor transformers multiplies [0, 255] pixels by: rescale_factor, or 1 when do_rescale is false."""
    do_rescale = data.get("do_rescale", True)
    if not isinstance(do_rescale, bool):
        raise ConversionError(f"{preprocessor}: do_rescale must be true or false, got {do_rescale!r}")
    if not do_rescale:
        return 1.0
    factor = data.get("rescale_factor", 1 / 255)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
        raise ConversionError(f"{preprocessor}: rescale_factor must be a positive number, got {factor!r}; fix it "
                              "there (transformers' default is 1/255)")
    # transformers writes 1/255 as 0.00392156862745098: keep its pixels bit for bit
    return 1 / 255 if math.isclose(factor, 1 / 255, rel_tol=1e-9) else float(factor)


# ----------------------------------------------------------------------------- loading


def load_checkpoint(source: Any, sources: dict[str, Source], fn: str) -> tuple[nn.Module, Path | None]:
    """The transformers model for `source`, and the preprocessor_config.json that goes with it
    (a path that may not exist), or None when there is no folder to look in."""
    supported = ", ".join(sources)
    _check_transformers_version()
    if isinstance(source, nn.Module):
        name = type(source).__name__
        if name not in sources:
            raise ConversionError(f"{fn} imports {supported}; got a {name}, which mmfusion cannot import")
        origin = getattr(source, "name_or_path", "") or ""
        return source, (Path(origin) / PREPROCESSOR_NAME if origin and Path(origin).is_dir() else None)
    text, local = _folder_or_hub_id(source, fn)
    import transformers

    def failed(e: Exception) -> ConversionError:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]  # the CLI prints one line
        if local.is_dir():
            return ConversionError(f"transformers could not load the folder {text}: {reason}")
        return ConversionError(
            f"{text!r} is not a local folder, so it was read as a Hugging Face Hub id, and transformers could not "
            f"load it ({reason}). Offline (no network, or HF_HUB_OFFLINE=1) a hub id works only once it is cached; "
            "otherwise download it where there is network, save it with save_pretrained, and pass that folder"
        )

    try:
        hf_config = transformers.AutoConfig.from_pretrained(text)
    except (OSError, ValueError, KeyError) as e:
        raise failed(e) from e
    listed = list(getattr(hf_config, "architectures", None) or [])
    arch = next((a for a in listed if a in sources), None)
    if arch is None and not listed:
        arch = DEFAULT_ARCHITECTURE.get(hf_config.model_type)
        arch = arch if arch in sources else None
    if arch is None:
        found = listed or [f"model_type {hf_config.model_type!r}"]
        kind = {"vit_from_hf": "ViT", "gpt_from_hf": "GPT"}.get(fn, "model")
        raise ConversionError(f"{text} holds {', '.join(found)}, not a model mmfusion imports as a {kind}: it imports "
                              f"{supported}")
    try:
        model, info = getattr(transformers, arch).from_pretrained(text, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise failed(e) from e
    # A key transformers could not fill would be random; one it dropped would escape our table.
    ignore = sources[arch].ignore
    problems = {name: [k for k in info.get(name, ()) if not (isinstance(k, str) and ignored(k, ignore))]
                for name in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    if any(problems.values()):
        detail = "; ".join(f"{name} [{key_list(keys)}]" for name, keys in problems.items() if keys)
        raise ConversionError(f"{text}: the checkpoint does not match {arch}: {detail}")
    if local.is_dir():
        return model, local / PREPROCESSOR_NAME
    return model, _hub_preprocessor(text)


def _folder_or_hub_id(source: Any, fn: str) -> tuple[str, Path]:
    """(the text to hand transformers, the local path it may name); refuses what is neither a
    transformers folder nor a plausible hub id."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{fn} takes a transformers model, a folder or a hub id, not {type(source).__name__}")
    text = os.fspath(source)
    local = Path(text).expanduser()
    if local.is_dir():
        if is_mmfusion_folder(local):
            raise ConversionError(f"{local} is an mmfusion model folder, not a transformers one; "
                                  "load it with ViT/GPT/VLM.from_pretrained")
        config = local / "config.json"
        if config.exists() or config.is_symlink():  # transformers would block on a FIFO, or recurse without end
            read_json(config, ConversionError)
        return str(local), local
    # A hub id is "name" or "owner/name"; more slashes (or a leading one) can only be a path.
    if (local.exists() or isinstance(source, Path) or text.startswith(("/", "./", "../", "~", ".\\"))
            or text.count("/") > 1 or "\\" in text):
        what = "is not a folder" if local.exists() else "does not exist"
        raise ConversionError(f"{source} {what}; pass a folder written by save_pretrained, or a hub id")
    return text, local


def transformers_version() -> str:
    """The installed transformers' version string (a function, so tests can stand in an older one)."""
    import transformers

    return transformers.__version__


def _check_transformers_version() -> None:
    from packaging.version import Version

    installed = transformers_version()
    if Version(installed).release[:2] < TABLES_NEED_TRANSFORMERS:
        need = ".".join(map(str, TABLES_NEED_TRANSFORMERS))
        raise ConversionError(
            f"the key tables follow the parameter names of transformers >= {need} (e.g. ViT's "
            f"layers.N.attention.q_proj); transformers {installed} is installed: pip install -U 'transformers>={need}'"
        )


def _hub_preprocessor(repo_id: str) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, PREPROCESSOR_NAME))
    except LocalEntryNotFoundError:  # offline and not cached: subclass of EntryNotFoundError, so first
        warnings.warn(f"could not fetch {repo_id}/{PREPROCESSOR_NAME}; using the family's default image_mean/std",
                      stacklevel=3)
        return None
    except EntryNotFoundError:  # the repo has none
        return None
