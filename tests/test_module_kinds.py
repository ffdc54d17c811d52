"""module_kinds: what lorakit adapts, and an adapted layer told apart without importing adapters."""

import torch
from transformers.pytorch_utils import Conv1D

from lorakit.adapters.layer import LoraLinear
from lorakit.module_kinds import is_adaptable, is_adapted, linear_shape


def test_kinds_and_shapes():
    linear, conv = torch.nn.Linear(6, 4), Conv1D(4, 6)  # Conv1D(nf=out, nx=in)
    assert is_adaptable(linear) and is_adaptable(conv) and not is_adaptable(torch.nn.Embedding(5, 3))
    assert linear_shape(linear) == (6, 4) == linear_shape(conv)
    adapted = LoraLinear(torch.nn.Linear(6, 4), 2, 4.0)
    assert is_adapted(adapted) and not is_adapted(linear) and not is_adaptable(adapted)
