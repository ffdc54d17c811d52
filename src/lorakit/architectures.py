"""Ground floor: what lorakit knows about each model family, in one table the other modules ask.

``FAMILIES`` maps a transformers ``config.model_type`` to its ``Family``:

- ``attention``: the leaf names of its query, key and value projections, or the one leaf that fuses
  them (GPT-2 ``c_attn``): the ``attn-qv`` / ``attn-qkv`` presets (adapters.targets) and the norm
  diagnostics (limits.norms) read it.
- ``encoder``: a bidirectional encoder (it has no causal LM: train.models refuses one).
- ``keep_ratio``: CE-LoRA's preset, {module suffix: kept fraction} (celora.plan; Chen et al. 2025's
  released LLaMA choice v/o 0.55, up/down 0.65, carried over to each family's names).
- ``lm_head``: the fused head + loss covers its causal LM, with this change of the logits
  (speed.forward; Gemma 2/3 soft-capping, Cohere's scale, Granite's division).
- ``first_token``: its sequence classifier reads row 0 of the last hidden state alone, with this
  layer layout (speed.first_token computes only that row in the last layer).
- ``position_offset``: position embeddings reserved before the first token (RoBERTa's padding index).
- ``gguf``: how llama.cpp stores the family (export: its GGUF architecture, q/k rows permuted, norm offset).

Adding a family is one entry here (and its test): ``Family(attention=("q_proj", "k_proj", "v_proj"),
keep_ratio=LLAMA_KEEP, lm_head=LogitChange())`` gives it the presets, CE-LoRA and the fused head.
A model whose type is not here still works: the presets then guess its projections by name
(``GUESSED_PROJECTIONS``) and say so, and no fast path is used.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LogitChange:
    """How a family changes the head's output before the loss: "none", "softcap" (c tanh(z / c)), "scale"
    (z * c) or "divide" (z / c), with c = config.<attr>."""

    kind: str = "none"
    attr: str | None = None


@dataclass(frozen=True)
class EncoderLayout:
    """Attribute paths of a post-norm encoder layer, from the layer (``layers``: from the base model):

        a = attention_norm(drop(attention_out(attention(query, key, value))) + h)
        out = output_norm(drop(ffn_out(activation(ffn_in(a)))) + a)

    ``attention`` is the module holding ``scaling``, ``dropout`` (of the probabilities) and
    ``attention_head_size``; ``ffn_activation`` None: ``ffn_in`` applies it; a dropout None: none there."""

    layers: str
    attention: str
    query: str
    key: str
    value: str
    attention_out: str
    attention_out_dropout: str | None
    attention_norm: str
    ffn_in: str
    ffn_activation: str | None
    ffn_out: str
    ffn_dropout: str
    output_norm: str
    chunking: str  # the module whose chunk_size_feed_forward splits the feed-forward (refused when set)


@dataclass(frozen=True)
class FirstToken:
    classifier: str  # the sequence classifier class whose head reads position 0 alone
    layout: EncoderLayout


@dataclass(frozen=True)
class GgufLayout:
    """How llama.cpp stores a family in GGUF (its converter, convert_hf_to_gguf.py, is the reference):

    - ``arch``: the GGUF architecture (``general.architecture``; gguf-py's tensor names follow from it).
    - ``permute_qk``: the query and key rows are stored permuted for llama.cpp's rotary layout: with h heads (the
      KV heads for k) of d rows, row (head, half, i) of the HF weight, half in {0, 1}, i < d/2, is stored at row
      (head, i, half): ``W.reshape(h, 2, d/2, -1).swapaxes(1, 2)``.
    - ``norm_offset``: added to every RMSNorm weight (Gemma's norm computes x (1 + w); llama.cpp stores 1 + w).
    """

    arch: str
    permute_qk: bool = False
    norm_offset: float = 0.0


LLAMA_GGUF = GgufLayout("llama", permute_qk=True)
GEMMA_GGUF = {t: GgufLayout(arch, norm_offset=1.0) for t, arch in
              (("gemma", "gemma"), ("gemma2", "gemma2"), ("gemma3_text", "gemma3"))}


@dataclass(frozen=True)
class Family:
    attention: tuple[str, str, str] | str | None = None
    encoder: bool = False
    keep_ratio: dict[str, float] | None = None
    lm_head: LogitChange | None = None
    first_token: FirstToken | None = None
    position_offset: int = 0
    gguf: GgufLayout | None = None


BERT_LAYER = EncoderLayout(
    layers="encoder.layer", attention="attention.self", query="attention.self.query", key="attention.self.key",
    value="attention.self.value", attention_out="attention.output.dense",
    attention_out_dropout="attention.output.dropout", attention_norm="attention.output.LayerNorm",
    ffn_in="intermediate", ffn_activation=None, ffn_out="output.dense", ffn_dropout="output.dropout",
    output_norm="output.LayerNorm", chunking="")
DISTILBERT_LAYER = EncoderLayout(
    layers="transformer.layer", attention="attention", query="attention.q_lin", key="attention.k_lin",
    value="attention.v_lin", attention_out="attention.out_lin", attention_out_dropout=None,
    attention_norm="sa_layer_norm", ffn_in="ffn.lin1", ffn_activation="ffn.activation", ffn_out="ffn.lin2",
    ffn_dropout="ffn.dropout", output_norm="output_layer_norm", chunking="ffn")

QKV_PROJ = ("q_proj", "k_proj", "v_proj")
BERT_QKV = ("query", "key", "value")
LLAMA_KEEP = {"v_proj": 0.55, "o_proj": 0.55, "up_proj": 0.65, "down_proj": 0.65}
BERT_KEEP = {"value": 0.55, "attention.output.dense": 0.55, "intermediate.dense": 0.65, "output.dense": 0.65}
PLAIN = LogitChange()


def _llama_like(lm_head: LogitChange = PLAIN, *, keep_ratio: dict[str, float] | None = LLAMA_KEEP,
                gguf: GgufLayout | None = None) -> Family:
    return Family(attention=QKV_PROJ, keep_ratio=keep_ratio, lm_head=lm_head, gguf=gguf)


def _bert_like(classifier: str, *, position_offset: int = 0) -> Family:
    return Family(attention=BERT_QKV, encoder=True, keep_ratio=BERT_KEEP, first_token=FirstToken(classifier, BERT_LAYER),
                  position_offset=position_offset)


FAMILIES: dict[str, Family] = {
    # decoders with the Llama layout: presets, CE-LoRA's preset and the fused head
    **{t: _llama_like(gguf=LLAMA_GGUF) for t in ("llama", "mistral")},
    "smollm3": _llama_like(gguf=GgufLayout("smollm3", permute_qk=True)),
    **{t: _llama_like(gguf=GgufLayout(t)) for t in ("qwen2", "qwen3")},
    "gemma": _llama_like(gguf=GEMMA_GGUF["gemma"]),
    **{t: _llama_like() for t in ("ministral", "mixtral", "olmo", "olmo2", "stablelm", "helium")},
    **{t: _llama_like(keep_ratio=None) for t in ("qwen2_moe", "qwen3_moe", "olmoe")},  # experts: no CE-LoRA preset
    **{t: _llama_like(LogitChange("softcap", "final_logit_softcapping"), gguf=GEMMA_GGUF[t])
       for t in ("gemma2", "gemma3_text")},
    "vaultgemma": _llama_like(LogitChange("softcap", "final_logit_softcapping")),
    "granite": _llama_like(LogitChange("divide", "logits_scaling")),
    "cohere": _llama_like(LogitChange("scale", "logit_scale")),
    # decoders with the fused head, without a CE-LoRA preset
    **{t: Family(attention=QKV_PROJ, lm_head=PLAIN) for t in ("phi", "starcoder2", "glm", "exaone4")},
    "opt": Family(attention=QKV_PROJ, keep_ratio={"v_proj": 0.55, "out_proj": 0.55, "fc1": 0.65, "fc2": 0.65},
                  lm_head=PLAIN),
    "gpt2": Family(attention="c_attn", keep_ratio={"attn.c_proj": 0.55, "mlp.c_fc": 0.65, "mlp.c_proj": 0.65},
                   lm_head=PLAIN),
    "gpt_neox": Family(attention="query_key_value", lm_head=PLAIN),
    "phi3": Family(attention="qkv_proj", keep_ratio=LLAMA_KEEP, lm_head=PLAIN, gguf=GgufLayout("phi3")),
    # decoders and encoder-decoders lorakit only targets
    **{t: Family(attention=QKV_PROJ) for t in ("bart", "mbart", "marian", "whisper", "m2m_100", "gptj", "gpt_neo",
                                              "codegen", "persimmon", "xglm", "blenderbot", "pegasus", "nllb-moe",
                                              "exaone")},
    **{t: Family(attention=("q", "k", "v")) for t in ("t5", "mt5", "umt5", "longt5")},
    "gpt_bigcode": Family(attention="c_attn"),
    "falcon": Family(attention="query_key_value"),
    "bloom": Family(attention="query_key_value"),
    "mpt": Family(attention="Wqkv"),
    # encoders; the post-norm BERT layout has the rows-the-head-reads path
    "bert": _bert_like("BertForSequenceClassification"),
    "roberta": _bert_like("RobertaForSequenceClassification", position_offset=2),
    "xlm-roberta": _bert_like("XLMRobertaForSequenceClassification", position_offset=2),
    "camembert": _bert_like("CamembertForSequenceClassification", position_offset=2),
    "electra": _bert_like("ElectraForSequenceClassification"),
    "ernie": _bert_like("ErnieForSequenceClassification"),
    "data2vec-text": _bert_like("Data2VecTextForSequenceClassification"),
    "distilbert": Family(attention=("q_lin", "k_lin", "v_lin"), encoder=True,
                         keep_ratio={"v_lin": 0.55, "out_lin": 0.55, "lin1": 0.65, "lin2": 0.65},
                         first_token=FirstToken("DistilBertForSequenceClassification", DISTILBERT_LAYER)),
    # encoders whose layer has relative or rotary positions, or is pre-norm: no first-token path
    **{t: Family(attention=BERT_QKV, encoder=True) for t in ("albert", "megatron-bert", "xmod", "roformer")},
    **{t: Family(attention=("query_proj", "key_proj", "value_proj"), encoder=True) for t in ("deberta", "deberta-v2")},
    "mpnet": Family(attention=("q", "k", "v"), encoder=True),
}

# Leaf names guessed for each projection of a model type not in FAMILIES.
GUESSED_PROJECTIONS = {
    "q": frozenset({"q_proj", "query", "q", "q_lin", "query_proj", "wq", "to_q"}),
    "k": frozenset({"k_proj", "key", "k", "k_lin", "key_proj", "wk", "to_k"}),
    "v": frozenset({"v_proj", "value", "v", "v_lin", "value_proj", "wv", "to_v"}),
    "fused": frozenset({"c_attn", "query_key_value", "qkv_proj", "qkv", "Wqkv"}),
}
# Output heads that 'all-linear' never adapts (besides the model's output embedding).
HEAD_NAMES = ("classifier", "score", "qa_outputs", "lm_head")
# Projections CE-LoRA keeps exact when keep_ratio is one number: every family's query and key, fused q/k/v, and gate.
EXACT_LEAVES = frozenset(
    {name for f in FAMILIES.values() if isinstance(f.attention, tuple) for name in f.attention[:2]}
    | {f.attention for f in FAMILIES.values() if isinstance(f.attention, str)} | {"gate_proj"})


def family(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type) if model_type else None


def model_type_of(model) -> str | None:
    """``model.config.model_type``, or None for a model without a transformers config."""
    return getattr(getattr(model, "config", None), "model_type", None)


def separate_projections(model_type: str | None) -> tuple[str, str, str] | None:
    """The (query, key, value) leaf names of a family with separate projections."""
    f = family(model_type)
    return f.attention if f is not None and isinstance(f.attention, tuple) else None


def fused_projection(model_type: str | None) -> str | None:
    """The one leaf holding q, k and v of a family that fuses them."""
    f = family(model_type)
    return f.attention if f is not None and isinstance(f.attention, str) else None


def is_encoder(model_type: str | None) -> bool:
    f = family(model_type)
    return f is not None and f.encoder


def families_with(what: str) -> dict[str, object]:
    """{model_type: the value} of every family that has ``what`` ("keep_ratio", "lm_head", "first_token", "gguf")."""
    return {t: getattr(f, what) for t, f in FAMILIES.items() if getattr(f, what) is not None}
