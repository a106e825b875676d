"""The accelerator section (`run.py --device cuda`, or on its own where CUDA is present): the
same comparisons on a GPU, at the scale GPUs train.

- machine: the bf16 and fp32 matmul peak measured in this run (8192^3), the GPU's name;
- vlm: the fine-tuning step of ViT-B/16 @224 + MLP adapter (CLS kept: 197 image tokens) +
  GPT-2 124M, everything trainable, bf16 autocast, fused AdamW, batch 64, 64 text tokens of
  which the last 32 are supervised; against the same model composed from transformers parts;
  samples/s, MFU against the measured bf16 peak, and each side's peak GPU memory;
- decode: GPT-2 124M greedy decoding at batch 1, prompt 128 + 128 new tokens, fp32 and bf16
  weights, mmfusion's three decoders (eager, static, compiled: a CUDA graph) against
  transformers' `generate`; every decoder must give transformers' tokens;
- gpu-compile (its own section, after those): the vlm step with both sides through torch.compile.

With `--smoke` it runs on tiny shapes on the CPU (CI), so the code cannot rot where no GPU is.
MFU counts the model FLOPs of one step (FlopCounterMode: 6 x matmul parameters x tokens plus
attention) over the step time and the measured peak.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mmfusion import GPT
from mmfusion.config import AdapterConfig, GPTConfig, ViTConfig, gpt_preset, vit_preset
from mmfusion.generation import GenerationConfig, decode_stream
from mmfusion.tokenizer import EOT_ID

from models import BF16, count_flops, for_side, hf_gpt_config, vlm_batch, vlm_loss, vlm_pair
from results import Run, target_row
from timing import alternate


@dataclass(frozen=True)
class GPUShapes:
    vit: ViTConfig
    gpt: GPTConfig
    batch: int
    text: int
    answer: int
    prompt: int
    new_tokens: int
    matmul: int
    repeats: int


def gpu_shapes(smoke: bool) -> GPUShapes:
    if smoke:
        return GPUShapes(ViTConfig(image_size=32, patch_size=8, n_layer=2, n_head=2, n_embd=32, num_classes=0),
                         GPTConfig(vocab_size=EOT_ID + 1, block_size=64, n_layer=2, n_head=2, n_embd=32),
                         batch=2, text=8, answer=4, prompt=8, new_tokens=4, matmul=128, repeats=1)
    return GPUShapes(vit_preset("vit-base-patch16-224", num_classes=0), gpt_preset("gpt-base"), batch=64, text=64,
                     answer=32, prompt=128, new_tokens=128, matmul=8192, repeats=10)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_median(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                 warmup: int = 2) -> dict[str, float]:
    """timing.alternate with the device synchronized around every call."""
    return alternate(fns, repeats, warmup, sync=lambda: sync(device))


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    # ten warm-up products: an idle GPU starts at a low clock, which would understate the peak
    t = timed_median({"mm": lambda: a @ b}, repeats, device, warmup=10)["mm"]
    return 2 * n**3 / t / 1e9  # GFLOP/s


def train_step(model: nn.Module, side: str, batch: dict, device: torch.device) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    model.train()
    batch = for_side(batch, side)

    def step() -> None:
        with torch.autocast(device.type, dtype=BF16):
            loss = vlm_loss(model, side, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peak_memory_gib(models: dict[str, nn.Module], batch: dict, device: torch.device) -> dict[str, float | None]:
    """Each side's peak GPU memory over a training step, with only its own model, gradients and
    optimizer state on the device (the other side waits on the CPU): what that side needs alone.
    None off CUDA, where the same moves run but nothing is measured."""
    for m in models.values():
        m.to("cpu")
    peaks: dict[str, float | None] = {}
    for side, m in models.items():
        m.to(device)
        step = train_step(m, side, batch, device)
        step()  # the optimizer state exists from the first step on
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        peaks[side] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        del step
        m.zero_grad(set_to_none=True)
        m.to("cpu")
    return peaks


def bench_gpu_vlm(run: Run, s: GPUShapes, device: torch.device, peak_bf16: float) -> None:
    pair = vlm_pair(s.vit, s.gpt, adapter=AdapterConfig(projection="mlp", keep_cls=True))
    models = {side: m.to(device) for side, m in pair.items()}
    batch = vlm_batch(s.vit, s.gpt, s.batch, s.text, s.answer, image_tokens=s.vit.num_patches + 1)
    batch = {k: v.to(device) for k, v in batch.items()}
    case = f"ViT {s.vit.n_layer}L/{s.vit.n_embd} @{s.vit.image_size} + MLP + GPT-2 {s.gpt.n_layer}L/{s.gpt.n_embd}"
    print(f"gpu vlm train: {case}, batch {s.batch}, {device}", flush=True)
    with torch.no_grad(), torch.autocast(device.type, dtype=BF16):
        losses = {k: float(vlm_loss(m, k, for_side(batch, k))) for k, m in models.items()}
    steps = {k: train_step(m, k, batch, device) for k, m in models.items()}
    times = timed_median(steps, s.repeats, device)
    rates = {k: s.batch / t for k, t in times.items()}
    note = (f"batch {s.batch}, {s.vit.num_patches + 1} image + {s.text} text tokens, {s.answer} supervised, bf16 "
            f"autocast, fused AdamW; losses {abs(losses['mmfusion'] - losses['transformers']):.1e} apart")
    target_row(run, "gpu", case, "bf16", "train samples/s", rates, 2.5, note=note)
    with torch.autocast(device.type, dtype=BF16):
        flops = count_flops(lambda m=models["mmfusion"]: vlm_loss(m, "mmfusion", for_side(batch, "mmfusion")))
    mfu = {k: flops / t / 1e9 / peak_bf16 * 100 for k, t in times.items()}
    run.add("gpu", case, "bf16", "% of measured bf16 matmul peak (MFU)", mfu["mmfusion"], mfu["transformers"],
            "ours >= 50%", mfu["mmfusion"] >= 50, note=f"{flops / 1e12:.2f} TFLOP/step, peak {peak_bf16 / 1e3:.0f} "
                                                       "TFLOP/s measured in this run; both sides over the same model "
                                                       "FLOPs (transformers also runs its LM head on the unsupervised "
                                                       "positions, which count as no useful work)")
    del steps  # and with them both optimizers' state
    memory = peak_memory_gib(models, batch, device)
    if memory["mmfusion"] is not None:
        target_row(run, "gpu", case, "bf16", "peak GPU memory GiB", memory, 1.0, higher_is_better=False,
                   note="torch.cuda.max_memory_allocated over one step after a reset, one side on the GPU at a time "
                        "(its model, gradients, AdamW state, activations)")
    del models
    gc.collect()


def bench_gpu_decode(run: Run, s: GPUShapes, device: torch.device) -> None:
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_gpt_config(s.gpt)).eval()
    ours = GPT.from_hf(hf).eval()
    ids = torch.randint(0, s.gpt.vocab_size - 1, (1, s.prompt), generator=torch.Generator().manual_seed(1))
    for dtype in ("fp32", "bf16"):
        torch_dtype = BF16 if dtype == "bf16" else torch.float32
        hf_d, ours_d, ids_d = hf.to(device, torch_dtype), ours.to(device, torch_dtype), ids.to(device)

        @torch.no_grad()
        def theirs(hf_d=hf_d, ids_d=ids_d) -> list[int]:
            out = hf_d.generate(input_ids=ids_d, attention_mask=torch.ones_like(ids_d), do_sample=False,
                                max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens, pad_token_id=EOT_ID)
            return out[0, s.prompt:].tolist()

        fns = {"transformers": theirs}
        for decoder in ("eager", "static", "compiled"):
            config = GenerationConfig(max_new_tokens=s.new_tokens, decoder=decoder)

            def mine(config=config, ours_d=ours_d, ids_d=ids_d) -> list[int]:
                return [int(t[0]) for t in decode_stream(ours_d, input_ids=ids_d, config=config, eot_id=-1)]

            fns[decoder] = mine
        reference = theirs()
        agree = {k: agreeing_tokens(f(), reference) for k, f in fns.items() if k != "transformers"}  # + warm-up
        recordings = CudaGraphRecordings() if device.type == "cuda" else None
        times = timed_median(fns, 3 if s.repeats > 1 else 1, device, warmup=1)
        graphs = recordings.stop() if recordings is not None else ""
        for decoder in ("eager", "static", "compiled"):
            rates = {"mmfusion": s.new_tokens / times[decoder], "transformers": s.new_tokens / times["transformers"]}
            print(f"gpu decode {dtype} {decoder}: {rates['mmfusion']:.0f} tok/s", flush=True)
            target_row(run, "gpu", f"GPT-2 {s.gpt.n_layer}L decode, batch 1, {decoder}", dtype, "tokens/s", rates,
                       None, note=f"prompt {s.prompt} + {s.new_tokens} greedy tokens; "
                                  + tokens_note(agree[decoder], s.new_tokens, dtype)
                                  + (f"; {graphs}" if decoder == "compiled" and graphs else ""))
        if device.type == "cuda":
            run.rows[-1].target, run.rows[-1].met = ">= 2,000 tok/s", s.new_tokens / times["compiled"] >= 2000
    del hf, ours
    gc.collect()


def agreeing_tokens(ours: list[int], theirs: list[int]) -> int:
    """How many tokens from the start the two greedy continuations share."""
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))


def tokens_note(agree: int, total: int, dtype: str) -> str:
    """fp32 must give transformers' tokens. In bf16 the two models round differently, and random
    weights leave near-ties between the top logits, so greedy paths part after a few tokens (the
    first of 128 at token 6 on a CPU check): the note says where, and it is no failure."""
    if agree == total:
        return "transformers' tokens: yes"
    if dtype == "bf16":
        return f"transformers' tokens for the first {agree} of {total} (bf16 rounding differs; random weights)"
    return f"transformers' tokens: NO, they part at token {agree}"


class CudaGraphRecordings:
    """Counts CUDA graph recordings (torch's cudagraph trees) until stop(): the compiled decoder
    should record during its warm-up and only replay while timed. Private torch API: where it is
    missing, stop() says the count is unknown instead of failing the run."""

    def __init__(self) -> None:
        self.count = 0
        try:
            from torch._inductor.cudagraph_trees import CUDAGraphTreeManager
        except ImportError:
            self.manager = None
            return
        self.manager, self.original = CUDAGraphTreeManager, CUDAGraphTreeManager.record_function

        def record_function(manager, *args, **kwargs):
            self.count += 1
            return self.original(manager, *args, **kwargs)

        CUDAGraphTreeManager.record_function = record_function

    def stop(self) -> str:
        if self.manager is None:
            return "CUDA graph recordings while timed: unknown (no cudagraph_trees in this torch)"
        self.manager.record_function = self.original
        from torch._dynamo.utils import counters

        skips = counters["inductor"].get("cudagraph_skips", 0)
        return f"CUDA graph recordings while timed: {self.count} (0: replays only); cudagraph skips so far: {skips}"


def bench_gpu_vlm_compiled(run: Run, s: GPUShapes, device: torch.device, peak_bf16: float) -> None:
    """The VLM step of bench_gpu_vlm with both models through torch.compile (default mode, as
    `--compile` trains), each against the other compiled: fused elementwise kernels are what the
    eager step lacks on a GPU. On the CPU smoke run the backend is "aot_eager" (dynamo's capture
    and AOT autograd, no code generation), so CI checks that both models and their backward
    compile without spending minutes generating kernels. mmfusion's batch carries what
    VQACollator gives training (models.for_side), so its forward has no graph breaks."""
    pair = vlm_pair(s.vit, s.gpt, adapter=AdapterConfig(projection="mlp", keep_cls=True))
    backend = "inductor" if device.type == "cuda" else "aot_eager"  # CPU smoke: capture and autograd, no codegen
    models = {side: torch.compile(m.to(device), backend=backend) for side, m in pair.items()}
    batch = vlm_batch(s.vit, s.gpt, s.batch, s.text, s.answer, image_tokens=s.vit.num_patches + 1)
    batch = {k: v.to(device) for k, v in batch.items()}
    case = (f"ViT {s.vit.n_layer}L/{s.vit.n_embd} @{s.vit.image_size} + MLP + GPT-2 {s.gpt.n_layer}L/{s.gpt.n_embd}, "
            "torch.compile")
    print(f"gpu vlm train, compiled ({backend}): batch {s.batch}, {device}", flush=True)
    steps = {k: train_step(m, k, batch, device) for k, m in models.items()}
    times = timed_median(steps, s.repeats, device, warmup=3)  # the first calls compile forward and backward
    rates = {k: s.batch / t for k, t in times.items()}
    target_row(run, "gpu", case, "bf16", "train samples/s", rates, 2.5,
               note=f"batch {s.batch}, as the eager row; both sides compiled (backend {backend}), timed after 3 "
                    "warm-up steps that compile")
    with torch.autocast(device.type, dtype=BF16):
        plain = pair["mmfusion"]  # the uncompiled module
        flops = count_flops(lambda: vlm_loss(plain, "mmfusion", for_side(batch, "mmfusion")))
    mfu = {k: flops / t / 1e9 / peak_bf16 * 100 for k, t in times.items()}
    run.add("gpu", case, "bf16", "% of measured bf16 matmul peak (MFU)", mfu["mmfusion"], mfu["transformers"],
            "ours >= 50%", mfu["mmfusion"] >= 50, note=f"{flops / 1e12:.2f} TFLOP/step, as the eager row")
    del steps, models, pair
    gc.collect()


def gpu_peaks(run: Run, s: GPUShapes, device: torch.device, smoke: bool) -> dict[str, float]:
    """The GPU's name into run.machine, and its bf16 and fp32 matmul peaks as rows (measured once
    per run, whichever GPU section comes first)."""
    if "gpu_peaks" not in run.machine:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
        run.machine["gpu"] = name
        run.machine["gpu_peaks"] = {d: matmul_peak(s.matmul, t, device, 3 if smoke else 10)
                                    for d, t in (("bf16", BF16), ("fp32", torch.float32))}
        for d, p in run.machine["gpu_peaks"].items():
            run.add("gpu", f"matmul {s.matmul}^3 on {name}", d, "peak GFLOP/s", p)
    return run.machine["gpu_peaks"]


def bench_gpu(run: Run, smoke: bool, device: torch.device) -> None:
    s = gpu_shapes(smoke)
    peak = gpu_peaks(run, s, device, smoke)
    bench_gpu_vlm(run, s, device, peak["bf16"])
    bench_gpu_decode(run, s, device)


def bench_gpu_compiled(run: Run, smoke: bool, device: torch.device) -> None:
    s = gpu_shapes(smoke)
    bench_gpu_vlm_compiled(run, s, device, gpu_peaks(run, s, device, smoke)["bf16"])
