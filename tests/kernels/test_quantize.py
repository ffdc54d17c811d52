"""kernels.quantize: int8, NF4 and int4 round trips within their bounds, the QLoRA code book, packing, double
quantisation, and the product on a packed weight against F.linear on the dequantised one."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lorakit.errors import ConfigError
from lorakit.kernels import quantize as kq

# bitsandbytes functional.py get_4bit_type("nf4"); torchao's nf4tensor.py rounds the same values to 4 decimals
TORCHAO_NF4 = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379,
               0.4407, 0.5626, 0.7230, 1.0]


def weight(out_f=24, in_f=256, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * scale * torch.rand(out_f, 1, generator=g).add(0.1)


@given(st.integers(1, 5), st.integers(1, 8), st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_nibbles_round_trip(rows, half, seed):
    codes = torch.randint(0, 16, (rows, 2 * half), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = kq.pack_nibbles(codes)
    assert packed.shape == (rows, half) and packed.dtype == torch.uint8
    assert torch.equal(kq.unpack_nibbles(packed), codes)
    assert torch.equal(packed[:, 0], codes[:, 0] * 16 + codes[:, 1])  # the even column in the high nibble


@given(st.integers(0, 1000), st.floats(1e-4, 10.0))
@settings(max_examples=25, deadline=None)
def test_int8_round_trip_within_absmax_over_254_per_channel(seed, scale):
    w = weight(seed=seed, scale=scale)
    q, s = kq.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.shape == (w.shape[0],)
    err = (kq.dequantize_int8(q, s) - w).abs().amax(dim=1)
    bound = w.abs().amax(dim=1) / 254
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-12)


def test_int8_bf16_scales_and_bf16_output():
    w = weight()
    q, s = kq.quantize_int8(w, torch.bfloat16)
    assert s.dtype == torch.bfloat16
    err = (kq.dequantize_int8(q, s) - w).abs().amax(dim=1)
    assert torch.all(err <= w.abs().amax(dim=1) / 254 * (1 + 2**-7))  # the scale itself is rounded to 8 bits
    assert kq.dequantize_int8(q, s, torch.bfloat16).dtype == torch.bfloat16


def test_nf4_code_book_is_qlora():
    code = torch.tensor(kq.NF4_CODE)
    assert code.numel() == 16 and code[0] == -1 and code[7] == 0 and code[15] == 1
    assert torch.all(code[1:] > code[:-1])
    assert torch.allclose(code, torch.tensor(TORCHAO_NF4), atol=5e-5)


def test_nf4_block_by_hand():
    """One block of 64: absmax is the block's max |w|; each weight gets the nearest code value times absmax."""
    w = torch.zeros(2, 128)
    w[0, :64] = torch.linspace(-0.5, 2.0, 64)  # block absmax 2.0
    w[0, 64:] = -3.0 * torch.ones(64)
    w[0, 70] = 0.3
    packed, absmax = kq.quantize_nf4(w)
    assert packed.shape == (2, 64) and absmax.shape == (2, 2)
    assert absmax.tolist() == [[2.0, 3.0], [0.0, 0.0]]
    codes = kq.unpack_nibbles(packed)
    code = torch.tensor(kq.NF4_CODE)
    expected = (w[0, :64, None] / 2.0 - code).abs().argmin(dim=1)
    assert torch.equal(codes[0, :64].long(), expected)
    assert codes[0, 64] == 0 and codes[0, 70] == (0.1 - code).abs().argmin()  # -3/3 -> -1.0; 0.3/3 = 0.1 -> 0.0796
    assert codes[0, 63] == 15  # the block's absmax itself -> 1.0
    deq = kq.dequantize_nf4(packed, absmax)
    assert torch.allclose(deq[0, :64], code[expected] * 2.0)
    assert deq[0, 64] == -3.0 and torch.all(deq[1] == 0)  # an all-zero block decodes to zero


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_nf4_dequantizes_to_the_code_value_times_absmax_in_every_dtype(dtype, monkeypatch):
    """The byte lookup (a pair read as one wide integer; float64 by rows of the table), block by block of rows, gives
    NF4[q] * absmax rounded once into the asked dtype."""
    monkeypatch.setattr(kq, "LOOKUP_BYTES", 96)  # several blocks of rows
    packed, absmax = kq.quantize_nf4(torch.randn(10, 128, generator=torch.Generator().manual_seed(3)))
    codes = kq.unpack_nibbles(packed).long()
    values = torch.tensor(kq.NF4_CODE, dtype=torch.float64).to(dtype)[codes]
    expected = (values.view(10, 2, 64) * absmax.to(dtype)[..., None]).view(10, 128)
    out = torch.full((10, 128), float("nan"), dtype=dtype)
    assert kq.dequantize_nf4(packed, absmax, dtype, out) is out
    assert torch.equal(out, expected)


