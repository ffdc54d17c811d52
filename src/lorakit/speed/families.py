"""Which models the fast forward covers, asked of the registry (``lorakit.architectures``).

Fused head: a family with ``lm_head`` whose causal-LM forward (transformers 5.x, checked class by
class) is

    logits = t(head(body(...).last_hidden_state)),   loss = transformers' causal-LM loss(logits, labels)

with ``head`` an nn.Linear and ``t`` the family's LogitChange: none, soft-capping c tanh(z / c) with
c = config.<attr> (Gemma 2 and 3), a scale z * config.<attr> (Cohere) or a division z / config.<attr>
(Granite). Mixture-of-experts decoders (Mixtral, Qwen2/3-MoE, OLMoE) are among them: their loss adds
the router's load-balancing term only when router logits are asked for (``output_router_logits``,
off by default), and such calls take the model's own forward.

Rows the head reads: a family with ``first_token`` (an encoder sequence classifier whose head reads
only position 0 of the last hidden state, [CLS] / <s>) and the layout of its post-norm encoder
layer, which ``speed.first_token`` uses to compute that one row. Families with relative positions
or rotary attention in the layer (DeBERTa, RoFormer, MPNet) or a pre-norm layer (XLM-RoBERTa-XL,
MegatronBERT) have none.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorakit.speed.widen import WidenedLinear

from lorakit.architectures import FirstToken, family, model_type_of

CAUSAL_LM_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class CausalLMParts:
    body: nn.Module
    head: nn.Linear
    scale: float
    softcap: float | None


def causal_lm_parts(model: nn.Module) -> CausalLMParts | None:
    """(body, head, logit scale, soft-cap) of a fused-head family's causal LM whose head is a plain nn.Linear (a bf16
    one widened, ``speed.widen``; or a packed one, ``--quantize-head``: it has ``packed_rows``), else None."""
    f = family(model_type_of(model))
    change = f.lm_head if f is not None else None
    if change is None or not type(model).__name__.endswith(CAUSAL_LM_CLASS_SUFFIXES):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    plain = type(head) in (nn.Linear, WidenedLinear) or callable(getattr(head, "packed_rows", None))
    if not plain or not isinstance(body, nn.Module) or body is model:
        return None
    value = getattr(model.config, change.attr, None) if change.attr else None
    if change.kind == "softcap":
        return CausalLMParts(body, head, 1.0, float(value) if value else None)
    if change.kind == "scale":
        return CausalLMParts(body, head, float(value if value is not None else 1.0), None)
    if change.kind == "divide":
        return CausalLMParts(body, head, 1.0 / float(value if value is not None else 1.0), None)
    return CausalLMParts(body, head, 1.0, None)


def first_token_family(model: nn.Module) -> FirstToken | None:
    """The family's FirstToken entry when ``model`` is that family's sequence classifier, else None."""
    f = family(model_type_of(model))
    found = f.first_token if f is not None else None
    return found if found is not None and found.classifier == type(model).__name__ else None
