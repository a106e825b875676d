"""Benchmarks: mmfusion against the same models composed from transformers, and against this
machine's own limits (matrix-multiply peak, memory bandwidth).

    python benchmarks/run.py                 # full run, writes benchmarks/RESULTS.md (+ RESULTS.json)
    python benchmarks/run.py --smoke         # tiny shapes, one repeat: checks that it all runs
    python benchmarks/run.py --only decode   # machine, vit, decode, vlm, memory, data (comma-separated)

Method: both sides run in the same process with the same weights (transformers models are built
from configs with random weights and converted with `ViT.from_hf` / `GPT.from_hf`), alternating
(the order flips every repeat), after a warm-up; every number is a median over repeats.
Peak memory is the RSS high-water mark of a fresh child process that builds one model and runs
its step (`--child`), so the two sides cannot share allocator state.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as `python benchmarks/run.py` without an install
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from mmfusion import GPT, VLM, ViT  # noqa: E402
from mmfusion.config import AdapterConfig, GPTConfig, ViTConfig, VLMConfig, gpt_preset, vit_preset  # noqa: E402
from mmfusion.generation import GenerationConfig, decode_stream  # noqa: E402
from mmfusion.tokenizer import EOT_ID, IMAGE_ID  # noqa: E402

BENCHMARKS = ("machine", "vit", "decode", "vlm", "memory", "data")
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


# ----------------------------------------------------------------------------- results

@dataclass
class Row:
    """One measured quantity. `ours`/`ref` are the two sides (for `data`: the pipeline and the
    rate the training step consumes); ratio is ours / ref; `met` is None where there is no target."""

    section: str
    case: str
    dtype: str
    metric: str
    ours: float
    ref: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.ours / self.ref if self.ref else None


@dataclass
class Run:
    smoke: bool
    rows: list[Row] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    train_rates: dict = field(default_factory=dict)  # (case, dtype) -> our images/s, for the data section

    def add(self, *args, **kwargs) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        print(f"  {row.section:8s} {row.case:24s} {row.dtype:5s} {row.metric:34s} ours={row.ours:.4g}"
              + (f" ref={row.ref:.4g} ratio={row.ratio:.3g}" if row.ref else "")
              + (f" target {row.target}: {'met' if row.met else 'NOT met'}" if row.met is not None else ""),
              flush=True)
        return row


# ----------------------------------------------------------------------------- timing

def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (order flipped every repeat)
    after `warmup` calls of each."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for k in order if r % 2 == 0 else order[::-1]:
            gc.collect()
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=BF16) if dtype == "bf16" else nullcontext()


# ----------------------------------------------------------------------------- machine limits

def matmul_peak(shapes: tuple[tuple[int, int, int], ...], dtype: torch.dtype, repeats: int) -> float:
    """Best GFLOP/s of (m, k) @ (k, n) products over the given shapes (a square one and the
    models' own linear-layer shapes): the practical ceiling of this machine and library."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best


def copy_bandwidth(mib: int, repeats: int = 5) -> float:
    """GB/s moved by copying one large fp32 tensor into another (bytes read + bytes written)."""
    a = torch.randn(mib * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(repeats))
    return 2 * a.numel() * 4 / best / 1e9


def _timed(f: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def bench_machine(run: Run, s: Shapes) -> None:
    print("machine limits", flush=True)
    reps = 1 if run.smoke else 5
    run.machine["fp32_peak"] = matmul_peak(s.matmul_fp32, torch.float32, reps)
    run.machine["bf16_peak"] = matmul_peak(s.matmul_bf16, BF16, 1 if run.smoke else 2)
    run.machine["copy_gbs"] = copy_bandwidth(s.copy_mib)
    for dtype, sizes in (("fp32", s.matmul_fp32), ("bf16", s.matmul_bf16)):
        run.add("machine", "matmul, best of " + ", ".join("x".join(map(str, mkn)) for mkn in sizes), dtype,
                "peak GFLOP/s", run.machine[f"{dtype}_peak"])
    run.add("machine", f"copy {s.copy_mib} MiB", "fp32", "bandwidth GB/s (read + write)", run.machine["copy_gbs"])


def ensure_machine(run: Run, s: Shapes) -> None:
    if not run.machine:
        bench_machine(run, s)


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

    def __init__(self, vit: nn.Module, proj: nn.Linear, gpt: nn.Module) -> None:
        super().__init__()
        self.vit, self.proj, self.gpt = vit, proj, gpt

    def forward(self, input_ids, pixel_values, attention_mask, labels) -> torch.Tensor:
        image = self.proj(self.vit(pixel_values=pixel_values).last_hidden_state[:, 1:])  # (B, M, C)
        text = self.gpt.transformer.wte(input_ids[:, image.shape[1]:])  # (B, T - M, C)
        embeds = torch.cat([image, text.to(image.dtype)], dim=1)  # (B, T, C)
        return self.gpt(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels).loss


def vlm_configs(s: Shapes, depth: int | None = None) -> tuple[ViTConfig, GPTConfig]:
    vit, gpt = s.vlm_vit, s.vlm_gpt
    if depth is not None:
        vit, gpt = vit.replace(n_layer=depth), gpt.replace(n_layer=depth)
    return vit, gpt


def vlm_pair(vit_c: ViTConfig, gpt_c: GPTConfig, seed: int = 0) -> dict[str, nn.Module]:
    import transformers  # lazily: mmfusion's memory children never load it

    torch.manual_seed(seed)
    hf_vit = transformers.ViTModel(hf_vit_config(vit_c), add_pooling_layer=False)
    hf_gpt = transformers.GPT2LMHeadModel(hf_gpt_config(gpt_c))
    proj = nn.Linear(vit_c.n_embd, gpt_c.n_embd)
    ours = VLM.from_parts(ViT.from_hf(hf_vit), GPT.from_hf(hf_gpt), AdapterConfig(projection="linear"))
    with torch.no_grad():
        ours.adapter.proj[0].weight.copy_(proj.weight)
        ours.adapter.proj[0].bias.copy_(proj.bias)
    return {"mmfusion": ours, "transformers": ComposedVLM(hf_vit, proj, hf_gpt)}


def vlm_batch(vit_c: ViTConfig, gpt_c: GPTConfig, s: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    """196 image slots + text; labels supervise the last `vlm_answer` tokens (the answer)."""
    g = torch.Generator().manual_seed(seed)
    m = vit_c.num_patches
    text = torch.randint(0, gpt_c.vocab_size - 1, (s.vlm_batch, s.vlm_text), generator=g)
    input_ids = torch.cat([torch.full((s.vlm_batch, m), IMAGE_ID), text], dim=1)  # (B, M + T)
    labels = torch.full_like(input_ids, -100)
    labels[:, -s.vlm_answer:] = input_ids[:, -s.vlm_answer:]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(s.vlm_batch, 3, vit_c.image_size, vit_c.image_size, generator=g)}


# ----------------------------------------------------------------------------- steps

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

    def step() -> float:
        with autocast(dtype):
            loss = model(**batch).loss if side == "mmfusion" else model(**batch)
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


def decode_fn(model: nn.Module, side: str, ids: torch.Tensor, new: int, clocks: list[Clock]
              ) -> Callable[[], torch.Tensor]:
    """Greedy decoding of exactly `new` tokens per row, KV cache on, ids (B, T) -> (B, new).
    Each call appends a Clock holding the time of every token to `clocks`."""
    if side == "mmfusion":
        config = GenerationConfig(max_new_tokens=new)

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


# ----------------------------------------------------------------------------- benchmarks

def target_row(run: Run, section, case, dtype, metric, times_or_rates: dict, target: float | None,
               higher_is_better: bool = True, note: str = "") -> Row:
    ours, ref = times_or_rates["mmfusion"], times_or_rates["transformers"]
    met = None
    if target is not None:
        ratio = ours / ref
        met = ratio >= target if higher_is_better else ratio <= target
    text = "" if target is None else (f">= {target:g}x" if higher_is_better else f"<= {target:g}x")
    return run.add(section, case, dtype, metric, ours, ref, text, met, note)


def mfu_rows(run: Run, case: str, dtype: str, flops: float, step_s: dict[str, float], target: float | None) -> None:
    peak = run.machine["bf16_peak" if dtype == "bf16" else "fp32_peak"]
    mfu = {k: flops / t / 1e9 / peak * 100 for k, t in step_s.items()}
    row = run.add("mfu", case, dtype, f"% of {dtype} matmul peak", mfu["mmfusion"], mfu["transformers"],
                  "" if target is None else f"ours >= {target:g}%",
                  None if target is None else mfu["mmfusion"] >= target,
                  note=f"{flops / 1e9:.1f} GFLOP/step, peak {peak:.1f} GFLOP/s")
    row.note += f"; achieved {flops / step_s['mmfusion'] / 1e9:.2f} vs {flops / step_s['transformers'] / 1e9:.2f} GFLOP/s"


def bench_vit(run: Run, s: Shapes) -> None:
    ensure_machine(run, s)
    for name, c, batch_fp32, batch_bf16, reps_bf16 in s.vit:
        models = vit_pair(c)
        for dtype in ("fp32", "bf16"):
            batch = batch_fp32 if dtype == "fp32" else batch_bf16
            print(f"vit train: {name} {dtype} batch {batch}", flush=True)
            steps = {k: vit_step(m, k, batch, c, dtype) for k, m in models.items()}
            # bf16 matmuls run at ~1 GFLOP/s on CPUs without AVX512-BF16/AMX, so the big bf16
            # case takes one untimed-warm-up-free step per side (noted in RESULTS.md).
            big_bf16 = dtype == "bf16" and reps_bf16 == 1 and not run.smoke
            times = alternate(steps, reps_bf16 if dtype == "bf16" else s.repeats, warmup=0 if big_bf16 else 1)
            rates = {k: batch / t for k, t in times.items()}
            run.train_rates[(name, dtype)] = rates["mmfusion"]
            target = 1.0 if dtype == "fp32" else 1.25
            note = f"batch {batch}" + ("; 1 step per side, no warm-up (bf16 cap)" if big_bf16 else "")
            target_row(run, "vit", name, dtype, "train images/s (fwd+bwd+AdamW)", rates, target, note=note)
            x = torch.randn(batch, 3, c.image_size, c.image_size)
            y = torch.randint(0, c.num_classes, (batch,))
            flops = count_flops(lambda m=models["mmfusion"], x=x, y=y: F.cross_entropy(m(x), y))
            mfu_rows(run, f"ViT train {name}", dtype, flops, times, 55.0 if dtype == "bf16" else None)
        del models
        gc.collect()


def weight_bytes(gpt: GPT) -> int:
    """Bytes a decoding step must read: every parameter once (the tied embedding once, as the
    LM head), except the position table, of which it reads one row."""
    return sum(p.numel() * p.element_size() for p in gpt.parameters()) - gpt.wpe.weight.numel() * 4


def bench_decode(run: Run, s: Shapes) -> None:
    ensure_machine(run, s)
    models = gpt_pair(s.gpt)
    wbytes = weight_bytes(models["mmfusion"])
    for b in s.decode_batches:
        print(f"decode: batch {b}, prompt {s.prompt_len}, {s.new_tokens} new tokens", flush=True)
        ids = torch.randint(0, s.gpt.vocab_size - 1, (b, s.prompt_len), generator=torch.Generator().manual_seed(b))
        clocks: dict[str, list[Clock]] = {k: [] for k in models}
        full = {k: decode_fn(m, k, ids, s.new_tokens, clocks[k]) for k, m in models.items()}
        same = bool(torch.equal(full["mmfusion"](), full["transformers"]()))  # also the warm-up
        for k in clocks:
            clocks[k].clear()
        reps = 1 if run.smoke or b > 1 else 2  # batch 8 at 128 tokens is minutes per run on 2 busy cores
        total = alternate(full, reps, warmup=0)
        ttft = {k: statistics.median(c.stamps[0] for c in v) for k, v in clocks.items()}
        per_token = {k: statistics.median((c.stamps[-1] - c.stamps[0]) / (len(c.stamps) - 1) for c in v)
                     for k, v in clocks.items()}
        rates = {k: b * s.new_tokens / t for k, t in total.items()}
        case = f"GPT-2 {s.gpt.n_layer}L, batch {b}"
        target_row(run, "decode", case, "fp32", "tokens/s (end to end)", rates, 1.5 if b == 1 else 1.3,
                   note=f"prompt {s.prompt_len}, {s.new_tokens} greedy tokens, median of {reps} run(s) after a warm-up "
                        f"run; same tokens as transformers: "
                        f"{'yes' if same else 'NO'}")
        target_row(run, "decode", case, "fp32", "time to first token ms", {k: v * 1000 for k, v in ttft.items()},
                   None, higher_is_better=False, note="prefill + first token")
        target_row(run, "decode", case, "fp32", "ms per decoded token", {k: v * 1000 for k, v in per_token.items()},
                   None, higher_is_better=False, note="after the first token")
        bound = b * run.machine["copy_gbs"] * 1e9 / wbytes  # tokens/s if each step only streamed the weights
        frac = {k: b / t / bound * 100 for k, t in per_token.items()}
        run.add("decode", case, "fp32", "% of memory-bandwidth bound", frac["mmfusion"], frac["transformers"],
                "ours >= 50%" if b == 1 else "", frac["mmfusion"] >= 50 if b == 1 else None,
                note=f"bound {bound:.1f} tokens/s = {b} x {run.machine['copy_gbs']:.1f} GB/s / "
                     f"{wbytes / 1e6:.0f} MB of weights per step")
    del models
    gc.collect()


def bench_vlm(run: Run, s: Shapes) -> None:
    ensure_machine(run, s)
    for dtype, depth in (("fp32", None), ("bf16", s.vlm_bf16_depth)):
        vit_c, gpt_c = vlm_configs(s, depth)
        models = vlm_pair(vit_c, gpt_c)
        batch = vlm_batch(vit_c, gpt_c, s)
        case = f"ViT {vit_c.n_layer}L/{vit_c.n_embd} + GPT-2 {gpt_c.n_layer}L/{gpt_c.n_embd}"
        print(f"vlm train: {case} {dtype} batch {s.vlm_batch}", flush=True)
        steps = {k: vlm_step(m, k, batch, dtype) for k, m in models.items()}
        with torch.no_grad():
            losses = {k: float(m(**batch).loss if k == "mmfusion" else m(**batch)) for k, m in models.items()}
        capped = dtype == "bf16" and not run.smoke
        times = alternate(steps, 1 if capped else s.repeats, warmup=0 if capped else 1)
        rates = {k: s.vlm_batch / t for k, t in times.items()}
        run.train_rates[("vlm", dtype)] = rates["mmfusion"]
        note = (f"batch {s.vlm_batch}, {vit_c.num_patches} image + {s.vlm_text} text tokens, {s.vlm_answer} "
                f"supervised; same loss: {abs(losses['mmfusion'] - losses['transformers']):.1e} apart")
        if capped:
            note += f"; depth capped to {depth}+{depth} blocks, 1 step per side, no warm-up (bf16 cap)"
        target_row(run, "vlm", case, dtype, "train samples/s (fwd+bwd+AdamW)", rates,
                   1.2 if dtype == "bf16" else None, note=note)
        flops = count_flops(lambda m=models["mmfusion"], b=batch: m(**b).loss)
        mfu_rows(run, f"VLM train {case}", dtype, flops, times, None)
        del models
        gc.collect()


# ----------------------------------------------------------------------------- memory

def child_main(spec: dict) -> None:
    """In a fresh process: for each kind, build one model (one side only) and its inputs, run its
    step twice, and print one JSON line of RSS figures in MiB: the high-water mark, and the
    resident size after the imports and after building, so imports (transformers is large) can be
    told apart from the model and its step."""
    s = shapes(spec["smoke"])
    side = spec["side"]
    if side == "transformers":
        import transformers
    imports = rss_now_mib()
    for kind in spec["kinds"]:
        torch.manual_seed(0)
        if kind == "vit":
            c = s.vit[0][1]
            model = ViT(c) if side == "mmfusion" else transformers.ViTForImageClassification(hf_vit_config(c))
            step = vit_step(model, side, s.vit[0][2], c, "fp32")
        elif kind == "vlm":
            vit_c, gpt_c = vlm_configs(s)
            if side == "mmfusion":
                model = VLM(VLMConfig(vit=vit_c, gpt=gpt_c, adapter=AdapterConfig(projection="linear")))
            else:
                model = ComposedVLM(transformers.ViTModel(hf_vit_config(vit_c), add_pooling_layer=False),
                                    nn.Linear(vit_c.n_embd, gpt_c.n_embd),
                                    transformers.GPT2LMHeadModel(hf_gpt_config(gpt_c)))
            step = vlm_step(model, side, vlm_batch(vit_c, gpt_c, s), "fp32")
        else:  # decode at the largest batch
            b = max(s.decode_batches)
            model = (GPT(s.gpt) if side == "mmfusion" else transformers.GPT2LMHeadModel(hf_gpt_config(s.gpt))).eval()
            ids = torch.randint(0, s.gpt.vocab_size - 1, (b, s.prompt_len))
            step = decode_fn(model, side, ids, s.new_tokens, [])
        gc.collect()
        built = rss_now_mib()
        step()
        step()
        print(json.dumps({"kind": kind, "peak_mib": rss_high_water_mib(), "imports_mib": imports,
                          "built_mib": built}), flush=True)
        del model, step
        gc.collect()


def rss_now_mib() -> float:
    return _proc_status_mib("VmRSS:")


def rss_high_water_mib() -> float:
    """This process's RSS high-water mark in MiB. Linux's ru_maxrss carries the parent's peak
    over fork + exec (it is kept per thread group, not per address space), so a child spawned by a
    500 MiB parent reads at least 500 MiB; VmHWM belongs to the child's own address space."""
    return _proc_status_mib("VmHWM:")


def _proc_status_mib(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; elsewhere an upper bound


def measure_children(kinds: list[str], smoke: bool) -> dict[str, dict[str, dict]]:
    """Run one child per side at the same time (RSS is per process, so they cannot disturb each
    other's numbers); {side: {kind: figures}}."""
    procs = {}
    for side in ("mmfusion", "transformers"):
        spec = json.dumps({"kinds": kinds, "side": side, "smoke": smoke})
        procs[side] = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", spec],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    got = {}
    for side, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"memory child {kinds}/{side} failed:\n{stderr[-3000:]}")
        got[side] = {r["kind"]: r for r in (json.loads(x) for x in stdout.splitlines() if x.startswith("{"))}
    return got


def bench_memory(run: Run, s: Shapes) -> None:
    cases = {
        "vit": f"ViT train {s.vit[0][0]}, batch {s.vit[0][2]}",
        "vlm": f"VLM train, batch {s.vlm_batch}",
        "decode": f"GPT-2 decode, batch {max(s.decode_batches)}",
    }
    got: dict[str, dict[str, dict]] = {"mmfusion": {}, "transformers": {}}
    if run.smoke:  # one process per side for all kinds: it checks the code paths, fast
        got = measure_children(list(cases), True)
    else:
        for kind, case in cases.items():
            print(f"memory: {case} (a fresh process per side)", flush=True)
            for side, figures in measure_children([kind], False).items():
                got[side].update(figures)
    for kind, case in cases.items():
        res = {side: got[side][kind] for side in got}
        target_row(run, "memory", case, "fp32", "peak RSS above imports MiB",
                   {k: v["peak_mib"] - v["imports_mib"] for k, v in res.items()}, 1.0, higher_is_better=False,
                   note="model + inputs + optimizer + step; RSS high-water mark (VmHWM) minus RSS after imports")
        target_row(run, "memory", case, "fp32", "peak RSS of the process MiB", {k: v["peak_mib"] for k, v in res.items()},
                   None, higher_is_better=False, note="includes imports (transformers only on its side)")


# ----------------------------------------------------------------------------- data

def easy_vqa_rows(n: int) -> list[dict]:
    """n (image path, question, answer) rows from the easy-VQA package; generated PNGs without it."""
    try:
        import easy_vqa

        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
        return [{"image": paths[i], "question": q, "answer": a}
                for q, a, i in list(zip(questions, answers, image_ids))[:n]]
    except ImportError:
        from PIL import Image, ImageDraw

        folder = Path(tempfile.mkdtemp(prefix="mmfusion-bench-"))
        rows = []
        for i in range(n):
            im = Image.new("RGB", (64, 64), (255, 255, 255))
            ImageDraw.Draw(im).ellipse((8 + i % 8, 8, 48, 52), fill=(200, 30 * (i % 8), 40))
            im.save(folder / f"{i}.png")
            rows.append({"image": str(folder / f"{i}.png"), "question": "what color is the shape?", "answer": "red"})
        return rows


def bench_data(run: Run, s: Shapes) -> None:
    from mmfusion.processing import ImageProcessor, PromptBuilder, VQACollator

    rows = easy_vqa_rows(s.data_images)
    pipelines = {
        "VQACollator @224": (VQACollator(ImageProcessor.from_config(s.vlm_vit),
                                         PromptBuilder(s.vlm_vit.num_patches, s.vlm_gpt.block_size)),
                             [("VLM train", ("vlm", "fp32")), (f"ViT train {s.vit[0][0]}", (s.vit[0][0], "fp32"))]),
        "ImageProcessor @64": (ImageProcessor.from_config(s.vit[-1][1]),
                               [(f"ViT train {s.vit[-1][0]}", (s.vit[-1][0], "fp32"))]),
    }
    for name, (fn, consumers) in pipelines.items():
        if run.smoke:
            name = name.split(" @")[0] + " (smoke)"
        print(f"data: {name}, {len(rows)} easy-VQA images, one process", flush=True)
        batches = [rows[i:i + s.data_batch] for i in range(0, len(rows), s.data_batch)]

        def go(fn=fn, batches=batches):
            for b in batches:
                fn(b) if isinstance(fn, VQACollator) else fn([r["image"] for r in b])

        go()  # warm the page cache
        t = statistics.median(_timed(go) for _ in range(max(1, min(3, s.repeats))))
        rate = len(rows) / t
        for consumer, key in consumers:
            consumed = run.train_rates.get(key)
            if consumed is None:
                run.add("data", name, "fp32", "images/s (decode, resize, normalize, collate)", rate,
                        note=f"{consumer} not measured in this run (add vit/vlm to --only)")
                continue
            run.add("data", name, "fp32", f"images/s vs {consumer} images/s", rate, consumed, ">= 5x",
                    rate / consumed >= 5, note="one process, no DataLoader workers")


# ----------------------------------------------------------------------------- report

def machine_info() -> dict:
    import transformers  # lazily: mmfusion's memory children never load it

    cpu, cores = platform.processor() or "unknown", os.cpu_count()
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1] for line in info.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f} " in f" {flags} "]
    return {"cpu": cpu, "cores": cores, "isa": " ".join(isa) or "unknown", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.is_available()}


