"""The two sides of each benchmark: the sizes a run uses, mmfusion models and the same models
composed from transformers (random weights, converted with `ViT.from_hf` / `GPT.from_hf`), and
the step each side times (a training step, or greedy decoding with a clock on every token)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmfusion import GPT, VLM, ViT
from mmfusion.config import AdapterConfig, GPTConfig, ViTConfig, gpt_preset, vit_preset
from mmfusion.generation import GenerationConfig, decode_stream
from mmfusion.loss import IGNORE_INDEX
from mmfusion.processing import supervised_positions
from mmfusion.tokenizer import EOT_ID, IMAGE_ID

BF16 = torch.bfloat16


# ----------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Shapes:
    """Every size the run uses; `--smoke` swaps in tiny ones."""

    vit: tuple  # (name, ViTConfig, batch fp32, batch bf16, repeats bf16)
    repeats: int
    gpt: GPTConfig
    decode_batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    vlm_vit: ViTConfig
    vlm_gpt: GPTConfig
    vlm_text: int  # text tokens after the image tokens
    vlm_answer: int  # supervised tokens at the end of the text
    vlm_batch: int
    vlm_bf16_depth: int  # bf16 VLM: blocks kept in each tower (see the note in RESULTS.md)
    matmul_fp32: tuple[tuple[int, int, int], ...]  # (m, k, n) shapes whose best rate is the peak
    matmul_bf16: tuple[tuple[int, int, int], ...]
    copy_mib: int
    data_images: int
    data_batch: int


def shapes(smoke: bool) -> Shapes:
    if smoke:
        tiny_vit = ViTConfig(image_size=32, patch_size=8, n_layer=2, n_head=2, n_embd=32, num_classes=10,
                             layer_norm_eps=1e-6)
        tiny_gpt = GPTConfig(vocab_size=EOT_ID + 1, block_size=64, n_layer=2, n_head=2, n_embd=32)
        return Shapes(vit=(("tiny", tiny_vit, 4, 2, 1),), repeats=1, gpt=tiny_gpt, decode_batches=(1, 2),
                      prompt_len=8, new_tokens=4, vlm_vit=tiny_vit.replace(num_classes=0), vlm_gpt=tiny_gpt,
                      vlm_text=8, vlm_answer=2, vlm_batch=2, vlm_bf16_depth=1, matmul_fp32=((128, 128, 128),),
                      matmul_bf16=((64, 64, 64),), copy_mib=8, data_images=4, data_batch=2)
    vit_s = vit_preset("vit-small-patch16-224")  # width 384, depth 12, 6 heads, 1000 classes
    return Shapes(
        vit=(("ViT-S/16 @224", vit_s, 8, 1, 1), ("vit-tiny @64", vit_preset("vit-tiny"), 64, 16, 3)),
        repeats=3, gpt=gpt_preset("gpt-base"), decode_batches=(1, 8), prompt_len=128, new_tokens=128,
        vlm_vit=vit_s.replace(num_classes=0), vlm_gpt=gpt_preset("gpt-base"), vlm_text=64, vlm_answer=8, vlm_batch=2,
        vlm_bf16_depth=1,
        matmul_fp32=((2048, 2048, 2048), (1576, 384, 1536), (1576, 1536, 384), (520, 768, 3072)),
        matmul_bf16=((512, 512, 512), (197, 384, 1536), (197, 1536, 384), (260, 768, 3072)), copy_mib=256, data_images=256,
        data_batch=16,
    )



# ----------------------------------------------------------------------------- model builders

def hf_vit_config(c: ViTConfig):
    import transformers  # lazily: mmfusion's memory children never load it

    return transformers.ViTConfig(
        hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        intermediate_size=c.mlp_dim, image_size=c.image_size, patch_size=c.patch_size, num_channels=c.num_channels,
        layer_norm_eps=c.layer_norm_eps, hidden_act="gelu", qkv_bias=c.qkv_bias, num_labels=max(c.num_classes, 1),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa",
    )


def hf_gpt_config(c: GPTConfig):
    import transformers  # lazily: mmfusion's memory children never load it

    return transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=c.intermediate_size, layer_norm_epsilon=c.layer_norm_eps, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOT_ID, eos_token_id=EOT_ID,
        pad_token_id=EOT_ID, attn_implementation="sdpa",
    )


def vit_pair(c: ViTConfig, seed: int = 0) -> dict[str, nn.Module]:
    import transformers  # lazily: mmfusion's memory children never load it

    torch.manual_seed(seed)
    hf = transformers.ViTForImageClassification(hf_vit_config(c))
    return {"mmfusion": ViT.from_hf(hf), "transformers": hf}


def gpt_pair(c: GPTConfig, seed: int = 0) -> dict[str, nn.Module]:
    import transformers  # lazily: mmfusion's memory children never load it

    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(hf_gpt_config(c)).eval()
    return {"mmfusion": GPT.from_hf(hf).eval(), "transformers": hf}


class ComposedVLM(nn.Module):
    """The transformers way to build the same model: ViTModel -> patch tokens -> Linear ->
    concatenated before the text embeddings -> GPT2LMHeadModel(inputs_embeds, labels)."""

    def __init__(self, vit: nn.Module, proj: nn.Module, gpt: nn.Module, keep_cls: bool = False) -> None:
        super().__init__()
        self.vit, self.proj, self.gpt = vit, proj, gpt
        self.first = 0 if keep_cls else 1  # CLS is token 0

    def forward(self, input_ids, pixel_values, attention_mask, labels) -> torch.Tensor:
        image = self.proj(self.vit(pixel_values=pixel_values).last_hidden_state[:, self.first:])  # (B, M, C)
        text = self.gpt.transformer.wte(input_ids[:, image.shape[1]:])  # (B, T - M, C)
        embeds = torch.cat([image, text.to(image.dtype)], dim=1)  # (B, T, C)
        return self.gpt(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels).loss


def vlm_configs(s: Shapes, depth: int | None = None) -> tuple[ViTConfig, GPTConfig]:
    vit, gpt = s.vlm_vit, s.vlm_gpt
    if depth is not None:
        vit, gpt = vit.replace(n_layer=depth), gpt.replace(n_layer=depth)
    return vit, gpt


def vlm_pair(vit_c: ViTConfig, gpt_c: GPTConfig, seed: int = 0,
             adapter: AdapterConfig = AdapterConfig(projection="linear")) -> dict[str, nn.Module]:
    """Ours with `adapter` (no token merging) and the composed transformers model with the same
    weights: the same ViT and GPT-2, and a copy of our projection (Linear, or Linear-GELU-Linear)."""
    import transformers  # lazily: mmfusion's memory children never load it

    torch.manual_seed(seed)
    hf_vit = transformers.ViTModel(hf_vit_config(vit_c), add_pooling_layer=False)
    hf_gpt = transformers.GPT2LMHeadModel(hf_gpt_config(gpt_c))
    ours = VLM.from_parts(ViT.from_hf(hf_vit), GPT.from_hf(hf_gpt), adapter)
    proj = copy.deepcopy(ours.adapter.proj)
    return {"mmfusion": ours, "transformers": ComposedVLM(hf_vit, proj, hf_gpt, keep_cls=adapter.keep_cls)}


def vlm_batch(vit_c: ViTConfig, gpt_c: GPTConfig, batch: int, text: int, answer: int, image_tokens: int | None = None,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """Image slots (the patches, or `image_tokens`) + `text` tokens; labels supervise the last
    `answer` tokens (the answer)."""
    g = torch.Generator().manual_seed(seed)
    m = image_tokens or vit_c.num_patches
    words = torch.randint(0, gpt_c.vocab_size - 1, (batch, text), generator=g)
    input_ids = torch.cat([torch.full((batch, m), IMAGE_ID), words], dim=1)  # (B, M + T)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -answer:] = input_ids[:, -answer:]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(batch, 3, vit_c.image_size, vit_c.image_size, generator=g)}


def for_side(batch: dict, side: str) -> dict:
    """The batch as each side trains on it. mmfusion's comes as VQACollator builds it in training,
    with the supervised positions and the slot count computed once on the host; without them the
    forward finds both on the device, a wait every step."""
    if side != "mmfusion":
        return batch
    return {**batch, "label_positions": supervised_positions(batch["labels"]),
            "slots_per_row": int((batch["input_ids"][0] == IMAGE_ID).sum())}


def vlm_loss(model: nn.Module, side: str, batch: dict) -> torch.Tensor:
    """One side's training loss on its batch (for_side's): mmfusion's VLM returns an output with
    .loss, the composed reference the loss itself."""
    return model(**batch).loss if side == "mmfusion" else model(**batch)


# ----------------------------------------------------------------------------- steps

def autocast(dtype: str):
    return torch.autocast("cpu", dtype=BF16) if dtype == "bf16" else nullcontext()


def vit_step(model: nn.Module, side: str, batch: int, c: ViTConfig, dtype: str) -> Callable[[], float]:
    x = torch.randn(batch, 3, c.image_size, c.image_size)
    y = torch.randint(0, c.num_classes, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> float:
        with autocast(dtype):
            out = model(x) if side == "mmfusion" else model(pixel_values=x).logits
            loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def vlm_step(model: nn.Module, side: str, batch: dict, dtype: str) -> Callable[[], float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    batch = for_side(batch, side)

    def step() -> float:
        with autocast(dtype):
            loss = vlm_loss(model, side, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


class Clock:
    """Timestamps of the tokens of one generate call: a transformers streamer (its first `put`
    is the prompt) and, for mmfusion, called once per yielded token."""

    def __init__(self, prompt_first: bool) -> None:
        self.skip = prompt_first
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def put(self, value=None) -> None:
        if self.skip:
            self.skip = False
            return
        self.stamps.append(time.perf_counter() - self.start)

    def end(self) -> None:
        pass


def decode_fn(model: nn.Module, side: str, ids: torch.Tensor, new: int, clocks: list[Clock],
              decoder: str = "eager") -> Callable[[], torch.Tensor]:
    """Greedy decoding of exactly `new` tokens per row, KV cache on, ids (B, T) -> (B, new), with
    mmfusion's `decoder`. Each call appends a Clock holding the time of every token to `clocks`."""
    if side == "mmfusion":
        config = GenerationConfig(max_new_tokens=new, decoder=decoder)

        def run() -> torch.Tensor:
            clock = Clock(prompt_first=False)
            # eot_id=-1: never stop early, as min_new_tokens does for transformers
            tokens = []
            for token in decode_stream(model, input_ids=ids, config=config, eot_id=-1):
                clock.put()
                tokens.append(token)
            clocks.append(clock)
            return torch.stack(tokens, dim=1)
    else:
        mask = torch.ones_like(ids)

        @torch.no_grad()
        def run() -> torch.Tensor:
            clock = Clock(prompt_first=True)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=EOT_ID, streamer=clock)
            clocks.append(clock)
            return out[:, ids.shape[1]:]
    return run


def count_flops(step_model: Callable[[], torch.Tensor]) -> float:
    """FLOPs of one forward + backward, counted by FlopCounterMode with SDPA on its math path
    (the fused CPU kernel is invisible to the counter)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        step_model().backward()
    return float(counter.get_total_flops())
