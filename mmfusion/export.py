"""Export to transformers: the inverse of `mmfusion.convert`, through the same key tables.

- a GPT -> `GPT2LMHeadModel` (+ GPT-2's tokenizer files),
- a ViT -> `ViTModel` / `ViTForImageClassification`, or `CLIPVisionModel` for a CLIP tower
  (+ `preprocessor_config.json` giving the pixels mmfusion gives it),
- a VLM -> both of those, its adapter (safetensors + JSON) and a model card, and, where
  transformers' LLaVA can represent it, the whole model as `LlavaForConditionalGeneration` with
  a processor (`llava_blockers` names what stops it: prefix attention, merged patch tokens,
  per-token position embeddings, the final LayerNorm of a ViT-layout tower as the feature
  layer -- LLaVA reads a block's raw output).

Every tensor is checked: the transformers model must take exactly the tensors the table gives
(tests/test_export.py compares outputs too). Anything without a transformers equivalent (a
per-cell head, a GPT without biases) is refused or left out, and the caller is told which.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import GPTConfig, ViTConfig
from .convert import clip_vision_table, gpt2_table, vit_table
from .errors import ConversionError
from .export_folder import HF_FILES, VLM_PARTS, write_folder
from .gpt import GPT
from .vit import ViT
from .vlm import VLM
from .weights import unique_state_dict

# our activation -> transformers' name for the same function
GPT2_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "quick_gelu": "quick_gelu"}
VIT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
PIL_FILTER_IDS = {"bilinear": 2, "bicubic": 3}
# transformers' image processor backend that gives mmfusion's pixels; no saved config can choose it
PIXELS_BACKEND = "pil"


def _fill(hf_model: torch.nn.Module, table: dict, ours: dict[str, torch.Tensor], optional: tuple[str, ...] = ()) -> None:
    """Load `ours` into `hf_model` through `table` run backwards; every hf key must be filled
    (except buffers named in `optional`) and every shape must match."""
    target = hf_model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, rule in table.items():
        shapes = [target[k].shape if k in target else None for k in rule.keys]
        for k, t in zip(rule.keys, rule.back(ours[key], shapes)):
            if k not in target:
                raise ConversionError(f"export: {type(hf_model).__name__} has no {k} (from our {key})")
            if t.shape != target[k].shape:
                raise ConversionError(f"export: {k} would get shape {tuple(t.shape)}, the model has "
                                      f"{tuple(target[k].shape)}")
            state[k] = t.detach().clone().to(target[k].dtype)
    missing = [k for k in target if k not in state and not any(k.endswith(o) for o in optional)]
    if missing:
        raise ConversionError(f"export: {type(hf_model).__name__} keys the table does not fill: {missing[:5]}")
    hf_model.load_state_dict(state, strict=False)


def gpt_to_hf(gpt: GPT):
    """Our GPT as a transformers GPT2LMHeadModel with the same weights (LM head tied)."""
    import transformers

    c: GPTConfig = gpt.config
    if not c.bias:
        raise ConversionError("export: GPT-2 has biases everywhere; a GPT with bias=False has no transformers twin")
    config = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=c.intermediate_size, activation_function=GPT2_ACTIVATIONS[c.activation],
        layer_norm_epsilon=c.layer_norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        initializer_range=c.initializer_range, tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)
    hf = transformers.GPT2LMHeadModel(config)
    _fill(hf, gpt2_table(c, "transformer.", lm_head=True), unique_state_dict(gpt) | {"lm_head.weight": gpt.wte.weight},
          optional=("attn.bias", "attn.masked_bias"))
    hf.tie_weights()
    hf.generation_config.suppress_tokens = unscored_tokens(c) or None
    return hf.eval()


def unscored_tokens(c: GPTConfig) -> list[int]:
    """The tokens a GPT with output_tokens never produces: transformers has no restricted LM head,
    so the export's generation_config suppresses them (its raw logits still score every token)."""
    if c.output_tokens is None:
        return []
    keep = set(c.output_tokens)
    return [i for i in range(c.vocab_size) if i not in keep]


def output_note(c: GPTConfig) -> list[str]:
    if c.output_tokens is None:
        return []
    return [f"the GPT scores only its {len(c.output_tokens)} output tokens: the export's logits cover the whole "
            "vocabulary, and its generation_config.json suppresses the other tokens, so generate() gives ours"]


