"""kernels.native: the compiled dequantisation gives the bits of the PyTorch code for every format and dtype, is
built once per source/compiler/CPU into the cache, and falls back to PyTorch without a compiler, with a compiler
that fails, with LORAKIT_NATIVE=0, and for tensors it does not take."""

import os
import stat

import pytest
import torch

from lorakit.kernels import native
from lorakit.kernels import quantize as kq

needs_kernel = pytest.mark.skipif(native.kernel() is None, reason="no C compiler, or a CPU without AVX2/FMA/F16C: "
                                  "the PyTorch path is the only one")
FORMATS = {"nf4": kq.NF4Format(), "nf4 double-quantised, blocks of 32": kq.NF4Format(block_size=32, double_quant=True),
           "int4 g32": kq.Int4Format(group_size=32), "int4 g128": kq.Int4Format(group_size=128),
           "int8 per channel": kq.Int8Format(), "int8 bf16 scales": kq.Int8Format(scale_dtype=torch.bfloat16),
           "int8 g16": kq.Int8Format(group_size=16)}


def weight(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * torch.rand(out_f, 1, generator=g).add(0.01)
    w[0, :64] = 0.0  # an all-zero block: its codes decode to zero
    return w


def with_pytorch(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(native, "_kernel", False)
        return fn()


def takes(fmt: kq.QuantFormat, in_features: int) -> bool:
    try:
        fmt.check(in_features)
    except kq.ConfigError:
        return False
    return True


SHAPES = [(7, 384), (300, 2048), (5, 196)]  # 196: a tail past the last 8 columns (per-channel int8 only)
CASES = [(name, shape) for name in FORMATS for shape in SHAPES if takes(FORMATS[name], shape[1])]


@needs_kernel
@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{s}" for n, s in CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_compiled_kernel_gives_the_bits_of_the_pytorch_code(monkeypatch, name, dtype, shape):
    fmt = FORMATS[name]
    tensors = fmt.quantize(weight(*shape))
    reference = with_pytorch(monkeypatch, lambda: fmt.dequantize(tensors, dtype))
    taken, compiled = [], native.dequantize
    monkeypatch.setattr(native, "dequantize", lambda *a, **k: taken.append(compiled(*a, **k)) or taken[-1])
    fast = fmt.dequantize(tensors, dtype, None, torch.full(shape, float("nan"), dtype=dtype))
    assert taken == [True]  # the compiled kernel wrote it
    assert torch.equal(fast.view(torch.uint8), reference.view(torch.uint8))
    rows = slice(2, 5)  # a block of rows, as the products dequantise them
    part = fmt.dequantize(tensors, dtype, rows, torch.empty(3, shape[1], dtype=dtype))
    assert torch.equal(part, reference[rows])


@needs_kernel
def test_tensors_the_kernel_does_not_take_fall_back_to_pytorch(monkeypatch):
    fmt = kq.NF4Format()
    tensors = fmt.quantize(weight(8, 128))
    reference = with_pytorch(monkeypatch, lambda: fmt.dequantize(tensors, torch.bfloat16))
    strided = torch.empty(128, 8, dtype=torch.bfloat16).t()  # not contiguous
    assert not native.dequantize("nf4", tensors["qweight"], tensors["absmax"], strided, code_values=kq.NF4_VALUES)
    assert not native.dequantize("nf4", tensors["qweight"].t(), tensors["absmax"], torch.empty(8, 128,
                                 dtype=torch.bfloat16), code_values=kq.NF4_VALUES)
    assert torch.equal(fmt.dequantize(tensors, torch.bfloat16, None, torch.empty(8, 128, dtype=torch.bfloat16)),
                       reference)
    assert not native.dequantize("nf4", tensors["qweight"], tensors["absmax"], torch.empty(8, 128, dtype=torch.float64),
                                 code_values=kq.NF4_VALUES)
    assert not native.dequantize("nf4", tensors["qweight"], tensors["absmax"][:3, :1],  # 3 rows of scales for 8
                                 torch.empty(8, 128, dtype=torch.bfloat16), code_values=kq.NF4_VALUES)
    out = torch.full((8, 128), 7.0, dtype=torch.bfloat16)
    assert not native.dequantize("nf4", tensors["qweight"], tensors["absmax"], out)  # no code values
    assert not native.dequantize("nf4", tensors["qweight"], tensors["absmax"], out.view(128, 8),  # out's shape
                                 code_values=kq.NF4_VALUES)
    int4 = kq.Int4Format(group_size=32).quantize(weight(8, 128))
    assert not native.dequantize("int4", int4["qweight"], int4["scale"], out)  # no zero
    assert not native.dequantize("int4", int4["qweight"], int4["scale"], out, zero=int4["zero"][:1])
    q8, s8 = kq.quantize_int8(weight(3, 10))
    assert not native.dequantize("int8", q8, s8[:2], torch.empty(3, 10))  # a scale per row, not 2 for 3 rows
    assert not native.dequantize("int8", q8, s8.to("meta"), torch.empty(3, 10))
    assert torch.equal(out, torch.full((8, 128), 7.0, dtype=torch.bfloat16))  # untouched by every refusal


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_nan_or_inf_scale_gives_nan_and_inf_as_pytorch_does(monkeypatch, dtype):
    q, s = kq.quantize_int8(weight(3, 64))
    s[0], s[1] = float("nan"), float("inf")
    fast = kq.dequantize_int8(q, s, dtype)
    reference = with_pytorch(monkeypatch, lambda: kq.dequantize_int8(q, s, dtype))
    assert torch.equal(fast.isnan(), reference.isnan()) and torch.equal(fast.isinf(), reference.isinf())
    assert fast[0].isnan().all() and torch.equal(fast[2], reference[2])


def fresh(monkeypatch, tmp_path, **env):
    monkeypatch.setattr(native, "_kernel", None)
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return native.kernel()


def test_no_compiler_a_failing_one_or_lorakit_native_0_keep_the_pytorch_path(monkeypatch, tmp_path):
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: error' >&2\nexit 1\n")
    failing.chmod(failing.stat().st_mode | stat.S_IXUSR)
    fmt = kq.Int4Format()
    tensors = fmt.quantize(weight(6, 128))
    expected = with_pytorch(monkeypatch, lambda: fmt.dequantize(tensors, torch.bfloat16))
    for env in ({"CC": str(tmp_path / "no-such-compiler")}, {"CC": str(failing)}, {"LORAKIT_NATIVE": "0"}):
        assert fresh(monkeypatch, tmp_path, **env) is None, env
        assert torch.equal(fmt.dequantize(tensors, torch.bfloat16), expected)
        assert not list((tmp_path / "cache").glob("native/*.so"))
        monkeypatch.delenv(next(iter(env)))


@needs_kernel
def test_built_once_into_the_cache_under_a_name_of_source_compiler_and_cpu(monkeypatch, tmp_path):
    assert fresh(monkeypatch, tmp_path) is not None
    built = list((tmp_path / "cache" / "native").glob("dequant-*.so"))
    assert len(built) == 1 and not list((tmp_path / "cache" / "native").glob("tmp*"))  # no half-built leftovers
    mtime = built[0].stat().st_mtime_ns
    assert fresh(monkeypatch, tmp_path) is not None and built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert fresh(monkeypatch, tmp_path, CC=f"env {os.environ.get('CC') or 'cc'}") is not None  # a compiler with words
    assert len(list((tmp_path / "cache" / "native").glob("dequant-*.so"))) == 1  # (the same compiler: its build)
    monkeypatch.delenv("CC")
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : another cpu")
    assert fresh(monkeypatch, tmp_path) is not None
    assert len(list((tmp_path / "cache" / "native").glob("dequant-*.so"))) == 2
    assert os.access(built[0], os.R_OK)
