"""Pure tensor kernels: no nn.Module, no transformers. The only home of custom autograd."""

from lorakit.kernels.lora_linear import LoraLinearFunction, lora_linear

__all__ = ["LoraLinearFunction", "lora_linear"]
