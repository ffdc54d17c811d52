"""A reusable buffer for a weight that exists only for one product: a bf16 weight widened to fp32, a packed one
dequantised.

Filling a fresh 64 MB fp32 tensor costs more than the conversion itself: glibc hands an allocation that large out
as new pages (mmap) and returns them when it is freed, so every ``w.to(torch.float32)`` page-faults and zeroes each
page again. Measured on a 2-core AMD EPYC, W 4096 x 4096: ``wb.float()`` 36 ms, ``buf.copy_(wb)`` into a buffer
that already exists 3.8 ms; against 143 ms for the fp32 product with 512 tokens, that is 25% of the layer's
forward saved. ``scratch(shape, dtype, device)`` returns a view of one buffer per (slot, dtype, device) and
thread, grown to the largest size asked; what it returns is valid until the next ``scratch`` call for the same
slot, so a caller uses it for one product and keeps nothing of it (autograd must not save it: the kernels here save
the stored weight and widen again in the backward). The memory it keeps is one layer's weight per slot (the memory
plan counts it as the widened weight).
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

_local = threading.local()


def scratch(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str,
            slot: str = "weight") -> Tensor:
    """An uninitialised [shape] tensor of ``dtype`` on ``device``, a view of the slot's reusable buffer."""
    device = torch.device(device)
    numel = math.prod(shape)
    if device.type != "cpu":  # the caching allocators of accelerators already reuse their blocks
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (slot, dtype, device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers.pop(key, None)  # (the old one is freed before the new one is made)
        with torch.inference_mode(False):  # a normal tensor: written in place in and out of inference mode
            buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def widened(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``weight.to(dtype)`` written into the scratch buffer (``weight`` itself when it already has ``dtype``)."""
    if weight.dtype == dtype:
        return weight
    return scratch(weight.shape, dtype, weight.device).copy_(weight)


def release() -> None:
    """Free this thread's buffers (after training, before a memory measurement that should not count them)."""
    _local.__dict__.pop("buffers", None)
