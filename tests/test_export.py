"""Export to transformers (mmfusion export): the exported GPT-2, ViT and CLIP towers give our
outputs, the tokenizer encodes as ours, the image processor gives our pixels, and importing the
export back gives the original model."""

from __future__ import annotations

import importlib
import json
import os

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
from mmfusion.errors import ConfigError, ConversionError  # noqa: E402
from mmfusion.export import export, gpt_to_hf, vit_to_hf, vlm_to_llava  # noqa: E402
from mmfusion.export_folder import MARKER  # noqa: E402
from mmfusion.generation import GenerationConfig, vlm_prompts  # noqa: E402
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
    pooled = randomized(ViT(ViTConfig(**VIT, num_classes=3, pool="mean")), 5)
    hf, notes = vit_to_hf(pooled)
    assert type(hf).__name__ == "ViTModel" and "mean-pooled classifier head (3 classes)" in notes[0]
    with torch.no_grad():
        assert (hf(x).last_hidden_state - pooled.forward_features(x)).abs().max() <= ATOL


def test_mmfusion_export_writes_parts_transformers_load(tmp_path, capsys):
    torch.manual_seed(0)
    vlm = VLM(VLMConfig(vit=ViTConfig(**VIT, num_classes=0), gpt=GPTConfig(n_layer=1, n_head=2, n_embd=32,
                                                                           block_size=64),
                        adapter=AdapterConfig(pixel_shuffle=2, keep_cls=True))).eval()
    vlm.save_pretrained(tmp_path / "model")
    assert main(["export", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "out")]) == 0
    assert "exported vlm to" in capsys.readouterr().out
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"gpt2", "vit", "adapter", "README.md", MARKER}
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
    card = (out / "README.md").read_text()
    assert "no LLaVA export: LLaVA cannot represent" in card and "2x2 patches merged" in card


def test_export_refusals_are_one_line(tmp_path, capsys):
    (tmp_path / "not_a_model").mkdir()
    assert main(["export", "--model", str(tmp_path / "not_a_model"), "--output", str(tmp_path / "o")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, bias=False)).save_pretrained(tmp_path / "nobias")
    assert main(["export", "--model", str(tmp_path / "nobias"), "--output", str(tmp_path / "o2")]) == 2
    assert "a GPT with bias=False has no transformers twin" in capsys.readouterr().err


CLIP_LAYOUT = dict(activation="quick_gelu", patch_bias=False, pre_norm=True, final_norm="cls")


def llava_ready(projection="mlp", keep_cls=True, layer=1, clip=False, seed=0, vocab_size=50257) -> VLM:
    """A random-weight VLM of the kind LLaVA represents: causal, one token per patch."""
    vit = ViTConfig(**VIT, num_classes=0, **(CLIP_LAYOUT if clip else {}))
    gpt = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=vocab_size)
    return randomized(VLM(VLMConfig(vit=vit, gpt=gpt,
                                    adapter=AdapterConfig(pixel_shuffle=1, keep_cls=keep_cls, projection=projection,
                                                          layer=layer), attention="causal")), seed)


@pytest.mark.parametrize("projection, keep_cls, layer, clip, vocab_size", [
    ("mlp", True, 1, False, 50257),  # the last block's raw output, CLS kept
    ("linear", False, 0, False, 50257),  # a lower block, CLS dropped (LLaVA's "default"), one Linear
    ("mlp", True, -1, True, 50257),  # a CLIP tower's last layer: no final norm on its tokens
    ("mlp", True, 1, False, 50258),  # a GPT whose table has a row for <|image|>: LLaVA's image row is that one
])
def test_llava_export_gives_our_logits_and_greedy_tokens(projection, keep_cls, layer, clip, vocab_size):
    vlm = llava_ready(projection, keep_cls, layer, clip, vocab_size=vocab_size)
    llava = vlm_to_llava(vlm)
    assert type(llava).__name__ == "LlavaForConditionalGeneration"
    ids = torch.tensor([[vlm.config.image_token_id] * vlm.num_image_tokens + [10, 20, 30]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        theirs = llava(input_ids=ids, pixel_values=pixels).logits
    assert theirs.shape[-1] == 50258  # GPT-2's vocabulary and the image slot
    assert (theirs[..., :vocab_size] - vlm(ids, pixels).logits).abs().max() <= ATOL
    ours = vlm.generate(ids, pixels, config=GenerationConfig(max_new_tokens=12))[0]
    out = llava.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                         do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == ours


def test_mmfusion_export_writes_llava_with_its_processor(tmp_path, capsys):
    vlm = llava_ready()
    vlm.save_pretrained(tmp_path / "model")
    assert main(["export", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"llava", "gpt2", "vit", "adapter", "README.md", MARKER}
    assert "transformers.LlavaForConditionalGeneration" in (out / "README.md").read_text()
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out / "llava").eval()
    processor = transformers.AutoProcessor.from_pretrained(out / "llava")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (45, 70, 3), dtype=np.uint8))
    question = "What color is the shape?"
    inputs = processor(images=image, text=f"<|image|>Question: {question}\nAnswer:", return_tensors="pt")
    ours = vlm_prompts(vlm, [image], [question])
    assert inputs["input_ids"].tolist() == ours["input_ids"].tolist()  # one <|image|> -> every image slot
    assert (inputs["pixel_values"] - ours["pixel_values"]).abs().max() <= ATOL
    new = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, ours["input_ids"].shape[1]:]
    assert new.tolist() == vlm.generate(ours["input_ids"], ours["pixel_values"],
                                        config=GenerationConfig(max_new_tokens=8))[0]
    assert processor.decode(new, skip_special_tokens=True).strip() == vlm.answer(image, question, max_new_tokens=8)


