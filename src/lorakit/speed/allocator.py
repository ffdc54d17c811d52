"""The C heap under PyTorch's CPU tensors: freed memory goes back to the system instead of staying resident.

PyTorch allocates CPU tensors with ``malloc``. glibc serves a block of at least its mmap threshold (128 KiB at
start) with its own ``mmap``, given back on ``free``; but each such free raises the threshold to the freed
block's size (up to 32 MiB), so after the first few MB-sized temporaries are freed, every later tensor below 32
MiB comes from the heap, whose freed holes stay resident and fragment. A training step frees and allocates its
activations and temporaries layer after layer, so the resident set grows by far more than what lives:

    1.1B Llama shape, 512 tokens, activation checkpointing, all-linear LoRA r 16, own loop, 2 steps (AMD EPYC,
    2 cores; benchmarks/heap_threshold.py, results/heap_threshold.json):
    int4 base: peak RSS 2436 MiB with the dynamic threshold, 1675 MiB with a fixed 1 MiB threshold
    bf16 base: 3538 MiB -> 2941 MiB; step time with 1 MiB / 32 MiB alternated in one process: 0.92x
    (each checkpointed layer kept ~40 MB resident beyond its 4 MB saved input)

``return_freed_memory_to_the_system()`` fixes the threshold (``mallopt(M_MMAP_THRESHOLD, 1 MiB)``, which also
stops glibc from moving it) and the trim threshold, once per process. A block served by ``mmap`` costs page faults
when it is first written (a 64 MB fp32 weight: ~36 ms against ~4 ms reused), which is why the weight a product
widens or dequantises lives in ``kernels.workspace``'s reused buffer instead. FSDP2 on CPU, which gathers and frees
each block's weights, measured the same effect (SmolLM2, 2 processes: 3.56 GB a process with the dynamic
threshold, 1.30 GB fixed; DDP 1.92 GB).

``lorakit.attach``, ``lorakit.quantize`` and ``train.models.load_model`` call it, so an own loop, HF Trainer and TRL
get it too. A user who set ``MALLOC_MMAP_THRESHOLD_`` in the environment keeps their setting; off glibc nothing
changes. ``trim()`` gives the heap's free pages back now (``malloc_trim``), for a loader that frees temporaries
between tensors that stay.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD = 1 << 20  # bytes: a block this large or larger is mmap'ed, and unmapped when freed
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

_LIBC: ctypes.CDLL | bool | None = None
_FIXED: bool | None = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    return _LIBC


def return_freed_memory_to_the_system() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD`` (see the module docstring), once per process. Returns whether
    the fixed threshold is in effect (False off glibc, or where the environment already sets one: that is kept)."""
    global _FIXED
    if _FIXED is None:
        libc = _libc()
        if not libc or "MALLOC_MMAP_THRESHOLD_" in os.environ:
            _FIXED = False
        else:
            _FIXED = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
                bool(libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD))
    return _FIXED


def trim() -> None:
    """Give the heap's free pages back to the system now (glibc's ``malloc_trim``); nothing off glibc."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