def test_nf4_error_within_half_the_widest_code_gap():
    w = weight()
    packed, absmax = kq.quantize_nf4(w)
    code = torch.tensor(kq.NF4_CODE)
    half_gap = (code[1:] - code[:-1]).max() / 2
    err = (kq.dequantize_nf4(packed, absmax) - w).abs().view(w.shape[0], -1, 64)
    assert torch.all(err <= half_gap * absmax[..., None] + 1e-7)


@given(st.integers(0, 1000))
@settings(max_examples=10, deadline=None)
def test_double_quantisation_round_trip(seed):
    absmax = kq.quantize_nf4(weight(out_f=40, in_f=512, seed=seed))[1]  # 320 constants: one full block and a part
    q, factor, mean = kq.double_quantize(absmax)
    assert q.dtype == torch.int8 and factor.shape == (2,) and mean.shape == ()
    back = kq.double_dequantize(q, factor, mean).view(absmax.shape)
    centred = (absmax.flatten() - absmax.mean())
    block_max = torch.stack([centred[:256].abs().max(), centred[256:].abs().max()])
    bound = torch.repeat_interleave(block_max / 254, torch.tensor([256, 64])).view(absmax.shape)
    assert torch.all((back - absmax).abs() <= bound * (1 + 1e-4) + 1e-9)


