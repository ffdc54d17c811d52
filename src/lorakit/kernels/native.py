"""Compiled code: ``build()`` makes a shared library of a C/C++ source once per machine (``speed.allocator``'s block
cache uses it too), and the dequantisation kernel (``dequant.c``), built with the system's C compiler, loaded
through ctypes, is used where it is vectorised; the PyTorch code in ``kernels.quantize`` stays the reference and the
fallback, and both give the same bits (tests/kernels/test_native_dequant.py).

Why: a packed weight is dequantised twice per layer per step (forward and dX), and PyTorch's elementwise ops each
make a pass over the weight (NF4: indices, lookup, scaling). One C pass, a 16-entry table per block looked up by a
byte shuffle, is faster: a 5632 x 2048 weight through ``QuantFormat.dequantize`` on a 2-core AMD EPYC Zen 4 (median
of 30 calls, 3 interleaved rounds), to bf16: NF4 1.6-2.6 ms against 5.1-6.6 (bitsandbytes' C++ kernel: 0.78 ms),
int4 1.5-2.6 against 12.8-13.3, int8 1.0-1.3 against 1.6-1.9; to fp32: NF4 1.1-1.5 against 6.8-8.0, int4 1.1-1.4
against 7.8-8.4.

The library is compiled with ``$CC`` (else ``cc``) ``-O3 -march=native`` into ``cache_dir()/native/``, under a name
that hashes the source, the compiler's version and the CPU's flags, so a home directory shared by machines with
different CPUs never runs code built for another one. No compiler, a failed build, or a CPU without AVX2/FMA/F16C
(the plain C loops are no faster than PyTorch's): the PyTorch path, silently, once per process. ``LORAKIT_NATIVE=0``
turns all compiled code off (to compare or to rule it out).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from lorakit.files import cache_dir

SOURCE = Path(__file__).with_name("dequant.c")
KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
FORMATS = {"nf4": 0, "int4": 1, "int8": 2}
CODES = {"nf4": torch.uint8, "int4": torch.uint8, "int8": torch.int8}
BUILD_TIMEOUT_S = 120

_kernel: ctypes._CFuncPtr | None | bool = None  # None: not tried yet; False: unavailable in this process


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def enabled() -> bool:
    """Whether lorakit may build and load compiled code in this process (``LORAKIT_NATIVE=0``: it may not)."""
    return os.environ.get("LORAKIT_NATIVE", "1") != "0"


def build(source: Path, compiler: str, flags: list[str], libraries: list[str] = ()) -> Path | None:
    """``source`` compiled into a shared library in ``cache_dir()/native/`` (once: its name hashes the source, the
    compiler's version, the flags and the CPU), or None where there is no such compiler or the build fails.
    ``compiler`` may carry words of its own (``CC="ccache gcc"``)."""
    words = shlex.split(compiler)
    path = shutil.which(words[0]) if words else None
    if path is None or not enabled():
        return None
    words[0] = path
    try:
        version = subprocess.run([*words, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = "\0".join([source.read_text(), version, *flags, *libraries, _cpu_flags(), platform.machine()])
        target = cache_dir() / "native" / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as work:  # built beside it, renamed into place whole
            built = Path(work) / target.name
            done = subprocess.run([*words, *flags, "-shared", "-fPIC", str(source), "-o", str(built), *libraries],
                                  capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if done.returncode != 0:
                return None
            os.replace(built, target)
        return target
    except (OSError, subprocess.SubprocessError):
        return None


def load(source: Path, compiler: str, flags: list[str], libraries: list[str] = ()) -> ctypes.CDLL | None:
    """``build(...)`` loaded into this process, or None where it cannot be built or loaded."""
    path = build(source, compiler, flags, libraries)
    try:
        return ctypes.CDLL(str(path)) if path is not None else None
    except OSError:
        return None


def kernel() -> ctypes._CFuncPtr | None:
    """The loaded ``lorakit_dequantize`` function, or None where it cannot be used (see the module docstring)."""
    global _kernel
    if _kernel is None:
        _kernel = False
        library = load(SOURCE, os.environ.get("CC") or "cc", ["-O3", "-march=native", "-pthread"], ["-lm"])
        if library is not None and library.lorakit_vectorised():
            f = library.lorakit_dequantize
            f.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_int]
            f.restype = ctypes.c_int
            _kernel = f
    return _kernel or None


def _scales(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Per-block scales (or zeros) as the float32 the kernel reads, rounded to the output dtype first."""
    return None if t is None else t.to(dtype).float().contiguous()


def dequantize(fmt: str, codes: Tensor, scale: Tensor, out: Tensor, zero: Tensor | None = None,
               code_values: Tensor | None = None) -> bool:
    """Write the dequantised weight into ``out`` [rows, in] with the compiled kernel; False (``out`` untouched) where
    the kernel is unavailable or the tensors are not plain contiguous CPU tensors it takes. ``codes``: [rows, in/2]
    uint8 (4-bit) or [rows, in] int8; ``scale`` (and ``zero``): one per block, [rows] or [rows, blocks];
    ``code_values``: NF4's 16 code values (rounded to ``out``'s dtype here, as the PyTorch path's table is)."""
    f = kernel()
    if f is None or out.dtype not in KINDS or codes.dtype != CODES[fmt] or not _takes(fmt, codes, scale, out, zero,
                                                                                       code_values):
        return False
    keep = [_scales(scale, out.dtype), _scales(zero, out.dtype), _scales(code_values, out.dtype)]
    s, z, c = (0 if t is None else t.data_ptr() for t in keep)
    blocks = scale.numel()
    return f(FORMATS[fmt], KINDS[out.dtype], codes.data_ptr(), c, s, z, out.data_ptr(), blocks, out.numel() // blocks,
             torch.get_num_threads()) == 0


def _takes(fmt: str, codes: Tensor, scale: Tensor, out: Tensor, zero: Tensor | None,
           code_values: Tensor | None) -> bool:
    """Plain contiguous CPU tensors of matching shapes: ``out`` [rows, in], codes [rows, in] (int8) or [rows, in/2],
    ``scale`` (and int4's ``zero``, same shape) [rows] or [rows, blocks] with blocks dividing in; NF4's 16 code
    values."""
    tensors = [codes, scale, out] + [t for t in (zero, code_values) if t is not None]
    if any(t.device.type != "cpu" for t in tensors) or not (codes.is_contiguous() and out.is_contiguous()):
        return False
    if codes.dim() != 2 or out.dim() != 2 or scale.dim() not in (1, 2) or scale.numel() == 0:
        return False
    rows, width = out.shape
    per_row = 1 if scale.dim() == 1 else scale.shape[1]
    if tuple(codes.shape) != (rows, width if fmt == "int8" else width // 2) or scale.shape[0] != rows or \
            width % per_row or (fmt != "int8" and width % 2):
        return False
    if fmt == "int4" and (zero is None or zero.shape != scale.shape):
        return False
    return fmt != "nf4" or (code_values is not None and code_values.numel() == 16)