def test_llava_refuses_what_it_cannot_represent():
    main_job_like = VLM(VLMConfig(vit=ViTConfig(**VIT, num_classes=0), gpt=GPTConfig(n_layer=1, n_head=2, n_embd=32),
                                  adapter=AdapterConfig(pixel_shuffle=2, keep_cls=True, position_embedding=True),
                                  attention="prefix"))
    with pytest.raises(ConversionError) as info:
        vlm_to_llava(main_job_like)
    for reason in ("prefix attention", "--attention causal", "2x2 patches merged", "--pixel-shuffle 1",
                   "position embedding (--no-image-positions)", "after the ViT's final LayerNorm", "--adapter-layer 1"):
        assert reason in str(info.value)


def test_to_hf_methods():
    gpt = randomized(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)))
    ids = torch.randint(0, 50257, (1, 5))
    with torch.no_grad():
        assert (gpt.to_hf()(ids).logits - gpt(ids)).abs().max() <= ATOL
    vit = randomized(ViT(ViTConfig(**VIT, num_classes=3)), 1)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (vit.to_hf()(x).logits - vit(x)).abs().max() <= ATOL
    assert type(llava_ready().to_hf()).__name__ == "LlavaForConditionalGeneration"


def test_export_names_a_model_type_that_is_not_a_string(tmp_path, capsys):
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)).save_pretrained(tmp_path / "gpt")
    config = json.loads((tmp_path / "gpt" / "config.json").read_text())
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({**config, "model_type": ["gpt"]}))
    assert main(["export", "--model", str(tmp_path / "gpt"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "\"model_type\" is ['gpt'], not a string" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def cross_fusion(seed=0) -> VLM:
    return randomized(VLM(VLMConfig(vit=ViTConfig(**VIT, num_classes=0), gpt=GPTConfig(n_layer=2, n_head=2, n_embd=32,
                                                                                     block_size=64),
                                    adapter=AdapterConfig(pixel_shuffle=1, layer=0), fusion="cross")), seed)


def files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_over_an_earlier_export_leaves_nothing_of_it(tmp_path, capsys):
    llava_ready(layer=0).save_pretrained(tmp_path / "a")
    cross_fusion().save_pretrained(tmp_path / "b")
    out = tmp_path / "out"
    assert main(["export", "--model", str(tmp_path / "a"), "--output", str(out)]) == 0
    (out / "gpt2" / "stale.bin").write_bytes(b"A's")
    (out / "notes.txt").write_text("not the export's: kept")
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "b"), "--output", str(out)]) == 0
    assert "note: removed the earlier export's llava/ from" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"gpt2", "vit", "adapter", "README.md", "notes.txt", MARKER}
    assert not (out / "gpt2" / "stale.bin").exists()
    assert json.loads((out / "adapter" / "config.json").read_text())["fusion"] == "cross"