def test_nf4_format_with_double_quant_is_close_to_without():
    w = weight()
    single, double = kq.NF4Format(64), kq.NF4Format(64, double_quant=True)
    ts, td = single.quantize(w), double.quantize(w)
    assert set(td) == {"qweight", "absmax_q", "absmax_factor", "absmax_mean"} and td["absmax_q"].dtype == torch.int8
    a, b = single.dequantize(ts, torch.float32), double.dequantize(td, torch.float32)
    assert (a - b).abs().max() <= 0.01 * w.abs().max()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_groupwise_error_within_half_a_step(group):
    w = weight(in_f=256)
    packed, scale, zero = kq.quantize_int4(w, group)
    assert packed.shape == (w.shape[0], 128) and scale.shape == (w.shape[0], 256 // group)
    err = (kq.dequantize_int4(packed, scale, zero) - w).abs().view(w.shape[0], -1, group)
    assert torch.all(err <= scale[..., None] / 2 * (1 + 1e-5) + 1e-7)
    groups = w.view(w.shape[0], -1, group)
    assert torch.allclose(zero, groups.amin(-1)) and torch.allclose(scale, (groups.amax(-1) - groups.amin(-1)) / 15)


@pytest.mark.parametrize("fmt", [kq.Int8Format(), kq.NF4Format(64), kq.NF4Format(64, True), kq.Int4Format(32)])
def test_format_dequantizes_rows_and_dtypes(fmt):
    w = weight(out_f=10, in_f=128)
    t = fmt.quantize(w)
    full = fmt.dequantize(t, torch.float32)
    assert full.shape == w.shape
    assert torch.equal(fmt.dequantize(t, torch.float32, slice(3, 7)), full[3:7])
    assert (fmt.dequantize(t, torch.bfloat16).float() - full).abs().max() <= 1e-2 * full.abs().max()


def test_formats_refuse_widths_and_sizes_they_do_not_divide():
    with pytest.raises(ConfigError, match=r"in_features=96, not a multiple of the int4 group size 64; use group_size=32 \(it divides 96\)"):
        kq.Int4Format(64).check(96, "mlp.down_proj")
    with pytest.raises(ConfigError, match=r"no block size of \(32, 64, 128\) divides it: use bits=8"):
        kq.NF4Format(64).check(100, "x")
    with pytest.raises(ConfigError, match="group_size=48 is not one of"):
        kq.Int4Format(48).check(96)


def test_dequantized_linear_equals_f_linear_forward_and_backward(monkeypatch):
    fmt = kq.Int4Format(32)
    w, b = weight(out_f=20, in_f=64), torch.randn(20, requires_grad=True)
    t = fmt.quantize(w)
    deq = lambda dtype, rows, out: fmt.dequantize(t, dtype, rows, out)  # noqa: E731
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = b.detach().clone().requires_grad_(True)
    for blocks in (False, True):
        if blocks:  # the row-block path of a large weight (an LM head)
            monkeypatch.setattr(kq, "BLOCK_ELEMENTS", 64 * 6)
        y = kq.dequantized_linear(x, b, deq, 20, 64)
        ref = F.linear(x_ref, fmt.dequantize(t, torch.float32), b_ref)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(y)
        y.backward(g)
        ref.backward(g)
        assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
        assert torch.allclose(b.grad, b_ref.grad, rtol=1e-5, atol=1e-6)
        x.grad = x_ref.grad = b.grad = b_ref.grad = None


# ---------------------------------------------------------------------- group-wise int8 (GGUF Q8_0 / Q6_K layouts)
@pytest.mark.parametrize("group", [16, 32, 128])
def test_group_wise_int8_error_is_half_a_step_of_its_group(group):
    from lorakit.kernels.quantize import Int8Format

    torch.manual_seed(0)
    w = torch.randn(24, 256) * torch.linspace(0.01, 3, 256)  # columns of very different size: groups pay off
    fmt = Int8Format(group_size=group)
    t = fmt.quantize(w)
    assert t["qweight"].dtype == torch.int8 and t["qweight"].shape == (24, 256)
    assert t["scale"].shape == (24, 256 // group) and t["scale"].dtype == torch.float32
    back = fmt.dequantize(t, torch.float32)
    step = t["scale"].repeat_interleave(group, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(back, t["qweight"].float() * step)  # exactly q * s, no other rounding
    per_channel = Int8Format().dequantize(Int8Format().quantize(w), torch.float32)
    assert (back - w).abs().mean() < (per_channel - w).abs().mean()
    rows = fmt.dequantize(t, torch.bfloat16, slice(3, 9))
    assert torch.equal(rows, (t["qweight"][3:9].to(torch.bfloat16) * step[3:9].to(torch.bfloat16)))


def test_group_wise_int8_refuses_a_width_its_group_does_not_divide():
    from lorakit.adapters.quantize import make_format, packed_bytes
    from lorakit.errors import ConfigError
    from lorakit.kernels.quantize import Int8Format

    with pytest.raises(ConfigError, match=r"in_features=80, not a multiple of the int8 group size 32; use group_size=16"):
        Int8Format(group_size=32).check(80, "q_proj")
    with pytest.raises(ConfigError, match=r"int8 group size 24 is not one of"):
        make_format(8, int8_group_size=24)
    fmt = make_format(8, int8_group_size=32)
    assert fmt == Int8Format(group_size=32) and fmt.describe() == "int8 (symmetric, groups of 32)"
    assert packed_bytes(fmt, 64, 256) == sum(t.nbytes for t in fmt.quantize(torch.randn(64, 256)).values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4_dequantizes_to_one_rounding_of_q_scale_plus_zero(dtype, monkeypatch):
    """16-bit outputs are computed in float32 a block of rows at a time and rounded once: the same bits as q s + z
    computed by addcmul in the output dtype (scale and zero rounded to it first)."""
    monkeypatch.setattr(kq, "LOOKUP_BYTES", 200)  # several blocks of rows through the float32 buffer
    packed, scale, zero = kq.quantize_int4(torch.randn(12, 128, generator=torch.Generator().manual_seed(4)), 32)
    q = kq.unpack_nibbles(packed).to(dtype).view(12, 4, 32)
    expected = torch.addcmul(zero.to(dtype)[..., None], q, scale.to(dtype)[..., None]).view(12, 128)
    assert torch.equal(kq.dequantize_int4(packed, scale, zero, dtype), expected)
