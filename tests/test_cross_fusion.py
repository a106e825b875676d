"""Late fusion (VLMConfig.fusion="cross"): gated cross-attention blocks from the text to the
image tokens. With the gates at zero the text logits are the bare GPT's; the prompt holds no
image slots; generation computes the image keys and values once per prompt; the same stage,
flags, save/load, generation API and export (LLaVA refused, the blocks kept) as early fusion."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmfusion import VLM, ViTConfig, VLMConfig
from mmfusion.cli import main as cli_main
from mmfusion.config import ConfigError, GPTConfig
from mmfusion.errors import ConversionError, SlotCountError
from mmfusion.export import export, vlm_to_llava
from mmfusion.generation import vlm_prompts
from mmfusion.layers import GatedCrossAttention
from mmfusion.training import train_vqa

VIT = ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=0)
GPT_C = GPTConfig(n_layer=4, n_head=2, n_embd=32, block_size=64)


def cross_vlm(every: int = 2, open_gates: bool = False) -> VLM:
    torch.manual_seed(0)
    vlm = VLM(VLMConfig(vit=VIT, gpt=GPT_C, fusion="cross", cross_every=every)).eval()
    if open_gates:
        with torch.no_grad():
            for block in vlm.cross.values():
                block.attn_gate.fill_(0.8)
                block.mlp_gate.fill_(0.5)
            for p in vlm.gpt.parameters():
                p.normal_(0, 0.3)
    return vlm


IMAGES = [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
QUESTIONS = ["what is it?", "a longer question about the picture?"]


def test_with_closed_gates_the_text_logits_are_the_bare_gpts():
    vlm = cross_vlm()
    assert sorted(vlm.cross) == ["0", "2"] and vlm.config.cross_layers == (0, 2)
    batch = vlm_prompts(vlm, IMAGES, QUESTIONS)
    assert vlm.prompt_slots == 0 and not (batch["input_ids"] == vlm.config.image_token_id).any()  # no slots
    with torch.no_grad():
        fused = vlm(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
        bare = vlm.gpt(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(fused, bare)
    # and the image does matter once the gates open
    opened = cross_vlm(open_gates=True)
    with torch.no_grad():
        a = opened(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
        b = opened(batch["input_ids"], batch["pixel_values"].flip(0), batch["attention_mask"]).logits
    assert (a - b).abs().max() > 1e-3


def test_generation_computes_image_keys_and_values_once_per_prompt(monkeypatch):
    vlm = cross_vlm(open_gates=True)
    calls = []
    original = GatedCrossAttention.image_kv
    monkeypatch.setattr(GatedCrossAttention, "image_kv", lambda self, image: calls.append(1) or original(self, image))
    answers = vlm.answer_batch(IMAGES, QUESTIONS, max_new_tokens=8)
    assert len(calls) == len(vlm.cross)  # once per cross block for the whole batch, not per token
    assert vlm.answer_batch(IMAGES, QUESTIONS, max_new_tokens=8, decoder="static") == answers
    assert "".join(vlm.stream(IMAGES[1], QUESTIONS[1], max_new_tokens=8)) == answers[1]
    with pytest.raises(ValueError, match="compiled decoder serves early fusion"):
        vlm.answer(IMAGES[0], QUESTIONS[0], decoder="compiled")


def test_a_prompt_with_image_slots_is_refused():
    vlm = cross_vlm()
    batch = vlm_prompts(vlm, IMAGES[:1], QUESTIONS[:1])
    ids = batch["input_ids"].clone()
    ids[0, 0] = vlm.config.image_token_id
    with pytest.raises(SlotCountError, match="row 0 has 1 <|image|> slots"):
        vlm(ids, batch["pixel_values"])


def test_config_checks():
    with pytest.raises(ConfigError, match="fusion must be 'early' or 'cross'"):
        VLMConfig(vit=VIT, gpt=GPT_C, fusion="late")
    with pytest.raises(ConfigError, match="cross_every"):
        VLMConfig(vit=VIT, gpt=GPT_C, fusion="cross", cross_every=5)
    with pytest.raises(ConfigError, match="prefix.*cross fusion has none"):
        VLMConfig(vit=VIT, gpt=GPT_C, fusion="cross", attention="prefix")
    # an early-fusion config saved before the field existed still loads as early fusion
    old = VLMConfig(vit=VIT, gpt=GPT_C).to_dict()
    del old["fusion"], old["cross_every"]
    assert VLMConfig.from_dict(old).fusion == "early"


@pytest.mark.slow
def test_stage2_trains_saves_and_loads_a_cross_fusion_vlm(tmp_path, capsys):
    rows = []
    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows += [{"image": f"{i}.png", "question": "what color?", "answers": [f"c{i % 2}"]}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    train_vqa.run(*train_vqa.parse(["--dataset", str(tmp_path / "qa.jsonl"), "--vit", "vit-tiny", "--fusion", "cross",
                                    "--cross-every", "2", "--holdout", "0", "--max-steps", "3", "--batch-size", "4",
                                    "--lr", "1e-2", "--warmup-steps", "0", "--mixed-precision", "no", "--no-progress",
                                    "--output-dir", str(out)]))
    assert "17 image tokens read by cross-attention before GPT blocks [0, 2]" in capsys.readouterr().out
    model = VLM.from_pretrained(out / "model")
    assert model.config.fusion == "cross" and model.config.attention == "causal"
    gates = [float(b.attn_gate.detach()) for b in model.cross.values()]
    assert all(g != 0 for g in gates)  # the cross blocks trained (as part of the connector)
    assert isinstance(model.answer(str(tmp_path / "0.png"), "what color?", max_new_tokens=2), str)


def test_export_refuses_llava_and_keeps_the_cross_blocks(tmp_path):
    vlm = cross_vlm(open_gates=True)
    with pytest.raises(ConversionError, match="cross fusion"):
        vlm_to_llava(vlm)
    notes = export(vlm, tmp_path / "out")
    assert any("cross-attention blocks are in adapter" in n for n in notes)
    saved = load_file(tmp_path / "out" / "adapter" / "model.safetensors")
    for k, v in vlm.cross.state_dict().items():
        assert torch.equal(saved[f"cross.{k}"], v)
    assert "llava" not in {p.name for p in (tmp_path / "out").iterdir()}
    assert "gated cross-attention blocks before its blocks [0, 2]" in (tmp_path / "out" / "README.md").read_text()
    vlm.save_pretrained(tmp_path / "m")
    assert cli_main(["export", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "o2")]) == 0