def test_a_failed_export_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    export(llava_ready(), tmp_path / "out")
    before = files(tmp_path / "out")

    def fails(*args):
        raise ConversionError("export: the processor failed")

    monkeypatch.setattr("mmfusion.export.llava_processor", fails)  # after gpt2/, vit/, adapter/ and llava's model
    for folder in (tmp_path / "out", tmp_path / "new"):
        with pytest.raises(ConversionError, match="the processor failed"):
            export(llava_ready(seed=1), folder)
    assert files(tmp_path / "out") == before and {p.name for p in (tmp_path / "out").iterdir()} == {
        "llava", "gpt2", "vit", "adapter", "README.md", MARKER}
    assert not (tmp_path / "new").exists()


def test_a_failure_halfway_through_the_move_puts_the_earlier_export_back(tmp_path, monkeypatch):
    """The earlier parts were deleted before the new ones moved in: a failure between the two left
    one config.json of five files."""
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    export(gpt, tmp_path / "out")
    before = files(tmp_path / "out")
    real, calls = os.replace, []

    def second_move_fails(src, dst):
        calls.append(dst)
        if len(calls) == len(before) + 2:  # the earlier entries moved aside, then the new ones' second
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr("mmfusion.export_folder.os.replace", second_move_fails)
    with pytest.raises(OSError, match="disk gone"):
        export(randomized(GPT(gpt.config), 1), tmp_path / "out")
    assert files(tmp_path / "out") == before and len(calls) > len(before) + 2  # and the moves were undone
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".export")] == []


KILLED_EXPORT = """
import os, sys
from pathlib import Path
from mmfusion import GPT
from mmfusion.export import export
folder, real, placed = Path(sys.argv[2]), os.replace, []

def dies(src, dst):  # os._exit: as SIGKILL, no except or finally runs
    if Path(dst).parent == folder:  # one of the new files moved into place
        placed.append(dst)
        if len(placed) == 2:
            os._exit(9)
    return real(src, dst)

os.replace = dies
export(GPT.from_pretrained(sys.argv[1]), folder)
"""


def hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".export"))


def test_an_export_killed_while_moving_in_is_rolled_back_by_the_next(tmp_path):
    """A SIGKILL halfway through the moves left the earlier export's files in a hidden folder and the
    folder a mix of two exports without a MARKER, which the next export then refused to touch."""
    import subprocess
    import sys

    from mmfusion.export_folder import host_tag, remove_stopped_exports

    out = tmp_path / "out"
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    export(gpt, out)
    before = files(out)
    randomized(GPT(gpt.config), 1).save_pretrained(tmp_path / "b")
    killed = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(tmp_path / "b"), str(out)],
                              stderr=subprocess.PIPE, text=True)
    assert killed.wait(timeout=120) == 9, killed.stderr.read()[-2000:]
    tag = f"{killed.pid}.{host_tag()}"
    assert [n.rsplit("-", 1)[0] for n in hidden(out)] == [f".export-{tag}", f".export-old-{tag}"]
    assert files(out) != before  # a mix: two new files in, the earlier ones aside
    notes = remove_stopped_exports(out)
    assert notes == [f"an export into {out} was stopped before it finished (process {killed.pid} is gone): put back "
                     "the earlier export it was replacing"]
    assert files(out) == before and not hidden(out)
    export(randomized(GPT(gpt.config), 2), out)  # the next export goes ahead, and leaves nothing hidden
    assert not hidden(out) and files(out) != before


def test_the_next_export_clears_what_a_killed_export_left_and_spares_a_running_ones(tmp_path):
    """Names without a host tag (from before it) count as this machine's."""
    import subprocess

    out = tmp_path / "out"
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    export(gpt, out)
    gone = subprocess.Popen(["true"])
    gone.wait()
    # killed while writing (its staging only), and killed after its last move (its MARKER in place)
    (out / f".export-{gone.pid}-abc" / "gpt2").mkdir(parents=True)
    (out / f".export-{gone.pid}-abc" / "gpt2" / "model.safetensors").write_bytes(b"x" * 1000)
    (out / f".export-{os.getpid()}-running").mkdir()  # a live process: another export under way
    (out / ".export-notes").mkdir()  # no process id in the name: not an export's
    notes = export(randomized(GPT(gpt.config), 1), out)
    assert notes[0] == (f"an export into {out} was stopped before it finished (process {gone.pid} is gone): removed "
                        "the files it had written")
    assert set(hidden(out)) == {".export-notes", f".export-{os.getpid()}-running"}
    after = files(out)
    (out / f".export-{gone.pid}-def").mkdir()
    (out / f".export-old-{gone.pid}-ghi" / "config.json").parent.mkdir()
    (out / f".export-old-{gone.pid}-ghi" / "config.json").write_text("{}")
    notes = export(randomized(GPT(gpt.config), 1), out)
    assert "its files were all in place; removed what it had set aside" in notes[0] and files(out) == after


