"""GGUF blocks -> lorakit's packed tensors, per tensor (issue 29: a GGUF model stays quantised; ``train.gguf_packed``).

GGUF block types that are exactly one of lorakit's packed formats (``kernels.quantize``):

    Q4_0   blocks of 32, fp16 d:            w = d (q - 8)        int4 g32, scale d, zero -8 d
    Q4_1   blocks of 32, fp16 d, m:         w = d q + m          int4 g32, scale d, zero m
    Q4_K   256 = 8 x 32, 6-bit sc, mn:      w = d sc q - dmin mn int4 g32, scale d sc, zero -dmin mn
    Q8_0   blocks of 32, fp16 d, int8 q:    w = d q              int8 g32, scale d
    Q6_K   256 = 16 x 16, int8 sc:          w = d sc (q - 32)    int8 g16, scale d sc

The codes are unpacked from the file's nibble order (Q4_0: the low nibbles of a block's 16 bytes are its elements
0..15, the high ones 16..31) and packed again in lorakit's (the even column in the high nibble); the scales are
computed in float32 as gguf-py's ``dequantize`` computes them, so the packed weight dequantised in float32 is
exactly ``gguf.quants.dequantize``'s values (``q * scale + zero`` rounds as gguf-py's ``d * q + m`` does).
transformers' per-tensor fix (``TENSOR_PROCESSORS``) is applied to the packed rows where it is a pure row
permutation (the Llama q/k reverse permutation: whole rows move, so each row's blocks move with it), found by
running the processor on a probe of row numbers; any other fix, and any other block type (Q5_*, F16, ...), goes the
dequantise -> cast to the base dtype -> quantise way, as a model directory is packed.
"""

from __future__ import annotations

import numpy as np
import torch


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _q4_codes(qs: np.ndarray) -> np.ndarray:
    """[n, 16 k] bytes of GGUF 4-bit blocks -> [n, 32 k] codes: per 16 bytes, the low nibbles then the high ones."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(15)).reshape(n, -1)


def _q4_0(blocks):
    d = _f16(blocks[:, :2]).reshape(-1)
    return _q4_codes(blocks[:, 2:]), d[:, None], (-8 * d)[:, None]


def _q4_1(blocks):
    return _q4_codes(blocks[:, 4:]), _f16(blocks[:, :2]), _f16(blocks[:, 2:4])


def _q4_k(blocks):
    from gguf.quants import Q4_K

    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
    qs = blocks[:, 16:].reshape(n, -1, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & np.uint8(15)).reshape(n, 256)
    return codes, d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))


def _q8_0(blocks):
    return np.ascontiguousarray(blocks[:, 2:]).view(np.int8), _f16(blocks[:, :2]), None


def _q6_k(blocks):
    n = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16(blocks[:, 208:210])
    ql = ql.reshape(n, -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & np.uint8(0x0F)).reshape(n, -1, 32)
    qh = qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(0x03)).reshape(n, -1, 32)
    q = ((ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(n, 256)
    return q, d * scales, None


# GGML type name -> (lorakit format name, group size, block reader: [n_blocks, type_size] bytes -> (codes, scale, zero))
EXACT = {"Q4_0": ("int4", 32, _q4_0), "Q4_1": ("int4", 32, _q4_1), "Q4_K": ("int4", 32, _q4_k),
         "Q8_0": ("int8", 32, _q8_0), "Q6_K": ("int8", 16, _q6_k)}


def maps_exactly(type_name: str, fmt) -> bool:
    """Whether a GGML block type is exactly the packed format ``fmt`` (no rounding)."""
    from lorakit.kernels.quantize import Int4Format, Int8Format

    entry = EXACT.get(type_name)
    if entry is None:
        return False
    name, group, _ = entry
    if name == "int4":
        return isinstance(fmt, Int4Format) and fmt.group_size == group
    return isinstance(fmt, Int8Format) and fmt.group_size == group


def repack(raw: np.ndarray, type_name: str, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """The raw bytes of a [rows, cols] GGUF tensor of an ``EXACT`` type -> lorakit's tensors (qweight, scale[,
    zero]), rows in the file's order."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from lorakit.kernels.quantize import pack_nibbles

    name, group, read = EXACT[type_name]
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    codes, scale, zero = read(raw.reshape(-1, type_size))
    codes = torch.from_numpy(np.ascontiguousarray(codes)).reshape(rows, cols)
    out = {"qweight": pack_nibbles(codes) if name == "int4" else codes.to(torch.int8),
           "scale": torch.from_numpy(np.ascontiguousarray(scale, np.float32)).reshape(rows, cols // group)}
    if name == "int4":
        out["zero"] = torch.from_numpy(np.ascontiguousarray(zero, np.float32)).reshape(rows, cols // group)
    return out


def row_permutation(processor, name: str, rows: int) -> np.ndarray | None:
    """The row order transformers' fix gives a [rows, ...] tensor ``name`` (out[i] = in[perm[i]]), or None where the
    fix is not a pure row permutation (it changes values, shapes or names): found by running it on a probe whose
    rows are their own numbers."""
    probe = np.stack([np.arange(rows, dtype=np.float64), -np.arange(rows, dtype=np.float64) - 0.5], axis=1)
    try:
        result = processor.process(weights=probe.copy(), name=name)
    except Exception:  # noqa: BLE001 - a fix that needs the real tensor: not a permutation
        return None
    got = np.asarray(result.weights)
    if result.name != name or got.shape != probe.shape:
        return None
    perm = got[:, 0]
    if not np.array_equal(perm, np.round(perm)) or not np.array_equal(np.sort(perm), probe[:, 0]):
        return None
    perm = perm.astype(np.int64)
    return perm if np.array_equal(got, probe[perm]) else None


