"""The memory plan: the peak resident memory of one ``lorakit train`` process, from the model's config alone.

Before a weight is read, ``plan_memory(config, ...)`` adds up what the process will hold at its peak (the
first layer of the backward pass, when every saved activation is still alive) and ``check_fits`` compares
it with ``available_memory()``, refusing a run that cannot fit with the changes that would make it fit.
Notation: N = b L tokens per micro-batch (b = --batch-size / processes rows of L = --max-length tokens), n
layers, H hidden, I intermediate, h / k query / key-value heads of width d, V vocabulary, r rank, w the
bytes of the base dtype, a those of the compute (activation) dtype.

    frozen weights      P_frozen w                      P from the config (``count_parameters``)
    trainable + AdamW   16 P_train                      fp32 value, gradient and two moments (adapters:
                                                        r (in + out) per targeted linear; a classifier head)
    activations         n S + W                         S: what autograd saves per layer, W: the backward's
                                                        transients while one layer is differentiated
      decoder layer     S = 2 N H (4 + a)               two RMSNorms (their fp32 input, their output)
                          + 4 N d (h + k) + N h d a     SDPA's fp32 q, k, v, output (CPU), o_proj's input
                          + 4 N I a + r N a T_layer     gate, act, up, their product; each adapter's x A^T
      encoder layer     S = 7 N H a + 2 N H + 2 N I a   inputs of q/k/v/o/ffn and both LayerNorms, dropout
                          + b h L^2 (5 + a)             masks, GELU; scores' softmax (fp32), mask, dropped probs
      checkpointed      S = N H a per layer boundary, plus one layer's S during its recompute
    LM head chunk       c V (a + 4[a != 4]) + N H a     the fused loss's logits rows (c = 96 MiB / 4V rows,
                                                        kernels.linear_cross_entropy) and the gradient it saves
    widened weight      4 max(out in)                   a bf16 base computing in fp32 widens one weight at a time
    DDP buckets         4 P_train                       one flat gradient copy per process (processes > 1)
    runtime             RUNTIME_BYTES                   python + torch + transformers + lorakit imported
    allocator slack     SLACK (activations + head       glibc's freed-but-kept pages (speed.allocator fixes its
                          chunk)                        mmap threshold, so little stays: SLACK = 0.1)

The activation terms count what lorakit's own paths save (kernels.lora_linear saves x and x A^T, not the
frozen weight's output; speed.attention runs CPU attention in fp32); they were calibrated against the
measured VmHWM of config-built Llama models (tests/train/test_memory_plan.py runs a few).

The model's shape from its config is ``model_shape``; what may be used, ``available``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorakit.adapters.config import LoraConfig
from lorakit.adapters.targets import leaf
from lorakit.errors import ConfigError
from lorakit.kernels.linear_cross_entropy import CHUNK_BYTES, WIDEN_ELEMENTS
from lorakit.train.available import available_memory, parse_memory
from lorakit.train.model_shape import Architecture, Linear, architecture, count_parameters, targeted

GB = 10**9
RUNTIME_BYTES = 380 * 2**20  # VmHWM of python + torch + transformers + lorakit.train imported and one tiny step (363 MiB)
SLACK = 0.1  # allocator slack: freed pages glibc keeps. With speed.allocator's fixed mmap threshold (attach, load_model)
# the config-built settings of tests/train/test_memory_plan.py peak below the plan without slack, by 0.1-0.2 of these
# rows' bytes (with glibc's dynamic threshold: 0.0-0.6 above it); 0.1 errs high
FAULT_AROUND = 64 << 10  # a fault on a file's map also maps the cached pages around it (Linux fault_around_bytes)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype | str) -> str:
    """"fp32" / "bf16" / "fp16" for a torch dtype or one of its spellings."""
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not one of fp32, bf16, fp16")
        dtype = DTYPES[dtype.lower()]
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if dtype not in names:
        raise ConfigError(f"dtype {dtype} is not one of torch.float32, torch.bfloat16, torch.float16")
    return names[dtype]


def dtype_bytes(dtype: torch.dtype | str) -> int:
    return 4 if dtype_name(dtype) == "fp32" else 2


# ---------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class MemoryPlan:
    """The rows (what, bytes) of one process's peak resident memory, their total, and the settings they assume."""

    rows: list[tuple[str, int]]
    total: int
    settings: dict = field(default_factory=dict)

    def table(self, available: tuple[int, str] | None = None) -> str:
        """A small aligned text table in GB (10^9 bytes), for ``lorakit train --dry-run``."""
        width = max([len(what) for what, _ in self.rows] + [len("total (peak resident)")])
        lines = [f"{what:<{width}}  {nbytes / GB:7.2f} GB" for what, nbytes in self.rows]
        lines.append(f"{'-' * width}  {'-' * 10}")
        lines.append(f"{'total (peak resident)':<{width}}  {self.total / GB:7.2f} GB")
        if available is not None:
            lines.append(f"{'available (' + available[1] + ')':<{width}}  {available[0] / GB:7.2f} GB")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """For run.json ("memory_plan"): bytes, and the settings the plan assumed."""
        return {"rows": [{"what": what, "bytes": int(nbytes)} for what, nbytes in self.rows], "total_bytes": int(self.total),
                "settings": dict(self.settings)}