def test_another_machines_hidden_export_is_left_with_a_note(tmp_path, monkeypatch):
    """On a folder two machines share, a process id of the other machine says nothing here: its
    running export's staging was taken for a stopped one's and removed (or rolled back mid-move)."""
    import subprocess

    from mmfusion import export_folder
    from mmfusion.export_folder import host_tag, remove_stopped_exports

    out = tmp_path / "out"
    gone = subprocess.Popen(["true"])
    gone.wait()
    here, there = host_tag(), "0badf00d" if host_tag() != "0badf00d" else "f00dfeed"
    for name in (f".export-{gone.pid}.{here}-a", f".export-{gone.pid}.{there}-b", f".export-old-{gone.pid}.{there}-c",
                 f".export-{os.getpid()}.{there}-d"):
        (out / name).mkdir(parents=True)
    notes = remove_stopped_exports(out)
    assert notes[0] == (f"an export into {out} was stopped before it finished (process {gone.pid} is gone): removed "
                        "the files it had written")
    others = sorted([f".export-{os.getpid()}.{there}-d", f".export-{gone.pid}.{there}-b",
                     f".export-old-{gone.pid}.{there}-c"])  # in the folder's name order, which the pids decide
    assert notes[1].startswith(f"left {', '.join(others)} in {out}: an export from another machine") and len(notes) == 2
    assert hidden(out) == sorted(others)
    monkeypatch.setattr(export_folder.socket, "gethostname", lambda: "another-host.example")  # now on that machine
    assert export_folder.host_tag() != here
    assert export_folder.export_owner(f".export-{gone.pid}.{here}-a") == (gone.pid, here)
    for name in (f".export-{gone.pid}.{here}-x", f".export-12.{here}-", ".export-12.xyz-a", ".export-12.0BADF00D-a"):
        (out / name).mkdir()
    notes = remove_stopped_exports(out)  # the first machine's folder is the other machine's now
    assert len(notes) == 1 and f".export-{gone.pid}.{here}-x, " in notes[0] and ".export-12.xyz-a" not in notes[0], notes
    assert len(hidden(out)) == 7  # nothing removed: the three left before and the four new


@pytest.mark.parametrize("name, owner", [
    (".export-123.0badf00d-xyz", (123, "0badf00d")), (".export-old-123.0badf00d-xyz", (123, "0badf00d")),
    (".export-123-xyz", (123, None)), (".export-old-7-", (7, None)),
    (".export-123.0badf00-xyz", None), (".export-123.0BADF00D-xyz", None), (".export-12a-x", None),
    (".export-notes", None), ("export-1-x", None), (".export-.0badf00d-x", None),
    (".export-99999999999999999999.0badf00d-x", None), (".export-2147483648-x", None), (".export-0.0badf00d-x", None),
    (".export-\u00b2.0badf00d-x", None), (".export-\u0661\u0662\u0663-x", None),  # digits, but not a pid we wrote
])
def test_export_owner_reads_only_an_exports_hidden_names(name, owner):
    from mmfusion.export_folder import export_owner

    assert export_owner(name) == owner


def test_export_never_replaces_what_no_export_wrote(tmp_path, capsys):
    """Exporting next to a run (OUT = runs/main) replaced the stage-1 run folder runs/main/vit/ with
    the exported ViT, without a word."""
    vlm = llava_ready()
    vlm.save_pretrained(tmp_path / "runs" / "vqa" / "model")
    (tmp_path / "runs" / "vit" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "vit" / "metrics.json").write_text("{}")
    (tmp_path / "runs" / "README.md").write_text("mine")
    before = files(tmp_path / "runs")
    assert main(["export", "--model", str(tmp_path / "runs" / "vqa" / "model"), "--output", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "already holds vit/, README.md, which no mmfusion export wrote there" in err and len(err.splitlines()) == 1
    assert files(tmp_path / "runs") == before and not [p for p in (tmp_path / "runs").iterdir()
                                                      if p.name.startswith(".export")]
    export(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)), tmp_path / "runs" / "vit" / "checkpoints")
    assert (tmp_path / "runs" / "README.md").read_text() == "mine"  # a GPT export writes no README.md