def _vit_family(c: ViTConfig) -> str:
    if not c.pre_norm and c.final_norm == "all" and c.patch_bias:
        return "vit"
    if c.pre_norm and c.final_norm == "cls" and not c.patch_bias and c.qkv_bias:
        return "clip"
    raise ConversionError("export: this ViT mixes ViT's and CLIP's layouts (pre_norm, final_norm, patch_bias); "
                          "no transformers class matches it")


def vit_to_hf(vit: ViT) -> tuple[torch.nn.Module, list[str]]:
    """Our ViT as transformers ViTModel / ViTForImageClassification / CLIPVisionModel, and notes on
    what had no place there (a per-cell head)."""
    import transformers

    c: ViTConfig = vit.config
    ours = unique_state_dict(vit)
    notes = []
    head = c.num_classes > 0
    if head and (c.label_grid > 1 or c.pool == "mean" or _vit_family(c) == "clip"):
        kind = "per-cell " if c.label_grid > 1 else "mean-pooled " if c.pool == "mean" else ""
        notes.append(f"the {kind}classifier head ({c.num_classes} classes) has no "
                     "transformers class: the backbone is exported without it")
        head = False
        ours = {k: v for k, v in ours.items() if not k.startswith("head.")}
    common = dict(image_size=c.image_size, patch_size=c.patch_size, num_channels=c.num_channels,
                  hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                  intermediate_size=c.mlp_dim, hidden_act=VIT_ACTIVATIONS[c.activation], layer_norm_eps=c.layer_norm_eps)
    if _vit_family(c) == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
        _fill(hf, clip_vision_table(c, ""), ours, optional=("position_ids",))
    elif head:
        names = dict(enumerate(c.class_names)) if c.class_names else {}  # else transformers' LABEL_i
        hf = transformers.ViTForImageClassification(transformers.ViTConfig(
            **common, qkv_bias=c.qkv_bias, num_labels=c.num_classes,
            **({"id2label": names, "label2id": {n: i for i, n in names.items()}} if names else {})))
        _fill(hf, vit_table(c, "vit.", "classifier"), ours)
    else:
        hf = transformers.ViTModel(transformers.ViTConfig(**common, qkv_bias=c.qkv_bias), add_pooling_layer=False)
        _fill(hf, vit_table(c, "", None), ours)
    return hf.eval(), notes


def processor_config(c: ViTConfig) -> dict:
    """preprocessor_config.json for transformers' image processor that gives our pixels."""
    side = {"height": c.image_size, "width": c.image_size}
    base = {"do_convert_rgb": c.num_channels == 3, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(c.image_mean), "image_std": list(c.image_std),
            "resample": PIL_FILTER_IDS[c.resample], "do_resize": True}
    if c.resize == "shortest_edge":
        return {**base, "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": c.resize_size
                or c.image_size}, "do_center_crop": True, "crop_size": side}
    return {**base, "image_processor_type": "ViTImageProcessor", "size": side}


def grayscale_note(c: ViTConfig) -> list[str]:
    """transformers' image processors convert only to RGB: a 1-channel ViT's processor takes
    grayscale images made as mmfusion makes them."""
    if c.num_channels != 1:
        return []
    return ["the grayscale conversion: transformers' image processor cannot convert to grayscale and fails on an RGB "
            "image (\"mean must have 3 elements\"); mmfusion resizes the RGB image, then converts it with PIL's "
            "convert(\"L\"): do the same before the processor for its pixels (converting first is up to a grey "
            "level off)"]


def save_tokenizer(folder: Path) -> None:
    """GPT-2's tokenizer (vocab.json, merges.txt and its config) from the hash-checked files
    mmfusion's own tokenizer is built from, padding on the left with `<|endoftext|>` as mmfusion's
    batched generation does."""
    from transformers import GPT2Tokenizer

    from .tokenizer import bpe_files

    vocab_bpe, encoder_json = bpe_files()
    vocab = json.loads(encoder_json.read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in vocab_bpe.read_text(encoding="utf-8").split("\n")[1:] if line.strip()]
    # GPT-2 has no pad token; generation continues the last position, so a batch pads on the left
    GPT2Tokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>", padding_side="left").save_pretrained(
        str(folder))