def _check_positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name}={value!r} must be a positive integer")


# long: the plan's rows one after another, as the module docstring's table lists them
# many parameters: the run's settings, each a keyword (plan_run passes them as one dict)
def plan_memory(config, *, task: str = "causal-lm", base_dtype: torch.dtype | str = torch.float32, batch_size: int = 1,
                seq_len: int = 256, rank: int | None = None, targets: str | list[str] | LoraConfig = "all-linear",
                gradient_checkpointing: bool = False, compute_dtype: torch.dtype | str | None = None, processes: int = 1,
                grad_accum: int = 1, attention_mask: bool = False, runtime: int = RUNTIME_BYTES,
                quant=None) -> MemoryPlan:
    """The peak resident memory of one training process (see the module docstring for each row's formula).

    batch_size is ``--batch-size``, the rows of one micro-batch over all processes (each takes batch_size /
    processes); grad_accum does not change the peak. targets: a preset, regex or list (with ``rank``), or a
    LoraConfig (its targets, rank, rank_pattern, layers, exclude). compute_dtype: the activations' dtype, by
    default the base dtype (a bf16 base computes in bf16; pass torch.float32 where it computes in fp32).
    attention_mask: batches carry a padding mask (grouped-query keys and values are then repeated to every head).
    quant: a ``train.precision.QuantSpec``: the frozen linear weights counted packed (``frozen_rows``), the rest at
    ``base_dtype``.
    """
    _check_positive(batch_size=batch_size, seq_len=seq_len, processes=processes, grad_accum=grad_accum)
    if isinstance(targets, LoraConfig):
        lora = targets if rank is None else targets.replace(r=rank)
    else:
        lora = LoraConfig(r=rank if rank is not None else 8, targets=targets)
    arch = architecture(config, task)
    w = dtype_bytes(base_dtype)
    cdt = base_dtype if compute_dtype is None else compute_dtype
    a = dtype_bytes(cdt)
    b = max(1, math.ceil(batch_size / processes))
    L, n = seq_len, arch.layers
    N = b * L
    H = arch.hidden

    chosen = targeted(arch, lora)
    adapter_params = sum(r * (lin.fan_in + lin.fan_out) for lin, r in chosen)
    trained = [lin for lin in arch.linears if lin.path in arch.trained_heads]
    head_params = sum(lin.fan_in * lin.fan_out + lin.fan_out * lin.bias for lin in trained)
    frozen = arch.parameters - head_params
    rank_tokens = sum(r for _, r in chosen) // max(1, n)  # sum of ranks per layer: each saves x A^T (N x r)

    per_layer, transient, what = _layer_bytes(arch, b, L, a, attention_mask, rank_tokens)
    if gradient_checkpointing:
        saved = n * N * H * a + per_layer
        act_label = f"activations (batch {b} x {L} tokens x {n} layers, checkpointed)"
    else:
        saved = n * per_layer
        act_label = f"activations (batch {b} x {L} tokens x {n} layers)"
    activations = saved + transient + N * H * a + N * H * 4  # + the embedding output and the final norm's fp32 input
    rows: list[tuple[str, int]] = frozen_rows(arch, frozen, base_dtype, quant, tokens=N)
    if head_params:
        rows.append(("classifier head + AdamW state (fp32)", 16 * head_params))
    rows.append((f"adapters + AdamW state (fp32, {len(chosen)} layers)", 16 * adapter_params))
    rows.append((act_label, activations))
    if task == "causal-lm":
        rows.append(_head_row(arch, N, a))
    if a > w:  # a 16-bit base computing in fp32 widens one frozen weight at a time (a packed one: dequantises)
        rows.append(("widened fp32 copy of the largest frozen weight", _largest_widened(arch, task) * 4))
    elif quant is not None:  # a packed base computing in bf16 dequantises one frozen weight at a time
        rows.append((f"dequantised {dtype_name(cdt)} copy of the largest frozen weight", _largest_widened(arch, task) * a))
    if processes > 1:
        rows.append(("DDP buckets", 4 * (adapter_params + head_params)))
    rows.append(("runtime (interpreter, torch, transformers)", runtime))
    # (the widened weight is kernels.workspace's one reused buffer, counted once above: no slack)
    dynamic = sum(nbytes for what, nbytes in rows if what.startswith(("activations", "LM head")))
    rows.append(("allocator slack", int(SLACK * dynamic)))
    settings = {"task": task, "model_type": arch.model_type, "layout": what if arch.exact else f"{what} (meta)",
                "base_dtype": dtype_name(base_dtype), "compute_dtype": dtype_name(cdt),
                "base_format": quant.describe() if quant is not None else dtype_name(base_dtype),
                "gradient_checkpointing": bool(gradient_checkpointing), "batch_size": batch_size, "micro_batch": b,
                "seq_len": seq_len, "processes": processes, "grad_accum": grad_accum, "rank": lora.r,
                "targets": lora.targets, "adapted_layers": len(chosen), "parameters": arch.parameters,
                "trainable_parameters": adapter_params + head_params, "attention_mask": attention_mask}
    rows = [(what, int(nbytes)) for what, nbytes in rows]
    return MemoryPlan(rows, sum(nbytes for _, nbytes in rows), settings)


