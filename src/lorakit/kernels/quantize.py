"""Quantise and dequantise a frozen weight W [out, in]: int8, NF4 (QLoRA) and group-wise int4, as pure tensor code.

    int8   per output channel, symmetric:  s_o = max_i |W_oi| / 127,  q = clamp(round(W / s_o), -127, 127)
           W ~ q s_o, error <= s_o / 2 = max|W_o| / 254 (fp32 scales); or group-wise (``Int8Format(group_size=g)``,
           g in 16/32/64/128 along the input dim, a float32 scale per group [out, in/g]): GGUF's Q8_0 is exactly
           int8 g32 (s = its fp16 d), Q6_K exactly int8 g16 (s = d * its int8 sub-block scale; train/gguf_packed.py)
    nf4    QLoRA (Dettmers et al. 2023, section 3 "4-bit NormalFloat"): blocks of 64 weights along the input
           dim, c_b = max |W| in the block, q = the index of the NF4 code value nearest to W / c_b,
           W ~ NF4[q] c_b; two 4-bit codes per byte (the even column in the high nibble, as torchao's NF4Tensor).
           Double quantisation (QLoRA section 3 "Double Quantization"): the block constants c_b, less their mean,
           quantised again to int8 in blocks of 256 (symmetric absmax, as torchao's ``double_quantize_scalers``).
    int4   group-wise asymmetric (groups of 32/64/128 along the input dim): s_g = (max - min) / 15, z_g = min,
           q = clamp(round((W - z_g) / s_g), 0, 15), W ~ q s_g + z_g, error <= s_g / 2; two codes per byte.
           (torch's ``_weight_int4pack_mm`` stores the same group as scale and zero + 8 s_g with codes q - 8.)

Dequantisation writes straight into a float buffer of the asked dtype, in place, with no temporary of the weight's
size: int8 a cast copy ``out.copy_(q)`` then ``out *= s[:, None]``; NF4 looks each packed byte up in a 256-entry
table of its two code values read as one integer (``index_select`` into ``out``, a block of rows at a time), int4
casts each nibble (shifted or masked out) into its column (the table was slower there); both then scale per block in
place. Where the compiled kernel runs (``kernels.native``: x86-64 with AVX2, a C compiler), each format is one pass
of it instead, with the same bits. The products dequantise into ``kernels.workspace``'s reused buffer, so no page of
a fresh weight-sized allocation is faulted in per product (W 4096 x 4096 to fp32 on a 2-core AMD EPYC: int8 75 ->
~7 ms, NF4 76 -> ~17 ms; the fp32 product with 512 tokens takes 143 ms). ``QuantFormat`` objects pair a format's
quantise and dequantise so a storage class knows a format by its tensors; ``dequantized_linear`` is y = x W^T + b
for a W held packed, whose backward dequantises W again (nothing in float is saved between the passes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.errors import ConfigError
from lorakit.kernels import native
from lorakit.kernels.workspace import scratch

# The 16 NF4 code values: bitsandbytes' functional.py ``get_4bit_type("nf4")`` (the quantiles of N(0, 1) of QLoRA's
# Appendix E, normalised to [-1, 1] with an exact zero); torchao's nf4tensor.py holds the same table to 4 decimals.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
NF4_VALUES = torch.tensor(NF4_CODE, dtype=torch.float64)
NF4_BLOCK = 64  # weights per absmax block (QLoRA)
DOUBLE_QUANT_BLOCK = 256  # block constants per second-level scale (QLoRA)
INT4_GROUPS = (32, 64, 128)
INT8_GROUPS = (16, 32, 64, 128)  # group sizes of group-wise int8 (16: GGUF's Q6_K sub-blocks, 32: its Q8_0 blocks)
_TINY = 1e-30  # divides an all-zero block or group by something; its codes then decode to zero anyway


# ---------------------------------------------------------------------- nibbles
def pack_nibbles(codes: Tensor) -> Tensor:
    """[..., 2n] codes in 0..15 -> [..., n] uint8, element 2j in the high nibble, 2j+1 in the low one."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] << 4) | c[..., 1::2]


