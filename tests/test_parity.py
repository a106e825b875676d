"""Parity with transformers: random-weight HF models (built from configs, no download) are
converted with mmfusion.convert and must give the same outputs in fp32 (max abs diff <= 1e-4).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

transformers = pytest.importorskip("transformers")

from mmfusion import GPT, ViT  # noqa: E402
from mmfusion.convert import ConversionError, apply_table, gpt2_table, gpt_from_hf, vit_from_hf  # noqa: E402
from mmfusion.hf_checkpoint import CLIP_MEAN, CLIP_STD, gpt_config_from_hf  # noqa: E402
from mmfusion.processing import ImageProcessor  # noqa: E402
from mmfusion.weights import CheckpointError  # noqa: E402

ATOL = 1e-4


def randomize(model: nn.Module, seed: int, std: float = 0.1) -> nn.Module:
    """Every parameter ~ N(0, std), LayerNorm scales ~ N(1, std): far from HF's init, so a
    wrong mapping cannot hide behind zeros or ones. Tied parameters stay tied."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm_scale = p.ndim == 1 and name.endswith("weight")
            p.copy_(noise + 1.0 if is_norm_scale else noise)
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------- GPT-2

GPT2_SHAPES = {
    "gelu_new-4heads": dict(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32),
    "gelu-3heads-n_inner": dict(n_layer=3, n_embd=48, n_head=3, n_inner=80, vocab_size=61, n_positions=24,
                                activation_function="gelu", layer_norm_epsilon=1e-4),
}


def hf_gpt2(cls_name: str = "GPT2LMHeadModel", seed: int = 0, **overrides):
    shape = {**GPT2_SHAPES["gelu_new-4heads"], **overrides}
    config = transformers.GPT2Config(**shape, bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    torch.manual_seed(seed)
    return randomize(getattr(transformers, cls_name)(config), seed)


@pytest.mark.parametrize("shape", sorted(GPT2_SHAPES))
def test_gpt2_logits_match(shape):
    hf = hf_gpt2(**GPT2_SHAPES[shape])
    ours = gpt_from_hf(hf).eval()
    assert ours.config.n_layer == hf.config.n_layer and ours.config.vocab_size == hf.config.vocab_size
    ids = torch.randint(0, hf.config.vocab_size, (3, hf.config.n_positions))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero tensors
    assert max_diff(ref, got) <= ATOL


def test_gpt2_base_model_matches_hidden_states():
    hf = hf_gpt2("GPT2Model", seed=1)
    ours = GPT.from_hf(hf).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 17))
    with torch.no_grad():
        assert max_diff(hf(ids).last_hidden_state, ours.hidden_states(ids)) <= ATOL
    assert ours.lm_head.weight is ours.wte.weight


