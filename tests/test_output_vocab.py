"""A GPT whose LM head scores only some tokens (GPTConfig.output_tokens, train-vqa --output-vocab
data): the same logits as the whole head on those tokens and -inf elsewhere, the loss and gradients
of a softmax over those tokens, decoding that never leaves them, the set kept through save/load and
export, and training that restricts the head to the training targets' tokens."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmfusion import GPT, VLM, VLMConfig
from mmfusion.config import AdapterConfig, GPTConfig, ViTConfig
from mmfusion.data import scenes
from mmfusion.errors import ConfigError
from mmfusion.generation import GenerationConfig, decode_stream, generate
from mmfusion.tokenizer import EOT_ID, get_tokenizer
from mmfusion.training import train_vqa

KEEP = (11, 198, 262, 500, 1000, 4321, 50256)


def varied_gpt(seed=0, **config) -> GPT:
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, **config)).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.3)
    return gpt


def restricted_copy(gpt: GPT, keep=KEEP) -> GPT:
    other = GPT(gpt.config.replace(output_tokens=tuple(keep))).eval()
    other.load_state_dict(gpt.state_dict())
    return other


def test_logits_are_the_whole_heads_on_the_output_tokens_and_minus_inf_elsewhere():
    full = varied_gpt()
    part = restricted_copy(full)
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = full(ids), part(ids)
    keep = torch.tensor(KEEP)
    torch.testing.assert_close(b[..., keep], a[..., keep])
    others = torch.ones(50257, dtype=torch.bool)
    others[keep] = False
    assert torch.isneginf(b[..., others]).all()
    h = torch.randn(3, 32)
    with torch.no_grad():  # decoding's rows: the output tokens' scores alone, and the ids they map to
        rows_a, rows_b = full.row_scores(h), part.row_scores(h)
    torch.testing.assert_close(rows_b, rows_a[:, keep])
    assert torch.equal(part.output_token(torch.arange(len(KEEP))), keep)
    assert rows_a.shape == (3, 50257) and torch.equal(full.output_token(keep), keep)


@pytest.mark.parametrize("decoder", ["eager", "static"])
def test_greedy_decoding_picks_the_best_output_token_every_step(decoder):
    full = varied_gpt(2)
    part = restricted_copy(full)
    prompt = torch.tensor([[5, 17, 300, 42]])
    # Reference: the unrestricted model, no cache, its logits masked to the output tokens by hand.
    ids, expected = prompt, []
    for _ in range(10):
        with torch.no_grad():
            logits = full(ids)[0, -1]
        masked = torch.full_like(logits, float("-inf"))
        masked[list(KEEP)] = logits[list(KEEP)]
        token = int(masked.argmax())
        expected.append(token)
        if token == EOT_ID:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    got = generate(part, input_ids=prompt, config=GenerationConfig(max_new_tokens=10, decoder=decoder))[0]
    assert got == expected and set(got) <= set(KEEP)
    unrestricted = generate(full, input_ids=prompt, config=GenerationConfig(max_new_tokens=10))[0]
    assert not set(unrestricted) <= set(KEEP)  # the restriction is what kept the tokens in the set


@pytest.mark.parametrize("decoder", ["eager", "static"])
def test_sampling_draws_from_the_softmax_over_the_output_tokens_without_building_whole_rows(decoder, monkeypatch):
    full = varied_gpt(4)
    part = restricted_copy(full)
    prompt = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        expected = full(prompt)[0, -1, list(KEEP)].softmax(-1)  # (K,)
    # Decoding scores the K output tokens only: the (B, V) row with -inf elsewhere is never built.
    monkeypatch.setattr(GPT, "_scatter_logits", lambda self, logits: pytest.fail("decoding built a (B, V) row"))
    n = 4000
    config = GenerationConfig(max_new_tokens=1, temperature=1.0, seed=0, decoder=decoder)
    drawn = next(decode_stream(part, input_ids=prompt.expand(n, -1), config=config))  # (n,) first tokens
    assert set(drawn.tolist()) <= set(KEEP)
    freq = torch.tensor([(drawn == t).float().mean() for t in KEEP])
    torch.testing.assert_close(freq, expected, atol=0.04, rtol=0)  # ~5 standard errors at n = 4000
    top2 = {KEEP[i] for i in expected.topk(2).indices.tolist()}
    config = GenerationConfig(max_new_tokens=1, temperature=1.0, top_k=2, seed=0, decoder=decoder)
    assert set(next(decode_stream(part, input_ids=prompt.expand(200, -1), config=config)).tolist()) == top2


def tiny_vlm(output_tokens=None) -> VLM:
    torch.manual_seed(3)
    vlm = VLM(VLMConfig(vit=ViTConfig(image_size=16, patch_size=8, n_layer=1, n_head=2, n_embd=16, num_classes=0),
                        gpt=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, output_tokens=output_tokens),
                        adapter=AdapterConfig(pixel_shuffle=1)))
    with torch.no_grad():
        for p in vlm.gpt.parameters():
            p.normal_(0, 0.3)
    return vlm


def batch_with_labels():
    ids = torch.tensor([[50257] * 4 + [10, 262, 500, 50256, 0], [50257] * 4 + [7, 8, 1000, 4321, 50256]])
    labels = torch.full_like(ids, -100)
    labels[0, 6:8] = ids[0, 6:8]
    labels[1, 6:9] = ids[1, 6:9]
    return ids, labels, torch.rand(2, 3, 16, 16)


@pytest.mark.parametrize("collated", [False, True])
def test_loss_and_gradients_are_a_softmax_over_the_output_tokens(collated):
    ids, labels, pixels = batch_with_labels()
    part = tiny_vlm(KEEP)
    full = tiny_vlm()
    full.load_state_dict(part.state_dict())
    extra = {}
    if collated:
        extra = {"label_positions": (labels[:, 1:] != -100).flatten().nonzero().squeeze(1), "slots_per_row": 4}
    loss = part(ids, pixels, labels=labels, **extra).loss
    loss.backward()
    # Reference: F.cross_entropy over the whole head's logits of the output tokens only.
    logits = full(ids, pixels).logits[:, :-1][..., list(KEEP)]  # (B, T-1, K)
    targets = labels[:, 1:]
    keep = targets != -100
    remap = {t: i for i, t in enumerate(KEEP)}
    target_rows = torch.tensor([remap[int(t)] for t in targets[keep]])
    ref = F.cross_entropy(logits[keep], target_rows)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for (name, a), b in zip(part.named_parameters(), full.parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_a_label_the_head_does_not_score_is_refused():
    ids, labels, pixels = batch_with_labels()
    with pytest.raises(ValueError, match="not among this model's output tokens.*--output-vocab data"):
        tiny_vlm((262, 500, 50256))(ids, pixels, labels=labels)


@pytest.mark.parametrize("bad, message", [
    ((), "non-empty"),
    ("11,12", "non-empty list"),
    ((1, 1.5), "integer"),
    ((1, True), "integer"),
    ((-1, 3), "in \\[0, 50257\\)"),
    ((3, 50257), "in \\[0, 50257\\)"),
    ((5, 3), "ascending without repeats"),
    ((3, 3), "ascending without repeats"),
])
def test_bad_output_tokens_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(output_tokens=bad)


def test_output_tokens_survive_save_load_and_json(tmp_path):
    assert GPTConfig(output_tokens=[1, 2]).output_tokens == (1, 2)  # a list from Python becomes a tuple
    vlm = tiny_vlm()
    vlm.restrict_output([500, 262, 500, 50256])
    assert vlm.config.gpt.output_tokens == (262, 500, 50256) == vlm.gpt.config.output_tokens
    vlm.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["config"]["gpt"]["output_tokens"] == [262, 500, 50256]
    back = VLM.from_pretrained(tmp_path / "m")
    assert back.gpt.output_ids.tolist() == [262, 500, 50256] and int(back.gpt.output_index[500]) == 1
    ids, _, pixels = batch_with_labels()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, pixels).logits, vlm(ids, pixels).logits)
    vlm.restrict_output(None)
    assert vlm.gpt.output_ids is None and vlm.config.gpt.output_tokens is None


def test_export_suppresses_the_tokens_the_head_does_not_score():
    pytest.importorskip("transformers")
    from mmfusion.export import gpt_to_hf

    part = restricted_copy(varied_gpt(4))
    hf = gpt_to_hf(part)
    assert len(hf.generation_config.suppress_tokens) == 50257 - len(KEEP)
    prompt = torch.tensor([[5, 17, 300, 42]])
    ours = generate(part, input_ids=prompt, config=GenerationConfig(max_new_tokens=8))[0]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                         pad_token_id=50256)[0, 4:].tolist()
    assert theirs[:len(ours)] == ours
    assert gpt_to_hf(varied_gpt(4)).generation_config.suppress_tokens is None


def test_import_reads_the_suppressed_tokens_back(tmp_path):
    pytest.importorskip("transformers")
    from mmfusion.export import gpt_to_hf

    part = restricted_copy(varied_gpt(4))
    gpt_to_hf(part).save_pretrained(tmp_path / "hf")
    back = GPT.from_hf(str(tmp_path / "hf")).eval()
    assert back.config.output_tokens == KEEP
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), part(ids))
    # A GPT-2 without suppress_tokens keeps every token.
    assert GPT.from_hf(gpt_to_hf(varied_gpt(4))).config.output_tokens is None


@pytest.mark.parametrize("suppressed, message", [
    ([3, 50257], "outside the vocabulary"),
    (list(range(50257)), "suppresses every token"),
    ([3, "7"], "must be a list of token ids"),
    ([3, True], "must be a list of token ids"),
])
def test_import_refuses_suppressed_tokens_that_lie(suppressed, message):
    pytest.importorskip("transformers")
    from mmfusion.errors import ConversionError
    from mmfusion.export import gpt_to_hf

    hf = gpt_to_hf(varied_gpt(4))
    hf.generation_config.suppress_tokens = suppressed
    with pytest.raises(ConversionError, match=message):
        GPT.from_hf(hf)


def test_export_note_names_the_restriction(tmp_path):
    pytest.importorskip("transformers")
    from mmfusion.export import export

    notes = export(restricted_copy(varied_gpt(4)), tmp_path / "gpt2")
    assert any("scores only its 7 output tokens" in n for n in notes)
    saved = json.loads((tmp_path / "gpt2" / "generation_config.json").read_text())
    assert len(saved["suppress_tokens"]) == 50257 - len(KEEP)


def _train(out, vit, gpt, *extra):
    return train_vqa.main(["--dataset", "scenes", "--task", "both", "--vit", vit, "--gpt", gpt, "--output-dir",
                           str(out), "--batch-size", "8", "--max-steps", "2", "--warmup-steps", "0", "--no-progress",
                           "--eval-batch-size", "16", "--caption-max-new-tokens", "6", "--max-new-tokens", "3",
                           "--pixel-shuffle", "2", *extra])


def test_training_restricts_the_head_to_the_training_targets(small_scenes, parts, tmp_path, capsys):
    vit, gpt = parts
    _train(tmp_path / "run", vit, gpt, "--output-vocab", "data")
    # Independently: every token of " answer" / " caption" plus EOT in the training split.
    enc = get_tokenizer()
    texts = list(scenes.load_scenes_captions("train")["caption"])
    texts += [a[0] for a in scenes.load_scenes_vqa("train")["answers"]]
    expected = sorted({t for text in texts for t in enc.encode(" " + text)} | {EOT_ID})
    model = VLM.from_pretrained(tmp_path / "run" / "model")
    assert list(model.config.gpt.output_tokens) == expected
    out = capsys.readouterr().out
    assert f"LM head: scores the {len(expected)} tokens of the training targets (of 50,257" in out
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run_config["stage"]["output_vocab"] == "data"
    assert run_config["model"]["gpt"]["output_tokens"] == expected
    for row in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines():
        prediction = json.loads(row)["prediction"]
        assert set(enc.encode(" " + prediction)) <= set(expected) if prediction.strip() else True


def test_a_saved_head_that_cannot_produce_the_targets_is_refused(small_scenes, parts, tmp_path, capsys):
    vit, gpt = parts
    small = GPT.from_pretrained(gpt)
    small.restrict_output([EOT_ID])
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(ConfigError, match="scores only its 1 output tokens.*--output-vocab data"):
        _train(tmp_path / "refused", vit, str(tmp_path / "small"))
    assert not (tmp_path / "refused" / "model").exists()
    _train(tmp_path / "grown", vit, str(tmp_path / "small"), "--output-vocab", "data")
    grown = VLM.from_pretrained(tmp_path / "grown" / "model").config.gpt.output_tokens
    assert EOT_ID in grown and len(grown) > 1


def test_auto_restricts_a_fresh_gpt_and_leaves_a_saved_one_whole(small_scenes, parts, tmp_path, capsys):
    vit, gpt = parts
    _train(tmp_path / "fresh", vit, "gpt-tiny", "--block-size", "96")
    fresh = VLM.from_pretrained(tmp_path / "fresh" / "model").config.gpt.output_tokens
    assert fresh is not None and EOT_ID in fresh and len(fresh) < 100
    assert "(of 50,257; --output-vocab auto)" in capsys.readouterr().out
    _train(tmp_path / "saved", vit, gpt)
    assert VLM.from_pretrained(tmp_path / "saved" / "model").config.gpt.output_tokens is None
    assert "LM head" not in capsys.readouterr().out
