"""Import pretrained transformers checkpoints into mmfusion's ViT and GPT.

Sources (key names as transformers 5.x writes them):
  ViT: ViTModel, ViTForImageClassification, CLIPVisionModel, CLIPModel (vision tower only)
  GPT: GPT2LMHeadModel, GPT2Model

`source` is a transformers model instance, a local folder written by `save_pretrained`, or a
Hugging Face Hub id. Each source family has ONE key table, our key -> `From(source keys,
transform)`, and `apply_table` asserts that the table fills exactly our keys, that every
source key is either used or matched by that source's documented ignore list, and that every
converted shape equals ours. Any mismatch raises `ConversionError` naming the keys; nothing
is skipped or printed.

Converted models are float32 (a bf16/fp16 checkpoint upcasts exactly) with dropout 0: dropout
is a training choice, not part of the weights; pass `dropout=` to change it.

Notation: C width, N patches, P patch size, V vocabulary, L layers.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, GPTConfig, ViTConfig
from .gpt import GPT
from .vit import ViT
from .weights import CONFIG_NAME, CheckpointError

PREPROCESSOR_NAME = "preprocessor_config.json"
# Normalization the checkpoints were trained with, used when no preprocessor_config.json is found.
VIT_MEAN = VIT_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers' `hidden_act` / `activation_function` -> ours. Anything else is refused:
# "gelu_fast", "gelu_accurate" and friends are different approximations, not the same function.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}


class ConversionError(CheckpointError):
    """A transformers model cannot be imported exactly: unsupported architecture or option,
    or source keys / shapes that do not match the key table."""


# ----------------------------------------------------------------------------- key tables


@dataclass(frozen=True)
class From:
    """How one of our tensors is made: `fn` applied to the source tensors named in `keys`."""

    keys: tuple[str, ...]
    fn: Callable[..., torch.Tensor]
    how: str  # for error messages


def take(key: str) -> From:
    return From((key,), lambda t: t, "copy")


def transposed(key: str) -> From:
    """GPT-2's Conv1D stores its weight as (in, out); nn.Linear wants (out, in)."""
    return From((key,), lambda t: t.t(), "transpose")


def stacked(q: str, k: str, v: str) -> From:
    """Separate q, k, v projections -> our fused `attn.qkv`, stacked along the output features
    in q, k, v order: (C, C) x 3 -> (3C, C), or (C,) x 3 -> (3C,)."""
    return From((q, k, v), lambda *t: torch.cat(t, dim=0), "concatenate q, k, v")


def reshaped(key: str, *shape: int) -> From:
    return From((key,), lambda t: t.reshape(shape), f"reshape to {shape}")