def test_export_refuses_a_folder_holding_a_saved_mmfusion_model(tmp_path):
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    gpt.save_pretrained(tmp_path / "gpt")
    before = files(tmp_path / "gpt")
    with pytest.raises(ConfigError, match="holds a saved mmfusion model"):
        export(llava_ready(), tmp_path / "gpt")
    assert files(tmp_path / "gpt") == before


def test_exported_llava_generates_a_padded_batch_as_answer_batch(tmp_path):
    vlm = llava_ready()
    export(vlm, tmp_path / "out")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out" / "llava").eval()
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "out" / "llava")
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(2)]
    questions = ["How many shapes are there in the picture, counting every one?", "Color?"]
    inputs = processor(images=images, text=[f"<|image|>Question: {q}\nAnswer:" for q in questions], padding=True,
                       return_tensors="pt")
    ours = vlm_prompts(vlm, images, questions)
    assert inputs["input_ids"].tolist() == ours["input_ids"].tolist()  # left-padded with <|endoftext|>, as ours
    new = model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    theirs = [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]
    assert theirs == vlm.answer_batch(images, questions, max_new_tokens=8)


def test_export_builds_the_pil_image_processor_and_tells_users_to_ask_for_it(tmp_path, monkeypatch):
    auto = importlib.import_module("transformers.models.auto.image_processing_auto")
    monkeypatch.setattr(auto, "is_torchvision_available", lambda: True)  # as in most users' environments
    chosen = []
    resolve = auto._resolve_backend
    monkeypatch.setattr(auto, "_resolve_backend", lambda *args: chosen.append(resolve(*args)) or chosen[-1])
    export(llava_ready(), tmp_path / "out")
    assert chosen == ["pil"]  # torchvision's resize is a grey level off ours
    card = (tmp_path / "out" / "README.md").read_text()
    assert 'AutoProcessor.from_pretrained(path, backend="pil")' in card
    assert 'AutoImageProcessor.from_pretrained(path, backend="pil")' in card
    transformers.AutoProcessor.from_pretrained(tmp_path / "out" / "llava", backend="pil")  # the card's call
    assert chosen == ["pil", "pil"]


def test_one_channel_vit_export_says_how_to_get_our_grayscale_pixels(tmp_path):
    vit = ViT(ViTConfig(**VIT, num_classes=0, num_channels=1, image_mean=(0.5,), image_std=(0.5,)))
    notes = export(vit, tmp_path / "out")
    assert len(notes) == 1 and "cannot convert to grayscale" in notes[0]
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out", backend="pil")
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (45, 70, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="mean must have 3 elements"):  # what the note warns of
        processor(images=image)
    gray = image.resize((32, 32), Image.BICUBIC).convert("L")  # the note's recipe: resize, then convert
    theirs = torch.as_tensor(np.asarray(processor(images=gray, return_tensors="np")["pixel_values"]))
    assert torch.equal(theirs, ImageProcessor.from_config(vit.config)(image))


def test_a_classifiers_class_names_survive_export_and_import(tmp_path):
    """The exported classifier said LABEL_2 in transformers' pipeline: the names lived only in the
    run's metrics.json. They are the config's now, and go out as id2label and come back in."""
    names = ("blue", "green", "red")
    vit = randomized(ViT(ViTConfig(**VIT, num_classes=3, class_names=names)), 6)
    export(vit, tmp_path / "out")
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out")
    assert hf.config.id2label == {0: "blue", 1: "green", 2: "red"} and hf.config.label2id["red"] == 2
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    best = transformers.pipeline("image-classification", model=str(tmp_path / "out"))(image, top_k=1)[0]
    with torch.no_grad():
        ours = vit(ImageProcessor.from_config(vit.config)([image]))[0]
    assert best["label"] == names[int(ours.argmax())]
    assert vit_from_hf(hf).config.class_names == names  # and back
    unnamed = transformers.ViTForImageClassification(transformers.ViTConfig(image_size=32, patch_size=8,
                                                                            hidden_size=32, num_hidden_layers=1,
                                                                            num_attention_heads=2, num_labels=3))
    assert vit_from_hf(unnamed).config.class_names is None  # LABEL_0..: transformers' placeholders
    unnamed.config.id2label = {0: "crane", 1: "maillot", 2: "crane"}  # ImageNet names two classes "crane"
    assert vit_from_hf(unnamed).config.class_names is None
    for names in (("a", "b"), ("a", "b", "a"), ("a", "", "c")):
        with pytest.raises(ConfigError, match="class_names must be None or 3 distinct non-empty strings"):
            ViTConfig(**VIT, num_classes=3, class_names=names)