def llava_blockers(model) -> list[str]:
    """What in a VLM transformers' LLaVA cannot represent, each with the training flag that avoids it."""
    c = model.config
    blockers = []
    if c.fusion != "early":
        blockers.append(f"{c.fusion} fusion (LLaVA puts the image tokens into the prompt; --fusion early)")
    if c.attention != "causal":
        blockers.append(f"{c.attention} attention over the image tokens (LLaVA attends causally; --attention causal)")
    if c.adapter.pixel_shuffle != 1:
        blockers.append(f"{c.adapter.pixel_shuffle}x{c.adapter.pixel_shuffle} patches merged per image token "
                        "(--pixel-shuffle 1)")
    if c.adapter.position_embedding:
        blockers.append("the adapter's image-token position embedding (--no-image-positions)")
    if c.adapter.layer == -1 and _vit_family(c.vit) == "vit":
        blockers.append("features after the ViT's final LayerNorm (LLaVA reads a block's raw output; --adapter-layer "
                        f"{c.vit.n_layer - 1}, the last block's, or lower)")
    if not c.gpt.bias:
        blockers.append("a GPT without biases")
    return blockers


def vlm_to_llava(model):
    """The VLM as a transformers LlavaForConditionalGeneration with the same outputs, or a
    ConversionError naming what LLaVA cannot represent. The image slot token has the last embedding
    row (LLaVA's text vocabulary is GPT-2's + 1, as LLaVA adds `<image>`): a zero row added for a
    GPT with GPT-2's 50257 rows, the GPT's own row where its table has one (its logit is then ours).
    Its logit is suppressed in the generation config: LLaVA cannot read an `<|image|>` it wrote back
    as text, and ours is trained never to write one."""
    import transformers

    blockers = llava_blockers(model)
    if blockers:
        raise ConversionError("export: LLaVA cannot represent " + "; ".join(blockers))
    c = model.config
    gpt = gpt_to_hf(model.gpt)
    vit, _ = vit_to_hf(model.vit)
    if hasattr(vit, "vit"):  # ViTForImageClassification: LLaVA takes the backbone
        vit = vit.vit
    text_config = transformers.GPT2Config(**{**gpt.config.to_dict(), "vocab_size": c.image_token_id + 1,
                                             "tie_word_embeddings": False})
    linear = c.adapter.projection == "linear"
    config = transformers.LlavaConfig(
        vision_config=vit.config.to_dict(), text_config=text_config.to_dict(), image_token_id=c.image_token_id,
        projector_hidden_act="linear" if linear else "gelu",
        vision_feature_select_strategy="full" if c.adapter.keep_cls else "default",
        vision_feature_layer=-1 if c.adapter.layer == -1 else c.adapter.layer + 1, multimodal_projector_bias=True,
        tie_word_embeddings=False)
    llava = transformers.LlavaForConditionalGeneration(config).eval()
    inner = llava.model
    missing, _ = inner.vision_tower.load_state_dict(vit.state_dict(), strict=False)
    with torch.no_grad():
        for name in missing:  # ViTModel's pooler, which LLaVA never calls
            if not name.startswith("pooler."):
                raise ConversionError(f"export: LLaVA's vision tower has {name}, which ours does not fill")
            inner.vision_tower.get_parameter(name).zero_()
        lm_state = {k.removeprefix("transformer."): v for k, v in gpt.state_dict().items()
                    if k.startswith("transformer.")}
        wte = lm_state.pop("wte.weight")
        if wte.shape[0] == c.image_token_id:  # GPT-2's rows only: the slot's row is never read, its logit suppressed
            wte = torch.cat([wte, wte.new_zeros(1, wte.shape[1])])
        inner.language_model.load_state_dict({**lm_state, "wte.weight": wte}, strict=False)
        llava.lm_head.weight.copy_(wte)
        layers = [m for m in model.adapter.proj if isinstance(m, torch.nn.Linear)]
        proj = inner.multi_modal_projector
        proj.linear_1.weight.copy_(layers[0].weight)
        proj.linear_1.bias.copy_(layers[0].bias)
        if linear:  # one Linear: LLaVA's second becomes the identity
            proj.linear_2.weight.copy_(torch.eye(proj.linear_2.weight.shape[0]))
            proj.linear_2.bias.zero_()
        else:
            proj.linear_2.weight.copy_(layers[1].weight)
            proj.linear_2.bias.copy_(layers[1].bias)
    llava.generation_config.suppress_tokens = sorted({c.image_token_id, *unscored_tokens(c.gpt)})
    llava.generation_config.eos_token_id = llava.generation_config.pad_token_id = 50256
    return llava