def fmt(x: float | None) -> str:
    if x is None:
        return ""
    if x == 0 or abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) >= 1 else f"{x:.3g}"


SECTION_TITLES = {
    "machine": ("Machine limits (measured in this run)", None),
    "vit": ("1. ViT training step", "transformers"),
    "decode": ("2. GPT-2 decoding (greedy, KV cache)", "transformers"),
    "vlm": ("3. VLM fine-tuning step", "transformers (composed)"),
    "mfu": ("4. Utilization (model FLOPs / step time / matmul peak)", "transformers"),
    "memory": ("5. Peak memory (fresh process per side)", "transformers"),
    "data": ("6. Data pipeline alone", "training step consumes"),
}


def markdown(run: Run, info: dict, header: dict) -> str:
    out = ["# Benchmark results", ""]
    out.append(f"Written by `python benchmarks/run.py{header['args']}` on {header['date']} in {header['wall']:.0f} s.")
    out.append("")
    out.append(f"- Machine: {info['cpu']}, {info['cores']} cores ({info['isa']}), torch threads {info['threads']}; "
               f"GPU: {'yes' if info['cuda'] else 'none lent to this run'}")
    out.append(f"- torch {info['torch']}, transformers {info['transformers']}, Python {info['python']}")
    out.append(f"- Load average at start (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in header['load'])}; "
               "other jobs may share the cores, which is why both sides alternate in one process")
    out.append("- Ratio = mmfusion / reference; for times and memory lower is better, so a target reads `<=`.")
    out.append("")
    for section, (title, ref_name) in SECTION_TITLES.items():
        rows = [r for r in run.rows if r.section == section]
        if not rows:
            continue
        out += [f"## {title}", ""]
        if ref_name is None:
            out += ["| measurement | dtype | quantity | value |", "|---|---|---|---:|"]
            out += [f"| {r.case} | {r.dtype} | {r.metric} | {fmt(r.ours)} |" for r in rows]
        else:
            out += [f"| case | dtype | metric | mmfusion | {ref_name} | ratio | target | met | notes |",
                    "|---|---|---|---:|---:|---:|---|---|---|"]
            for r in rows:
                met = "" if r.met is None else ("yes" if r.met else "**no**")
                out.append(f"| {r.case} | {r.dtype} | {r.metric} | {fmt(r.ours)} | {fmt(r.ref)} | "
                           f"{'' if r.ratio is None else f'{r.ratio:.2f}x'} | {r.target} | {met} | {r.note} |")
        out.append("")
    targets = [r for r in run.rows if r.met is not None]
    out.append(f"**Targets met: {sum(r.met for r in targets)} of {len(targets)}.**")
    out.append("")
    out += [*run.notes, ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> Run:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (for CI)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BENCHMARKS)} (mfu: vit,vlm)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="Markdown report to write")
    p.add_argument("--notes", default=str(ROOT / "benchmarks" / "NOTES.md"),
                   help="Markdown appended to the report as its notes section (skipped if missing)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return Run(smoke=True)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    only = [y for x in only for y in (("vit", "vlm") if x == "mfu" else (x,))]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)} or mfu")
    chosen = [b for b in BENCHMARKS if not only or b in only]
    load = os.getloadavg()
    info = machine_info()
    print(f"{info['cpu']} x{info['cores']}, torch {info['torch']}, transformers {info['transformers']}, "
          f"load {load[0]:.2f}", flush=True)
    s = shapes(args.smoke)
    run = Run(smoke=args.smoke)
    t0 = time.perf_counter()
    for name in chosen:
        {"machine": bench_machine, "vit": bench_vit, "decode": bench_decode, "vlm": bench_vlm,
         "memory": bench_memory, "data": bench_data}[name](run, s)
    header = {"args": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
              "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "wall": time.perf_counter() - t0,
              "load": load}
    notes = Path(args.notes)
    if notes.exists() and not args.smoke:
        run.notes.append(notes.read_text().strip())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(run, info, header))
    out.with_suffix(".json").write_text(json.dumps(
        {"machine": info, **header, "rows": [{**asdict(r), "ratio": r.ratio} for r in run.rows]}, indent=1))
    print(f"wrote {out}", flush=True)
    return run


if __name__ == "__main__":
    main()
