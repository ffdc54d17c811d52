"""What the memory plan needs to know of a model, from its config alone: its linears (name, in, out), the other
parameters, and which linears an adapter targets (``memory_plan``'s P_frozen, P_train and T_layer)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lorakit.adapters.config import PRESETS, LoraConfig
from lorakit.adapters.targets import leaf, matches
from lorakit.architectures import HEAD_NAMES, family, fused_projection, separate_projections
from lorakit.errors import ConfigError

LLAMA_LIKE = ("llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "helium", "smollm3")
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert")
TASKS = ("causal-lm", "classify")


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
