"""The base model's safetensors checkpoint as stored, read without loading it: which files (the index's shards or
model.safetensors), each tensor's dtype, shape and byte range from the file headers (checked to lie inside the
file), and the dtype most of its floating-point bytes are stored in. ``lorakit merge`` streams from these ranges;
what cannot be read raises ``NotStreamable`` with the reason.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import LorakitError
from lorakit.train.safetensors_layout import SAFETENSORS_DTYPE

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors dtype codes: (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {code: (dtype, dtype.itemsize) for dtype, code in SAFETENSORS_DTYPE.items()}
FLOATS = ("F64", "F32", "F16", "BF16")
CODE = SAFETENSORS_DTYPE


class NotStreamable(LorakitError):
    """The base or the adapter is something the streamed merge cannot reproduce exactly; the message says why."""


@dataclass(frozen=True)
class Stored:
    """One tensor of the base checkpoint: its file, name there, dtype code, shape and absolute byte range."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


# ---------------------------------------------------------------------- reading the base checkpoint
def read_header(path: Path) -> dict[str, Stored]:
    """The tensors of a safetensors file from its header (8 bytes little-endian length, then JSON), checked to lie
    inside the file."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            length = int.from_bytes(fh.read(8), "little")
            if size < 8 or length > min(size - 8, 2**27):
                raise ValueError(f"a header of {length:,} bytes in a {size:,}-byte file")
            header = json.loads(fh.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = (8 + length + int(o) for o in info["data_offsets"])
            if not 8 + length <= begin <= end <= size or not isinstance(info["dtype"], str):
                raise ValueError(f"tensor {name!r} lies outside the file")
            out[name] = Stored(path, name, info["dtype"], tuple(int(d) for d in info["shape"]), begin, end)
        return out
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise NotStreamable(f"{path} is not a readable safetensors file ({exc})") from None


def checkpoint_files(base_dir: Path) -> list[Path]:
    """The base's safetensors files in order: the shards its index names, or model.safetensors."""
    index = base_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = list(dict.fromkeys(str(f) for f in weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise NotStreamable(f"{index} cannot be read ({type(exc).__name__}: {exc})") from None
        if any(Path(f).name != f for f in files):
            raise NotStreamable(f"{index} names shard files outside {base_dir}")
        return sorted(base_dir / f for f in files)
    if (base_dir / SINGLE_NAME).is_file():
        return [base_dir / SINGLE_NAME]
    found = sorted(p.name for p in base_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    raise NotStreamable(f"{base_dir} holds no {SINGLE_NAME} or {INDEX_NAME}"
                        + (f" (its weights: {', '.join(found[:3])})" if found else ""))


def read_checkpoint(base_dir: Path) -> dict[str, Stored]:
    tensors: dict[str, Stored] = {}
    for path in checkpoint_files(base_dir):
        if not path.is_file():
            raise NotStreamable(f"{path}, named in {INDEX_NAME}, does not exist")
        tensors.update(read_header(path))
    return tensors


def storage_dtype(tensors: dict[str, Stored]) -> str | None:
    """The dtype code most of the checkpoint's floating-point bytes are stored in."""
    counts = Counter({})
    for t in tensors.values():
        if t.dtype in FLOATS:
            counts[t.dtype] += t.end - t.start
    return counts.most_common(1)[0][0] if counts else None


def stored_dtype(base_dir: Path) -> torch.dtype | None:
    """The torch dtype the base stores its weights in, from its safetensors headers, else config.json's
    ``dtype`` / ``torch_dtype``; None when neither says (the in-memory merge then loads float32)."""
    try:
        code = storage_dtype(read_checkpoint(base_dir))
        if code is not None:
            return DTYPES[code][0]
    except NotStreamable:
        pass
    try:
        doc = json.loads((base_dir / "config.json").read_text())
        name = doc.get("dtype") or doc.get("torch_dtype")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
