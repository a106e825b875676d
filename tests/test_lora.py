"""LoRA on the GPT (train-vqa --lora-rank): only the low-rank updates (and the adapter) train,
the GPT's own weights stay as they were, and the saved model is a plain VLM whose GPT holds the
merged updates: the same outputs as the wrapped model."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from PIL import Image

pytest.importorskip("peft")

from mmfusion import GPT, VLM, GPTConfig  # noqa: E402
from mmfusion.config import ConfigError  # noqa: E402
from mmfusion.training import train_vqa  # noqa: E402
from mmfusion.training.lora import add_lora, merge_lora  # noqa: E402


def test_merged_weights_give_the_wrapped_models_outputs():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        before = gpt(ids)
        lora = add_lora(gpt, rank=4)
        assert torch.equal(gpt(ids), before)  # B starts at zero: the model starts unchanged
        for name, p in gpt.named_parameters():
            assert p.requires_grad == (".lora_" in name), name
            if ".lora_B" in name:
                p.normal_(0, 0.5)
        wrapped = gpt(ids)
        assert (wrapped - before).abs().max() > 1e-2
        merged = merge_lora(lora)
        assert merged is gpt and set(gpt.state_dict()) == set(GPT(gpt.config).state_dict())  # plain keys
        assert torch.allclose(gpt(ids), wrapped, atol=1e-5)


def test_train_vqa_with_lora_saves_a_plain_vlm_with_the_gpt_updated(tmp_path, capsys):
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "question": "what color?", "answers": [f"c{i}"]} for i in range(4)] * 4
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).save_pretrained(tmp_path / "gpt")
    start = GPT.from_pretrained(tmp_path / "gpt").state_dict()
    stage, run = train_vqa.parse(["--vit", "vit-tiny", "--gpt", str(tmp_path / "gpt"), "--dataset",
                                  str(tmp_path / "qa.jsonl"), "--lora-rank", "4", "--holdout", "0", "--lr", "0.05",
                                  "--max-steps", "3", "--batch-size", "4", "--no-progress", "--mixed-precision", "no",
                                  "--output-dir", str(tmp_path / "out")])
    train_vqa.run(stage, run)
    assert "LoRA: rank 4 updates of the GPT's fc, proj, qkv layers" in capsys.readouterr().out
    saved = VLM.from_pretrained(tmp_path / "out" / "model").gpt.state_dict()
    assert set(saved) == set(start)
    changed = {k for k in start if not torch.equal(start[k], saved[k])}
    assert changed and all(k.split(".")[-2] in ("qkv", "proj", "fc") for k in changed), changed  # merged updates
    assert torch.equal(saved["wte.weight"], start["wte.weight"])  # the rest is fixed
    # the updates were saved on their own as a peft adapter of the exported GPT-2; merged into the start
    # (GPT-2's Conv1D layers hold W transposed) they give the saved weights
    from safetensors.torch import load_file

    from mmfusion.convert import gpt2_table

    adapter = load_file(tmp_path / "out" / "lora" / "adapter_model.safetensors")
    meta = json.loads((tmp_path / "out" / "lora" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["lora_alpha"] == 8 and meta["fan_in_fan_out"]
    assert sorted(meta["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
    assert meta["base_model_name_or_path"] is None  # an mmfusion folder: transformers cannot load it; its export can
    ours = {source.keys[0]: key for key, source in gpt2_table(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64),
                                                               "transformer.", lm_head=True).items()}
    layers = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in adapter}
    assert {ours[f"{layer}.weight"] for layer in layers} == {k for k in start if k.endswith(".weight") and
                                                            k.split(".")[-2] in ("qkv", "proj", "fc")}
    for layer in layers:
        a, b = (adapter[f"base_model.model.{layer}.lora_{p}.weight"] for p in "AB")
        torch.testing.assert_close(saved[ours[f"{layer}.weight"]], start[ours[f"{layer}.weight"]] + 2.0 * b @ a,
                                   atol=1e-6, rtol=1e-5)
    # --lora-targets picks the layers
    stage, run = train_vqa.parse(["--vit", "vit-tiny", "--gpt", str(tmp_path / "gpt"), "--dataset",
                                  str(tmp_path / "qa.jsonl"), "--lora-rank", "4", "--lora-targets", "qkv",
                                  "--holdout", "0", "--lr", "0.05", "--max-steps", "2", "--batch-size", "4",
                                  "--no-progress", "--mixed-precision", "no", "--output-dir", str(tmp_path / "qkv")])
    train_vqa.run(stage, run)
    only = VLM.from_pretrained(tmp_path / "qkv" / "model").gpt.state_dict()
    assert {k for k in start if not torch.equal(start[k], only[k])} == {"blocks.0.attn.qkv.weight"}
    with pytest.raises(ConfigError, match="--lora-targets 'qkv,attn': attn is not a GPT layer"):
        train_vqa.parse(["--lora-rank", "4", "--lora-targets", "qkv,attn"])


def test_the_saved_updates_are_a_peft_adapter_of_the_exported_gpt2(tmp_path):
    """OUTPUT_DIR/lora had peft's file names but our module names and config keys: peft could
    not load it. Now peft applies it to transformers' GPT-2 (our GPT exported) with our outputs."""
    from peft import PeftModel

    from mmfusion.export import gpt_to_hf
    from mmfusion.training.lora import save_lora

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    base = gpt_to_hf(gpt).eval()  # before LoRA wraps the layers
    lora = add_lora(gpt, rank=4, alpha=6, targets=("qkv", "fc"))
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if ".lora_B" in name:
                p.normal_(0, 0.5)
    save_lora(lora, gpt, tmp_path / "lora")
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        ours, plain = gpt(ids), base(ids).logits
        theirs = PeftModel.from_pretrained(base, tmp_path / "lora").eval()(ids).logits  # wraps base in place
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        assert (theirs - plain).abs().max() > 1e-2  # the updates are applied, not dropped


def test_the_adapter_names_a_base_transformers_can_load(tmp_path, monkeypatch):
    from mmfusion.training.train_vqa import lora_base

    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)).save_pretrained(tmp_path / "ours")
    (tmp_path / "hf").mkdir()
    monkeypatch.chdir(tmp_path)
    assert lora_base("gpt-tiny") is None and lora_base("ours") is None
    assert lora_base("hf") == str(tmp_path / "hf") and lora_base("gpt2") == "gpt2"  # absolute; a hub id as given


def test_lora_flags_are_checked_and_peft_is_named_when_missing(monkeypatch):
    with pytest.raises(ConfigError, match="--lora-rank must be >= 0"):
        train_vqa.VQAStageConfig(lora_rank=-1)
    train_vqa.VQAStageConfig(freeze_vit=True, freeze_adapter=True, freeze_gpt=True, lora_rank=2)  # LoRA trains
    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name.startswith("peft"):
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(ConfigError, match=r"--lora-rank needs peft: pip install 'mmfusion\[lora\]'"):
        add_lora(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)), rank=2)