def llava_processor(model, folder: Path):
    """A LlavaProcessor for the exported model: GPT-2's tokenizer with `<|image|>` as the slot
    token, our image processor, and one `<|image|>` in a prompt expanded to the model's image tokens."""
    import transformers

    save_tokenizer(folder)
    tokenizer = transformers.GPT2Tokenizer.from_pretrained(str(folder))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    if tokenizer.convert_tokens_to_ids("<|image|>") != model.config.image_token_id:
        raise ConversionError("export: the tokenizer's <|image|> id differs from the model's image slot id")
    (folder / "preprocessor_config.json").write_text(json.dumps(processor_config(model.config.vit), indent=2) + "\n")
    # the torchvision backend, picked where torchvision is installed, resizes off ours by a grey level
    images = transformers.AutoImageProcessor.from_pretrained(str(folder), backend=PIXELS_BACKEND)
    c = model.config
    return transformers.LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=c.vit.patch_size,
        vision_feature_select_strategy="full" if c.adapter.keep_cls else "default", num_additional_image_tokens=1,
        image_token="<|image|>")


def export(model, folder: str | Path, source: str | None = None) -> list[str]:
    """Write `model` (a VLM, GPT or ViT) as transformers folders under `folder`; returns notes on
    what was left out. A VLM gives folder/gpt2, folder/vit, folder/adapter, folder/README.md and,
    where LLaVA can represent it, folder/llava (model and processor).

    Written aside and moved in whole (mmfusion.export_folder): a failure leaves `folder` as it
    was; an earlier export's parts are replaced whole and the ones this export does not write are
    removed (a note says which); anything else under a name this export writes (a training run's
    vit/, a README.md) is refused (ConfigError), never replaced; other files stay. A folder
    holding a saved mmfusion model is refused too."""
    planned = [n for n in VLM_PARTS if n != "llava" or not llava_blockers(model)] if isinstance(model, VLM) else HF_FILES
    return write_folder(Path(folder), planned, lambda staging: _write(model, staging, source))