@pytest.mark.parametrize("side", ["right", "left"])
def test_gpt2_padded_batch(side):
    hf = hf_gpt2(seed=2)
    ours = gpt_from_hf(hf).eval()
    T, lengths = 14, [14, 9, 3]
    ids = torch.randint(0, hf.config.vocab_size, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    if side == "left":
        mask = mask.flip(1)
    # HF GPT-2 does not derive positions from the mask; with left padding they must be passed.
    # Ours counts real tokens itself (cumsum of the mask).
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert max_diff(ref[real], got[real]) <= ATOL
    # Each padded row equals that row run alone without padding.
    with torch.no_grad():
        for row in range(len(lengths)):
            alone = ours(ids[row][real[row]][None])[0]
            assert max_diff(alone, got[row][real[row]]) <= ATOL


# ----------------------------------------------------------------------------- ViT

VIT_SHAPES = {
    "32px-p8-gelu": dict(image_size=32, patch_size=8, hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                         intermediate_size=64),
    "24px-p6-gelu_new-noqkvbias": dict(image_size=24, patch_size=6, hidden_size=48, num_attention_heads=4,
                                       num_hidden_layers=3, intermediate_size=72, qkv_bias=False,
                                       hidden_act="gelu_new", layer_norm_eps=1e-6),
}


def hf_vit(cls_name: str, shape: str = "32px-p8-gelu", seed: int = 0, **overrides):
    config = transformers.ViTConfig(**{**VIT_SHAPES[shape], **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    return randomize(getattr(transformers, cls_name)(config), seed)


def pixels(config, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.num_channels, config.image_size, config.image_size, generator=g)


@pytest.mark.parametrize("shape", sorted(VIT_SHAPES))
def test_vit_classifier_logits_match(shape):
    hf = hf_vit("ViTForImageClassification", shape, num_labels=7)
    ours = vit_from_hf(hf).eval()
    assert ours.config.num_classes == 7 and ours.config.qkv_bias == hf.config.qkv_bias
    assert ours.config.image_mean == (0.5, 0.5, 0.5)
    x = pixels(hf.config)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        got = ours(x)
        feats = ours.forward_features(x)
    assert ref.logits.abs().max() > 1.0
    assert max_diff(ref.logits, got) <= ATOL
    # transformers' hidden_states[-1] is the last block's raw output, before the final norm.
    _, states = ours.forward_features(x, output_hidden_states=True)
    assert max_diff(ref.hidden_states[-1], states[-1]) <= ATOL
    assert max_diff(hf.vit.layernorm(ref.hidden_states[-1]), feats) <= ATOL


def test_grayscale_vit_classifier_converts_and_matches():
    """A 1-channel transformers ViT (no preprocessor_config.json) gets ViT's 0.5 / 0.5 for its one
    channel; this raised 'image_mean and image_std need one value per channel'."""
    hf = hf_vit("ViTForImageClassification", num_channels=1, num_labels=3)
    ours = vit_from_hf(hf).eval()
    assert ours.config.num_channels == 1 and ours.config.image_mean == (0.5,) and ours.config.image_std == (0.5,)
    gray = Image.fromarray(np.arange(40 * 40, dtype=np.uint8).reshape(40, 40) % 200, "L")
    x = ImageProcessor.from_config(ours.config)(gray)  # a 3-channel view would not fit the model
    assert x.shape == (1, 1, 32, 32)
    assert max_diff(x[0, 0], torch.as_tensor(np.asarray(gray.resize((32, 32), Image.Resampling.BILINEAR),
                                                          dtype=np.float32)) / 127.5 - 1) <= 1e-5
    with torch.no_grad():
        assert ours(x).shape == (1, 3)
    x = pixels(hf.config)
    with torch.no_grad():
        assert max_diff(hf(x).logits, ours(x)) <= ATOL


@pytest.mark.parametrize("shape", sorted(VIT_SHAPES))
def test_vit_model_last_hidden_state_matches(shape):
    hf = hf_vit("ViTModel", shape, seed=3)
    ours = ViT.from_hf(hf).eval()
    assert ours.config.num_classes == 0 and ours.head is None
    x = pixels(hf.config, seed=1)
    with torch.no_grad():
        assert max_diff(hf(x).last_hidden_state, ours.forward_features(x)) <= ATOL


# ----------------------------------------------------------------------------- CLIP vision

CLIP_SHAPES = {
    "32px-p8": dict(image_size=32, patch_size=8, hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                    intermediate_size=64),
    "28px-p7": dict(image_size=28, patch_size=7, hidden_size=48, num_attention_heads=3, num_hidden_layers=3,
                    intermediate_size=96),
}


def hf_clip_vision(shape: str, seed: int = 0):
    config = transformers.CLIPVisionConfig(**CLIP_SHAPES[shape], attn_implementation="eager")
    torch.manual_seed(seed)
    return randomize(transformers.CLIPVisionModel(config), seed)


def hf_clip(shape: str, seed: int = 0):
    text = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64, vocab_size=99,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = transformers.CLIPConfig(text_config=text, vision_config=CLIP_SHAPES[shape], projection_dim=16)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize(transformers.CLIPModel(config), seed)


def check_clip(ours: ViT, tower, seed: int) -> None:
    x = pixels(tower.config, seed=seed)
    with torch.no_grad():
        ref = tower(x)
        hidden = ours.forward_features(x)
        pooled = ours.pool(hidden)
    assert max_diff(ref.last_hidden_state, hidden) <= ATOL
    assert max_diff(ref.pooler_output, pooled) <= ATOL


@pytest.mark.parametrize("shape", sorted(CLIP_SHAPES))
def test_clip_vision_model_matches(shape):
    hf = hf_clip_vision(shape, seed=4)
    ours = vit_from_hf(hf).eval()
    c = ours.config
    assert (c.pre_norm, c.final_norm, c.patch_bias, c.activation, c.layer_norm_eps) == (True, "cls", False,
                                                                                        "quick_gelu", 1e-5)
    assert (c.image_mean, c.image_std, c.num_classes) == (CLIP_MEAN, CLIP_STD, 0)
    check_clip(ours, hf, seed=2)


@pytest.mark.parametrize("shape", sorted(CLIP_SHAPES))
def test_clip_model_vision_tower_matches(shape):
    hf = hf_clip(shape, seed=5)
    ours = vit_from_hf(hf).eval()
    check_clip(ours, hf.vision_model, seed=3)


# ----------------------------------------------------------------------------- local folders


def test_gpt2_from_local_folder(tmp_path):
    hf = hf_gpt2(seed=6)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_hf(tmp_path).eval()  # a Path
    same = gpt_from_hf(str(tmp_path)).eval()  # a str
    ids = torch.randint(0, hf.config.vocab_size, (2, 11))
    with torch.no_grad():
        ref = hf(ids).logits
        assert max_diff(ref, ours(ids)) <= ATOL
        assert torch.equal(ours(ids), same(ids))


def test_vit_from_local_folder_reads_preprocessor_config(tmp_path):
    hf = hf_vit("ViTForImageClassification", num_labels=3, seed=7)
    hf.save_pretrained(tmp_path)
    stats = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.7, 0.8, 0.9], "do_normalize": True}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(stats))
    ours = ViT.from_hf(tmp_path).eval()
    assert ours.config.image_mean == (0.1, 0.2, 0.3) and ours.config.image_std == (0.7, 0.8, 0.9)
    assert ours.config.num_classes == 3
    x = pixels(hf.config)
    with torch.no_grad():
        assert max_diff(hf(x).logits, ours(x)) <= ATOL


