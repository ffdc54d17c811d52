"""Writing a GGUF file one tensor at a time, with gguf-py's writer (llama.cpp's own Python package).

Every tensor's name, shape and type is declared first (the header, the key-values and the tensor table are written
before any data), then each tensor is made, encoded and written in turn, so the peak memory is one tensor, never the
model. The file is written under a temporary name beside the output and renamed onto it when complete
(``files.write_atomic``): a failed or interrupted export leaves no partial file.

Encodings (``--outtype``): f32, f16, bf16, q8_0 (blocks of 32 with an f16 scale), q4_0 (blocks of 32, 4 bits and an
f16 scale), as llama.cpp defines them (gguf-py's ``quants.quantize``). As llama.cpp's converter does, one-dimensional
tensors (norms, biases) stay f32, and a weight whose rows are not whole blocks is written f16; with q4_0 the token
embeddings and the output head are q8_0 (llama-quantize keeps those at higher precision for the same reason: they
carry the most error per bit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.errors import ExportError
from lorakit.files import write_atomic

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ROWS_ELEMENTS = 1 << 22  # rows encoded at a time: ~16 MB of fp32 temporaries (gguf-py's quantize makes several)
HIGH_PRECISION = ("token_embd.weight", "output.weight")


def qtype_of(outtype: str):
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[outtype]


def file_type_of(outtype: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0}[outtype]


def tensor_qtype(name: str, shape: tuple[int, ...], outtype: str):
    """The type a tensor is written in under ``outtype`` (see the module docstring)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2:
        return Q.F32
    if outtype == "q4_0" and name in HIGH_PRECISION:
        outtype = "q8_0"
    qtype = qtype_of(outtype)
    block = GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16


def nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def encode(values: np.ndarray, qtype) -> np.ndarray:
    """``values`` (float32, any shape) in ``qtype``: the bytes llama.cpp reads (f32/f16 as arrays of their type)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    values = np.ascontiguousarray(values, np.float32)
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        if values.size and np.abs(values).max() > np.finfo(np.float16).max:
            raise ExportError(f"a weight reaches {np.abs(values).max():.4g}, past float16's range (65504); "
                              "use --outtype bf16 (or f32)")
        return values.astype(np.float16)
    rows = values.reshape(-1, values.shape[-1])
    step = max(1, ROWS_ELEMENTS // max(1, rows.shape[1]))
    return np.concatenate([quants.quantize(rows[i:i + step], qtype) for i in range(0, rows.shape[0], step)])


@dataclass
class Planned:
    """One tensor of the output: its name, shape (rows first, as numpy), type, and how to make its bytes."""

    name: str
    shape: tuple[int, ...]
    qtype: Any
    make: Callable[[], np.ndarray]  # the encoded tensor (``encode``'s result, or bytes copied as stored)


def write_gguf(path: Path, arch: str, metadata: Callable[[Any], None], tensors: Iterable[Planned]) -> None:
    """Write ``path`` (atomically): ``metadata(writer)`` adds the key-values, then each planned tensor in order."""
    import gguf

    planned = list(tensors)
    names = [p.name for p in planned]
    if len(set(names)) != len(names):
        raise ExportError(f"two tensors would be named {next(n for n in names if names.count(n) > 1)!r}")

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        metadata(writer)
        for p in planned:
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes(p.shape, p.qtype), raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in planned:
            data = p.make()
            if data.nbytes != nbytes(p.shape, p.qtype):
                raise ExportError(f"{p.name}: {data.nbytes:,} bytes made, {nbytes(p.shape, p.qtype):,} declared")
            writer.write_tensor_data(data)
            del data
        writer.close()

    write_atomic(path, write)
