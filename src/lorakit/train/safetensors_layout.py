"""The safetensors layout lorakit writes: dtype names and the header, in one place.

A safetensors file is a little-endian u64 header length, a JSON header (``__metadata__`` of strings, then per
tensor its dtype name, shape and ``[start, end)`` byte offsets into the data that follows), padded here with spaces
to a multiple of 8 bytes (the format's alignment), then the tensors' bytes in order. ``header_bytes`` writes that
prefix for the tensors a writer then streams one by one (``train.gguf_convert``, ``train.gguf_packed``,
``train.merge_stream``); ``train.quantized_load`` reads with ``SAFETENSORS_DTYPE``'s inverse.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping

import torch

SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.float64: "F64",
                     torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8",
                     torch.bool: "BOOL"}  # safetensors' dtype names


def header_bytes(tensors: Iterable[tuple[str, str | torch.dtype, list[int] | tuple[int, ...], int]],
                 metadata: Mapping[str, str] | None = None) -> bytes:
    """The length-prefixed, 8-byte-aligned header for ``tensors`` (name, dtype or its safetensors name, shape,
    bytes), laid out one after another in that order; ``metadata`` (strings) goes into ``__metadata__`` with
    ``format: pt``."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": SAFETENSORS_DTYPE[dtype] if isinstance(dtype, torch.dtype) else dtype,
                        "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text
