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
    allocator slack     SLACK (activations + head       glibc's freed-but-kept pages (measured: 0-60% of the
                          chunk + widened weight)       step's own allocations on top of them)

The activation terms count what lorakit's own paths save (kernels.lora_linear saves x and x A^T, not the
frozen weight's output; speed.attention runs CPU attention in fp32); they were calibrated against the
measured VmHWM of config-built Llama models (tests/train/test_memory_plan.py runs a few).
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.adapters.config import PRESETS, LoraConfig
from lorakit.adapters.targets import leaf, matches
from lorakit.architectures import HEAD_NAMES, family, fused_projection, separate_projections
from lorakit.errors import ConfigError
from lorakit.kernels.linear_cross_entropy import CHUNK_BYTES, WIDEN_ELEMENTS

GB = 10**9
RUNTIME_BYTES = 380 * 2**20  # VmHWM of python + torch + transformers + lorakit.train imported and one tiny step (363 MiB)
SLACK = 0.5  # allocator slack: glibc keeps freed activation pages and reuses them imperfectly (calibrated: 0.0-0.6
# of the activation, head-chunk and widened bytes on the measured settings; one rate for all, erring high)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
LLAMA_LIKE = ("llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "helium", "smollm3")
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert")
TASKS = ("causal-lm", "classify")


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


# ---------------------------------------------------------------------------------------------- the architecture
@dataclass(frozen=True)
class Linear:
    path: str  # the module path transformers gives it (adapter targets are matched against it)
    fan_in: int
    fan_out: int
    bias: bool = False
    layer: int | None = None


@dataclass(frozen=True)
class Architecture:
    """What the plan needs of a model, read from its transformers config."""

    model_type: str
    encoder: bool
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    linears: tuple[Linear, ...]  # every nn.Linear in the model, heads included
    other_frozen: int  # embeddings, norms, position tables: frozen parameters outside the linears
    heads_paths: tuple[str, ...]  # output heads ('all-linear' never adapts them)
    trained_heads: tuple[str, ...]  # task heads trained in full in fp32 (a classifier)
    fused_head: bool  # a causal LM whose loss lorakit fuses with the head (chunked logits)
    exact: bool  # parameters counted from the layout (True) or by building the model on the meta device

    @property
    def parameters(self) -> int:
        return self.other_frozen + sum(lin.fan_in * lin.fan_out + lin.fan_out * lin.bias for lin in self.linears)


def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def architecture(config, task: str = "causal-lm") -> Architecture:
    """The layout of a llama/qwen2/mistral/gemma-style decoder or a BERT-style encoder, from its config; other
    model types are built on the meta device (no memory) and read from there."""
    if task not in TASKS:
        raise ConfigError(f"task={task!r} must be one of {', '.join(TASKS)}")
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_LIKE:
        return _decoder(config, task)
    if model_type in BERT_LIKE and task == "classify":
        return _bert(config)
    return _from_meta(config, task)


def _decoder(config, task: str) -> Architecture:
    t = config.model_type
    H, n, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    h = config.num_attention_heads
    k = _get(config, "num_key_value_heads", default=h)
    d = _get(config, "head_dim", default=H // h)
    I = config.intermediate_size
    qkv_bias = t == "qwen2" or bool(getattr(config, "attention_bias", False))
    o_bias = t != "qwen2" and bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    norms = 4 if t in ("gemma2", "gemma3_text") else 2  # gemma 2/3 also norm after attention and the MLP
    qk_norm = 2 * d if t in ("qwen3", "gemma3_text") else 0
    linears = []
    for i in range(n):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        linears += [Linear(f"{a}.q_proj", H, h * d, qkv_bias, i), Linear(f"{a}.k_proj", H, k * d, qkv_bias, i),
                    Linear(f"{a}.v_proj", H, k * d, qkv_bias, i), Linear(f"{a}.o_proj", h * d, H, o_bias, i),
                    Linear(f"{m}.gate_proj", H, I, mlp_bias, i), Linear(f"{m}.up_proj", H, I, mlp_bias, i),
                    Linear(f"{m}.down_proj", I, H, mlp_bias, i)]
    other = V * H + n * (norms * H + qk_norm) + H  # embeddings, per-layer norms, the final norm
    if task == "classify":
        linears.append(Linear("score", H, _get(config, "num_labels", default=2)))
        heads, trained = ("score",), ("score",)
    else:
        heads, trained = ("lm_head",), ()
        if getattr(config, "tie_word_embeddings", False):
            pass  # the head is the embedding matrix, counted once
        else:
            linears.append(Linear("lm_head", H, V))
    return Architecture(t, False, H, I, n, h, k, d, V, tuple(linears), other, heads, trained,
                        fused_head=task == "causal-lm", exact=True)


def _bert(config) -> Architecture:
    t = config.model_type
    H, n, V, I = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    h = config.num_attention_heads
    linears = []
    for i in range(n):
        p = f"{'bert' if t == 'bert' else 'roberta'}.encoder.layer.{i}"
        linears += [Linear(f"{p}.attention.self.query", H, H, True, i), Linear(f"{p}.attention.self.key", H, H, True, i),
                    Linear(f"{p}.attention.self.value", H, H, True, i),
                    Linear(f"{p}.attention.output.dense", H, H, True, i),
                    Linear(f"{p}.intermediate.dense", H, I, True, i), Linear(f"{p}.output.dense", I, H, True, i)]
    labels = _get(config, "num_labels", default=2)
    if t == "bert":  # BertForSequenceClassification: pooler (tanh dense on row 0) + classifier
        linears += [Linear("bert.pooler.dense", H, H, True), Linear("classifier", H, labels, True)]
        trained = ("classifier",)
    else:  # RobertaClassificationHead: dense + out_proj, no pooler
        linears += [Linear("classifier.dense", H, H, True), Linear("classifier.out_proj", H, labels, True)]
        trained = ("classifier.dense", "classifier.out_proj")
    positions = config.max_position_embeddings * H
    types = _get(config, "type_vocab_size", default=2) * H
    other = V * H + positions + types + 2 * H + n * 2 * 2 * H  # embeddings + their LayerNorm, two LayerNorms a layer
    return Architecture(t, True, H, I, n, h, h, H // h, V, tuple(linears), other, ("classifier",), trained,
                        fused_head=False, exact=True)


def _from_meta(config, task: str) -> Architecture:
    """Any other model type: built on the meta device (shapes only), its linears read from the modules."""
    import transformers
    from torch import nn

    auto = transformers.AutoModelForSequenceClassification if task == "classify" else transformers.AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"the memory plan cannot lay out a {config.model_type!r} model for task {task!r}: {exc}") from None
    linears, seen = [], set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            w = module.weight
            tied = id(w) in seen
            seen.add(id(w))
            fan_in, fan_out = (w.shape[1], w.shape[0]) if isinstance(module, nn.Linear) else (w.shape[0], w.shape[1])
            if module is out or leaf(name) in HEAD_NAMES:
                heads.append(name)
            if tied:
                continue
            index = next((int(p) for p in name.split(".") if p.isdigit()), None)
            linears.append(Linear(name, fan_in, fan_out, module.bias is not None, index))
    in_linears = sum(lin.fan_in * lin.fan_out + lin.fan_out * lin.bias for lin in linears)
    total = sum(p.numel() for p in model.parameters())
    H = _get(config, "hidden_size", "d_model", "n_embd")
    h = _get(config, "num_attention_heads", "n_head", "encoder_attention_heads", default=1)
    trained = tuple(n for n in heads if leaf(n) in ("classifier", "score")) if task == "classify" else ()
    fam = family(config.model_type)
    return Architecture(
        config.model_type, bool(fam is not None and fam.encoder), H, _get(config, "intermediate_size", "n_inner", "ffn_dim",
                                                                           default=4 * H),
        _get(config, "num_hidden_layers", "n_layer", "num_layers"), h, _get(config, "num_key_value_heads", default=h),
        _get(config, "head_dim", default=H // h), config.vocab_size, tuple(linears), total - in_linears, tuple(heads),
        trained, fused_head=task == "causal-lm" and fam is not None and fam.lm_head is not None, exact=False)


def count_parameters(config, task: str = "causal-lm") -> int:
    """Every parameter of the model (tied matrices once), from its config."""
    return architecture(config, task).parameters


# ---------------------------------------------------------------------------------------------- adapter targets
def targeted(arch: Architecture, lora: LoraConfig) -> list[tuple[Linear, int]]:
    """(linear, rank) of each layer ``lora``'s targets select, as adapters.targets.resolve would on the model."""
    adaptable = [lin for lin in arch.linears]
    skip = set(arch.trained_heads)
    if isinstance(lora.modules_to_save, list):
        skip |= {lin.path for lin in adaptable if matches(lin.path, lora.modules_to_save)}
    t = lora.targets
    if isinstance(t, str) and t in PRESETS:
        if t == "all-linear":
            chosen = [lin for lin in adaptable if lin.path not in arch.heads_paths and leaf(lin.path) not in HEAD_NAMES]
        else:
            fused = fused_projection(arch.model_type)
            qkv = separate_projections(arch.model_type)
            if fused is not None:
                leaves = {fused}
            elif qkv is not None:
                leaves = {qkv[0], qkv[2]} if t == "attn-qv" else set(qkv)
            else:
                leaves = {"q_proj", "v_proj", "query", "value"} | (set() if t == "attn-qv" else {"k_proj", "key"})
            chosen = [lin for lin in adaptable if leaf(lin.path) in leaves]
        chosen = [lin for lin in chosen if lora.selects_layer(lin.path)]
    elif isinstance(t, str):
        chosen = [lin for lin in adaptable if re.fullmatch(t, lin.path)]
    else:
        chosen = [lin for lin in adaptable if matches(lin.path, t) and lora.selects_layer(lin.path)]
    if lora.exclude:
        if isinstance(lora.exclude, str):
            chosen = [lin for lin in chosen if not re.fullmatch(lora.exclude, lin.path)]
        else:
            chosen = [lin for lin in chosen if not matches(lin.path, lora.exclude)]
    return [(lin, lora.rank_for(lin.path)) for lin in chosen if not any(
        lin.path == s or lin.path.startswith(s + ".") for s in skip)]


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


def plan_memory(config, *, task: str = "causal-lm", base_dtype: torch.dtype | str = torch.float32, batch_size: int = 1,
                seq_len: int = 256, rank: int | None = None, targets: str | list[str] | LoraConfig = "all-linear",
                gradient_checkpointing: bool = False, compute_dtype: torch.dtype | str | None = None, processes: int = 1,
                grad_accum: int = 1, attention_mask: bool = False, runtime: int = RUNTIME_BYTES) -> MemoryPlan:
    """The peak resident memory of one training process (see the module docstring for each row's formula).

    batch_size is ``--batch-size``, the rows of one micro-batch over all processes (each takes batch_size /
    processes); grad_accum does not change the peak. targets: a preset, regex or list (with ``rank``), or a
    LoraConfig (its targets, rank, rank_pattern, layers, exclude). compute_dtype: the activations' dtype, by
    default the base dtype (a bf16 base computes in bf16; pass torch.float32 where it computes in fp32).
    attention_mask: batches carry a padding mask (grouped-query keys and values are then repeated to every head).
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
    H, I = arch.hidden, arch.intermediate
    h, k, d = arch.heads, arch.kv_heads, arch.head_dim

    chosen = targeted(arch, lora)
    adapter_params = sum(r * (lin.fan_in + lin.fan_out) for lin, r in chosen)
    trained = [lin for lin in arch.linears if lin.path in arch.trained_heads]
    head_params = sum(lin.fan_in * lin.fan_out + lin.fan_out * lin.bias for lin in trained)
    frozen = arch.parameters - head_params
    rank_tokens = sum(r for _, r in chosen) // max(1, n)  # sum of ranks per layer: each saves x A^T (N x r)

    if arch.encoder:
        scores = b * h * L * L
        per_layer = 7 * N * H * a + 2 * N * H + 2 * N * I * a + scores * (5 + a) + N * rank_tokens * a
        transient = scores * 4 + 2 * N * I * a + 2 * N * H * 4
        what = "encoder"
    else:
        kv = h if attention_mask else k
        # SDPA's output is o_proj's input in fp32 (one storage); a 16-bit compute casts it back for o_proj
        per_layer = (2 * N * H * (4 + a) + 4 * N * d * (2 * h + 2 * kv) + (a != 4) * N * h * d * a
                     + 4 * N * I * a + N * rank_tokens * a)
        transient = 3 * N * I * a + 3 * N * H * 4
        what = "decoder"
    if gradient_checkpointing:
        saved = n * N * H * a + per_layer
        act_label = f"activations (batch {b} x {L} tokens x {n} layers, checkpointed)"
    else:
        saved = n * per_layer
        act_label = f"activations (batch {b} x {L} tokens x {n} layers)"
    activations = saved + transient + N * H * a + N * H * 4  # + the embedding output and the final norm's fp32 input
    rows: list[tuple[str, int]] = [(f"frozen weights ({dtype_name(base_dtype)})", frozen * w)]
    if head_params:
        rows.append(("classifier head + AdamW state (fp32)", 16 * head_params))
    rows.append((f"adapters + AdamW state (fp32, {len(chosen)} layers)", 16 * adapter_params))
    rows.append((act_label, activations))
    if task == "causal-lm":
        V = arch.vocab
        if arch.fused_head:
            rows_per_chunk = max(1, min(N, max(32, CHUNK_BYTES // (4 * V))))
            chunk = rows_per_chunk * V * (a + (4 if a != 4 else 0)) + N * H * a
            rows.append((f"LM head chunk ({rows_per_chunk} x {V} logits)", chunk))
        else:
            rows.append((f"LM head logits (unfused, {N} x {V})", N * V * (a + 12)))
    if a > w:  # a 16-bit base computing in fp32 widens one frozen weight at a time
        # (the fused loss widens its head WIDEN_ELEMENTS weights at a time, kernels.linear_cross_entropy)
        fused = task == "causal-lm" and arch.fused_head
        block = min(arch.vocab, max(256, WIDEN_ELEMENTS // H)) * H  # (kernels.linear_cross_entropy._vocab_blocks)
        biggest = max([lin.fan_in * lin.fan_out for lin in arch.linears if not (fused and leaf(lin.path) == "lm_head")]
                      + [block if fused else 0])
        if task == "causal-lm" and not fused and not any(leaf(lin.path) == "lm_head" for lin in arch.linears):
            biggest = max(biggest, arch.vocab * H)  # a tied head is the embedding matrix
        rows.append(("widened fp32 copy of the largest frozen weight", biggest * 4))
    if processes > 1:
        rows.append(("DDP buckets", 4 * (adapter_params + head_params)))
    rows.append(("runtime (interpreter, torch, transformers)", runtime))
    # (a widened weight is one allocation, which glibc returns to the system when it is freed: no slack)
    dynamic = sum(nbytes for what, nbytes in rows if what.startswith(("activations", "LM head")))
    rows.append(("allocator slack", int(SLACK * dynamic)))
    settings = {"task": task, "model_type": arch.model_type, "layout": what if arch.exact else f"{what} (meta)",
                "base_dtype": dtype_name(base_dtype), "compute_dtype": dtype_name(cdt),
                "gradient_checkpointing": bool(gradient_checkpointing), "batch_size": batch_size, "micro_batch": b,
                "seq_len": seq_len, "processes": processes, "grad_accum": grad_accum, "rank": lora.r,
                "targets": lora.targets, "adapted_layers": len(chosen), "parameters": arch.parameters,
                "trainable_parameters": adapter_params + head_params, "attention_mask": attention_mask}
    rows = [(what, int(nbytes)) for what, nbytes in rows]
    return MemoryPlan(rows, sum(nbytes for _, nbytes in rows), settings)


# ---------------------------------------------------------------------------------------------- what may be used
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(text: str | int) -> int:
    """Bytes of a memory size: 22GB (10^9), 22.5GiB (2^30), 20000MB, 512M (2^20, as free -h), or a plain byte count."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(f"--max-memory {text} must be a positive number of bytes, e.g. 22GB or 20GiB")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"--max-memory {text!r} is not a memory size; write e.g. 22GB, 22.5GiB, 20000MB or a byte count")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"--max-memory {text!r} must be more than 0 bytes, e.g. 22GB")
    return value


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_room(proc: Path, cgroup: Path) -> int | None:
    """The cgroup's memory limit minus what it uses now (reclaimable page cache not counted as used); None
    without a limit. cgroup v2 (memory.max, memory.current) at this process's own group or the root, else v1."""
    own = ""
    try:
        for line in (proc / "self" / "cgroup").read_text().splitlines():
            if line.startswith("0::"):
                own = line[3:].strip().lstrip("/")
    except OSError:
        pass
    for group in dict.fromkeys([cgroup / own, cgroup]):
        limit = _read_int(group / "memory.max")
        if limit is not None:
            used = _read_int(group / "memory.current") or 0
            return max(0, limit - max(0, used - _stat(group / "memory.stat", "inactive_file")))
    v1 = cgroup / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    if limit is not None and limit < 2**60:
        used = _read_int(v1 / "memory.usage_in_bytes") or 0
        return max(0, limit - max(0, used - _stat(v1 / "memory.stat", "total_inactive_file")))
    return None


def available_memory(max_memory: str | int | None = None, *, proc: str | os.PathLike = "/proc",
                     cgroup: str | os.PathLike = "/sys/fs/cgroup") -> tuple[int, str]:
    """(bytes this process may use, where that comes from): the smallest of MemAvailable (/proc/meminfo), the
    cgroup's limit minus its usage, and ``max_memory`` (--max-memory) when given."""
    found: list[tuple[int, str]] = []
    if max_memory is not None:
        found.append((parse_memory(max_memory), "--max-memory"))
    meminfo = None
    try:
        for line in (Path(proc) / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                meminfo = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if meminfo is not None:
        found.append((meminfo, "MemAvailable"))
    room = _cgroup_room(Path(proc), Path(cgroup))
    if room is not None:
        found.append((room, "cgroup limit"))
    if not found:
        raise ConfigError("cannot tell how much memory this process may use (no /proc/meminfo, no cgroup limit); "
                          "give --max-memory, e.g. --max-memory 16GB")
    return min(found, key=lambda f: f[0])


# ---------------------------------------------------------------------------------------------- refusing early
def _flags(settings: dict, base: dict) -> str:
    out = []
    if settings["base_dtype"] != base["base_dtype"]:
        out.append(f"--base-dtype {dtype_name(settings['base_dtype'])}")
    if settings["gradient_checkpointing"] and not base["gradient_checkpointing"]:
        out.append("--gradient-checkpointing")
    if settings["batch_size"] != base["batch_size"]:
        out.append(f"--batch-size {settings['batch_size']} --grad-accum {settings['grad_accum']}")
    if settings["seq_len"] != base["seq_len"]:
        out.append(f"--max-length {settings['seq_len']}")
    return " ".join(out)


def _candidates(settings: dict) -> list[tuple[tuple, dict]]:
    """Every combination of the four changes, each with its cost: (changes made, how much is given up)."""
    processes = settings.get("processes", 1)
    dtypes = [settings["base_dtype"]] + ([] if dtype_name(settings["base_dtype"]) == "bf16" else ["bf16"])
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
    for dt, gc, bs, sl in itertools.product(dtypes, checkpoints, batches, lengths):
        accum = settings.get("grad_accum", 1) * (settings["batch_size"] // bs)
        s = dict(settings, base_dtype=dt, gradient_checkpointing=gc, batch_size=bs, grad_accum=accum, seq_len=sl)
        changes = (dt != settings["base_dtype"]) + (gc != settings["gradient_checkpointing"]) + \
            (bs != settings["batch_size"]) + (sl != settings["seq_len"])
        # fewest changes first; then the cheapest kind: checkpointing (time), bf16 (precision), smaller micro-batches
        # (time, same results), shorter rows (changes the data) last
        cost = (changes, sl != settings["seq_len"], settings["seq_len"] / sl, settings["batch_size"] / bs,
                dt != settings["base_dtype"])
        out.append((cost, s))
    return sorted(out, key=lambda c: c[0])


def check_fits(plan_for: Callable[[dict], MemoryPlan], settings: dict, available: tuple[int, str],
               *, options: int = 2) -> None:
    """Raise ConfigError (one line) when ``plan_for(settings)`` needs more than ``available`` (bytes, source).

    ``settings`` holds at least base_dtype, gradient_checkpointing, batch_size, seq_len (and grad_accum, processes);
    ``plan_for`` maps such a dict to a MemoryPlan (typically ``lambda s: plan_memory(config, **s)``). The message
    names the estimate, the limit and up to ``options`` of the cheapest combinations of --base-dtype bf16,
    --gradient-checkpointing, a smaller --batch-size (with a larger --grad-accum: the same global batch) and a
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
        total = plan_for(s).total
        if smallest is None or total < smallest[1]:
            smallest = (_flags(s, settings), total)
        kinds = tuple(not cost[0] or s[key] != settings[key] for key in ("base_dtype", "gradient_checkpointing",
                                                                           "batch_size", "seq_len"))
        if total <= limit and len(fits) < options and kinds not in listed:  # one option of each kind of change
            fits.append((_flags(s, settings), total))
            listed.add(kinds)
            changes_done = cost[0]
    if fits:
        what = ", or ".join(f"{flags} (~{total / GB:.1f} GB)" for flags, total in fits)
        raise ConfigError(f"{head}; fits with {what}")
    hint = f"the smallest plan, {smallest[0]}, needs ~{smallest[1] / GB:.1f} GB" if smallest else "no change to try"
    raise ConfigError(f"{head}; nothing fits: {hint}; use a machine with more memory or a smaller model")