def frozen_rows(arch: Architecture, frozen: int, base_dtype: torch.dtype | str, quant,
                tokens: int = 0) -> list[tuple[str, int]]:
    """The frozen weights' row(s): ``frozen`` parameters at ``base_dtype``; with ``quant`` the frozen linear weights
    (not the output heads unless quant.quantize_head, never a trained task head) at their packed bytes
    (``adapters.quantize.packed_bytes``), each width checked against the block or group size first, and a causal
    LM's input embedding, when no head is tied to it, paged from the weights file (``train.quantized_load``): the
    pages of the rows ``tokens`` tokens look up (each row and the pages a fault maps around it)."""
    w = dtype_bytes(base_dtype)
    if quant is None:
        return [(f"frozen weights ({dtype_name(base_dtype)})", frozen * w)]
    from lorakit.adapters.quantize import packed_bytes

    fmt = quant.make()
    skip = set(arch.trained_heads) | (set() if quant.quantize_head else set(arch.heads_paths) | {"lm_head"})
    packed = [lin for lin in arch.linears if lin.path not in skip and leaf(lin.path) not in skip]
    for lin in packed:
        try:
            fmt.check(lin.fan_in, lin.path)
        except ConfigError as exc:
            fits = [g for g in (32, 64, 128) if all(other.fan_in % g == 0 for other in packed)]
            fix = f"use --group-size {' or '.join(map(str, fits))}" if fits else "no group size divides every width"
            raise ConfigError(f"--group-size {quant.group_size}: {str(exc).split('; ')[0]}; {fix}, or "
                              "--base-dtype int8 (per output channel)") from None
    numel = sum(lin.fan_in * lin.fan_out for lin in packed)
    rows = [(f"frozen linear weights ({quant.describe()}, {len(packed)} layers)",
             sum(packed_bytes(fmt, lin.fan_out, lin.fan_in) for lin in packed))]
    untied = any(leaf(lin.path) == "lm_head" for lin in arch.linears)
    if arch.fused_head and untied:  # (a tied head reads every row each step: the whole matrix stays resident)
        embedding = arch.vocab * arch.hidden
        numel += embedding
        rows.append((f"input embedding (paged from the file: {min(tokens, arch.vocab)} rows)",
                     min(tokens, arch.vocab) * (arch.hidden * w + FAULT_AROUND)))
    return rows + [(f"other frozen weights ({dtype_name(base_dtype)})", (frozen - numel) * w)]


