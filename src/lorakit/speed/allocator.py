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
get it too.

The fixed threshold has a price in time: every tensor of 1 MiB or more is a fresh mmap, page-faulted in as it is
first written. ``reuse_freed_blocks()`` (``lorakit.attach`` calls it: the model is about to train) makes
``block_cache.cpp`` PyTorch's CPU allocator: a freed block of 1 MiB or more waits, by size, for the next request
of that size, which a training step makes layer after layer; at most ``BLOCK_CACHE_BYTES`` of free blocks are
held (past it the oldest is given back). Smaller blocks still come from malloc. Measured: 1.1B Llama shape, NF4
base, 4 x 256 tokens, own loop (``benchmarks/peft_bnb_cpu.py``'s worker loop run step by step, one process per
setting, alternated, 2 rounds x 3 steps after a warm-up), AMD EPYC Zen 4, 2 cores: minor page faults a step
1.26-1.53 million -> 0.41-0.42 million, a step 16.6-18.3 s (median 17.9) -> 14.0-16.7 s (median 15.1), peak RSS
3168-3172 -> 3210-3214 MiB; holding up to 1 GiB faulted less (0.21 million) but was no faster. It is compiled
against the running torch (``kernels.native.build``, C++ with torch's headers, ~1 s, once per machine); without a
C++ compiler, with ``LORAKIT_NATIVE=0`` or with ``LORAKIT_BLOCK_CACHE_MIB=0``, PyTorch keeps its own allocator
(``LORAKIT_BLOCK_CACHE_MIB=N``: hold at most N MiB). While it is in place ``torch.profiler``'s
``profile_memory`` sees no CPU allocations (PyTorch's allocator reports them, this one does not): profile memory
with ``LORAKIT_BLOCK_CACHE_MIB=0``.

A user who set ``MALLOC_MMAP_THRESHOLD_`` in the environment keeps their setting; off glibc nothing changes.
``trim()`` gives the heap's free pages and the cache's free blocks back now, for a loader that frees temporaries
between tensors that stay.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import torch

from lorakit.errors import ConfigError
from lorakit.kernels import native

MMAP_THRESHOLD = 1 << 20  # bytes: a block this large or larger is mmap'ed, and unmapped when freed
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

BLOCK_CACHE_BYTES = 256 << 20  # free blocks held for reuse at most (one layer's temporaries at 1B-8B sizes)
BLOCK_CACHE_SOURCE = Path(__file__).with_name("block_cache.cpp")

_LIBC: ctypes.CDLL | bool | None = None
_FIXED: bool | None = None
_BLOCK_CACHE: ctypes.CDLL | bool | None = None


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
    """Give the heap's free pages and the block cache's free blocks back to the system now (glibc's
    ``malloc_trim``); nothing off glibc."""
    if _BLOCK_CACHE:
        _BLOCK_CACHE.lorakit_block_cache_flush()
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def _block_cache() -> ctypes.CDLL | None:
    global _BLOCK_CACHE
    if _BLOCK_CACHE is None:
        root = Path(torch.__file__).parent
        abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
        flags = ["-O2", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{root / 'include'}",
                 f"-DLORAKIT_TORCH={torch.__version__}"]  # (in the build's name: another torch rebuilds)
        _BLOCK_CACHE = native.load(BLOCK_CACHE_SOURCE, os.environ.get("CXX") or "c++", flags,
                                   [f"-L{root / 'lib'}", "-lc10", f"-Wl,-rpath,{root / 'lib'}"]) or False
    return _BLOCK_CACHE or None


def block_cache_limit() -> int:
    """The bytes of free blocks the cache may hold: $LORAKIT_BLOCK_CACHE_MIB MiB, else ``BLOCK_CACHE_BYTES``;
    ConfigError naming the value where it is not a whole number (``lorakit train`` asks before it loads)."""
    mib = os.environ.get("LORAKIT_BLOCK_CACHE_MIB", "").strip()
    if mib and not mib.isdigit():
        raise ConfigError(f"LORAKIT_BLOCK_CACHE_MIB={mib!r} is not a whole number of MiB; set it to one (e.g. 256), "
                          "or to 0 to keep PyTorch's own allocator")
    return int(mib) << 20 if mib else BLOCK_CACHE_BYTES


def reuse_freed_blocks(limit_bytes: int | None = None) -> bool:
    """Make the block cache (see the module docstring) PyTorch's CPU allocator, holding at most ``limit_bytes`` of
    free blocks (default: $LORAKIT_BLOCK_CACHE_MIB MiB, else ``BLOCK_CACHE_BYTES``); returns whether it is in place
    (False without a C++ compiler, with LORAKIT_NATIVE=0 or a limit of 0). A $LORAKIT_BLOCK_CACHE_MIB that is not a
    whole number raises ConfigError naming it."""
    if limit_bytes is None:
        limit_bytes = block_cache_limit()
    limit_bytes = min(max(int(limit_bytes), 0), 1 << 62)  # (a negative limit holds nothing; no uint64 wrap-around)
    library = _block_cache() if limit_bytes > 0 or _BLOCK_CACHE else None
    if library is None:
        return False
    library.lorakit_block_cache_install(ctypes.c_uint64(limit_bytes))  # (0 when in place: it holds nothing more)
    return limit_bytes > 0


def block_cache_stats() -> dict[str, int] | None:
    """{"held": bytes of free blocks held, "hits": requests served from them, "misses": requests that were not},
    or None where the cache is not in place."""
    library = _block_cache() if _BLOCK_CACHE else None
    if library is None:
        return None
    values = (ctypes.c_uint64 * 3)()
    library.lorakit_block_cache_stats(values)
    return dict(zip(("held", "hits", "misses"), map(int, values)))
