"""mmfusion: a from-scratch ViT and GPT-2 joined by early fusion."""

from .adapter import ViTAdapter
from .config import AdapterConfig, ConfigError, GPTConfig, ViTConfig, VLMConfig
from .gpt import GPT
from .vit import ViT
from .vlm import VLM

__version__ = "0.1.0"
__all__ = ["ViT", "GPT", "VLM", "ViTAdapter", "ViTConfig", "GPTConfig", "VLMConfig", "AdapterConfig",
           "ConfigError", "__version__"]
