"""The training loss of a batch, with the causal-LM head and cross-entropy fused when the model allows.

``training_loss(model, batch)`` equals ``model(**batch).loss`` (the mean next-token cross-entropy
over labelled positions for a causal LM; whatever the model computes otherwise), but for the
decoder families listed in FUSED_FAMILIES it runs the decoder body, then
``kernels.linear_cross_entropy`` on its last hidden states: the N x V logits are never stored
(the largest activation of a small-model step: 200 MB for 4 x 256 tokens of SmolLM2) and no
key-value cache is built during training. Anything that changes the logits after the head
(soft-capping, logit scaling, an adapter or modules_to_save on the head, a head that is not an
nn.Linear) falls back to the model's own forward. For the BERT-family sequence classifiers, whose head
reads only the first token, the last encoder layer computes that token's row alone
(``train.first_token``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.kernels.linear_cross_entropy import linear_cross_entropy
from lorakit.train.first_token import first_token_layer, first_token_only

# model_type -> the body's last hidden state goes straight into get_output_embeddings()
FUSED_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "opt", "phi3", "starcoder2", "olmo",
                            "olmo2", "gpt_neox", "smollm3"})
_LOGIT_CHANGERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def fused_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder body, output head) when the loss can be fused for this model, else None."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in FUSED_FAMILIES:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_CHANGERS):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if type(head) is not nn.Linear or not isinstance(body, nn.Module) or body is model:
        return None
    return body, head


def shifted_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Labels of the next token at every position (the last one ignored), as transformers shifts them."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def training_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The loss of ``batch`` (see the module docstring); a float32 scalar with a graph to backpropagate."""
    labels = batch.get("labels")
    parts = fused_head(model) if labels is not None and labels.dim() == 2 else None
    if parts is None:
        with first_token_only(first_token_layer(model) if labels is not None else None):
            return model(**batch).loss
    body, head = parts
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = body(**inputs, use_cache=False).last_hidden_state
    return linear_cross_entropy(hidden, head.weight, shifted_labels(labels), head.bias)