def _layer_bytes(arch: Architecture, b: int, L: int, a: int, attention_mask: bool, rank_tokens: int) -> tuple[int, int, str]:
    """(S: what autograd saves per layer, W: the backward's transients, the layout's name) for micro-batches of
    ``b`` rows of ``L`` tokens computing in ``a``-byte activations (the module docstring's formulas)."""
    N, H, I = b * L, arch.hidden, arch.intermediate
    h, k, d = arch.heads, arch.kv_heads, arch.head_dim
    if arch.encoder:
        scores = b * h * L * L
        per_layer = 7 * N * H * a + 2 * N * H + 2 * N * I * a + scores * (5 + a) + N * rank_tokens * a
        return per_layer, scores * 4 + 2 * N * I * a + 2 * N * H * 4, "encoder"
    kv = h if attention_mask else k
    # SDPA's output is o_proj's input in fp32 (one storage); a 16-bit compute casts it back for o_proj
    per_layer = (2 * N * H * (4 + a) + 4 * N * d * (2 * h + 2 * kv) + (a != 4) * N * h * d * a
                 + 4 * N * I * a + N * rank_tokens * a)
    return per_layer, 3 * N * I * a + 3 * N * H * 4, "decoder"


def _head_row(arch: Architecture, N: int, a: int) -> tuple[str, int]:
    """A causal LM's logits: the fused loss's chunk of rows, or the whole N x V of an unfused head."""
    V, H = arch.vocab, arch.hidden
    if arch.fused_head:
        rows_per_chunk = max(1, min(N, max(32, CHUNK_BYTES // (4 * V))))
        chunk = rows_per_chunk * V * (a + (4 if a != 4 else 0)) + N * H * a
        return (f"LM head chunk ({rows_per_chunk} x {V} logits)", chunk)
    return (f"LM head logits (unfused, {N} x {V})", N * V * (a + 12))


def _largest_widened(arch: Architecture, task: str) -> int:
    """The elements of the largest frozen weight widened to fp32 at once (a 16-bit base computing in fp32); the
    fused loss widens its head WIDEN_ELEMENTS weights at a time (kernels.linear_cross_entropy._vocab_blocks)."""
    H = arch.hidden
    fused = task == "causal-lm" and arch.fused_head
    block = min(arch.vocab, max(256, WIDEN_ELEMENTS // H)) * H
    biggest = max([lin.fan_in * lin.fan_out for lin in arch.linears if not (fused and leaf(lin.path) == "lm_head")]
                  + [block if fused else 0])
    if task == "causal-lm" and not fused and not any(leaf(lin.path) == "lm_head" for lin in arch.linears):
        biggest = max(biggest, arch.vocab * H)  # a tied head is the embedding matrix
    return biggest


# ---------------------------------------------------------------------------------------------- refusing early
def _format(settings: dict) -> str:
    """The base's storage as --base-dtype names it: "int8" / "int4" for a packed base, else its dtype's name."""
    quant = settings.get("quant")
    return dtype_name(settings["base_dtype"]) if quant is None else f"int{quant.bits}"


def _flags(settings: dict, base: dict) -> str:
    out = []
    if _format(settings) != _format(base):
        out.append(f"--base-dtype {_format(settings)}")
    if settings["gradient_checkpointing"] and not base["gradient_checkpointing"]:
        out.append("--gradient-checkpointing")
    if settings["batch_size"] != base["batch_size"]:
        out.append(f"--batch-size {settings['batch_size']} --grad-accum {settings['grad_accum']}")
    if settings["seq_len"] != base["seq_len"]:
        out.append(f"--max-length {settings['seq_len']}")
    return " ".join(out)


# The bases a refusal may offer, least precision given up first: bf16, then int8 and 4-bit packed frozen linears
# (--base-dtype int8 / int4: train.precision.default_quant's formats; embeddings and norms stay bf16).
STORAGE_STEPS = ("bf16", "int8", "int4")


def _storages(settings: dict) -> list[tuple[int, torch.dtype | str, object]]:
    """(precision given up, base_dtype, quant) for the current base and each smaller one of STORAGE_STEPS."""
    from lorakit.train.precision import default_quant

    here = _format(settings)
    rank = STORAGE_STEPS.index(here) + 1 if here in STORAGE_STEPS else 0
    out = [(0, settings["base_dtype"], settings.get("quant"))]
    for step, name in enumerate(STORAGE_STEPS, start=1):
        if step > rank:
            out.append((step, torch.bfloat16, default_quant(name)))
    return out


def _candidates(settings: dict) -> list[tuple[tuple, dict]]:
    """Every combination of the four changes, each with its cost: (changes made, how much is given up)."""
    processes = settings.get("processes", 1)
    checkpoints = [bool(settings["gradient_checkpointing"])] + ([] if settings["gradient_checkpointing"] else [True])
    batches, b = [settings["batch_size"]], settings["batch_size"]
    while b % 2 == 0 and b // 2 >= processes and (b // 2) % processes == 0:
        b //= 2
        batches.append(b)
    lengths, L = [settings["seq_len"]], settings["seq_len"]
    while L // 2 >= 32:
        L //= 2
        lengths.append(L)
    out = []
    for (given_up, dt, quant), gc, bs, sl in itertools.product(_storages(settings), checkpoints, batches, lengths):
        accum = settings.get("grad_accum", 1) * (settings["batch_size"] // bs)
        s = dict(settings, base_dtype=dt, quant=quant, gradient_checkpointing=gc, batch_size=bs, grad_accum=accum,
                 seq_len=sl)
        changes = (given_up > 0) + (gc != settings["gradient_checkpointing"]) + \
            (bs != settings["batch_size"]) + (sl != settings["seq_len"])
        # fewest changes first; then the cheapest kind: checkpointing (time), a smaller base (precision: bf16, then
        # int8, then 4-bit), smaller micro-batches (time, same results), shorter rows (changes the data) last
        cost = (changes, sl != settings["seq_len"], settings["seq_len"] / sl, settings["batch_size"] / bs, given_up)
        out.append((cost, s))
    return sorted(out, key=lambda c: c[0])


def check_fits(plan_for: Callable[[dict], MemoryPlan], settings: dict, available: tuple[int, str],
               *, options: int = 2) -> None:
    """Raise ConfigError (one line) when ``plan_for(settings)`` needs more than ``available`` (bytes, source).

    ``settings`` holds at least base_dtype, gradient_checkpointing, batch_size, seq_len (and grad_accum, processes);
    ``plan_for`` maps such a dict to a MemoryPlan (typically ``lambda s: plan_memory(config, **s)``). The message
    names the estimate, the limit and up to ``options`` of the cheapest combinations of a smaller base (--base-dtype
    bf16, int8, int4: ``STORAGE_STEPS``; ``settings["quant"]`` is the current QuantSpec or None), --gradient-checkpointing, a smaller --batch-size (with a larger --grad-accum: the same global batch) and a
    smaller --max-length that fit; or, when none does, the smallest plan.
    """
    limit, source = available
    plan = plan_for(settings)
    if plan.total <= limit:
        return
    head = f"the run needs ~{plan.total / GB:.1f} GB, {limit / GB:.1f} GB available ({source})"
    fits: list[tuple[str, int]] = []
    smallest: tuple[str, int] | None = None
    changes_done, listed = None, set()
    for cost, s in _candidates(settings)[1:]:
        if changes_done is not None and cost[0] > changes_done:
            break
        try:
            total = plan_for(s).total
        except ConfigError:  # a packed base whose block size a width does not divide: not an option here
            continue
        if smallest is None or total < smallest[1]:
            smallest = (_flags(s, settings), total)
        kinds = (_format(s) != _format(settings),) + tuple(s[key] != settings[key] for key in (
            "gradient_checkpointing", "batch_size", "seq_len"))
        if total <= limit and len(fits) < options and kinds not in listed:  # one option of each kind of change
            fits.append((_flags(s, settings), total))
            listed.add(kinds)
            changes_done = cost[0]
    if fits:
        what = ", or ".join(f"{flags} (~{total / GB:.1f} GB)" for flags, total in fits)
        raise ConfigError(f"{head}; fits with {what}")
    hint = f"the smallest plan, {smallest[0]}, needs ~{smallest[1] / GB:.1f} GB" if smallest else "no change to try"
    raise ConfigError(f"{head}; nothing fits: {hint}; use a machine with more memory or a smaller model")


__all__ = ["Architecture", "GB", "Linear", "MemoryPlan", "RUNTIME_BYTES", "architecture", "available_memory", "check_fits",
           "count_parameters", "parse_memory", "plan_memory", "targeted"]
