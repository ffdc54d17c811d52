"""Which models the fast forward covers: one table per fast path, read by ``speed.forward``.

CAUSAL_LM: decoders whose causal-LM forward (transformers 5.x, checked class by class) is

    logits = t(head(body(...).last_hidden_state)),   loss = transformers' causal-LM loss(logits, labels)

with ``head`` an nn.Linear and ``t`` the logit change named in the table: none, soft-capping
c tanh(z / c) with c = config.<attr> (Gemma 2 and 3), a scale z * config.<attr> (Cohere) or a
division z / config.<attr> (Granite). Mixture-of-experts decoders (Mixtral, Qwen2/3-MoE, OLMoE) are
here too: their loss adds the router's load-balancing term only when router logits are asked for
(``output_router_logits``, off by default), and such calls take the model's own forward.

FIRST_TOKEN: encoder sequence classifiers whose head reads only position 0 of the last hidden
state ([CLS] / <s>), each with the layout of its encoder layer (``EncoderLayout``: where the
query, key, value, output projection, norms and feed-forward sit), which ``speed.first_token``
uses to compute that one row. A family whose layer has this post-norm shape is one line here;
families with relative positions or rotary attention in the layer (DeBERTa, RoFormer, MPNet) or a
pre-norm layer (XLM-RoBERTa-XL, MegatronBERT) are not in it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

CAUSAL_LM_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class LogitChange:
    """How a family changes the head's output before the loss: "none", "softcap", "scale" or "divide" by config.<attr>."""

    kind: str = "none"
    attr: str | None = None


NONE = LogitChange()
CAUSAL_LM: dict[str, LogitChange] = {
    **{t: NONE for t in ("llama", "mistral", "ministral", "qwen2", "qwen3", "gpt2", "opt", "phi", "phi3", "starcoder2",
                         "olmo", "olmo2", "gpt_neox", "smollm3", "stablelm", "helium", "gemma", "glm", "exaone4",
                         "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")},
    "gemma2": LogitChange("softcap", "final_logit_softcapping"),
    "gemma3_text": LogitChange("softcap", "final_logit_softcapping"),
    "granite": LogitChange("divide", "logits_scaling"),
    "cohere": LogitChange("scale", "logit_scale"),
}


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


@dataclass(frozen=True)
class FirstTokenFamily:
    classifier: str  # the sequence classifier class whose head reads position 0 alone
    layout: EncoderLayout


FIRST_TOKEN: dict[str, FirstTokenFamily] = {  # model_type -> its classifier and layer layout
    "bert": FirstTokenFamily("BertForSequenceClassification", BERT_LAYER),
    "roberta": FirstTokenFamily("RobertaForSequenceClassification", BERT_LAYER),
    "xlm-roberta": FirstTokenFamily("XLMRobertaForSequenceClassification", BERT_LAYER),
    "camembert": FirstTokenFamily("CamembertForSequenceClassification", BERT_LAYER),
    "electra": FirstTokenFamily("ElectraForSequenceClassification", BERT_LAYER),
    "ernie": FirstTokenFamily("ErnieForSequenceClassification", BERT_LAYER),
    "data2vec-text": FirstTokenFamily("Data2VecTextForSequenceClassification", BERT_LAYER),
    "distilbert": FirstTokenFamily("DistilBertForSequenceClassification", DISTILBERT_LAYER),
}


@dataclass(frozen=True)
class CausalLMParts:
    body: nn.Module
    head: nn.Linear
    scale: float
    softcap: float | None


def causal_lm_parts(model: nn.Module) -> CausalLMParts | None:
    """(body, head, logit scale, soft-cap) of a CAUSAL_LM family model whose head is a plain nn.Linear, else None."""
    config = getattr(model, "config", None)
    change = CAUSAL_LM.get(getattr(config, "model_type", None))
    if change is None or not type(model).__name__.endswith(CAUSAL_LM_CLASS_SUFFIXES):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if type(head) is not nn.Linear or not isinstance(body, nn.Module) or body is model:
        return None
    value = getattr(config, change.attr, None) if change.attr else None
    if change.kind == "softcap":
        return CausalLMParts(body, head, 1.0, float(value) if value else None)
    if change.kind == "scale":
        return CausalLMParts(body, head, float(value if value is not None else 1.0), None)
    if change.kind == "divide":
        return CausalLMParts(body, head, 1.0 / float(value if value is not None else 1.0), None)
    return CausalLMParts(body, head, 1.0, None)


def first_token_family(model: nn.Module) -> FirstTokenFamily | None:
    """The FIRST_TOKEN entry of a model that is that family's sequence classifier, else None."""
    family = FIRST_TOKEN.get(getattr(getattr(model, "config", None), "model_type", None))
    return family if family is not None and family.classifier == type(model).__name__ else None

