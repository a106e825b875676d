"""mmfusion: a from-scratch ViT and GPT-2 joined by early fusion."""

from . import (
    convert,  # noqa: F401  (attaches ViT.from_hf and GPT.from_hf)
    export,  # noqa: F401  (attaches GPT.to_hf, ViT.to_hf and VLM.to_hf)
)
from .adapter import ViTAdapter
from .config import AdapterConfig, GPTConfig, ViTConfig, VLMConfig
from .errors import (
    CheckpointError,
    ConfigError,
    ConversionError,
    DatasetError,
    ImageError,
    MMFusionError,
    NonFiniteLossError,
    NonFiniteOutputError,
    PromptError,
    SlotCountError,
    TokenIdError,
    TokenizerFilesError,
)
from .gpt import GPT
from .vit import ViT
from .vlm import VLM

__version__ = "0.1.0"
__all__ = ["ViT", "GPT", "VLM", "ViTAdapter", "ViTConfig", "GPTConfig", "VLMConfig", "AdapterConfig",
           "MMFusionError", "ConfigError", "CheckpointError", "ConversionError", "DatasetError", "ImageError",
           "PromptError", "SlotCountError", "TokenIdError", "TokenizerFilesError", "NonFiniteLossError",
           "NonFiniteOutputError",
           "__version__"]
