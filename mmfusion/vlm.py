"""Early-fusion VLM: image tokens spliced into the GPT's token embeddings.

pixel_values (B, 3, H, W) -> ViT -> adapter -> image_embeds (B, M, C)
input_ids (B, T) with exactly M `<|image|>` slots per row -> token embeddings (B, T, C)
-> image_embeds scattered into the slots -> GPT blocks -> logits / loss.

Notation: B batch, T tokens, M image tokens per image, C GPT width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import generation
from .adapter import ViTAdapter
from .config import AdapterConfig, VLMConfig
from .errors import SlotCountError
from .generation import GenerationConfig
from .gpt import GPT
from .loss import IGNORE_INDEX, linear_cross_entropy
from .vit import ViT
from .weights import PretrainedMixin


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # (B, T, V) without labels; None with labels (the loss is fused)
    num_tokens: int = 0  # supervised tokens behind `loss`


def fuse_image_embeddings(token_embeds: torch.Tensor, image_mask: torch.Tensor,
                          image_embeds: torch.Tensor) -> torch.Tensor:
    """Scatter image_embeds (B, M, C) into the True positions of image_mask (B, T) of
    token_embeds (B, T, C), row by row, in order. Every row must have exactly M slots."""
    B, M, C = image_embeds.shape
    counts = image_mask.sum(dim=1)  # (B,)
    if bool((counts != M).any()):
        row = int((counts != M).nonzero()[0])
        raise SlotCountError(
            f"row {row} has {int(counts[row])} <|image|> slots but the adapter yields {M} image tokens; "
            "build prompts with mmfusion.processing.PromptBuilder so the counts match"
        )
    out = token_embeds.clone()
    out[image_mask] = image_embeds.reshape(B * M, C).to(out.dtype)  # row-major order = slot order
    return out


class VLM(PretrainedMixin, nn.Module):
    config_class = VLMConfig
    model_type = "vlm"

    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = ViT(config.vit)
        self.adapter = ViTAdapter(config.adapter, config.vit.n_embd, config.gpt.n_embd, config.num_image_tokens)
        self.gpt = GPT(config.gpt)

    @classmethod
    def from_parts(cls, vit: ViT, gpt: GPT, adapter: AdapterConfig | None = None,
                   attention: str = "causal") -> VLM:
        """A VLM whose ViT and GPT start from the given (e.g. pretrained or imported) models."""
        # The VLM's ViT has no classifier: an unused head would only confuse DDP and the optimizer.
        config = VLMConfig(vit=vit.config.replace(num_classes=0), gpt=gpt.config, adapter=adapter or AdapterConfig(),
                           attention=attention)
        model = cls(config)
        model.vit.load_state_dict({k: v for k, v in vit.state_dict().items() if not k.startswith("head.")})
        model.gpt.load_state_dict(gpt.state_dict())
        return model

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    def vit_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> the ViT hidden states the adapter reads (B, 1+N, Dv),
        from the configured layer (AdapterConfig.layer)."""
        layer = self.config.adapter.layer
        if layer == -1:
            return self.vit.forward_features(pixel_values)  # (B, 1+N, Dv)
        return self.vit.forward_features(pixel_values, output_hidden_states=True)[1][layer + 1]

    def encode_images(self, pixel_values: torch.Tensor | None = None,
                      image_features: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (B, 3, H, W), or their precomputed `vit_features` (B, 1+N, Dv) when the
        ViT is frozen -> image embeddings (B, M, C) in GPT width."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of pixel_values and image_features")
        return self.adapter(self.vit_features(pixel_values) if image_features is None else image_features)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with the images fused in (B, T, C), and the tokens that attend to each
        other bidirectionally (B, T): the image slots under prefix attention, else None."""
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        # The slot id may lie outside the GPT vocabulary; its embedding is overwritten anyway.
        token_embeds = self.gpt.wte(input_ids.masked_fill(image_mask, 0))  # (B, T, C)
        embeds = fuse_image_embeddings(token_embeds, image_mask, self.encode_images(pixel_values, image_features))
        return embeds, image_mask if self.config.attention == "prefix" else None

    def hidden_states(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, cache=None,
                      image_features: torch.Tensor | None = None) -> torch.Tensor:
        embeds, bidirectional = self.embed(input_ids, pixel_values, image_features)
        return self.gpt.hidden_states(inputs_embeds=embeds, attention_mask=attention_mask, cache=cache,
                                      bidirectional=bidirectional)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, loss_per: str = "token") -> VLMOutput:
        """input_ids (B, T), pixel_values (B, 3, H, W) or image_features (B, 1+N, Dv) (see
        `vit_features`), attention_mask (B, T), labels (B, T).

        labels hold token ids where the model is supervised and -100 elsewhere, aligned with
        input_ids; the shift (position t predicts token t+1) happens here and nowhere else.
        The loss is the mean over all supervised tokens of the batch (`loss_per="token"`), or
        over rows of each row's mean (`"example"`: a one-word answer counts as much as a caption).
        Only supervised positions go through the LM head, and `linear_cross_entropy` forms the
        loss and its gradients without keeping logits: with labels, `logits` is None.
        """
        hidden = self.hidden_states(input_ids, pixel_values, attention_mask, image_features=image_features)  # (B, T, C)
        if labels is None:
            return VLMOutput(loss=None, logits=self.gpt.lm_head(hidden))
        targets = labels[:, 1:]  # (B, T-1)
        keep = targets != IGNORE_INDEX  # (B, T-1)
        n = int(keep.sum())
        if n == 0:
            raise ValueError("no supervised tokens in this batch: every label is -100")
        weights = None
        if loss_per == "example":
            per_row = keep.sum(1, keepdim=True)  # (B, 1)
            rows = (per_row > 0).sum()
            weights = (1.0 / (per_row.clamp_min(1) * rows)).expand_as(keep)[keep]  # (K,), summing to 1
        elif loss_per != "token":
            raise ValueError(f"loss_per must be 'token' or 'example', got {loss_per!r}")
        loss = linear_cross_entropy(hidden[:, :-1][keep], self.gpt.lm_head.weight, targets[keep],
                                    weights)  # over K tokens
        return VLMOutput(loss=loss, logits=None, num_tokens=n)

    # ---- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 config: GenerationConfig = GenerationConfig()) -> list[list[int]]:
        """New token ids per row for left-padded prompts (B, T) with image slots."""
        embeds, bidirectional = self.embed(input_ids, pixel_values)
        return generation.generate(self.gpt, inputs_embeds=embeds, attention_mask=attention_mask,
                                   bidirectional=bidirectional, config=config)

    def answer(self, image, question: str, **kwargs) -> str:
        """Answer one question about one image (PIL image, path, array or tensor).
        Keyword arguments are GenerationConfig fields (max_new_tokens, temperature, ...)."""
        return self.answer_batch([image], [question], **kwargs)[0]

    def answer_batch(self, images, questions: list[str], **kwargs) -> list[str]:
        return generation.vlm_generate_text(self, images, list(questions), GenerationConfig(**kwargs))

    def caption(self, image, **kwargs) -> str:
        return self.caption_batch([image], **kwargs)[0]

    def caption_batch(self, images, **kwargs) -> list[str]:
        return generation.vlm_generate_text(self, images, [None] * len(images), GenerationConfig(**kwargs))

    def stream(self, image, question: str | None = None, **kwargs):
        """Iterator of text pieces of the answer (or the caption when question is None)."""
        batch = generation.vlm_prompts(self, [image], [question])
        with torch.no_grad():
            embeds, bidirectional = self.embed(batch["input_ids"], batch["pixel_values"])
        return generation.stream_text(self.gpt, inputs_embeds=embeds, bidirectional=bidirectional,
                                      config=GenerationConfig(**kwargs))