def test_clip_from_local_folder_defaults_to_openai_stats(tmp_path):
    hf = hf_clip("32px-p8", seed=8)
    hf.save_pretrained(tmp_path)
    ours = vit_from_hf(tmp_path).eval()
    assert (ours.config.image_mean, ours.config.image_std) == (CLIP_MEAN, CLIP_STD)
    check_clip(ours, hf.vision_model, seed=4)


def test_missing_folder_and_offline_hub_id_raise_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ConversionError, match="nope does not exist"):
        gpt_from_hf(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConversionError, match="file is not a folder"):
        gpt_from_hf(tmp_path / "file")
    with pytest.raises(ConversionError, match="runs/gpt/model does not exist"):  # not a hub id: two slashes
        gpt_from_hf("runs/gpt/model")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConversionError, match="Hugging Face Hub id") as info:
        gpt_from_hf("mmfusion-tests/certainly-not-cached")
    assert "save_pretrained" in str(info.value) and "\n" not in str(info.value)  # the CLI prints one line
    assert isinstance(info.value, CheckpointError)


def test_mmfusion_folder_is_pointed_to_from_pretrained(tmp_path):
    GPT(gpt_from_hf(hf_gpt2()).config).save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="from_pretrained"):
        gpt_from_hf(tmp_path)


def test_folder_of_unsupported_architecture_is_refused(tmp_path):
    config = transformers.ViTConfig(**VIT_SHAPES["32px-p8-gelu"])
    transformers.ViTForMaskedImageModeling(config).save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="ViTForMaskedImageModeling"):
        vit_from_hf(tmp_path)


# ----------------------------------------------------------------------------- refusals


def test_unsupported_model_classes_are_refused():
    with pytest.raises(ConversionError, match="GPT2LMHeadModel"):
        vit_from_hf(hf_gpt2())
    with pytest.raises(ConversionError, match="ViTModel"):
        gpt_from_hf(hf_vit("ViTModel"))
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                     intermediate_size=64, vocab_size=50)
    with pytest.raises(ConversionError, match="BertModel"):
        gpt_from_hf(transformers.BertModel(config))
    with pytest.raises(TypeError):
        gpt_from_hf(42)


