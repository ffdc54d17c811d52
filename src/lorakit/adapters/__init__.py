"""LoRA adapters: configuration, the adapted layer, attaching to a model, PEFT-format files."""

from lorakit.adapters.attach import attach, disabled, is_attached, lora_layers, merge, summary, unload, unmerge
from lorakit.adapters.config import LoraConfig
from lorakit.adapters.io import load_adapter, read_config, save_adapter
from lorakit.adapters.layer import LoraLinear

__all__ = [
    "LoraConfig", "LoraLinear", "attach", "disabled", "is_attached", "load_adapter", "lora_layers",
    "merge", "read_config", "save_adapter", "summary", "unload", "unmerge",
]
