"""Ground floor: what kind of layer a module is (lorakit adapts nn.Linear and GPT-2's Conv1D)."""

from __future__ import annotations

from torch import nn

try:  # GPT-2 style Conv1D: weight stored as [in, out], y = x W + b
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment]


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_f, out_f = module.weight.shape  # Conv1D
    return in_f, out_f


def is_adapted(module: nn.Module) -> bool:
    """A lorakit adapted layer (``adapters.layer.LoraLinear``: a base_layer and per-adapter factors), told by shape
    so that packages below ``adapters`` need not import it."""
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and isinstance(getattr(module, "base_layer", None),
                                                                                        nn.Module)