def unpack_nibbles(packed: Tensor) -> Tensor:
    """The inverse of ``pack_nibbles``: [..., n] uint8 -> [..., 2n] uint8 codes."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2)


_nf4_tables: dict[tuple, Tensor] = {}
_WIDE = {2: torch.int32, 4: torch.int64}  # the integer type as wide as two values of an itemsize


def _nf4_pair_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """[256, 2]: the two NF4 code values packed in each byte (high nibble first), one table per dtype and device."""
    key = (dtype, device)
    if key not in _nf4_tables:
        v = torch.tensor(NF4_CODE, dtype=torch.float64).to(device=device, dtype=dtype)
        _nf4_tables[key] = torch.stack([v.repeat_interleave(16), v.repeat(16)], dim=-1).contiguous()
    return _nf4_tables[key]


LOOKUP_BYTES = 2**22  # packed bytes unpacked per pass (their int32 indices: 16 MB of scratch; 1 MiB passes were
# ~2x slower on a busy 2-core CPU, each op waiting on the other thread)


def _nf4_lookup(packed: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """[out, in/2] packed bytes -> [out, in] NF4 code values in ``dtype`` (one table lookup per byte), written into
    ``out`` if given; a block of rows at a time, through a small scratch buffer of int32 indices. The byte's two
    values are read as one integer as wide as both (bf16 pairs as int32, fp32 pairs as int64) by a 1-D
    ``index_select``, faster than selecting rows of the [256, 2] table (5632 x 2048 to bf16 on a 2-core AMD EPYC
    Zen 4: 3.3-4.7 against 7.2 ms); a dtype without such an integer (float64) selects the rows."""
    table = _nf4_pair_table(dtype, packed.device)
    rows, half = packed.shape
    if out is None:
        out = torch.empty(rows, half * 2, dtype=dtype, device=packed.device)
    wide = _WIDE.get(table.element_size())
    if wide is not None:
        table, target = table.view(wide).view(-1), out.view(wide).view(rows, half)
    else:
        target = out.view(rows, half, 2)
    step = max(1, LOOKUP_BYTES // max(half, 1))
    for r0 in range(0, rows, step):
        block = packed[r0 : r0 + step]
        index = scratch(block.shape, torch.int32, packed.device, slot="codes").copy_(block)
        torch.index_select(table, 0, index.view(-1), out=target[r0 : r0 + step].view(-1, *table.shape[1:]))
    return out


# ---------------------------------------------------------------------- int8
def quantize_int8(weight: Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(q int8 [out, in], s [out] in ``scale_dtype``): per-output-channel symmetric, s = absmax / 127. The codes are
    computed against the scale as stored (a bf16 scale is rounded first), so dequantising gives back round(W/s) s."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).to(scale_dtype)
    q = torch.round(w / scale.float().clamp_min(_TINY)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
    """q s per row (``scale`` [out]) or per group (``scale`` [out, in/g]), in ``dtype`` (written into ``out`` if
    given: a cast copy, then the scaling in place; or the compiled kernel's one pass, the same bits)."""
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if native.dequantize("int8", q, scale, out):
        return out
    out.copy_(q)
    if scale.dim() == 1:
        return out.mul_(scale.to(dtype)[:, None])
    out_f, in_f = out.shape
    groups = scale.shape[1]
    out.view(out_f, groups, in_f // groups).mul_(scale.to(dtype)[..., None])
    return out


def quantize_int8_groups(weight: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor]:
    """(q int8 [out, in], s float32 [out, in/group_size]): symmetric per group, s = absmax / 127 (GGUF's Q8_0 with
    group_size 32, its scale kept in float32 rather than fp16)."""
    out_f, in_f = weight.shape
    w = weight.detach().float().view(out_f, in_f // group_size, group_size)
    scale = w.abs().amax(dim=-1) / 127.0
    q = torch.round(w / scale.clamp_min(_TINY)[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.view(out_f, in_f), scale


# ---------------------------------------------------------------------- NF4
def quantize_nf4(weight: Tensor, block_size: int = NF4_BLOCK) -> tuple[Tensor, Tensor]:
    """(packed uint8 [out, in/2], absmax float32 [out, in/block_size]): each weight's nearest NF4 code in its block."""
    out_f, in_f = weight.shape
    w = weight.detach().float().view(out_f, in_f // block_size, block_size)
    absmax = w.abs().amax(dim=-1)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    mids = (code[1:] + code[:-1]) / 2  # nearest code value: the interval between midpoints it falls in
    codes = torch.bucketize(w / absmax.clamp_min(_TINY)[..., None], mids, out_int32=True)
    return pack_nibbles(codes.view(out_f, in_f)), absmax


def dequantize_nf4(packed: Tensor, absmax: Tensor, dtype: torch.dtype = torch.float32,
                   out: Tensor | None = None) -> Tensor:
    """NF4[q] * absmax of q's block, [out, in] in ``dtype`` (the block size is in / absmax.shape[1]), into ``out``
    (by the compiled kernel where it runs: the same bits in one pass)."""
    if out is None:
        out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=dtype, device=packed.device)
    if native.dequantize("nf4", packed, absmax, out, code_values=NF4_VALUES):
        return out
    values = _nf4_lookup(packed, dtype, out)
    out_f, in_f = values.shape
    blocks = absmax.shape[1]
    values.view(out_f, blocks, in_f // blocks).mul_(absmax.to(dtype)[..., None])
    return values


def double_quantize(absmax: Tensor, block_size: int = DOUBLE_QUANT_BLOCK) -> tuple[Tensor, Tensor, Tensor]:
    """The block constants quantised again (QLoRA's double quantisation): (q int8 [n], factor float32
    [ceil(n / block_size)], mean float32 []), with c ~ q / factor + mean, |error| <= 1 / (2 factor) = absmax of its
    256-block of (c - mean) / 254. ``absmax`` of any shape; n = absmax.numel()."""
    c = absmax.detach().float().flatten()
    mean = c.mean()
    centred = c - mean
    pad = (-centred.numel()) % block_size
    blocks = F.pad(centred, (0, pad)).view(-1, block_size)
    factor = 127.0 / blocks.abs().amax(dim=1).clamp_min(_TINY)
    q = torch.round(blocks * factor[:, None]).clamp_(-127, 127).to(torch.int8).flatten()[: c.numel()]
    return q, factor, mean


def double_dequantize(q: Tensor, factor: Tensor, mean: Tensor, block_size: int = DOUBLE_QUANT_BLOCK) -> Tensor:
    """The float32 block constants [n] back from ``double_quantize``'s tensors."""
    pad = (-q.numel()) % block_size
    blocks = F.pad(q.float(), (0, pad)).view(-1, block_size)
    return (blocks / factor.float()[:, None] + mean.float()).flatten()[: q.numel()]


# ---------------------------------------------------------------------- int4, group-wise asymmetric
def quantize_int4(weight: Tensor, group_size: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """(packed uint8 [out, in/2], scale float32 [out, in/group_size], zero float32 [same]): W ~ q scale + zero."""
    out_f, in_f = weight.shape
    w = weight.detach().float().view(out_f, in_f // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = (hi - lo) / 15.0
    q = torch.round((w - lo[..., None]) / scale.clamp_min(_TINY)[..., None]).clamp_(0, 15)
    return pack_nibbles(q.view(out_f, in_f)), scale, lo


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype = torch.float32,
                    out: Tensor | None = None) -> Tensor:
    """q * scale + zero per group, [out, in] in ``dtype`` (the group size is in / scale.shape[1]), into ``out``.
    The codes are their own values: each nibble is shifted or masked out and cast into its column, no table
    (faster than the lookup: 57 against 85 ms for 4096 x 4096 on a busy 2-core AMD EPYC). A 16-bit ``dtype`` is
    computed a block of rows at a time in a float32 scratch buffer from the scale and zero rounded to ``dtype``,
    then rounded once into ``out``: the bits of a 16-bit ``addcmul`` (which alone took 10.6 ms of the 13.8 for 5632 x
    2048 to bf16 on a Zen 4, its broadcast scales in bf16), in 10.5 ms; the compiled kernel, where it runs, in
    1.5-2.6."""
    rows, half = packed.shape
    values = torch.empty(rows, half * 2, dtype=dtype, device=packed.device) if out is None else out
    if native.dequantize("int4", packed, scale, values, zero=zero):
        return values
    groups = scale.shape[1]
    narrow = values.element_size() == 2
    scale, zero = scale.to(dtype), zero.to(dtype)  # (as stored for the product: rounded to the output dtype)
    if narrow:
        scale, zero = scale.float(), zero.float()
    step = max(1, LOOKUP_BYTES // max(half, 1))
    for r0 in range(0, rows, step):
        block = packed[r0 : r0 + step]
        n = block.shape[0]
        work = scratch((n, half * 2), torch.float32, packed.device, slot="int4_rows") if narrow else \
            values[r0 : r0 + n]
        pairs = work.view(n, half, 2)
        nibble = scratch(block.shape, torch.uint8, packed.device, slot="codes")
        pairs[:, :, 0].copy_(torch.bitwise_right_shift(block, 4, out=nibble))
        pairs[:, :, 1].copy_(torch.bitwise_and(block, 15, out=nibble))
        v = work.view(n, groups, -1)
        torch.addcmul(zero[r0 : r0 + n, :, None], v, scale[r0 : r0 + n, :, None], out=v)  # one rounding: q s + z
        if narrow:
            values[r0 : r0 + n].copy_(work)
    return values


# ---------------------------------------------------------------------- formats
@dataclass(frozen=True)
class QuantFormat:
    """A quantised weight format: its name, bits per weight, and how a weight [out, in] becomes named tensors and back.

    ``quantize(w)`` -> {name: tensor} (each with the output rows as its first dim, except the small second-level
    scales of double quantisation); ``dequantize(tensors, dtype, rows)`` -> W [rows, in] in ``dtype``. A new format is
    a subclass with these two methods and ``check`` plus a row in ``FORMATS``."""

    name = ""
    bits = 0

    def check(self, in_features: int, where: str = "") -> None:
        """Refuse an input width the format's blocks or groups do not divide (ConfigError naming the fix)."""

    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def dequantize(self, tensors: Mapping[str, Tensor], dtype: torch.dtype, rows: slice | None = None,
                   out: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def _rows(t: Tensor, rows: slice | None) -> Tensor:
    return t if rows is None else t[rows]


@dataclass(frozen=True)
class Int8Format(QuantFormat):
    """int8, symmetric: a scale per output channel (``group_size`` None) or per group of ``group_size`` inputs."""

    scale_dtype: torch.dtype = torch.float32
    group_size: int | None = None
    name = "int8"
    bits = 8

    def check(self, in_features: int, where: str = "") -> None:
        if self.group_size is None:
            return
        if self.group_size not in INT8_GROUPS:
            raise ConfigError(f"group_size={self.group_size} is not one of {INT8_GROUPS} for group-wise int8; pick one "
                              "of them")
        _check_divides("int8", self.group_size, "group size", in_features, where, INT8_GROUPS)

    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        if self.group_size is None:
            q, scale = quantize_int8(weight, self.scale_dtype)
        else:
            q, scale = quantize_int8_groups(weight, self.group_size)
        return {"qweight": q, "scale": scale}

    def dequantize(self, tensors, dtype, rows=None, out=None):
        return dequantize_int8(_rows(tensors["qweight"], rows), _rows(tensors["scale"], rows), dtype, out)

    def describe(self) -> str:
        if self.group_size is not None:
            return f"int8 (symmetric, groups of {self.group_size})"
        return f"int8 (per-channel, {str(self.scale_dtype).removeprefix('torch.')} scales)"


def _check_divides(fmt: str, size: int, what: str, in_features: int, where: str,
                   sizes: tuple[int, ...] = INT4_GROUPS) -> None:
    if in_features % size == 0:
        return
    fits = [g for g in sizes if in_features % g == 0]
    fix = (f"use group_size={fits[-1]} (it divides {in_features})" if fits else
           f"no {what} of {sizes} divides it: use bits=8 (per-channel int8 has no blocks)")
    raise ConfigError(f"{where or 'a layer'} has in_features={in_features}, not a multiple of the {fmt} {what} {size}; "
                      f"{fix}")


@dataclass(frozen=True)
class NF4Format(QuantFormat):
    block_size: int = NF4_BLOCK
    double_quant: bool = False
    name = "nf4"
    bits = 4

    def check(self, in_features: int, where: str = "") -> None:
        if self.block_size not in INT4_GROUPS:
            raise ConfigError(f"block size {self.block_size} is not one of {INT4_GROUPS} for nf4; use 64 (QLoRA's)")
        _check_divides("nf4", self.block_size, "block size", in_features, where)

    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        packed, absmax = quantize_nf4(weight, self.block_size)
        if not self.double_quant:
            return {"qweight": packed, "absmax": absmax}
        q, factor, mean = double_quantize(absmax)
        return {"qweight": packed, "absmax_q": q.view(absmax.shape), "absmax_factor": factor, "absmax_mean": mean}

    def absmax(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """The block constants [out, in/block_size], float32 (dequantised again under double quantisation)."""
        if not self.double_quant:
            return tensors["absmax"]
        q = tensors["absmax_q"]
        return double_dequantize(q.flatten(), tensors["absmax_factor"], tensors["absmax_mean"]).view(q.shape)

    def dequantize(self, tensors, dtype, rows=None, out=None):
        return dequantize_nf4(_rows(tensors["qweight"], rows), _rows(self.absmax(tensors), rows), dtype, out)

    def describe(self) -> str:
        return f"nf4 (blocks of {self.block_size}{', double quantised scales' if self.double_quant else ''})"


@dataclass(frozen=True)
class Int4Format(QuantFormat):
    group_size: int = 64
    name = "int4"
    bits = 4

    def check(self, in_features: int, where: str = "") -> None:
        if self.group_size not in INT4_GROUPS:
            raise ConfigError(f"group_size={self.group_size} is not one of {INT4_GROUPS} for int4; pick one of them")
        _check_divides("int4", self.group_size, "group size", in_features, where)

    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        packed, scale, zero = quantize_int4(weight, self.group_size)
        return {"qweight": packed, "scale": scale, "zero": zero}

    def dequantize(self, tensors, dtype, rows=None, out=None):
        return dequantize_int4(*(_rows(tensors[k], rows) for k in ("qweight", "scale", "zero")), dtype, out)

    def describe(self) -> str:
        return f"int4 (asymmetric, groups of {self.group_size})"


FORMATS: dict[str, type[QuantFormat]] = {"int8": Int8Format, "nf4": NF4Format, "int4": Int4Format}


# ---------------------------------------------------------------------- product on a packed weight
BLOCK_ELEMENTS = 2**24  # a weight larger than this is dequantised a block of output rows at a time


def _row_blocks(out_features: int, in_features: int) -> list[slice]:
    step = out_features if out_features * in_features <= BLOCK_ELEMENTS else max(1, BLOCK_ELEMENTS // in_features)
    return [slice(o, min(o + step, out_features)) for o in range(0, out_features, step)]


Dequantize = Callable[..., Tensor]  # (dtype, rows, out) -> W[rows] in dtype, written into out


def _dequantized_rows(dequantize: Dequantize, dtype: torch.dtype, rows: slice, in_features: int,
                      device: torch.device) -> Tensor:
    """W[rows] dequantised into the workspace's scratch buffer (valid for one product)."""
    return dequantize(dtype, rows, scratch((rows.stop - rows.start, in_features), dtype, device))


class DequantizedLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W = dequantize(x.dtype), for a frozen packed W: dX = G W with W dequantised again;
    saves no float copy of W (only the function that reads the packed tensors). Each block of rows is dequantised
    into one reused scratch buffer (``kernels.workspace``), used for its product and overwritten by the next."""

    @staticmethod
    def forward(ctx, x, bias, dequantize, out_features, in_features):
        ctx.dequantize, ctx.shape = dequantize, (out_features, in_features)
        ctx.bias_dtype = None if bias is None else bias.dtype
        b = None if bias is None else bias.to(x.dtype)
        blocks = _row_blocks(out_features, in_features)
        if len(blocks) == 1:
            return F.linear(x, _dequantized_rows(dequantize, x.dtype, blocks[0], in_features, x.device), b)
        y = x.new_empty(*x.shape[:-1], out_features)
        for rows in blocks:
            w = _dequantized_rows(dequantize, x.dtype, rows, in_features, x.device)
            y[..., rows] = F.linear(x, w, None if b is None else b[rows])
        return y

    @staticmethod
    def backward(ctx, grad):
        dx = db = None
        if ctx.needs_input_grad[0]:
            for rows in _row_blocks(*ctx.shape):
                part = grad[..., rows] @ _dequantized_rows(ctx.dequantize, grad.dtype, rows, ctx.shape[1], grad.device)
                dx = part if dx is None else dx.add_(part)
        if ctx.needs_input_grad[1]:  # a bias trained (bias="all")
            db = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, db, None, None, None


def dequantized_linear(x: Tensor, bias: Tensor | None, dequantize: Dequantize, out_features: int,
                       in_features: int) -> Tensor:
    """x W^T + b for a frozen W held packed: ``dequantize(dtype, rows, out)`` writes W[rows] into ``out``."""
    return DequantizedLinearFunction.apply(x, bias, dequantize, out_features, in_features)
