"""The README's contract for the Python API: bad configuration values, prompts and generation
settings raise an `mmfusion.errors` exception (a ValueError too) naming the fix, not a bare
ValueError, so callers can catch `MMFusionError` for everything a user typed wrong."""

from __future__ import annotations

import pytest
import torch

from mmfusion import VLM, AdapterConfig, ViTAdapter, ViTConfig, VLMConfig
from mmfusion.adapter import pixel_shuffle
from mmfusion.config import GPTConfig
from mmfusion.errors import ConfigError, MMFusionError, PromptError
from mmfusion.generation import GenerationConfig, generate
from mmfusion.gpt import GPT
from mmfusion.layers import activation

VIT = ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=0)
GPT_C = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)
IMAGE = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))


def early_vlm() -> VLM:
    torch.manual_seed(0)
    return VLM(VLMConfig(vit=VIT, gpt=GPT_C)).eval()


def cross_vlm() -> VLM:
    torch.manual_seed(0)
    return VLM(VLMConfig(vit=VIT, gpt=GPT_C, fusion="cross")).eval()


def right_padded_generation():
    gpt = GPT(GPT_C).eval()
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    generate(gpt, input_ids=ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
             config=GenerationConfig(max_new_tokens=2))


CASES = {
    "unknown decoder": (ConfigError, "decoder must be one of", lambda: GenerationConfig(decoder="bogus")),
    "unknown decoder through answer": (ConfigError, "decoder must be one of",
                                       lambda: early_vlm().answer(IMAGE, "what?", decoder="bogus")),
    "compiled decoder on cross fusion": (ConfigError, "decode a cross-fusion VLM with decoder",
                                         lambda: cross_vlm().answer(IMAGE, "what?", decoder="compiled")),
    "images and questions of different counts": (PromptError, "one question per image",
                                                 lambda: early_vlm().answer_batch([IMAGE], ["a?", "b?"])),
    "right padding": (PromptError, "left=True", right_padded_generation),
    "position embedding without a token count": (
        ConfigError, "needs num_tokens", lambda: ViTAdapter(AdapterConfig(position_embedding=True), 64, 128)),
    "pixel shuffle that does not divide the grid": (
        ConfigError, "divides the ViT's grid side", lambda: pixel_shuffle(torch.zeros(1, 16, 8), 3)),
    "unknown activation": (ConfigError, "use gelu", lambda: activation("relu6")),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_an_mmfusion_error_that_is_also_a_value_error(case):
    kind, message, call = CASES[case]
    with pytest.raises(kind, match=message) as caught:
        call()
    assert isinstance(caught.value, MMFusionError) and isinstance(caught.value, ValueError)


def test_every_error_class_is_exported_from_the_package():
    """The README lists the errors the public API raises; each is importable from `mmfusion`."""
    import inspect

    import mmfusion
    from mmfusion import errors

    classes = {name for name, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, MMFusionError) and c.__module__ == errors.__name__}
    assert "TokenizerFilesError" in classes and classes <= set(mmfusion.__all__)
    assert all(getattr(mmfusion, name) is getattr(errors, name) for name in classes)


def test_api_misuse_is_named_not_a_bare_type_error(tmp_path):
    """from_pretrained(None), a typo'd generation setting, a string or a generator to
    caption_batch: bare TypeErrors (or a message pointing at answer())."""
    import numpy as np
    from PIL import Image

    from mmfusion import GPT, VLM, VLMConfig
    from mmfusion.config import AdapterConfig, GPTConfig, ViTConfig
    from mmfusion.errors import CheckpointError, ConfigError, PromptError

    for folder, message in ((None, "named by its folder's path .*got NoneType None"), (5, "got int 5"),
                            (tmp_path / "missing", "missing does not exist")):
        with pytest.raises(CheckpointError, match=message):
            GPT.from_pretrained(folder)
    torch.manual_seed(0)
    vlm = VLM(VLMConfig(vit=ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=0),
                        gpt=GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64), adapter=AdapterConfig())).eval()
    image = Image.fromarray(np.full((16, 16, 3), 128, np.uint8))
    with pytest.raises(ConfigError, match="unknown generation setting.s. max_tokens; the settings are max_new_tokens"):
        vlm.answer(image, "what?", max_tokens=3)
    with pytest.raises(ConfigError, match="unknown generation setting"):
        vlm.caption(image, beams=2)
    with pytest.raises(PromptError, match="caption_batch takes a list of images, got str; for one image use caption"):
        vlm.caption_batch("img.png")
    assert len(vlm.caption_batch(im for im in [image, image])) == 2  # any iterable
