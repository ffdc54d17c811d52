"""Which models the fast forward covers: one table per fast path, read by ``speed.forward``.

CAUSAL_LM: decoders whose causal-LM forward (transformers 5.x, checked class by class) is

    logits = t(head(body(...).last_hidden_state)),   loss = transformers' causal-LM loss(logits, labels)

with ``head`` an nn.Linear and ``t`` the logit change named in the table: none, soft-capping
c tanh(z / c) with c = config.<attr> (Gemma 2 and 3), a scale z * config.<attr> (Cohere) or a
division z / config.<attr> (Granite). Mixture-of-experts decoders add a router loss and are not here.

FIRST_TOKEN: encoder sequence classifiers whose head reads only position 0 of the last hidden
state ([CLS] / <s>), with BERT's layer structure (``speed.first_token``).
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
                         "olmo", "olmo2", "gpt_neox", "smollm3", "stablelm", "helium", "gemma", "glm", "exaone4")},
    "gemma2": LogitChange("softcap", "final_logit_softcapping"),
    "gemma3_text": LogitChange("softcap", "final_logit_softcapping"),
    "granite": LogitChange("divide", "logits_scaling"),
    "cohere": LogitChange("scale", "logit_scale"),
}
FIRST_TOKEN: dict[str, str] = {  # model_type -> its sequence classifier class
    "bert": "BertForSequenceClassification",
    "roberta": "RobertaForSequenceClassification",
    "xlm-roberta": "XLMRobertaForSequenceClassification",
    "camembert": "CamembertForSequenceClassification",
    "electra": "ElectraForSequenceClassification",
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


def is_first_token_classifier(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return FIRST_TOKEN.get(getattr(config, "model_type", None)) == type(model).__name__
