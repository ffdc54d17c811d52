"""Encoder classifiers read one token: their last layer computes that token's row alone.

The sequence classifiers of ``speed.families.FIRST_TOKEN`` (BERT and MiniLM, RoBERTa, XLM-R,
CamemBERT, ELECTRA, ERNIE, Data2Vec-Text, DistilBERT) read only the first position of the last
hidden state ([CLS] / <s>). In the last encoder layer everything after the key and value
projections is row-wise in the query position, so the loss depends on that layer only through
row 0 (H: the layer input, all L rows; h_0 its first row):

    K = H Wk + bk,  V = H Wv + bv                        (every row: the first token attends to all)
    q_0 = h_0 Wq + bq,  a_0 = drop(softmax(q_0 K^T * scale + mask_0)) V
    o_0 = LN(drop(a_0 Wo + bo) + h_0),  out_0 = LN(drop(act(o_0 W1 + b1) W2 + b2) + o_0)

``first_token_layer(model)`` finds such a layer (with its family's ``EncoderLayout``) and
``first_token_only(found)`` makes it compute exactly this for the duration of a ``with`` block;
the other L - 1 rows of its query, attention, output and feed-forward products are never formed.
At MiniLM's 6 layers and 128 tokens that is ~14% of a training step's FLOPs. Every dropout in the
layer draws its mask at the full shape ([B, heads, L, L] or [B, L, hidden]) and keeps the first row
(``kernels.dropout.dropout_leading_rows``), so the random stream, and the loss for a given seed,
are those of the full forward.
``speed.forward`` uses it for training calls; the model's outputs are not affected outside the block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.kernels.dropout import dropout_leading_rows, zero_padded
from lorakit.speed.attention import FAST_DROPOUT_FLAG, LORAKIT_SDPA, masked_softmax
from lorakit.speed.dropout import FastDropout
from lorakit.architectures import EncoderLayout
from lorakit.speed.families import first_token_family

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", LORAKIT_SDPA)


class FirstTokenLayer(NamedTuple):
    layer: nn.Module
    layout: EncoderLayout


def _get(module: nn.Module, path: str):
    for part in filter(None, path.split(".")):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def first_token_layer(model: nn.Module) -> FirstTokenLayer | None:
    """The last encoder layer of a first-token classifier whose layout this module knows, else None."""
    family = first_token_family(model)  # (None without a config)
    if family is None:
        return None
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ATTENTION_IMPLEMENTATIONS or getattr(config, "is_decoder", False):
        return None
    layout = family.layout
    layers = _get(getattr(model, getattr(model, "base_model_prefix", ""), None), layout.layers)
    if not isinstance(layers, nn.ModuleList) or not layers:
        return None
    layer = layers[-1]
    parts = [getattr(layout, f.name) for f in dataclasses.fields(layout) if f.name != "layers"]
    if any(_get(layer, path) is None for path in parts if path is not None):
        return None
    if getattr(_get(layer, layout.chunking), "chunk_size_feed_forward", 0):
        return None
    return FirstTokenLayer(layer, layout) if _returns_hidden_states(type(layer)) else None


@functools.cache
def _returns_hidden_states(layer_class: type) -> bool:
    """transformers >= 5 layers return the hidden states; older ones a tuple that the encoder indexes. Once a class
    (asked at every training step)."""
    return inspect.signature(layer_class.forward).return_annotation in (Tensor, "torch.Tensor")


def _dropout(module: nn.Module, x: Tensor, full_shape: tuple[int, ...]) -> Tensor:
    """``module`` (a dropout) applied to the first row of a [B, L, ...] tensor, drawing the full tensor's mask."""
    if not module.training or module.p == 0.0:
        return x
    if type(module) in (nn.Dropout, FastDropout):
        return dropout_leading_rows(x, full_shape, 1, module.p, fast=type(module) is FastDropout)
    return module(zero_padded(x, full_shape, 1))[:, :1]  # another dropout: run it on the full shape


def _first_query_attention(attention: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T * scale + mask) V for one query row a sequence ([B, heads, 1, d]); dropout as the full [L, L]."""
    if mask is not None and mask.dim() == 4 and mask.shape[-2] != 1:
        mask = mask[:, :, :1]
    p = attention.dropout.p if attention.training else 0.0
    if p == 0.0 and attention.config._attn_implementation != "eager":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attention.scaling)
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(attention.scaling)
    probs = masked_softmax(scores, mask).to(q.dtype)
    b, heads, _, length = probs.shape
    probs = dropout_leading_rows(probs, (b, heads, length, length), 2, p,
                                 fast=getattr(attention, FAST_DROPOUT_FLAG, False))
    return torch.matmul(probs, v)


def _first_token_forward(layer: nn.Module, layout: EncoderLayout, hidden_states: Tensor,
                         attention_mask: Tensor | None = None, *args, **kwargs) -> Tensor:
    """The layer's output at position 0 only, [B, 1, hidden] (see the module docstring)."""
    part = functools.partial(_get, layer)
    attention = part(layout.attention)
    b, length, width = hidden_states.shape
    first = hidden_states[:, :1]
    d = attention.attention_head_size
    q = part(layout.query)(first).view(b, 1, -1, d).transpose(1, 2)
    k = part(layout.key)(hidden_states).view(b, length, -1, d).transpose(1, 2)
    v = part(layout.value)(hidden_states).view(b, length, -1, d).transpose(1, 2)
    context = _first_query_attention(attention, q, k, v, attention_mask).transpose(1, 2).reshape(b, 1, -1)
    full = (b, length, width)
    attended = part(layout.attention_out)(context)
    if layout.attention_out_dropout:
        attended = _dropout(part(layout.attention_out_dropout), attended, full)
    attended = part(layout.attention_norm)(attended + first)
    inner = part(layout.ffn_in)(attended)
    if layout.ffn_activation:
        inner = part(layout.ffn_activation)(inner)
    out = _dropout(part(layout.ffn_dropout), part(layout.ffn_out)(inner), full)
    return part(layout.output_norm)(out + attended)


@contextlib.contextmanager
def first_token_only(found: FirstTokenLayer | None) -> Iterator[None]:
    """Within the block, the layer (from ``first_token_layer``) returns only its first row; a no-op for None."""
    if found is None:
        yield
        return
    layer = found.layer
    own = layer.__dict__.get("forward")  # a forward set on the instance (by a hook library) is put back
    checkpointed = layer.__dict__.get("gradient_checkpointing")
    layer.forward = functools.partial(_first_token_forward, layer, found.layout)
    layer.gradient_checkpointing = False  # one row's activations: nothing to recompute after the block has ended
    try:
        yield
    finally:
        if checkpointed is None:
            layer.__dict__.pop("gradient_checkpointing", None)
        else:
            layer.gradient_checkpointing = checkpointed
        if own is None:
            del layer.forward
        else:
            layer.forward = own