@pytest.mark.parametrize("make, match", [
    (lambda: hf_vit("ViTModel", hidden_act="relu"), "relu"),
    (lambda: hf_vit("ViTModel", hidden_act="gelu_fast"), "gelu_fast"),
    (lambda: hf_vit("ViTModel", image_size=(32, 16)), "not square"),
    (lambda: hf_gpt2(activation_function="relu"), "relu"),
    (lambda: hf_gpt2(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (lambda: hf_gpt2(scale_attn_weights=False), "scale_attn_weights"),
])
def test_unsupported_options_are_refused(make, match):
    hf = make()
    convert = gpt_from_hf if "GPT2" in type(hf).__name__ else vit_from_hf
    with pytest.raises(ConversionError, match=match):
        convert(hf)


@pytest.mark.parametrize("version", ["4.57.6", "5.0.0", "5.8.1"])
def test_a_transformers_older_than_the_tables_names_is_refused_naming_the_version(monkeypatch, version):
    """transformers 5.0-5.8 load but name ViT's keys attention.attention.query: say which version
    to install rather than list every key the table misses."""
    from mmfusion import hf_checkpoint

    hf = hf_vit("ViTModel")
    # not transformers.__version__: building a transformers model can put a fresh module in sys.modules
    monkeypatch.setattr(hf_checkpoint, "transformers_version", lambda: version)
    with pytest.raises(ConversionError, match=rf"transformers {version} is installed: pip install -U 'transformers>=5\.9'"):
        vit_from_hf(hf)
    monkeypatch.setattr(hf_checkpoint, "transformers_version", lambda: "5.9.0.dev0")
    vit_from_hf(hf)


def test_untied_lm_head_is_refused():
    hf = hf_gpt2(tie_word_embeddings=False)
    assert hf.lm_head.weight is not hf.transformer.wte.weight
    with pytest.raises(ConversionError, match="untied"):
        gpt_from_hf(hf)


def test_extra_source_key_is_named():
    hf = hf_gpt2()
    hf.transformer.h[1].register_buffer("scale", torch.ones(1))  # a key no table entry or ignore rule covers
    with pytest.raises(ConversionError, match=r"transformer\.h\.1\.scale"):
        gpt_from_hf(hf)


def test_tampered_state_dicts_are_named_and_leave_the_model_untouched():
    hf = hf_gpt2()
    ours = gpt_from_hf(hf)
    table = gpt2_table(ours.config, "transformer.", lm_head=True)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    state = dict(hf.state_dict())

    # The documented ignore list: older transformers' causal-mask buffers are accepted.
    ignore = [r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)"]
    apply_table(ours, table, {**state, "transformer.h.0.attn.bias": torch.ones(1, 1, 4, 4)}, ignore)

    missing = {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(ConversionError, match=r"lacks \[transformer\.h\.1\.mlp\.c_fc\.bias\]"):
        apply_table(ours, table, missing, ignore)
    with pytest.raises(ConversionError, match=r"ignore list \[transformer\.h\.0\.attn\.extra\]"):
        apply_table(ours, table, {**state, "transformer.h.0.attn.extra": torch.ones(1)}, ignore)
    wrong = {**state, "transformer.wpe.weight": torch.zeros(5, 32)}
    with pytest.raises(ConversionError, match=r"wpe\.weight \(5, 32\)"):
        apply_table(ours, table, wrong, ignore)
    short = {k: v for k, v in table.items() if k != "ln_f.bias"}
    with pytest.raises(ConversionError, match=r"our keys without a source \[ln_f\.bias\]"):
        apply_table(ours, short, state, ignore)
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


@pytest.mark.slow
def test_gpt2_names_the_pretrained_weights_not_a_fresh_preset(monkeypatch):
    """`--gpt gpt2` must import GPT-2 (here: fail clearly offline), never give random weights
    under the hub id's name; the fresh 124M preset is `gpt-base`."""
    import huggingface_hub.constants

    from mmfusion.loading import load_gpt

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConversionError, match="'gpt2' is not a local folder, so it was read as a Hugging Face Hub id"):
        load_gpt("gpt2", None)
    fresh = load_gpt("gpt-base", None).config
    assert (fresh.n_layer, fresh.n_embd, fresh.vocab_size, fresh.block_size) == (12, 768, 50257, 1024)


@pytest.mark.parametrize("std", [0.02, 0.06])
def test_fresh_gpt_init_matches_transformers_gpt2_init(std):
    """A fresh GPT draws its weights like transformers' GPT-2 with the same initializer_range:
    Normal(0, std) for embeddings and linear layers, std / sqrt(2 n_layer) for the residual
    projections; the config field imports from a GPT2Config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=256, initializer_range=std)
    assert gpt_config_from_hf(hf_config).initializer_range == std
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_config).transformer
    ours = GPT(gpt_config_from_hf(hf_config))
    pairs = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "blocks.1.attn.qkv.weight": "h.1.attn.c_attn.weight",
             "blocks.1.attn.proj.weight": "h.1.attn.c_proj.weight", "blocks.2.mlp.fc.weight": "h.2.mlp.c_fc.weight",
             "blocks.2.mlp.proj.weight": "h.2.mlp.c_proj.weight"}
    theirs, mine = dict(hf.named_parameters()), dict(ours.named_parameters())
    for name, hf_name in pairs.items():
        assert mine[name].std().item() == pytest.approx(theirs[hf_name].std().item(), rel=0.03), name
    assert mine["blocks.2.mlp.proj.weight"].std().item() == pytest.approx(std / 8**0.5, rel=0.03)
    assert torch.all(mine["blocks.1.attn.qkv.bias"] == 0) and torch.all(mine["blocks.0.ln1.weight"] == 1)


def test_gpt_init_std_flag_reaches_a_fresh_gpt():
    from mmfusion.loading import load_gpt
    from mmfusion.training.train_vqa import VQAStageConfig

    stage = VQAStageConfig(gpt="gpt-tiny", vit="vit-tiny", gpt_init_std=0.06, block_size=96)
    gpt = load_gpt(stage.gpt, stage.gpt_overrides())
    assert (gpt.config.initializer_range, gpt.config.block_size) == (0.06, 96)
    assert gpt.wte.weight.std().item() == pytest.approx(0.06, rel=0.02)


# ----------------------------------------------------------------------------- pixels

def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A landscape or portrait photo stand-in: smooth gradients (where resampling filters differ
    most) and noise."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    base = np.stack([x * 255, y * 255, (1 - x) * y * 255], -1) + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def theirs(processor, image: Image.Image) -> torch.Tensor:
    return torch.as_tensor(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))


@pytest.mark.parametrize("size", [(600, 400), (300, 500), (32, 32), (17, 90)])
def test_imported_vit_sees_the_pixels_vit_image_processor_gives(tmp_path, size):
    """ViTImageProcessor resizes the whole image bilinearly (we used bicubic: up to 0.196 apart)."""
    hf = hf_vit("ViTModel")
    hf.save_pretrained(tmp_path)
    processor = transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                                                  image_std=[0.2, 0.3, 0.25])
    processor.save_pretrained(tmp_path)
    ours = ViT.from_hf(tmp_path)
    assert (ours.config.resize, ours.config.resample) == ("square", "bilinear")
    image = photo(*size)
    assert max_diff(ImageProcessor.from_config(ours.config)(image)[0], theirs(processor, image)) <= 1e-5
    assert ViT.from_hf(hf).config.resample == "bilinear"  # the family's default, without the file


@pytest.mark.parametrize("size", [(600, 400), (300, 500), (33, 32), (40, 101), (10, 160)])
def test_imported_clip_sees_the_pixels_clip_image_processor_gives(tmp_path, size):
    """CLIPImageProcessor resizes the short side and crops the centre (we squashed the whole image
    to a square: mean 0.56, max 3.59 apart on a 600x400 photo)."""
    hf = hf_clip_vision("32px-p8")
    hf.save_pretrained(tmp_path)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    ours = vit_from_hf(tmp_path)
    assert (ours.config.resize, ours.config.resample) == ("shortest_edge", "bicubic")
    image = photo(*size, seed=1)
    assert max_diff(ImageProcessor.from_config(ours.config)(image)[0], theirs(processor, image)) <= 1e-5


def test_a_larger_resize_then_crop_is_followed(tmp_path):
    hf = hf_clip_vision("32px-p8")
    hf.save_pretrained(tmp_path)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                                   resample=2)
    processor.save_pretrained(tmp_path)
    ours = vit_from_hf(tmp_path)
    assert (ours.config.resize_size, ours.config.resample) == (40, "bilinear")
    image = photo(70, 50, seed=2)
    assert max_diff(ImageProcessor.from_config(ours.config)(image)[0], theirs(processor, image)) <= 1e-5


@pytest.mark.parametrize("settings", [{"rescale_factor": 1 / 127.5}, {"do_rescale": False},
                                      {"do_rescale": False, "do_normalize": False},
                                      {"rescale_factor": 2 / 255, "do_normalize": False}])
def test_imported_vit_follows_the_processors_rescale(tmp_path, settings):
    """rescale_factor and do_rescale were dropped: 1.8 apart at 1/127.5, 460 without the rescale."""
    hf_vit("ViTModel").save_pretrained(tmp_path)
    processor = transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                                                  image_std=[0.2, 0.3, 0.25], **settings)
    processor.save_pretrained(tmp_path)
    ours = ViT.from_hf(tmp_path)
    image = photo(40, 50, seed=3)
    expected = theirs(processor, image)
    assert max_diff(ImageProcessor.from_config(ours.config)(image)[0], expected) <= 1e-6 * expected.abs().max() + 1e-5


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_trns_transparent_colour_is_composited_as_clip_image_processor_does(mode):
    """tRNS was honoured for palette images only: an L image's transparent pixels stayed black (1.23 apart)."""
    image = photo(40, 48, seed=4).convert(mode)
    image.info["transparency"] = image.getpixel((20, 20))  # one colour, wherever it occurs, is transparent
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ours = ImageProcessor(32, CLIP_MEAN, CLIP_STD, resize="shortest_edge", resample="bicubic")
    assert max_diff(ours(image)[0], theirs(processor, image)) <= 1e-5


@pytest.mark.parametrize("size", [(3, 100), (120, 5), (1, 333)])
def test_a_thin_image_stays_within_a_level_of_clip_image_processor(size):
    """Past CROP_AFTER_RESIZE_LIMIT only the crop box is resized (transformers builds the whole
    16x1600 intermediate here): on a smooth image the pixels stay within a level or two."""
    rng = np.random.default_rng(5)
    x, y = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]))
    image = Image.fromarray((np.stack([x, y, x * y], -1) * 255 + rng.uniform(-2, 2, (*x.shape, 3))).clip(0, 255)
                            .astype(np.uint8))
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    ours = ImageProcessor(16, CLIP_MEAN, CLIP_STD, resize="shortest_edge", resample="bicubic")
    assert max_diff(ours(image)[0], theirs(processor, image)) <= 2.5 / 255 / min(CLIP_STD)


@pytest.mark.parametrize("settings, message", [
    ({"resample": 1}, "resample 1 is not supported"),
    ({"rescale_factor": 0}, "rescale_factor must be a positive number, got 0"),
    ({"rescale_factor": "1/255"}, "rescale_factor must be a positive number"),
    ({"do_rescale": "yes"}, "do_rescale must be true or false"),
    ({"rescale_factor": 0.5, "image_std": [0.5, 0.5, 0.5]}, "rescale other than 1/255 but no image_mean"),
    ({"size": {"height": 48, "width": 48}}, "the processor gives 48x48 images, the model takes 32x32"),
    ({"size": {"shortest_edge": 32}, "do_center_crop": False}, "without a centre crop"),
    ({"size": {"height": 32, "width": 40}}, "size must be a positive size"),
])
def test_processor_settings_the_model_cannot_follow_are_refused(tmp_path, settings, message):
    hf = hf_vit("ViTModel")
    hf.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ConversionError, match=message):
        ViT.from_hf(tmp_path)
