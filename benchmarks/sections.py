"""The measured sections of a run, each `bench_<name>(run, shapes)` adding its rows: this
machine's limits, the ViT training step, GPT-2 decoding, the VLM fine-tuning step (each with
its utilization rows), and the data pipeline against the rate the training steps consume.
Peak memory is in memory.py."""

from __future__ import annotations

import gc
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from mmfusion import GPT

from models import (
    BF16,
    Clock,
    Shapes,
    count_flops,
    decode_fn,
    for_side,
    gpt_pair,
    vit_pair,
    vit_step,
    vlm_batch,
    vlm_configs,
    vlm_loss,
    vlm_pair,
    vlm_step,
)
from results import Run, mfu_rows, target_row
from timing import alternate, copy_bandwidth, matmul_peak, timed

# ----------------------------------------------------------------------------- machine limits

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


# ----------------------------------------------------------------------------- models

def bench_vit(run: Run, s: Shapes) -> None:
    ensure_machine(run, s)
    for name, c, batch_fp32, batch_bf16, reps_bf16 in s.vit:
        models = vit_pair(c)
        for dtype in ("fp32", "bf16"):
            # bf16 matmuls run at ~1 GFLOP/s on CPUs without AVX512-BF16/AMX, so there the bf16
            # cases take a smaller batch, and the big one a single step per side without warm-up.
            slow = dtype == "bf16" and run.bf16_is_slow()
            batch = batch_bf16 if slow else batch_fp32
            print(f"vit train: {name} {dtype} batch {batch}", flush=True)
            steps = {k: vit_step(m, k, batch, c, dtype) for k, m in models.items()}
            big_bf16 = slow and reps_bf16 == 1 and not run.smoke
            times = alternate(steps, reps_bf16 if slow else s.repeats, warmup=0 if big_bf16 else 1)
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
        if b == 1:  # the compiled decoder too (torch.compile of a fixed-shape step), for users choosing one
            clocks["compiled"] = []
            full["compiled"] = decode_fn(models["mmfusion"], "mmfusion", ids, s.new_tokens, clocks["compiled"],
                                         decoder="compiled")
        tokens = {k: f() for k, f in full.items()}  # also the warm-up, and the compiled decoder's compiling
        same = {k: bool(torch.equal(t, tokens["transformers"])) for k, t in tokens.items()}
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
                      note=f"prompt {s.prompt_len}, {s.new_tokens} greedy tokens, median of {reps} run(s) after a "
                        f"warm-up run; same tokens as transformers: {'yes' if same['mmfusion'] else 'NO'}")
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
        if "compiled" in total:
            target_row(run, "decode", case + ", compiled decoder", "fp32", "tokens/s (end to end)",
                       {"mmfusion": rates["compiled"], "transformers": rates["transformers"]}, None,
                       note=f"decoder='compiled' (torch.compile, default mode on CPU), timed as the row above, "
                            f"compiled in the warm-up run; same tokens as transformers: "
                            f"{'yes' if same['compiled'] else 'NO'}")
    del models
    gc.collect()


def bench_vlm(run: Run, s: Shapes) -> None:
    ensure_machine(run, s)
    for dtype in ("fp32", "bf16"):
        capped = dtype == "bf16" and run.bf16_is_slow()  # towers cut to vlm_bf16_depth blocks, one step
        depth = s.vlm_bf16_depth if capped else None
        vit_c, gpt_c = vlm_configs(s, depth)
        models = vlm_pair(vit_c, gpt_c)
        batch = vlm_batch(vit_c, gpt_c, s.vlm_batch, s.vlm_text, s.vlm_answer)
        case = f"ViT {vit_c.n_layer}L/{vit_c.n_embd} + GPT-2 {gpt_c.n_layer}L/{gpt_c.n_embd}"
        print(f"vlm train: {case} {dtype} batch {s.vlm_batch}", flush=True)
        steps = {k: vlm_step(m, k, batch, dtype) for k, m in models.items()}
        with torch.no_grad():
            losses = {k: float(vlm_loss(m, k, for_side(batch, k))) for k, m in models.items()}
        single = capped and not run.smoke
        times = alternate(steps, 1 if single else s.repeats, warmup=0 if single else 1)
        rates = {k: s.vlm_batch / t for k, t in times.items()}
        run.train_rates[("vlm", dtype)] = rates["mmfusion"]
        note = (f"batch {s.vlm_batch}, {vit_c.num_patches} image + {s.vlm_text} text tokens, {s.vlm_answer} "
                f"supervised; same loss: {abs(losses['mmfusion'] - losses['transformers']):.1e} apart")
        if capped:
            note += f"; depth capped to {depth}+{depth} blocks" + (", 1 step per side, no warm-up" if single else "") \
                + " (bf16 cap)"
        target_row(run, "vlm", case, dtype, "train samples/s (fwd+bwd+AdamW)", rates,
                   1.2 if dtype == "bf16" else None, note=note)
        flops = count_flops(lambda m=models["mmfusion"], b=for_side(batch, "mmfusion"): vlm_loss(m, "mmfusion", b))
        mfu_rows(run, f"VLM train {case}", dtype, flops, times, None)
        del models
        gc.collect()


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
        t = statistics.median(timed(go) for _ in range(max(1, min(3, s.repeats))))
        rate = len(rows) / t
        for consumer, key in consumers:
            consumed = run.train_rates.get(key)
            if consumed is None:
                run.add("data", name, "fp32", "images/s (decode, resize, normalize, collate)", rate,
                        note=f"{consumer} not measured in this run (add vit/vlm to --only)")
                continue
            run.add("data", name, "fp32", f"images/s vs {consumer} images/s", rate, consumed, ">= 5x",
                    rate / consumed >= 5, note="one process, no DataLoader workers")


