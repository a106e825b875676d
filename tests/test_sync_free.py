"""The training step's forward pass and loss never wait for the device: on a batch from
VQACollator, forward and backward issue no operation that reads a tensor's values back to the
host (`.item()`, `bool()`, `nonzero`, boolean indexing). Recorded on the CPU with a dispatch mode,
which sees the same aten operations a GPU run would issue; the same loss as the checked path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from mmfusion import ViT, ViTConfig
from mmfusion.config import AdapterConfig, GPTConfig
from mmfusion.errors import SlotCountError
from mmfusion.gpt import GPT
from mmfusion.processing import ImageProcessor, PromptBuilder, VQACollator
from mmfusion.vlm import VLM

aten = torch.ops.aten
# operations whose result size or value the host must read from the device
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.is_nonzero.default, aten.unique_consecutive.default, aten._unique2.default}


class SyncRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                              aten._index_put_impl_.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []) if i is not None)
        if func in SYNCING or bool_index:
            self.syncs.append(str(func))
        return func(*args, **kwargs)


def tiny_vlm(attention: str = "prefix", fusion: str = "early") -> VLM:
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=16, patch_size=4, n_layer=2, n_head=2, n_embd=32, num_classes=0))
    gpt = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    return VLM.from_parts(vit, gpt, AdapterConfig(pixel_shuffle=2, keep_cls=True), attention, fusion)


def batch_for(model: VLM) -> dict:
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8))
              for i in range(3)]
    rows = [{"image": images[0], "question": "what color is it?", "answers": ["red"]},
            {"image": images[1], "question": "a longer question about the shape here?", "answers": ["a circle"]},
            {"image": images[2], "question": None, "caption": "a small red circle at the top left"}]
    return VQACollator(ImageProcessor.from_config(model.config.vit), PromptBuilder(model.prompt_slots, 64))(rows)


@pytest.mark.parametrize("attention, loss_per, fusion", [("prefix", "token", "early"), ("causal", "example", "early"),
                                                         ("causal", "token", "cross")])
def test_collated_step_issues_no_host_sync(attention, loss_per, fusion):
    model = tiny_vlm(attention, fusion).train()
    batch = batch_for(model)
    assert batch["attention_mask"].min() == 0  # rows of different lengths: padding is there
    with SyncRecorder() as recorder:
        loss = model(**batch, loss_per=loss_per).loss
        loss.backward()
    assert recorder.syncs == []
    # the checked path (no label_positions: a user's own batch) gives the same loss, and it does sync
    plain = {k: v for k, v in batch.items() if k not in ("label_positions", "slots_per_row")}
    with SyncRecorder() as recorder:
        checked = model(**plain, loss_per=loss_per).loss
    assert recorder.syncs  # what the recorder catches: the slot check, nonzero, the target check
    torch.testing.assert_close(loss.detach(), checked.detach(), rtol=1e-6, atol=1e-6)


def test_collated_step_with_cached_features_issues_no_host_sync():
    model = tiny_vlm().train()
    batch = batch_for(model)
    with torch.no_grad():
        batch["image_features"] = model.vit_features(batch.pop("pixel_values"))
    with SyncRecorder() as recorder:
        model(**batch).loss.backward()
    assert recorder.syncs == []


def test_slot_counts_are_checked_on_the_cpu_by_the_collator_and_the_model():
    model = tiny_vlm()
    builder = PromptBuilder(model.num_image_tokens + 1, 64)  # a builder out of step with the model
    collate = VQACollator(ImageProcessor.from_config(model.config.vit), builder)
    row = {"image": Image.new("RGB", (16, 16)), "question": "q?", "answers": ["a"]}
    with pytest.raises(SlotCountError, match="the batch has 6 <|image|> slots per row but the adapter yields 5"):
        model(**collate([row]))
    builder.num_image_tokens -= 1
    batch = collate([row])
    batch["input_ids"][0, 0] = 11  # one slot fewer: a hand-made batch, without the collator's count
    del batch["label_positions"], batch["slots_per_row"]
    with pytest.raises(SlotCountError, match="row 0 has 4 <|image|> slots but the adapter yields 5"):
        model(**batch)