def _write(model, folder: Path, source: str | None) -> list[str]:
    """`export` into a new, empty `folder`."""
    folder.mkdir(exist_ok=True)
    if isinstance(model, GPT):
        gpt_to_hf(model).save_pretrained(folder)
        save_tokenizer(folder)
        return output_note(model.config)
    if isinstance(model, ViT):
        hf, notes = vit_to_hf(model)
        hf.save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(json.dumps(processor_config(model.config), indent=2) + "\n")
        return notes + grayscale_note(model.config)
    if not isinstance(model, VLM):
        raise ConversionError(f"export takes a VLM, GPT or ViT, not {type(model).__name__}")
    notes = _write(model.gpt, folder / "gpt2", source) + _write(model.vit, folder / "vit", source)
    (folder / "adapter").mkdir()
    tensors = {k: v.detach().contiguous() for k, v in model.adapter.state_dict().items()}
    if model.config.fusion == "cross":  # the connector's other half: no transformers class reads it
        tensors |= {f"cross.{k}": v.detach().contiguous() for k, v in model.cross.state_dict().items()}
        notes.append("the cross-attention blocks are in adapter/model.safetensors (keys cross.*); the exported "
                     "GPT-2 alone is the text model without them")
    save_file(tensors, str(folder / "adapter" / "model.safetensors"))
    meta = {"adapter": model.config.adapter.to_dict(), "image_token_id": model.config.image_token_id,
            "attention": model.config.attention, "num_image_tokens": model.num_image_tokens,
            "fusion": model.config.fusion, "cross_layers": list(model.config.cross_layers)}
    (folder / "adapter" / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    blockers = llava_blockers(model)
    if blockers:
        notes.append("no LLaVA export: LLaVA cannot represent " + "; ".join(blockers))
    else:
        (folder / "llava").mkdir()
        vlm_to_llava(model).save_pretrained(folder / "llava")
        llava_processor(model, folder / "llava").save_pretrained(folder / "llava")
    (folder / "README.md").write_text(model_card(model, source, notes, llava=not blockers))
    return notes


def model_card(model, source: str | None, notes: list[str], llava: bool = False) -> str:
    c = model.config
    lines = [
        "# mmfusion VLM, exported", "",
        f"A vision-language model trained with mmfusion{f' (from `{source}`)' if source else ''}: a ViT "
        f"({c.vit.n_layer} layers, width {c.vit.n_embd}, {c.vit.image_size}px, patch {c.vit.patch_size}), an adapter "
        f"giving {model.num_image_tokens} image tokens, and a GPT-2 ({c.gpt.n_layer} layers, width {c.gpt.n_embd}) "
        + ("reading them in place of `<|image|>` slots at the start of the prompt." if c.fusion == "early" else
           f"reading them through gated cross-attention blocks before its blocks {list(c.cross_layers)} (late "
           "fusion; the prompt holds no image slots)."), "",
        "| folder | what | loads with |", "|---|---|---|",
    ]
    if llava:
        lines.append("| `llava/` | the whole model and its processor | `transformers.LlavaForConditionalGeneration`, "
                     f"`AutoProcessor.from_pretrained(path, backend=\"{PIXELS_BACKEND}\")` |")
    lines += [
        "| `gpt2/` | the language model and GPT-2's tokenizer | `transformers.GPT2LMHeadModel`, `AutoTokenizer` |",
        "| `vit/` | the vision tower and its image processor | `transformers.AutoModel` (a ViT: "
        "`ViTModel.from_pretrained(path, add_pooling_layer=False)`, it has no pooler), "
        f"`AutoImageProcessor.from_pretrained(path, backend=\"{PIXELS_BACKEND}\")` |",
        "| `adapter/` | ViT hidden states -> image tokens (safetensors + JSON) | mmfusion's `ViTAdapter` |", "",
    ]
    if llava:
        lines += ["With the processor, one `<|image|>` in the text stands for the image: "
                  "`processor(images=image, text=\"<|image|>Question: What color is the shape?\\nAnswer:\")`, "
                  "then `model.generate(**inputs, max_new_tokens=8)`; greedy decoding gives mmfusion's tokens. For a batch, "
                  "pass lists and `padding=True`: the tokenizer pads on the left with `<|endoftext|>`, as "
                  "generation needs."]
    else:
        lines += ["transformers' LLaVA cannot represent this model (see below), so the parts are separate; to run "
                  "the VLM, load the mmfusion folder it was exported from with `mmfusion.VLM.from_pretrained`."]
    lines += [
        "",
        "Prompt format: M `<|image|>` slots (early fusion; none under cross fusion), then "
        "`Question: {question}\\nAnswer:` (the answer follows after a "
        "space and ends with `<|endoftext|>`), or `Caption:` for a caption. mmfusion's tokenizer reads a typed "
        "`<|endoftext|>` as plain text; transformers' GPT-2 tokenizer reads it as the special token.", "",
        f"Pass `backend=\"{PIXELS_BACKEND}\"` when loading a processor: where torchvision is installed, transformers 5 "
        "otherwise picks its torchvision image processor, whose resize differs from PIL's (mmfusion's) by up to "
        "a grey level, and no saved config can choose the backend.",
    ]
    if notes:
        lines += ["", "Notes on the export: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def _vit_to_hf_method(vit: ViT):
    """The transformers twin of this ViT (ViTModel, ViTForImageClassification or CLIPVisionModel);
    what has no place there (a per-cell head) is left out: `mmfusion.export.vit_to_hf` says what."""
    return vit_to_hf(vit)[0]


# `GPT.to_hf()`, `ViT.to_hf()`, `VLM.to_hf()`, as convert.py attaches `from_hf`.
GPT.to_hf = gpt_to_hf
ViT.to_hf = _vit_to_hf_method
VLM.to_hf = vlm_to_llava