def tied_to(key: str, twin: str) -> From:
    """`key` must equal `twin` (our LM head is tied to the token embedding, so GPT-2's must be)."""

    def check(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or not torch.equal(a, b):
            raise ConversionError(
                f"{key} differs from {twin}: this GPT-2 has an untied LM head "
                "(tie_word_embeddings=False), but mmfusion's GPT ties lm_head to wte"
            )
        return a

    return From((key, twin), check, f"equal to {twin} (tied)")


def vit_table(config: ViTConfig, p: str, classifier: str | None) -> dict[str, From]:
    """transformers ViTModel (prefix "") / ViTForImageClassification (prefix "vit.") -> our ViT."""
    e = f"{p}embeddings."
    table = {
        "cls_token": take(e + "cls_token"),  # (1, 1, C) in both
        "pos_embed": take(e + "position_embeddings"),  # (1, N+1, C) in both
        "patch_embed.weight": take(e + "patch_embeddings.projection.weight"),  # (C, 3, P, P)
        "patch_embed.bias": take(e + "patch_embeddings.projection.bias"),
        "norm.weight": take(f"{p}layernorm.weight"),
        "norm.bias": take(f"{p}layernorm.bias"),
    }
    if classifier is not None:
        table["head.weight"] = take(f"{classifier}.weight")
        table["head.bias"] = take(f"{classifier}.bias")
    for i in range(config.n_layer):
        o, s = f"blocks.{i}.", f"{p}layers.{i}."
        a = s + "attention."
        table |= {
            o + "ln1.weight": take(s + "layernorm_before.weight"),
            o + "ln1.bias": take(s + "layernorm_before.bias"),
            o + "attn.qkv.weight": stacked(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
            o + "attn.proj.weight": take(a + "o_proj.weight"),
            o + "attn.proj.bias": take(a + "o_proj.bias"),
            o + "ln2.weight": take(s + "layernorm_after.weight"),
            o + "ln2.bias": take(s + "layernorm_after.bias"),
            o + "mlp.fc.weight": take(s + "mlp.fc1.weight"),
            o + "mlp.fc.bias": take(s + "mlp.fc1.bias"),
            o + "mlp.proj.weight": take(s + "mlp.fc2.weight"),
            o + "mlp.proj.bias": take(s + "mlp.fc2.bias"),
        }
        if config.qkv_bias:
            table[o + "attn.qkv.bias"] = stacked(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias")
    return table


def clip_vision_table(config: ViTConfig, p: str) -> dict[str, From]:
    """transformers CLIPVisionModel (prefix "") / CLIPModel (prefix "vision_model.") -> our ViT.

    CLIP has no patch bias, a LayerNorm after the embeddings (`pre_layrnorm`, sic) and a final
    LayerNorm on the pooled CLS token only (`post_layernorm` -> our `norm`, used by `pool`).
    """
    C, n = config.n_embd, config.num_patches
    e = f"{p}embeddings."
    table = {
        "cls_token": reshaped(e + "class_embedding", 1, 1, C),  # (C,) -> (1, 1, C)
        "pos_embed": reshaped(e + "position_embedding.weight", 1, n + 1, C),  # (N+1, C) -> (1, N+1, C)
        "patch_embed.weight": take(e + "patch_embedding.weight"),  # (C, 3, P, P)
        "pre_norm.weight": take(f"{p}pre_layrnorm.weight"),
        "pre_norm.bias": take(f"{p}pre_layrnorm.bias"),
        "norm.weight": take(f"{p}post_layernorm.weight"),
        "norm.bias": take(f"{p}post_layernorm.bias"),
    }
    for i in range(config.n_layer):
        o, s = f"blocks.{i}.", f"{p}encoder.layers.{i}."
        a = s + "self_attn."
        table |= {
            o + "ln1.weight": take(s + "layer_norm1.weight"),
            o + "ln1.bias": take(s + "layer_norm1.bias"),
            o + "attn.qkv.weight": stacked(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
            o + "attn.qkv.bias": stacked(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
            o + "attn.proj.weight": take(a + "out_proj.weight"),
            o + "attn.proj.bias": take(a + "out_proj.bias"),
            o + "ln2.weight": take(s + "layer_norm2.weight"),
            o + "ln2.bias": take(s + "layer_norm2.bias"),
            o + "mlp.fc.weight": take(s + "mlp.fc1.weight"),
            o + "mlp.fc.bias": take(s + "mlp.fc1.bias"),
            o + "mlp.proj.weight": take(s + "mlp.fc2.weight"),
            o + "mlp.proj.bias": take(s + "mlp.fc2.bias"),
        }
    return table


def gpt2_table(config: GPTConfig, p: str, lm_head: bool) -> dict[str, From]:
    """transformers GPT2Model (prefix "") / GPT2LMHeadModel (prefix "transformer.") -> our GPT.

    GPT-2's linears are Conv1D with (in, out) weights, hence the transposes; `c_attn`'s output
    columns are already [q | k | v], the layout of our fused `attn.qkv`.
    """
    table = {
        "wte.weight": take(f"{p}wte.weight"),  # (V, C)
        "wpe.weight": take(f"{p}wpe.weight"),  # (block_size, C)
        "ln_f.weight": take(f"{p}ln_f.weight"),
        "ln_f.bias": take(f"{p}ln_f.bias"),
        # Our lm_head shares wte's tensor; GPT2Model has no head, GPT2LMHeadModel's must be tied.
        "lm_head.weight": tied_to("lm_head.weight", f"{p}wte.weight") if lm_head else take(f"{p}wte.weight"),
    }
    for i in range(config.n_layer):
        o, s = f"blocks.{i}.", f"{p}h.{i}."
        table |= {
            o + "ln1.weight": take(s + "ln_1.weight"),
            o + "ln1.bias": take(s + "ln_1.bias"),
            o + "attn.qkv.weight": transposed(s + "attn.c_attn.weight"),  # (C, 3C) -> (3C, C)
            o + "attn.qkv.bias": take(s + "attn.c_attn.bias"),
            o + "attn.proj.weight": transposed(s + "attn.c_proj.weight"),  # (C, C)
            o + "attn.proj.bias": take(s + "attn.c_proj.bias"),
            o + "ln2.weight": take(s + "ln_2.weight"),
            o + "ln2.bias": take(s + "ln_2.bias"),
            o + "mlp.fc.weight": transposed(s + "mlp.c_fc.weight"),  # (C, 4C) -> (4C, C)
            o + "mlp.fc.bias": take(s + "mlp.c_fc.bias"),
            o + "mlp.proj.weight": transposed(s + "mlp.c_proj.weight"),  # (4C, C) -> (C, 4C)
            o + "mlp.proj.bias": take(s + "mlp.c_proj.bias"),
        }
    return table


# Source keys dropped on purpose, as full-match regexes. Every other source key must be used.
GPT2_MASK_BUFFERS = r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)"  # older transformers' causal-mask
#   buffers; our attention builds its own mask
VIT_POOLER = r"pooler\.dense\.(weight|bias)"  # ViTModel's tanh pooler; ViTForImageClassification
#   does not use it either (its head reads the normalized CLS token)
VIT_MASK_TOKEN = r"embeddings\.mask_token"  # only used for masked image modeling
CLIP_POSITION_IDS = r"(vision_model\.)?embeddings\.position_ids"  # an arange buffer
CLIP_NON_VISION = r"text_model\..*|text_projection\.weight|visual_projection\.weight|logit_scale"  # CLIPModel's
#   text tower and contrastive head; only the vision tower is imported


@dataclass(frozen=True)
class Source:
    family: str  # "vit", "clip" or "gpt2": which table
    prefix: str  # where the tower's keys start in the source state dict
    ignore: tuple[str, ...]


VIT_SOURCES = {
    "ViTModel": Source("vit", "", (VIT_POOLER, VIT_MASK_TOKEN)),
    "ViTForImageClassification": Source("vit", "vit.", ()),
    "CLIPVisionModel": Source("clip", "", (CLIP_POSITION_IDS,)),
    "CLIPModel": Source("clip", "vision_model.", (CLIP_POSITION_IDS, CLIP_NON_VISION)),
}
GPT_SOURCES = {
    "GPT2LMHeadModel": Source("gpt2", "transformer.", (GPT2_MASK_BUFFERS,)),
    "GPT2Model": Source("gpt2", "", (GPT2_MASK_BUFFERS,)),
}
# For a saved config without `architectures`: the class that loads every checkpoint of the type.
DEFAULT_ARCHITECTURE = {"vit": "ViTModel", "clip": "CLIPModel", "clip_vision_model": "CLIPVisionModel",
                        "gpt2": "GPT2LMHeadModel"}


def _names(keys: Iterable[Any], limit: int = 10) -> str:
    keys = sorted(str(k) for k in keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _ignored(key: str, ignore: Iterable[str]) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in ignore)


def apply_table(model: nn.Module, table: dict[str, From], state: dict[str, torch.Tensor],
                ignore: Iterable[str] = (), source: str = "source") -> None:
    """Fill every tensor of `model` from `state` through `table`, checking everything first.

    Raises ConversionError when: the table does not cover exactly the model's keys; a source
    key the table needs is absent; a source key is neither used nor matched by `ignore`; or a
    converted tensor's shape differs from ours. The model is untouched unless all checks pass.
    """
    ignore = tuple(ignore)
    ours = model.state_dict()
    unfilled, foreign = set(ours) - set(table), set(table) - set(ours)
    if unfilled or foreign:
        raise ConversionError(
            f"{source}: the key table does not match the model: our keys without a source [{_names(unfilled)}], "
            f"table keys the model lacks [{_names(foreign)}]"
        )
    used = {key for rule in table.values() for key in rule.keys}
    absent = used - set(state)
    unused = {key for key in state if key not in used and not _ignored(key, ignore)}
    if absent or unused:
        raise ConversionError(
            f"{source}: source keys the table needs but the checkpoint lacks [{_names(absent)}]; "
            f"source keys neither converted nor in the documented ignore list [{_names(unused)}]"
        )
    converted = {name: rule.fn(*(state[k] for k in rule.keys)) for name, rule in table.items()}
    bad = [f"{name} {tuple(t.shape)} from {table[name].keys[0]} ({table[name].how}) != ours {tuple(ours[name].shape)}"
           for name, t in converted.items() if t.shape != ours[name].shape]
    if bad:
        raise ConversionError(f"{source}: shapes do not match the config: {'; '.join(bad[:10])}")
    with torch.no_grad():
        for name, t in converted.items():
            ours[name].copy_(t)


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
                       dropout: float = 0.0) -> ViTConfig:
    """A transformers ViTConfig (family "vit") or CLIPVisionConfig ("clip") -> our ViTConfig."""
    where = type(hf_config).__name__
    n_embd, n_head = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and head_dim * n_head != n_embd:
        raise ConversionError(f"{where}.head_dim={head_dim} * {n_head} heads != hidden_size {n_embd}; unsupported")
    default_mean, default_std = (CLIP_MEAN, CLIP_STD) if family == "clip" else (VIT_MEAN, VIT_STD)
    fields = dict(
        image_size=_square(hf_config.image_size, "image_size", where),
        patch_size=_square(hf_config.patch_size, "patch_size", where),
        num_channels=hf_config.num_channels, n_layer=hf_config.num_hidden_layers, n_head=n_head, n_embd=n_embd,
        intermediate_size=hf_config.intermediate_size, num_classes=num_classes, dropout=dropout,
        layer_norm_eps=hf_config.layer_norm_eps, activation=_activation(hf_config.hidden_act, where),
        image_mean=tuple(image_mean or default_mean), image_std=tuple(image_std or default_std),
    )
    if family == "clip":
        return _make(ViTConfig, where, **fields, qkv_bias=True, patch_bias=False, pre_norm=True, final_norm="cls")
    return _make(ViTConfig, where, **fields, qkv_bias=bool(hf_config.qkv_bias))


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


def _normalization(preprocessor: Path | None, num_channels: int) -> tuple[tuple[float, ...] | None, ...]:
    """image_mean/std from a preprocessor_config.json, or (None, None) when there is none."""
    if preprocessor is None or not preprocessor.is_file():
        return None, None
    try:
        data = json.loads(preprocessor.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{preprocessor} is not valid JSON ({e})") from e
    if data.get("do_normalize", True) is False:  # pixels are fed as they are
        return (0.0,) * num_channels, (1.0,) * num_channels

    def per_channel(value: Any) -> tuple[float, ...] | None:
        if value is None:
            return None
        return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * num_channels

    return per_channel(data.get("image_mean")), per_channel(data.get("image_std"))


# ----------------------------------------------------------------------------- loading


def _load(source: Any, sources: dict[str, Source], fn: str) -> tuple[nn.Module, Path | None]:
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
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{fn} takes a transformers model, a folder or a hub id, not {type(source).__name__}")

    text = os.fspath(source)
    local = Path(text).expanduser()
    if local.is_dir():
        text = str(local)
        if _is_mmfusion_folder(local):
            raise ConversionError(f"{text} is an mmfusion model folder, not a transformers one; "
                                  "load it with ViT/GPT/VLM.from_pretrained")
    elif local.exists() or isinstance(source, Path) or text.startswith(("/", "./", "../", "~", ".\\")):
        raise ConversionError(f"{source} is not a folder; pass a folder written by save_pretrained, or a hub id")

    import transformers

    def failed(e: Exception) -> ConversionError:
        if local.is_dir():
            return ConversionError(f"transformers could not load the folder {text}: {e}")
        return ConversionError(
            f"{text!r} is not a local folder, so it was read as a Hugging Face Hub id, and transformers could not "
            f"load it: {e}\nOffline (no network, or HF_HUB_OFFLINE=1) a hub id works only once it is cached; "
            "otherwise download it where there is network, save it with save_pretrained, and pass that folder."
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
        raise ConversionError(f"{text} holds {', '.join(found)}; {fn} imports only {supported}")
    try:
        model, info = getattr(transformers, arch).from_pretrained(text, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise failed(e) from e
    # A key transformers could not fill would be random; one it dropped would escape our table.
    ignore = sources[arch].ignore
    problems = {name: [k for k in info.get(name, ()) if not (isinstance(k, str) and _ignored(k, ignore))]
                for name in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    if any(problems.values()):
        detail = "; ".join(f"{name} [{_names(keys)}]" for name, keys in problems.items() if keys)
        raise ConversionError(f"{text}: the checkpoint does not match {arch}: {detail}")
    if local.is_dir():
        return model, local / PREPROCESSOR_NAME
    return model, _hub_preprocessor(text)


def _check_transformers_version() -> None:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ConversionError(
            f"the key tables follow transformers 5.x parameter names (e.g. ViT's layers.N.attention.q_proj); "
            f"transformers {transformers.__version__} is installed: pip install 'transformers>=5'"
        )


def _is_mmfusion_folder(folder: Path) -> bool:
    try:
        data = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and {"model_type", "format_version", "config"} <= set(data)


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


def vit_from_hf(source: Any, *, dropout: float = 0.0) -> ViT:
    """Import a transformers ViTModel, ViTForImageClassification, CLIPVisionModel or CLIPModel
    (its vision tower) as an mmfusion ViT.

    source: a model instance, a folder written by save_pretrained, or a hub id.
    image_mean/std come from the folder's preprocessor_config.json when there is one, else the
    family's defaults (ViT: 0.5; CLIP: OpenAI's). A classifier's `num_labels` becomes
    `num_classes`; the other sources give `num_classes=0`.
    Raises ConversionError for unsupported architectures or options, and for any key or shape
    mismatch.
    """
    hf, preprocessor = _load(source, VIT_SOURCES, "vit_from_hf")
    arch = type(hf).__name__
    spec = VIT_SOURCES[arch]
    hf_config = hf.config.vision_config if arch == "CLIPModel" else hf.config
    num_classes = hf.config.num_labels if arch == "ViTForImageClassification" else 0
    mean, std = _normalization(preprocessor, hf_config.num_channels)
    config = vit_config_from_hf(hf_config, spec.family, num_classes, mean, std, dropout)
    if spec.family == "clip":
        table = clip_vision_table(config, spec.prefix)
    else:
        table = vit_table(config, spec.prefix, "classifier" if num_classes else None)
    model = ViT(config)
    apply_table(model, table, hf.state_dict(), spec.ignore, source=arch)
    return model


def gpt_from_hf(source: Any, *, dropout: float = 0.0) -> GPT:
    """Import a transformers GPT2LMHeadModel or GPT2Model as an mmfusion GPT (tied LM head).

    source: a model instance, a folder written by save_pretrained, or a hub id.
    Raises ConversionError for unsupported architectures or options (cross-attention, other
    attention scalings, untied LM head, unknown activation) and for any key or shape mismatch.
    """
    hf, _ = _load(source, GPT_SOURCES, "gpt_from_hf")
    arch = type(hf).__name__
    spec = GPT_SOURCES[arch]
    config = gpt_config_from_hf(hf.config, dropout)
    model = GPT(config)
    apply_table(model, gpt2_table(config, spec.prefix, lm_head=arch == "GPT2LMHeadModel"), hf.state_dict(),
                spec.ignore, source=arch)
    return model
