"""Export to transformers (mmfusion export): the exported GPT-2, ViT and CLIP towers give our
outputs, the tokenizer encodes as ours, the image processor gives our pixels, and importing the
export back gives the original model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from mmfusion import GPT, VLM, ViT, VLMConfig  # noqa: E402
from mmfusion.adapter import ViTAdapter  # noqa: E402
from mmfusion.cli import main  # noqa: E402
from mmfusion.config import AdapterConfig, GPTConfig, ViTConfig  # noqa: E402
from mmfusion.convert import gpt_from_hf, vit_from_hf  # noqa: E402
from mmfusion.export import gpt_to_hf, vit_to_hf  # noqa: E402
from mmfusion.processing import ImageProcessor  # noqa: E402
from mmfusion.tokenizer import get_tokenizer  # noqa: E402

ATOL = 1e-5
VIT = dict(image_size=32, patch_size=8, n_layer=2, n_head=2, n_embd=32)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random (norms and biases too), so a swapped or dropped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "quick_gelu"])
def test_exported_gpt2_gives_our_logits_and_imports_back(activation):
    ours = randomized(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, activation=activation)))
    hf = gpt_to_hf(ours)
    ids = torch.randint(0, 50257, (2, 11))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= ATOL
    back = gpt_from_hf(hf)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


def test_exported_vit_classifier_backbone_and_clip_give_our_outputs():
    x = torch.randn(2, 3, 32, 32)
    classifier = randomized(ViT(ViTConfig(**VIT, num_classes=5)), 1)
    hf, notes = vit_to_hf(classifier)
    assert type(hf).__name__ == "ViTForImageClassification" and not notes
    with torch.no_grad():
        assert (hf(x).logits - classifier(x)).abs().max() <= ATOL
    backbone = randomized(ViT(ViTConfig(**VIT, num_classes=0, activation="gelu_tanh", qkv_bias=False)), 2)
    hf, _ = vit_to_hf(backbone)
    with torch.no_grad():
        assert (hf(x).last_hidden_state - backbone.forward_features(x)).abs().max() <= ATOL
    clip = randomized(ViT(ViTConfig(**VIT, num_classes=0, activation="quick_gelu", qkv_bias=True, patch_bias=False,
                                    pre_norm=True, final_norm="cls")), 3)
    hf, _ = vit_to_hf(clip)
    assert type(hf).__name__ == "CLIPVisionModel"
    with torch.no_grad():
        assert (hf(x).last_hidden_state - clip.forward_features(x)).abs().max() <= ATOL
        assert (vit_from_hf(hf).forward_features(x) - clip.forward_features(x)).abs().max() <= ATOL
    cells = randomized(ViT(ViTConfig(**VIT, num_classes=4, label_grid=2)), 4)
    hf, notes = vit_to_hf(cells)
    assert type(hf).__name__ == "ViTModel" and "per-cell classifier head (4 classes)" in notes[0]


def test_mmfusion_export_writes_parts_transformers_load(tmp_path, capsys):
    torch.manual_seed(0)
    vlm = VLM(VLMConfig(vit=ViTConfig(**VIT, num_classes=0), gpt=GPTConfig(n_layer=1, n_head=2, n_embd=32,
                                                                           block_size=64),
                        adapter=AdapterConfig(pixel_shuffle=2, keep_cls=True))).eval()
    vlm.save_pretrained(tmp_path / "model")
    assert main(["export", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "out")]) == 0
    assert "exported vlm to" in capsys.readouterr().out
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"gpt2", "vit", "adapter", "README.md"}
    # the tokenizer: the same ids as ours
    tok = transformers.AutoTokenizer.from_pretrained(out / "gpt2")
    for text in ["What color is the shape?", " 日本 🙂 é\n", "a  b"]:
        assert tok.encode(text) == get_tokenizer().encode(text)
    # the image processor: our pixels
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8))
    processor = transformers.AutoImageProcessor.from_pretrained(out / "vit")
    theirs = torch.as_tensor(np.asarray(processor(images=image, return_tensors="np")["pixel_values"]))
    assert (theirs - ImageProcessor.from_config(vlm.config.vit)(image)).abs().max() <= ATOL
    # the parts back together: the same model
    adapter_meta = json.loads((out / "adapter" / "config.json").read_text())
    adapter = ViTAdapter(AdapterConfig.from_dict(adapter_meta["adapter"]), 32, 32, adapter_meta["num_image_tokens"])
    from safetensors.torch import load_file

    adapter.load_state_dict(load_file(out / "adapter" / "model.safetensors"))
    rebuilt = VLM.from_parts(vit_from_hf(out / "vit"), gpt_from_hf(out / "gpt2"), adapter.config,
                             adapter_meta["attention"])
    rebuilt.adapter.load_state_dict(adapter.state_dict())
    ids = torch.tensor([[vlm.config.image_token_id] * vlm.num_image_tokens + [10, 20, 30]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (rebuilt.eval()(ids, pixels).logits - vlm(ids, pixels).logits).abs().max() <= ATOL
    assert "transformers has no class for the whole model" in (out / "README.md").read_text()


def test_export_refusals_are_one_line(tmp_path, capsys):
    (tmp_path / "not_a_model").mkdir()
    assert main(["export", "--model", str(tmp_path / "not_a_model"), "--output", str(tmp_path / "o")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, bias=False)).save_pretrained(tmp_path / "nobias")
    assert main(["export", "--model", str(tmp_path / "nobias"), "--output", str(tmp_path / "o2")]) == 2
    assert "a GPT with bias=False has no transformers twin" in capsys.readouterr().err
