"""One decision for every command: the frozen base's storage dtype and the dtype its products run in.

``--base-dtype`` (TrainConfig.base_dtype; ``--base-dtype`` of eval, merge, generate, norms, rank-advice,
reproduce and bench) is the STORAGE of the frozen base: the weights are read straight into it (shard by
shard, ``models.load_model``), never through an fp32 copy.

    fp32 | bf16 | fp16   as given
    int8 | int4          the frozen linear weights packed (QuantSpec: int8 per channel; int4 as --quant-format nf4,
                         QLoRA's, or int4 group-wise), everything else (embeddings, norms, the head) stored in bf16:
                         the storage below is bf16 and ``PrecisionPlan.quant`` says the packed format
    auto                 fp32 when the run fits in memory with an fp32 base, else bf16; with --bf16, bf16
                         wherever this machine's bf16 products are at least as fast as its fp32 ones

The COMPUTE dtype follows from the storage and the device (``plan_precision``):

    CPU, bf16 storage, bf16 GEMM at least as fast as fp32 (AMX, AVX512-BF16)  ->  bf16 products (use_bf16)
    CPU, any other 16-bit storage                                           ->  fp32 products, each weight
                                                                                widened for its product only
                                                                                (speed.widen.compute_in_fp32)
    CUDA/MPS, bf16 storage (or --bf16)                                      ->  bf16 products
    fp32 storage                                                            ->  fp32 (bf16 autocast on a GPU
                                                                                with --bf16)

The AUTOCAST is the plan's too (``autocast_dtype``): bf16 on a GPU under --bf16, whatever the storage; none on
a CPU, where bf16 means bf16 weights (use_bf16), which is faster than autocast. The trainer's autocast is the plan's.

Adapters, fully trained heads and AdamW's state are float32 in every case. fp16 products on a GPU
would need loss scaling, which lorakit does not do: training with an fp16 base on a GPU is refused
(its storage on CPU is fine: the products are fp32); bf16 on a GPU without bf16 support is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.kernels.quantize import INT4_GROUPS

BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED = ("int8", "int4")  # --base-dtype values that pack the frozen linear weights (adapters.quantize)
BASE_DTYPE_CHOICES = ("auto", *BASE_DTYPES, *QUANTIZED)
QUANT_FORMATS = ("nf4", "int4")  # the 4-bit formats; nf4 the default (equal to int4 g128 in speed on this CPU:
# benchmarks/results/quant_products.json, dequantise + fp32 GEMM 597 ms vs 595 ms; nf4 is QLoRA's)
GROUP_SIZES = INT4_GROUPS  # the block / group sizes the packed formats take (kernels.quantize)


@dataclass(frozen=True)
class QuantSpec:
    """A packed frozen base: ``bits`` 8 (int8 per output channel, or per group of ``int8_group`` inputs) or 4
    (``format`` nf4 or int4, blocks/groups of ``group_size``, ``double_quant`` for nf4), the LM head too with
    ``quantize_head``.

    ``gguf_layout``: no format was asked for, so a GGUF model takes its file's own layout where it has one
    (``resolve(spec)``, ``train.gguf_packed``): int4 g32 when its linear weights are Q4_0 / Q4_1 / Q4_K blocks, int8
    g32 for Q8_0 ones (re-packed from the file's blocks, not re-rounded); anything else, and a model directory, gets
    the format fields (int8 per channel; nf4 g64). ``source``: the GGUF block type a resolved spec came from."""

    bits: int
    format: str = "nf4"
    group_size: int = 64
    double_quant: bool = False
    quantize_head: bool = False
    int8_group: int | None = None
    gguf_layout: bool = False
    source: str | None = None

    def make(self):
        """The kernels' QuantFormat (a ConfigError for a combination it does not allow)."""
        from lorakit.adapters.quantize import make_format

        return make_format(self.bits, self.format, self.group_size, self.double_quant,
                           int8_group_size=self.int8_group if self.bits == 8 else None)

    def resolve(self, model_spec: str | None) -> QuantSpec:
        """The concrete spec for ``model_spec`` (``gguf_layout``: the GGUF file's own layout where it has one)."""
        if not self.gguf_layout:
            return self
        from lorakit.train.gguf_packed import resolve_quant

        return resolve_quant(self, model_spec)

    def describe(self) -> str:
        """What run.json records as the base format: "int8", "int8 g32", "nf4 g64", "nf4 g64 double-quant",
        "int4 g128", "int4 g32 (the GGUF's Q4_K blocks)"."""
        if self.bits == 8:
            text = "int8" + (f" g{self.int8_group}" if self.int8_group else "")
        else:
            text = f"{self.format} g{self.group_size}" + (" double-quant" if self.double_quant else "")
        if self.source:
            text += f" (the GGUF's {self.source})"
        return text + (" +head" if self.quantize_head else "")


def quant_spec(options) -> QuantSpec | None:
    """The QuantSpec of a configuration's --base-dtype and quantisation options (None: a float base); options given
    for a float base, or a combination the formats do not allow, are refused in one line naming the fix. With no
    --quant-format, --double-quant or --group-size, a GGUF model (``options.model``) takes its file's
    own layout where it has one (``QuantSpec.gguf_layout``); --group-size None means 64."""
    given = [flag for flag, on in (("--quant-format", options.quant_format is not None),
                                   ("--double-quant", options.double_quant),
                                   ("--group-size", options.group_size is not None),
                                   ("--quantize-head", options.quantize_head)) if on]
    if options.base_dtype not in QUANTIZED:
        if given:
            raise ConfigError(f"{', '.join(given)} applies to a packed base only; add --base-dtype int4 (or int8), or "
                              f"drop {', '.join(given)}")
        return None
    if options.base_dtype == "int8" and (options.quant_format is not None or options.double_quant
                                         or options.group_size is not None):
        raise ConfigError("--quant-format, --double-quant and --group-size choose a 4-bit format (int8 has a scale per "
                          "output channel); use --base-dtype int4 with them, or drop them for int8")
    bits = 8 if options.base_dtype == "int8" else 4
    native = bits == 8 or (options.quant_format is None and not options.double_quant and options.group_size is None)
    spec = QuantSpec(bits, "int8" if bits == 8 else options.quant_format or QUANT_FORMATS[0], options.group_size or 64,
                     options.double_quant, options.quantize_head, gguf_layout=native)
    spec.make()
    model = getattr(options, "model", None)
    return spec.resolve(model) if isinstance(model, str) and model else spec


def default_quant(value: str | torch.dtype | None) -> QuantSpec | None:
    """The QuantSpec a bare --base-dtype int8/int4 means (int8; nf4 blocks of 64; a GGUF's own layout where it has
    one), None for a float dtype."""
    specs = {"int8": QuantSpec(8, "int8", gguf_layout=True), "int4": QuantSpec(4, gguf_layout=True)}
    return specs.get(value) if isinstance(value, str) else None


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in BASE_DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def base_dtype(value: str | torch.dtype) -> torch.dtype | None:
    """The torch dtype of a --base-dtype value (None for "auto"); anything else is refused in one line."""
    if isinstance(value, torch.dtype):
        if value in BASE_DTYPES.values():
            return value
        raise ConfigError(f"base dtype {value} is not one of {', '.join(map(str, BASE_DTYPES.values()))}")
    if value == "auto":
        return None
    if value in QUANTIZED:  # the float parts of a packed base
        return torch.bfloat16
    if value not in BASE_DTYPES:
        raise ConfigError(f"--base-dtype {value!r} is not one of {', '.join(BASE_DTYPE_CHOICES)}")
    return BASE_DTYPES[value]


def autocast_dtype(bf16: bool, device: torch.device | str) -> torch.dtype | None:
    """The autocast of a run on ``device``: bf16 on a GPU under --bf16, else none (see the module docstring)."""
    return torch.bfloat16 if bf16 and torch.device(device).type != "cpu" else None


@dataclass(frozen=True)
class PrecisionPlan:
    storage: torch.dtype  # the frozen base as loaded
    compute: torch.dtype  # its products
    autocast: torch.dtype | None  # a GPU's autocast dtype (None: none)
    why: str
    quant: QuantSpec | None = None  # the frozen linear weights packed (storage: the rest of the base)

    @property
    def base_format(self) -> str:
        return self.quant.describe() if self.quant is not None else dtype_name(self.storage)

    def to_dict(self) -> dict[str, str | None]:
        return {"base_dtype": dtype_name(self.storage), "base_format": self.base_format,
                "compute_dtype": dtype_name(self.compute),
                "autocast": None if self.autocast is None else dtype_name(self.autocast), "why": self.why}


def plan_precision(requested: str | torch.dtype, device: torch.device | str, *, bf16: bool = False,
                   fits: Callable[[torch.dtype], bool] = lambda dtype: True, training: bool = True,
                   quant: QuantSpec | None = None) -> PrecisionPlan:
    """Storage and compute dtypes for ``requested`` (--base-dtype) on ``device`` (see the module docstring).
    ``fits(dtype)``: whether the run fits in memory with the base stored in ``dtype`` (the memory plan).
    ``quant``: the packed format of an int8/int4 base (default: ``default_quant(requested)``)."""
    quant = quant or default_quant(requested)
    plan = _plan_precision(requested, torch.device(device), bf16, fits, training)
    if quant is None:
        return plan
    why = f"--base-dtype {'int8' if quant.bits == 8 else 'int4'}: frozen linear weights packed ({quant.describe()}), " \
          "the rest in bf16" + plan.why.removeprefix("--base-dtype bf16")
    return PrecisionPlan(plan.storage, plan.compute, plan.autocast, why, quant)


def _plan_precision(requested: str | torch.dtype, device: torch.device, bf16: bool,
                    fits: Callable[[torch.dtype], bool], training: bool) -> PrecisionPlan:
    from lorakit.speed.gemm import bf16_decision

    storage = base_dtype(requested)
    on_cpu = device.type == "cpu"
    bf16_pays, measured = bf16_decision(device) if (bf16 or storage == torch.bfloat16 or storage is None) else (False, "")
    if storage is None:
        if bf16 and bf16_pays:
            storage, why = torch.bfloat16, f"--base-dtype auto with --bf16: {measured}"
        elif fits(torch.float32):
            storage, why = torch.float32, "--base-dtype auto: an fp32 base fits in memory"
        else:
            storage, why = torch.bfloat16, "--base-dtype auto: an fp32 base does not fit in memory, a bf16 one is stored"
    else:
        why = f"--base-dtype {dtype_name(storage)}"
    if not on_cpu and training:
        _check_gpu_dtype(storage, device)
    autocast = autocast_dtype(bf16, device)
    if storage == torch.float32:
        if bf16 and on_cpu and not bf16_pays:
            why += f"; --bf16: {measured}"
        return PrecisionPlan(storage, torch.float32, autocast, why + (", bf16 autocast" if autocast else ""))
    if not on_cpu:
        return PrecisionPlan(storage, storage, autocast, why + f"; {dtype_name(storage)} products on {device.type}")
    if storage == torch.bfloat16 and bf16_pays:
        return PrecisionPlan(storage, torch.bfloat16, None, why + f"; bf16 products ({measured})")
    reason = measured if storage == torch.bfloat16 else "fp16 products are slow on CPUs"
    return PrecisionPlan(storage, torch.float32, None,
                         why + f"; fp32 products, each weight widened for its product only ({reason})")


def _check_gpu_dtype(storage: torch.dtype, device: torch.device) -> None:
    if storage == torch.float16:
        raise ConfigError(f"--base-dtype fp16 on {device.type} computes in fp16, which needs loss scaling that lorakit "
                          "does not do; use --base-dtype bf16 (or fp32)")
    if storage == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--base-dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use "
                          "--base-dtype fp32")


def apply_precision(model: nn.Module, plan: PrecisionPlan) -> str | None:
    """After attach: make an adapted model compute as ``plan`` says; what was done, as a note (None: nothing)."""
    from lorakit.adapters.precision import use_bf16
    from lorakit.speed.widen import compute_in_fp32, train_in_fp32

    train_in_fp32(model)  # a head trained whole (modules_to_save) of a base loaded in 16 bits
    if plan.storage == torch.float32:
        return None
    if plan.compute == torch.float32:
        return compute_in_fp32(model).describe()
    use_bf16(model, plan.compute, when="always")
    return f"frozen weights stored and computed in {dtype_name(plan.compute)}; adapters and AdamW state in float32"
