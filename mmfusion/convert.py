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

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import GPTConfig, ViTConfig
from .errors import ConversionError
from .gpt import GPT
from .hf_checkpoint import (
    Source,
    gpt_config_from_hf,
    ignored,
    key_list,
    load_checkpoint,
    normalization,
    resizing,
    vit_config_from_hf,
)
from .vit import ViT

# ----------------------------------------------------------------------------- key tables


@dataclass(frozen=True)
class From:
    """How one of our tensors is made: `fn` applied to the source tensors named in `keys`; and
    back (export): `back(ours, source_shapes)` gives those source tensors."""

    keys: tuple[str, ...]
    fn: Callable[..., torch.Tensor]
    how: str  # for error messages
    back: Callable[[torch.Tensor, list[torch.Size]], tuple[torch.Tensor, ...]] = lambda t, shapes: (t,)


def take(key: str) -> From:
    return From((key,), lambda t: t, "copy")


def transposed(key: str) -> From:
    """GPT-2's Conv1D stores its weight as (in, out); nn.Linear wants (out, in)."""
    return From((key,), lambda t: t.t(), "transpose", lambda t, shapes: (t.t(),))


def stacked(q: str, k: str, v: str) -> From:
    """Separate q, k, v projections -> our fused `attn.qkv`, stacked along the output features
    in q, k, v order: (C, C) x 3 -> (3C, C), or (C,) x 3 -> (3C,)."""
    return From((q, k, v), lambda *t: torch.cat(t, dim=0), "concatenate q, k, v", lambda t, shapes: t.chunk(3))


def reshaped(key: str, *shape: int) -> From:
    return From((key,), lambda t: t.reshape(shape), f"reshape to {shape}", lambda t, shapes: (t.reshape(shapes[0]),))


def tied_to(key: str, twin: str) -> From:
    """`key` must equal `twin` (our LM head is tied to the token embedding, so GPT-2's must be)."""

    def check(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or not torch.equal(a, b):
            raise ConversionError(
                f"{key} differs from {twin}: this GPT-2 has an untied LM head "
                "(tie_word_embeddings=False), but mmfusion's GPT ties lm_head to wte"
            )
        return a

    return From((key, twin), check, f"equal to {twin} (tied)", lambda t, shapes: (t, t))


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
            f"{source}: the key table does not match the model: our keys without a source [{key_list(unfilled)}], "
            f"table keys the model lacks [{key_list(foreign)}]"
        )
    used = {key for rule in table.values() for key in rule.keys}
    absent = used - set(state)
    unused = {key for key in state if key not in used and not ignored(key, ignore)}
    if absent or unused:
        raise ConversionError(
            f"{source}: source keys the table needs but the checkpoint lacks [{key_list(absent)}]; "
            f"source keys neither converted nor in the documented ignore list [{key_list(unused)}]"
        )
    converted = {name: rule.fn(*(state[k] for k in rule.keys)) for name, rule in table.items()}
    bad = [f"{name} {tuple(t.shape)} from {table[name].keys[0]} ({table[name].how}) != ours {tuple(ours[name].shape)}"
           for name, t in converted.items() if t.shape != ours[name].shape]
    if bad:
        raise ConversionError(f"{source}: shapes do not match the config: {'; '.join(bad[:10])}")
    with torch.no_grad():
        for name, t in converted.items():
            ours[name].copy_(t)


def vit_from_hf(source: Any, *, dropout: float = 0.0) -> ViT:
    """Import a transformers ViTModel, ViTForImageClassification, CLIPVisionModel or CLIPModel
    (its vision tower) as an mmfusion ViT.

    source: a model instance, a folder written by save_pretrained, or a hub id.
    image_mean/std and the resizing (bilinear squares for ViT; CLIP's short side + centre crop,
    bicubic) come from the folder's preprocessor_config.json when there is one, else the
    family's defaults (ViT: 0.5; CLIP: OpenAI's). A classifier's `num_labels` becomes
    `num_classes`; the other sources give `num_classes=0`.
    Raises ConversionError for unsupported architectures or options, and for any key or shape
    mismatch.
    """
    hf, preprocessor = load_checkpoint(source, VIT_SOURCES, "vit_from_hf")
    arch = type(hf).__name__
    spec = VIT_SOURCES[arch]
    hf_config = hf.config.vision_config if arch == "CLIPModel" else hf.config
    num_classes = hf.config.num_labels if arch == "ViTForImageClassification" else 0
    mean, std = normalization(preprocessor, hf_config.num_channels)
    resize = resizing(preprocessor, spec.family, hf_config)
    config = vit_config_from_hf(hf_config, spec.family, num_classes, mean, std, dropout, resize)
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
    A generation_config with `suppress_tokens` (what our export writes for a head restricted to
    some tokens) gives a GPT that scores only the other tokens (`GPTConfig.output_tokens`), so
    its generation stays what transformers' generate() gives.
    Raises ConversionError for unsupported architectures or options (cross-attention, other
    attention scalings, untied LM head, unknown activation) and for any key or shape mismatch.
    """
    hf, _ = load_checkpoint(source, GPT_SOURCES, "gpt_from_hf")
    arch = type(hf).__name__
    spec = GPT_SOURCES[arch]
    config = gpt_config_from_hf(hf.config, dropout)
    suppressed = getattr(getattr(hf, "generation_config", None), "suppress_tokens", None)
    if suppressed:
        config = config.replace(output_tokens=output_tokens_from_suppressed(suppressed, config.vocab_size, arch))
    model = GPT(config)
    apply_table(model, gpt2_table(config, spec.prefix, lm_head=arch == "GPT2LMHeadModel"), hf.state_dict(),
                spec.ignore, source=arch)
    return model


def output_tokens_from_suppressed(suppressed: Any, vocab_size: int, where: str) -> tuple[int, ...]:
    """generation_config.suppress_tokens -> the tokens the head keeps (the complement, ascending)."""
    if not isinstance(suppressed, (list, tuple)) or not all(type(t) is int for t in suppressed):
        raise ConversionError(f"{where}: generation_config.suppress_tokens must be a list of token ids, "
                              f"got {str(suppressed)[:80]}; fix or remove it in generation_config.json")
    bad = [t for t in suppressed if not 0 <= t < vocab_size]
    if bad:
        raise ConversionError(f"{where}: generation_config.suppress_tokens holds ids outside the vocabulary "
                              f"[0, {vocab_size}): {bad[:5]}; fix or remove them in generation_config.json")
    keep = tuple(sorted(set(range(vocab_size)) - set(suppressed)))
    if not keep:
        raise ConversionError(f"{where}: generation_config.suppress_tokens suppresses every token, so nothing "
                              "could be generated; fix or remove it in generation_config.json")
    return keep


# `ViT.from_hf` / `GPT.from_hf`: attached here, so the model files never import the converter
# (imports run one way, converter -> models); `import mmfusion` always runs this module.
ViT.from_hf = staticmethod(vit_from_hf)
GPT.from_hf = staticmethod(gpt_from_hf)
