"""Frozen, validated configuration dataclasses for every part of mmfusion.

Each model gets only its own config. Configs round-trip through JSON
(`to_dict` / `from_dict`), validate themselves in `__post_init__`, and expose
derived values as properties, never as stored fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, json_kind
from .tokenizer import EOT_ID, IMAGE_ID

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
RESAMPLE_FILTERS = ("bicubic", "bilinear")
ATTENTION_INITS = ("mimetic", "normal")  # how a fresh ViT's attention starts: mmfusion.layers.mimetic_init_, or N(0, 0.02)


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{type(cfg).__name__}.{name} must be a positive integer, got {value!r}")


# A config whose weights would not fit in any machine's memory is refused before anything is
# allocated (a block_size of 1e12 would otherwise fail deep inside torch, or swap for minutes).
MAX_PARAMETERS = 20_000_000_000  # 80 GB in fp32; the largest preset (ViT-B, GPT-2 small) is ~0.1B


def _check_size(cfg: Any, sizes: str) -> None:
    n = cfg.parameter_count
    if n > MAX_PARAMETERS:
        raise ConfigError(f"{type(cfg).__name__} would hold about {n:.3g} parameters ({4 * n / 1e9:.3g} GB in fp32; "
                          f"at most {MAX_PARAMETERS:.0e} are allowed): {sizes}; check these sizes")


def check_number(label: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Raise ConfigError unless `value` is a finite number (an int if `integer`; never a bool) in
    the range. Every numeric setting goes through here: NaN fails `x < 0` and `x <= 0` alike, and
    inf passes them, so range checks written as comparisons let both through."""
    if low == 0 and low_open and high is None:
        span = "positive"
    elif high is None:
        span = f"{'>' if low_open else '>='} {low}" if low is not None else ""
    elif low is None:
        span = f"{'<' if high_open else '<='} {high}"
    else:
        span = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        what = "an integer" if integer else "a finite number"
        raise ConfigError(f"{label} must be {span + ' (' + what + ')' if span else what}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ConfigError(f"{label} must be {span}, got {value!r}")


def _flags(cfg: Any) -> None:
    """Every field annotated `bool` must be one: "false", "no" and 0 would pass a truthiness test
    (a non-empty string is true), and 1 or 0 in JSON means a hand-edited file."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.type in ("bool", bool) and not isinstance(value, bool):
            raise ConfigError(f"{type(cfg).__name__}.{f.name} must be true or false (a bool), got {value!r}")


def _probability(cfg: Any, *names: str) -> None:
    for name in names:
        check_number(f"{type(cfg).__name__}.{name}", getattr(cfg, name), 0, 1, high_open=True)


def _check_object(what: str, data: Any) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{what} settings must be a JSON object of name: value pairs, not {json_kind(data)}")


class _JSONMixin:
    """JSON round trip shared by every config; nested configs become nested dicts."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        _check_object(cls.__name__, data)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields: {unknown}")
        kwargs = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                continue
            value = data[f.name]
            if isinstance(value, list):  # JSON has no tuples
                value = tuple(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


@dataclass(frozen=True)
class ViTConfig(_JSONMixin):
    """Vision Transformer: patchify, prepend CLS, add learned positions, bidirectional blocks.

    `label_grid` g > 1 makes the classifier label each cell of a g x g grid of image regions
    (logits (B, g*g, num_classes) from the mean of each cell's patch tokens) instead of the
    whole image from CLS: a dense objective whose patch tokens keep what is where, which is
    what an adapter feeding the GPT needs (see `mmfusion.data.scenes.load_scenes_cells`).

    `final_norm` says where the last LayerNorm applies: "all" tokens (HF ViT's
    `last_hidden_state` is normalized) or only the pooled "cls" token (CLIP's
    `post_layernorm`). `pre_norm` adds CLIP's LayerNorm right after the embeddings.
    """

    image_size: int = field(default=224, metadata={"help": "input images are resized to this square size"})
    patch_size: int = field(default=16, metadata={"help": "side of the square patches"})
    num_channels: int = 3
    n_layer: int = field(default=12, metadata={"help": "transformer blocks"})
    n_head: int = field(default=12, metadata={"help": "attention heads"})
    n_embd: int = field(default=768, metadata={"help": "width"})
    intermediate_size: int | None = None  # None: 4 * n_embd
    num_classes: int = 1000  # 0: no classifier head
    dropout: float = field(default=0.0, metadata={"help": "dropout in the blocks"})
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    qkv_bias: bool = True
    patch_bias: bool = True
    pre_norm: bool = False
    final_norm: str = "all"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    label_grid: int = 1  # 1: one label per image (from CLS); g > 1: one label per cell of a g x g grid
    # What the whole-image classifier reads: the "cls" token (ViT, CLIP) or the "mean" of the
    # patch tokens (global average pooling).
    pool: str = "cls"
    # How a fresh ViT's attention weights start: "mimetic" (mmfusion.layers.mimetic_init_, which
    # learned faster than transformers' ViT on digits and easy-VQA, not on the scenes' per-cell
    # labels) or "normal" (transformers' N(0, 0.02)). Loaded weights replace either.
    attention_init: str = field(default="mimetic", metadata={
        "help": "attention weights of a fresh ViT: mimetic (start like trained attention) or normal "
                "(transformers' N(0, 0.02))", "choices": ATTENTION_INITS})
    # The spread of a fresh ViT's patch projection. 0.072 (1/sqrt(3*8*8)) learned much faster than
    # transformers' 0.02 on easy-VQA and ended higher on the scenes; on 8x8 digits it is slower than
    # 0.02 early but ahead of transformers' ViT, where 0.5 (1/sqrt(fan_in)) was not (docs/experiments.md).
    patch_init_std: float = field(default=0.072, metadata={
        "help": "std of a fresh ViT's patch projection weights, N(0, std) (transformers: 0.02)"})
    # How images reach image_size x image_size, as the weights were trained: "square" resizes the
    # whole image (ViT's processor); "shortest_edge" resizes the short side to resize_size (None:
    # image_size) keeping the aspect ratio, then crops the centre (CLIP's). The resampling filter
    # is the processor's: bicubic (mmfusion's own models, CLIP) or bilinear (ViT).
    resize: str = "square"
    resize_size: int | None = None
    resample: str = "bicubic"
    # The classifier's class names, in id order (from the training data, or an imported model's
    # id2label); None: unnamed. Exported as transformers' id2label.
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _positive(self, "image_size", "patch_size", "num_channels", "n_layer", "n_head", "n_embd", "label_grid")
        _flags(self)
        if self.resize not in ("square", "shortest_edge"):
            raise ConfigError(f"ViTConfig.resize must be 'square' or 'shortest_edge', got {self.resize!r}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ConfigError(f"ViTConfig.resample must be one of {sorted(RESAMPLE_FILTERS)}, got {self.resample!r}")
        if self.resize_size is not None:
            _positive(self, "resize_size")
            # at least the crop; at most 4x it (processors use 1-1.15x), which bounds the resized image
            check_number("ViTConfig.resize_size", self.resize_size, self.image_size, 4 * self.image_size,
                         integer=True)
        if self.intermediate_size is not None:
            _positive(self, "intermediate_size")
        check_number("ViTConfig.num_classes", self.num_classes, 0, integer=True)  # True is an int, not a count
        if self.class_names is not None and (
                not isinstance(self.class_names, (tuple, list)) or len(self.class_names) != self.num_classes
                or not all(isinstance(n, str) and n for n in self.class_names)
                or len(set(self.class_names)) != len(self.class_names)):  # label2id would merge duplicates
            raise ConfigError(f"ViTConfig.class_names must be None or {self.num_classes} distinct non-empty strings "
                              f"(one per class), got {str(self.class_names)[:80]}")
        _probability(self, "dropout")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"ViTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "pick a width that is a multiple of the head count"
            )
        if self.patch_size > self.image_size:
            raise ConfigError(f"ViTConfig.patch_size={self.patch_size} is larger than image_size={self.image_size}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"ViTConfig.image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"ViTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.final_norm not in ("all", "cls"):
            raise ConfigError(f"ViTConfig.final_norm must be 'all' or 'cls', got {self.final_norm!r}")
        if self.attention_init not in ATTENTION_INITS:
            raise ConfigError(f"ViTConfig.attention_init must be 'mimetic' or 'normal', got {self.attention_init!r}")
        check_number("ViTConfig.patch_init_std", self.patch_init_std, 0, low_open=True)
        if self.pool not in ("cls", "mean"):
            raise ConfigError(f"ViTConfig.pool must be 'cls' or 'mean', got {self.pool!r}")
        if not all(isinstance(v, (tuple, list)) for v in (self.image_mean, self.image_std)) or \
                len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ConfigError("ViTConfig.image_mean and image_std need one value per channel")
        for mean, std in zip(self.image_mean, self.image_std):
            check_number("ViTConfig.image_mean", mean)
            check_number("ViTConfig.image_std", std, 0, low_open=True)
        check_number("ViTConfig.layer_norm_eps", self.layer_norm_eps, 0, low_open=True)
        if self.grid_size % self.label_grid:
            raise ConfigError(f"ViTConfig.label_grid={self.label_grid} does not divide the "
                              f"{self.grid_size}x{self.grid_size} patch grid")
        _check_size(self, f"image_size={self.image_size}, patch_size={self.patch_size}, n_embd={self.n_embd}, "
                          f"n_layer={self.n_layer}, intermediate_size={self.mlp_dim}, num_classes={self.num_classes}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    @property
    def parameter_count(self) -> int:
        """Weights, biases and norms left out: (patches + CLS) positions, patch projection, blocks, head."""
        c = self.n_embd
        return ((self.num_patches + 1) * c + self.num_channels * self.patch_size**2 * c
                + self.n_layer * (4 * c * c + 2 * c * self.mlp_dim) + c * self.num_classes)


def _check_output_tokens(ids: Any, vocab_size: int) -> None:
    if not isinstance(ids, tuple) or not ids:
        raise ConfigError("GPTConfig.output_tokens must be a non-empty list of token ids or null, "
                          f"got {reprlib.repr(ids)}")
    for i in ids:
        check_number("GPTConfig.output_tokens[...]", i, 0, vocab_size, high_open=True, integer=True)
    if any(a >= b for a, b in zip(ids, ids[1:])):
        raise ConfigError("GPTConfig.output_tokens must be ascending without repeats; sort and deduplicate them")


@dataclass(frozen=True)
class GPTConfig(_JSONMixin):
    """GPT-2: learned positions, pre-LN causal blocks, LM head tied to the token embedding."""

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int | None = None  # None: 4 * n_embd
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"
    bias: bool = True
    # Std of the Normal init of a fresh GPT (transformers' GPT2Config.initializer_range). GPT-2's
    # 0.02 suits width 768; the width-128 gpt-tiny preset uses 0.1.
    initializer_range: float = 0.02
    # The token ids the LM head scores, ascending (None: the whole vocabulary). A fresh GPT trained
    # on a closed vocabulary (a dataset's answers and captions) needs a few dozen of its 50,257 rows:
    # scoring only those makes the loss and decoding steps cheap, and the rest can never be produced.
    output_tokens: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        _flags(self)
        if isinstance(self.output_tokens, list):
            object.__setattr__(self, "output_tokens", tuple(self.output_tokens))
        if self.output_tokens is not None:
            _check_output_tokens(self.output_tokens, self.vocab_size)
        check_number("GPTConfig.initializer_range", self.initializer_range, 0, low_open=True)
        check_number("GPTConfig.layer_norm_eps", self.layer_norm_eps, 0, low_open=True)
        if self.intermediate_size is not None:
            _positive(self, "intermediate_size")
        _probability(self, "dropout")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "pick a width that is a multiple of the head count"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"GPTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        _check_size(self, f"vocab_size={self.vocab_size}, block_size={self.block_size}, n_embd={self.n_embd}, "
                          f"n_layer={self.n_layer}, intermediate_size={self.mlp_dim}")

    @property
    def parameter_count(self) -> int:
        """Weights only (tied head): token and position tables and the blocks."""
        c = self.n_embd
        return (self.vocab_size + self.block_size) * c + self.n_layer * (4 * c * c + 2 * c * self.mlp_dim)

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size or 4 * self.n_embd


@dataclass(frozen=True)
class AdapterConfig(_JSONMixin):
    """ViT hidden states -> GPT-width image tokens.

    `layer` picks the ViT layer whose output feeds the adapter (-1: the final,
    normalized output of `forward_features`; k >= 0: block k's raw output).
    `pixel_shuffle` s > 1 merges each s x s group of patches into one token (s^2 fewer
    tokens) before the projection, by `merge`: "concat" (pixel shuffle: s^2 times wider,
    every patch kept) or "mean" (average pooling: same width; the feature a ViT trained
    with `label_grid` classifies each cell from).
    `position_embedding` adds a learned vector per image token before the projection, so the
    GPT can tell image tokens apart even when the ViT features carry little of where they
    came from (as those of a ViT pretrained on per-cell labels, `ViTConfig.label_grid`).
    On scenes it decides whether captions are learned at all (docs/experiments.md).
    """

    projection: str = field(default="mlp", metadata={"help": "adapter projection", "choices": ("linear", "mlp")})
    layer: int = field(default=-1, metadata={"help": "ViT layer feeding the adapter (-1: last)"})
    keep_cls: bool = field(default=False, metadata={"help": "keep the ViT's CLS token as an image token"})
    pixel_shuffle: int = field(default=1, metadata={"help": "merge s x s patches into one image token"})
    merge: str = field(default="concat", metadata={
        "help": "how pixel shuffle merges patches: concatenated, or their mean", "choices": ("concat", "mean")})
    dropout: float = 0.0
    position_embedding: bool = field(default=False, metadata={
        "help": "a learned embedding per image token, added before the projection"})

    def __post_init__(self) -> None:
        if self.projection not in ("linear", "mlp"):
            raise ConfigError(f"AdapterConfig.projection must be 'linear' or 'mlp', got {self.projection!r}")
        if self.merge not in ("concat", "mean"):
            raise ConfigError(f"AdapterConfig.merge must be 'concat' or 'mean', got {self.merge!r}")
        _positive(self, "pixel_shuffle")
        _probability(self, "dropout")
        _flags(self)
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < -1:
            raise ConfigError(f"AdapterConfig.layer must be -1 (last) or a block index >= 0, got {self.layer!r}")

    def num_tokens(self, vit: ViTConfig) -> int:
        """Image tokens this adapter yields for a ViT of config `vit`."""
        if vit.grid_size % self.pixel_shuffle:
            raise ConfigError(
                f"AdapterConfig.pixel_shuffle={self.pixel_shuffle} does not divide the ViT patch grid "
                f"({vit.grid_size}x{vit.grid_size})"
            )
        return vit.num_patches // self.pixel_shuffle**2 + int(self.keep_cls)


@dataclass(frozen=True)
class VLMConfig(_JSONMixin):
    """Vision-language model: ViT -> adapter -> image tokens, fused into the GPT.

    `fusion` "early": the image tokens are spliced into the GPT's token embeddings at
    `<|image|>` slots; `attention` is then "causal" (image tokens see only earlier image tokens)
    or "prefix" (image tokens see each other bidirectionally; text stays causal).
    `fusion` "cross" (late fusion, Flamingo's gated cross-attention): the text holds no image
    slots; before every `cross_every`-th GPT block a cross-attention block lets the text attend to
    the image tokens, its output scaled by tanh of a gate that starts at 0 (so the GPT starts
    unchanged). `attention` is then "causal" (there are no image slots to attend to each other).
    """

    vit: ViTConfig = field(default_factory=ViTConfig)
    gpt: GPTConfig = field(default_factory=GPTConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    attention: str = "causal"
    image_token_id: int = 50257
    fusion: str = "early"
    cross_every: int = 1

    def __post_init__(self) -> None:
        for name, kind in (("vit", ViTConfig), ("gpt", GPTConfig), ("adapter", AdapterConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"VLMConfig.{name} must be a {kind.__name__}")
        if self.attention not in ("causal", "prefix"):
            raise ConfigError(f"VLMConfig.attention must be 'causal' or 'prefix', got {self.attention!r}")
        if self.fusion not in ("early", "cross"):
            raise ConfigError(f"VLMConfig.fusion must be 'early' or 'cross', got {self.fusion!r}")
        check_number("VLMConfig.cross_every", self.cross_every, 1, self.gpt.n_layer, integer=True)
        # PromptBuilder and the collator always write the tokenizer's <|image|> id into the slots.
        if isinstance(self.image_token_id, bool) or not isinstance(self.image_token_id, int) or \
                self.image_token_id != IMAGE_ID:
            raise ConfigError(f"VLMConfig.image_token_id must be {IMAGE_ID}, the tokenizer's <|image|> id that "
                              f"PromptBuilder writes into the image slots; got {self.image_token_id!r}")
        # Prompts are GPT-2 ids: a smaller table fails on them, a larger head emits ids nothing can decode.
        if self.gpt.vocab_size not in (EOT_ID + 1, IMAGE_ID + 1):
            raise ConfigError(f"VLMConfig.gpt.vocab_size={self.gpt.vocab_size}, but a VLM reads and writes the GPT-2 "
                              f"tokenizer's ids: use vocab_size={EOT_ID + 1} (GPT-2's; {IMAGE_ID + 1} if the "
                              "table has a row for <|image|>)")
        if self.fusion == "cross" and self.attention != "causal":
            raise ConfigError("VLMConfig.attention 'prefix' applies to early fusion's image slots; cross fusion "
                              "has none: use attention='causal'")
        if self.adapter.layer >= self.vit.n_layer:
            raise ConfigError(
                f"AdapterConfig.layer={self.adapter.layer} but the ViT has only {self.vit.n_layer} layers"
            )
        n = self.adapter.num_tokens(self.vit)  # validates pixel_shuffle against the grid
        if n >= self.gpt.block_size and self.fusion == "early":
            raise ConfigError(
                f"{n} image tokens do not fit the GPT context of {self.gpt.block_size} positions; "
                "use pixel_shuffle or a larger block_size"
            )

    @property
    def num_image_tokens(self) -> int:
        """Image tokens the adapter yields for one image."""
        return self.adapter.num_tokens(self.vit)

    @property
    def prompt_slots(self) -> int:
        """`<|image|>` slots in a prompt: the image tokens under early fusion, none under cross."""
        return self.num_image_tokens if self.fusion == "early" else 0

    @property
    def parameter_count(self) -> int:
        """A lower bound: the towers' weights (the adapter and cross-attention left out)."""
        return self.vit.parameter_count + self.gpt.parameter_count

    @property
    def cross_layers(self) -> tuple[int, ...]:
        """The GPT blocks a cross-attention block runs before (cross fusion), else ()."""
        return tuple(range(0, self.gpt.n_layer, self.cross_every)) if self.fusion == "cross" else ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLMConfig:
        _check_object(cls.__name__, data)
        data = dict(data)
        parts = {"vit": ViTConfig, "gpt": GPTConfig, "adapter": AdapterConfig}
        for name, kind in parts.items():
            if name in data and not isinstance(data[name], kind):  # JSON's object, or a config built in Python
                _check_object(f"{cls.__name__}.{name}", data[name])
                data[name] = kind.from_dict(data[name])
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown VLMConfig fields: {unknown}")
        return cls(**data)


# Presets: a small dict, nothing more. "tiny" presets train in minutes on a laptop CPU.
VIT_PRESETS: dict[str, ViTConfig] = {
    # vit-tiny: width 64 trains easy-VQA shapes as well as width 128 per example, at about twice the speed.
    "vit-tiny": ViTConfig(image_size=64, patch_size=8, n_layer=4, n_head=4, n_embd=64, num_classes=24,
                          layer_norm_eps=1e-6),
    "vit-small-patch16-224": ViTConfig(n_layer=12, n_head=6, n_embd=384),
    "vit-base-patch16-224": ViTConfig(),
}
GPT_PRESETS: dict[str, GPTConfig] = {
    # gpt-tiny starts from Normal(0, 0.1), not GPT-2's 0.02 (made for width 768): at width 128 that
    # leaves attention near uniform for long (docs/experiments.md, GPT init scale).
    "gpt-tiny": GPTConfig(block_size=256, n_layer=4, n_head=4, n_embd=128, initializer_range=0.1),
    # GPT-2 small's shapes (124M), fresh. Not named "gpt2": that is the hub id of the pretrained
    # weights, which `--gpt gpt2` imports (a preset would shadow it with random weights).
    "gpt-base": GPTConfig(),
}


def vit_preset(name: str, **overrides: Any) -> ViTConfig:
    if name not in VIT_PRESETS:
        raise ConfigError(f"unknown ViT preset {name!r}; choose from {sorted(VIT_PRESETS)}")
    return VIT_PRESETS[name].replace(**overrides)


def gpt_preset(name: str, **overrides: Any) -> GPTConfig:
    if name not in GPT_PRESETS:
        raise ConfigError(f"unknown GPT preset {name!r}; choose from {sorted(GPT_PRESETS)}")
    return GPT_PRESETS[name].replace(**overrides)
