"""Pure tensor kernels: no nn.Module, no transformers. The only home of custom autograd."""

from lorakit.kernels.lora_linear import LoraLinearFunction, lora_linear
from lorakit.kernels.poly_attention import poly_attention

__all__ = ["LoraLinearFunction", "lora_linear", "poly_attention"]
