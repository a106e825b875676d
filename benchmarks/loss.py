"""The LM-head loss: `linear_cross_entropy` against `F.cross_entropy(F.linear(h, W), t)`.

    python benchmarks/loss.py              # the shapes below, 20 alternating repeats
    python benchmarks/loss.py --smoke      # tiny shapes, for the test suite

Times forward + backward of the loss alone (hidden (K, C) and the weight (V, C) both need
gradients, the weight tied to an embedding as in GPT-2, so its two gradients are summed), and a
whole stage-2 training step of the main job's VLM shape (gpt-tiny, 17 image tokens + ~17 text tokens,
batch 64, 2 supervised tokens a row) with either loss. Both sides alternate in one process
(timing.py's `alternate`, as in run.py); each prints the median, and the rows report the largest loss
and gradient differences too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfusion.loss import IGNORE_INDEX, linear_cross_entropy

from timing import alternate, repeat_args  # the sibling timing.py: medians, sides interleaved, order flipped each repeat

# (name, K supervised tokens, C width, V vocabulary)
SHAPES = [("stage 2 (gpt-tiny, batch 64)", 128, 128, 50257), ("GPT-2 small, 512 tokens", 512, 768, 50257)]
SMOKE_SHAPES = [("smoke", 6, 8, 40)]


def loss_case(k: int, c: int, v: int, fused: bool, seed: int = 0):
    """A step function for one side: the loss through a tied embedding, forward and backward."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.Embedding(v, c)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(v, c, generator=g) * 0.1)
    ids, targets = torch.randint(0, v, (k,), generator=g), torch.randint(0, v, (k,), generator=g)
    x = torch.randn(k, c, generator=g)

    def step():
        emb.zero_grad(set_to_none=True)
        hidden = x + emb(ids)  # (K, C): the embedding's gradient path
        loss = (linear_cross_entropy(hidden, emb.weight, targets) if fused
                else F.cross_entropy(F.linear(hidden, emb.weight), targets))
        loss.backward()
        return loss.detach(), emb.weight.grad

    return step


def vlm_case(fused: bool, batch: int, smoke: bool):
    """A stage-2 training step (fwd + bwd + AdamW) of the main job's VLM shape, on random data."""
    from mmfusion.config import AdapterConfig, gpt_preset, vit_preset
    from mmfusion.gpt import GPT
    from mmfusion.vit import ViT
    from mmfusion.vlm import VLM

    torch.manual_seed(0)
    vit_c = vit_preset("vit-tiny", num_classes=0, **({"image_size": 16, "n_layer": 1} if smoke else {}))
    gpt_c = gpt_preset("gpt-tiny", **({"n_layer": 1} if smoke else {}))
    model = VLM.from_parts(ViT(vit_c), GPT(gpt_c), AdapterConfig(keep_cls=True, pixel_shuffle=2), "prefix")
    model.vit.requires_grad_(False)
    m, text = model.num_image_tokens, 17
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.full((batch, m), model.config.image_token_id),
                     torch.randint(0, 50000, (batch, text), generator=g)], 1)  # (B, M + T)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -2:] = ids[:, -2:]  # the answer and end-of-text
    features = model.vit_features(torch.randn(batch, 3, vit_c.image_size, vit_c.image_size, generator=g))
    batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
              "image_features": features}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    model.train()

    def step():
        if fused:
            loss = model(**batch_).loss
        else:  # the same model, the loss written the plain way
            hidden = model.hidden_states(ids, None, batch_["attention_mask"], image_features=features)
            keep = labels[:, 1:] != IGNORE_INDEX
            loss = F.cross_entropy(model.gpt.lm_head(hidden[:, :-1][keep]).float(), labels[:, 1:][keep])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), None

    return step


def main(argv: list[str] | None = None) -> list[dict]:
    args = repeat_args(__doc__, 20, argv)
    repeats = args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; median of {repeats} alternating "
          "repeats after one warm-up")
    print("| case | F.cross_entropy ms | linear_cross_entropy ms | ratio | max loss diff | max grad diff |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for name, k, c, v in SMOKE_SHAPES if args.smoke else SHAPES:
        ref, ours = loss_case(k, c, v, fused=False), loss_case(k, c, v, fused=True)
        (l0, g0), (l1, g1) = ref(), ours()
        t = alternate({"ref": ref, "ours": ours}, repeats)
        rows.append({"case": f"loss fwd+bwd, {name}: K={k}, C={c}, V={v}", "ref_s": t["ref"], "ours_s": t["ours"],
                     "loss_diff": (l0 - l1).abs().item(), "grad_diff": (g0 - g1).abs().max().item()})
    ref, ours = vlm_case(False, 4 if args.smoke else 64, args.smoke), vlm_case(True, 4 if args.smoke else 64, args.smoke)
    l0, l1 = ref()[0], ours()[0]  # the first step from the same weights: the same loss
    t = alternate({"ref": ref, "ours": ours}, repeats)
    rows.append({"case": "stage-2 training step (fwd+bwd+AdamW), gpt-tiny VLM" + (" (smoke)" if args.smoke else ""),
                 "ref_s": t["ref"], "ours_s": t["ours"], "loss_diff": (l0 - l1).abs().item(), "grad_diff": None})
    for r in rows:
        grad = "" if r["grad_diff"] is None else f"{r['grad_diff']:.1e}"
        print(f"| {r['case']} | {1e3 * r['ref_s']:.1f} | {1e3 * r['ours_s']:.1f} | "
              f"{r['ours_s'] / r['ref_s']:.2f}x | {r['loss_diff']:.1e} | {grad} |")
    return rows


if __name__ == "__main__":
    main()
