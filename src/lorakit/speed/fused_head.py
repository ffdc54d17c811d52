"""A decoder's training loss with the head and cross-entropy fused: the N x V logits are never stored.

In training with labels, ``speed.forward`` runs a CAUSAL_LM family model (``speed.families``) as

    hidden = body(...).last_hidden_state                  (no key-value cache is built)
    loss   = linear_cross_entropy(hidden, head.weight, labels shifted by one, head.bias,
                                  scale, softcap, divisor = num_items_in_batch)

which equals transformers' causal-LM loss of ``t(head(hidden))`` (``kernels.linear_cross_entropy``
applies the family's logit scale or soft-cap chunk by chunk) including its gradient-accumulation
normalisation: with ``num_items_in_batch`` (HF Trainer passes it) the summed cross-entropy over that
count, else the mean over labelled positions. The output's ``logits`` is None, as with
Liger-Kernel's fused loss: the logits were never formed (the largest activation of a small-model
step: 200 MB for 4 x 256 tokens of SmolLM2). A call the fused loss does not cover (a cache, logits
to keep, labels already shifted, a tuple output) returns None and the model's own forward runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lorakit.kernels.linear_cross_entropy import linear_cross_entropy
from lorakit.speed.families import CausalLMParts

_NOT_COVERED = ("past_key_values", "cache", "cache_position", "shift_labels", "encoder_hidden_states")
_NOT_FOR_BODY = ("labels", "logits_to_keep", "use_cache", "return_dict", "num_items_in_batch", "ignore_index")


def shifted_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Labels of the next token at every position (the last one ignored), as transformers shifts them."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def fused_loss_forward(parts: CausalLMParts, arguments: dict[str, Any]):
    """The model's output for a training call with ``arguments`` (the forward's bound arguments, ``**kwargs``
    merged in), loss fused and logits None; None when the call is one the fused loss does not cover."""
    labels = arguments.get("labels")
    if not isinstance(labels, Tensor) or labels.dim() != 2 or labels.is_floating_point():
        return None
    if any(arguments.get(k) is not None for k in _NOT_COVERED) or arguments.get("return_dict") is False:
        return None
    keep = arguments.get("logits_to_keep", 0)
    if not (isinstance(keep, int) and keep == 0):
        return None
    ignore_index = arguments.get("ignore_index", -100)
    out = parts.body(**{k: v for k, v in arguments.items() if k not in _NOT_FOR_BODY}, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    head = parts.head
    packed = getattr(head, "packed_rows", None)  # a packed head (--quantize-head): read a block of rows at a time
    weight = packed() if callable(packed) else head.weight
    loss = linear_cross_entropy(hidden, weight, shifted_labels(labels, ignore_index), head.bias,
                                ignore_index=ignore_index, scale=parts.scale, softcap=parts.softcap,
                                divisor=arguments.get("num_items_in_batch"))
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    output = MoeCausalLMOutputWithPast if hasattr(out, "router_logits") else CausalLMOutputWithPast
    return output(loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None),
                  attentions=getattr(out, "attentions", None))
