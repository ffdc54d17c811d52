"""LoRA adapters: configuration, the adapted layer (a frozen weight's ``storage`` plus adapters, each with its
``variants`` strategy: plain LoRA, DoRA, PiSSA, CE-LoRA), attaching to a model, named adapters, PEFT-format files,
quantised frozen weights (``quantize``: int8, NF4, int4)."""

from lorakit.adapters.attach import (
    active_adapters,
    adapter_names,
    attach,
    delete_adapter,
    disabled,
    is_attached,
    lora_layers,
    merge,
    set_adapter,
    summary,
    unload,
    unmerge,
)
from lorakit.adapters.combine import add_weighted_adapter
from lorakit.adapters.config import CeloraConfig, LoraConfig, NormControl
from lorakit.adapters.io import load_adapter, read_config, save_adapter
from lorakit.adapters.layer import LoraLinear
from lorakit.adapters.quantize import quantize

__all__ = [
    "CeloraConfig", "LoraConfig", "NormControl", "LoraLinear", "active_adapters", "adapter_names", "add_weighted_adapter", "attach", "delete_adapter",
    "disabled", "is_attached", "load_adapter", "lora_layers", "merge", "quantize", "read_config", "save_adapter", "set_adapter",
    "summary", "unload", "unmerge",
]
