"""The VLM: image tokens fused into a GPT, early (spliced into its token embeddings) or late
(cross-attention from the text to the image tokens).

pixel_values (B, 3, H, W) -> ViT -> adapter -> image_embeds (B, M, C)
early: input_ids (B, T) with exactly M `<|image|>` slots per row -> token embeddings (B, T, C)
       -> image_embeds put into the slots -> GPT blocks -> logits / loss.
cross: input_ids (B, T) without slots -> token embeddings -> GPT blocks, each `cross_every`-th
       preceded by a gated cross-attention block reading image_embeds -> logits / loss.

Notation: B batch, T tokens, M image tokens per image, C GPT width, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from . import generation
from .adapter import ViTAdapter
from .config import AdapterConfig, VLMConfig
from .errors import PromptError, SlotCountError
from .generation import GenerationConfig
from .gpt import GPT
from .layers import GatedCrossAttention, init_linear_and_norm
from .loss import IGNORE_INDEX, linear_cross_entropy
from .vit import ViT
from .weights import PretrainedMixin


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # (B, T, V) without labels; None with labels (the loss is fused)
    num_tokens: int = 0  # supervised tokens behind `loss`


def check_slot_counts(image_mask: torch.Tensor, M: int) -> None:
    """A SlotCountError unless every row of image_mask (B, T) has exactly M slots. It reads the
    mask's values, so on an accelerator it waits for the device: the training step skips it for
    batches VQACollator has checked on the CPU."""
    counts = image_mask.sum(dim=1)  # (B,)
    if bool((counts != M).any()):
        row = int((counts != M).nonzero()[0])
        raise SlotCountError(
            f"row {row} has {int(counts[row])} <|image|> slots but the adapter yields {M} image tokens; "
            "build prompts with mmfusion.processing.PromptBuilder so the counts match"
        )


def fuse_image_embeddings(token_embeds: torch.Tensor, image_mask: torch.Tensor,
                          image_embeds: torch.Tensor) -> torch.Tensor:
    """Put image_embeds (B, M, C) into the True positions of image_mask (B, T) of token_embeds
    (B, T, C), row by row, in order; every row must have exactly M slots (check_slot_counts).
    A gather and a select of fixed shapes: nothing here waits for the device."""
    B, M, C = image_embeds.shape
    index = (image_mask.long().cumsum(dim=1) - 1).clamp(0, M - 1)  # (B, T): slot k of a row -> image token k
    gathered = image_embeds.to(token_embeds.dtype).gather(1, index[..., None].expand(-1, -1, C))  # (B, T, C)
    return torch.where(image_mask[..., None], gathered, token_embeds)


class VLM(PretrainedMixin, nn.Module):
    """A ViT, a ViTAdapter and a GPT (plus cross-attention blocks under late fusion), configured by
    a VLMConfig. Build it fresh (`VLM(config)`), from existing towers (`VLM.from_parts`), or from a
    saved folder (`VLM.from_pretrained`); `forward` gives logits and the loss on labelled tokens,
    `answer` / `caption` / `stream` generate text from images."""

    config_class = VLMConfig
    model_type = "vlm"

    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = ViT(config.vit)
        self.adapter = ViTAdapter(config.adapter, config.vit.n_embd, config.gpt.n_embd, config.num_image_tokens)
        self.gpt = GPT(config.gpt)
        if config.cross_layers:
            g = config.gpt
            self.cross = nn.ModuleDict({str(i): GatedCrossAttention(g.n_embd, g.n_head, g.mlp_dim, g.activation,
                                                                    g.layer_norm_eps, g.bias)
                                        for i in config.cross_layers})
            self.cross.apply(functools.partial(init_linear_and_norm, std=g.initializer_range))

    @classmethod
    def from_parts(cls, vit: ViT, gpt: GPT, adapter: AdapterConfig | None = None,
                   attention: str = "causal", fusion: str = "early", cross_every: int = 1) -> VLM:
        """A VLM whose ViT and GPT start from the given (e.g. pretrained or imported) models."""
        # The VLM's ViT has no classifier: an unused head would only confuse DDP and the optimizer.
        config = VLMConfig(vit=vit.config.replace(num_classes=0, class_names=None), gpt=gpt.config,
                           adapter=adapter or AdapterConfig(), attention=attention, fusion=fusion,
                           cross_every=cross_every)
        model = cls(config)
        model.vit.load_state_dict({k: v for k, v in vit.state_dict().items() if not k.startswith("head.")})
        model.gpt.load_state_dict(gpt.state_dict())
        return model

    @property
    def num_image_tokens(self) -> int:
        """Image tokens the adapter yields for one image."""
        return self.config.num_image_tokens

    @property
    def prompt_slots(self) -> int:
        """`<|image|>` slots a prompt holds: the image tokens (early fusion) or none (cross)."""
        return self.config.prompt_slots

    def restrict_output(self, token_ids) -> None:
        """The GPT's LM head scores only `token_ids` (None: all); see `GPT.restrict_output`."""
        self.gpt.restrict_output(token_ids)
        self.config = self.config.replace(gpt=self.gpt.config)

    def connector(self) -> list[nn.Module]:
        """The parts between the two towers: the adapter, and the cross-attention blocks."""
        return [self.adapter] + ([self.cross] if self.config.cross_layers else [])

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

    def fuse(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
             image_features: torch.Tensor | None = None, check_slots: bool = True) -> dict:
        """What the GPT needs to read the text with the images: `inputs_embeds` (B, T, C),
        `bidirectional` (B, T) (early fusion's image slots under prefix attention, else None) and
        `before_block` (cross fusion's cross-attention, its image keys and values computed once
        here and reused for every decoded token; else None). `check_slots=False` skips the slot
        count check (for batches checked on the CPU)."""
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        if check_slots:
            check_slot_counts(image_mask, self.prompt_slots)
        image = self.encode_images(pixel_values, image_features)  # (B, M, C)
        if self.config.fusion == "cross":
            kv = {i: self.cross[str(i)].image_kv(image) for i in self.config.cross_layers}

            def before_block(i: int, x: torch.Tensor) -> torch.Tensor:
                return self.cross[str(i)](x, kv[i]) if i in kv else x

            return {"inputs_embeds": self.gpt.wte(input_ids), "bidirectional": None, "before_block": before_block}
        # The slot id may lie outside the GPT vocabulary; its embedding is overwritten anyway.
        token_embeds = self.gpt.wte(input_ids.masked_fill(image_mask, 0))  # (B, T, C)
        return {"inputs_embeds": fuse_image_embeddings(token_embeds, image_mask, image),
                "bidirectional": image_mask if self.config.attention == "prefix" else None, "before_block": None}

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None,
              check_slots: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Early fusion: token embeddings with the images put in (B, T, C), and the tokens that
        attend to each other bidirectionally (B, T): the image slots under prefix attention, else None."""
        if self.config.fusion != "early":
            raise ValueError("embed() is early fusion's; a cross-fusion VLM reads its image in fuse()")
        fused = self.fuse(input_ids, pixel_values, image_features, check_slots)
        return fused["inputs_embeds"], fused["bidirectional"]

    def hidden_states(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, cache=None,
                      image_features: torch.Tensor | None = None, check_slots: bool = True) -> torch.Tensor:
        """The GPT's final-norm hidden states (B, T, C) with the images fused in; arguments as in `forward`."""
        return self.gpt.hidden_states(attention_mask=attention_mask, cache=cache,
                                      **self.fuse(input_ids, pixel_values, image_features, check_slots))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, loss_per: str = "token",
                label_positions: torch.Tensor | None = None, slots_per_row: int | None = None) -> VLMOutput:
        """input_ids (B, T), pixel_values (B, 3, H, W) or image_features (B, 1+N, Dv) (see
        `vit_features`), attention_mask (B, T), labels (B, T).

        labels hold token ids where the model is supervised and -100 elsewhere, aligned with
        input_ids; the shift (position t predicts token t+1) happens here and nowhere else.
        The loss is the mean over all supervised tokens of the batch (`loss_per="token"`), or
        over rows of each row's mean (`"example"`: a one-word answer counts as much as a caption).
        Only supervised positions go through the LM head, and `linear_cross_entropy` forms the
        loss and its gradients without keeping logits: with labels, `logits` is None.

        From `VQACollator`, which builds right-padded batches on the CPU: label_positions (K,),
        where labels[:, 1:] is supervised as flat indices into (B, T-1), and slots_per_row, the
        image slots it counted in every row (checked here against the adapter's M, for free).
        With them nothing in the forward pass or the loss waits for the device (no `.item()`, no
        boolean indexing): the slot and target checks ran on the CPU, and the padding mask is left
        out, since right padding never reaches a real token under causal attention.
        """
        if slots_per_row is not None and slots_per_row != self.prompt_slots:
            raise SlotCountError(f"the batch has {slots_per_row} <|image|> slots per row but this model's prompts "
                                 f"hold {self.prompt_slots}; build the collator's PromptBuilder with the model's "
                                 "prompt_slots")
        collated = label_positions is not None
        hidden = self.hidden_states(input_ids, pixel_values, None if collated else attention_mask,
                                    image_features=image_features, check_slots=slots_per_row is None)  # (B, T, C)
        if labels is None:
            return VLMOutput(loss=None, logits=self.gpt.logits(hidden))
        targets = labels[:, 1:]  # (B, T-1)
        keep = targets != IGNORE_INDEX  # (B, T-1)
        if not collated:
            label_positions = keep.flatten().nonzero().squeeze(1)  # (K,): waits for the device
        n = label_positions.numel()
        if n == 0:
            raise ValueError("no supervised tokens in this batch: every label is -100")
        weights = None
        if loss_per == "example":
            per_row = keep.sum(1, keepdim=True)  # (B, 1)
            rows = (per_row > 0).sum()
            weights = (1.0 / (per_row.clamp_min(1) * rows)).expand_as(keep).flatten().index_select(0, label_positions)
        elif loss_per != "token":
            raise ValueError(f"loss_per must be 'token' or 'example', got {loss_per!r}")
        C = hidden.shape[-1]
        picked = hidden[:, :-1].reshape(-1, C).index_select(0, label_positions)  # (K, C)
        target_ids = self.gpt.output_targets(targets.flatten().index_select(0, label_positions))  # (K,)
        restricted = self.config.gpt.output_tokens is not None
        # Mapped ids lie in [-1, K): under a restricted head this one read is the whole range check.
        if not collated and restricted and bool((target_ids < 0).any()):
            raise ValueError("a label token is not among this model's output tokens (GPTConfig.output_tokens); "
                             "train with --output-vocab data to score the training data's tokens")
        loss = linear_cross_entropy(picked, self.gpt.output_weight(), target_ids, weights,
                                    check=not collated and not restricted)
        return VLMOutput(loss=loss, logits=None, num_tokens=n)

    # ---- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 config: GenerationConfig = GenerationConfig()) -> list[list[int]]:
        """New token ids per row for left-padded prompts (B, T) (with image slots under early fusion)."""
        return generation.generate(self.gpt, attention_mask=attention_mask, config=config,
                                   **self.fuse(input_ids, pixel_values))

    def answer(self, image, question: str, **kwargs) -> str:
        """Answer one question about one image (PIL image, path, array or tensor).
        Keyword arguments are GenerationConfig fields (max_new_tokens, temperature, ...)."""
        return self.answer_batch([image], [question], **kwargs)[0]

    def answer_batch(self, images, questions: list[str], **kwargs) -> list[str]:
        """Answer one question per image, generated together (left-padded); keyword arguments as in `answer`."""
        return generation.vlm_generate_text(self, images, questions, GenerationConfig.from_kwargs(kwargs))

    def caption(self, image, **kwargs) -> str:
        """Caption one image (the prompt without a question); keyword arguments as in `answer`."""
        return self.caption_batch([image], **kwargs)[0]

    def caption_batch(self, images, **kwargs) -> list[str]:
        """Caption each image, generated together; keyword arguments as in `answer`."""
        if isinstance(images, (str, bytes)) or not isinstance(images, Iterable):
            raise PromptError(f"caption_batch takes a list of images, got {type(images).__name__}; for one image "
                              "use caption()")
        images = list(images)  # any iterable, a generator too
        return generation.vlm_generate_text(self, images, [None] * len(images), GenerationConfig.from_kwargs(kwargs))

    def stream(self, image, question: str | None = None, **kwargs):
        """Iterator of text pieces of the answer (or the caption when question is None)."""
        batch = generation.vlm_prompts(self, [image], [question])
        with torch.no_grad():
            fused = self.fuse(batch["input_ids"], batch["pixel_values"])
        return generation.stream_text(self.gpt, config=GenerationConfig.from_kwargs(kwargs), **fused)
