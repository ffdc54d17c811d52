"""Encoder classifiers read one token: their last layer computes that token's row alone.

The BERT-family sequence classifiers (``speed.families.FIRST_TOKEN``: BERT and MiniLM, RoBERTa, XLM-R,
CamemBERT, ELECTRA) read only the first position of the last hidden state ([CLS] / <s>). In the last encoder layer
everything after the key and value projections is row-wise in the query position, so the loss
depends on that layer only through row 0 (H: the layer input, all L rows; h_0 its first row):

    K = H Wk + bk,  V = H Wv + bv                        (every row: the first token attends to all)
    q_0 = h_0 Wq + bq,  a_0 = drop(softmax(q_0 K^T * scale + mask_0)) V
    o_0 = LN(drop(a_0 Wo + bo) + h_0),  out_0 = LN(drop(act(o_0 W1 + b1) W2 + b2) + o_0)

``first_token_layer(model)`` finds such a layer and ``first_token_only(layer)`` makes it compute
exactly this for the duration of a ``with`` block; the other L - 1 rows of its query, attention,
output and feed-forward products are never formed. At MiniLM's 6 layers and 128 tokens that is
~14% of a training step's FLOPs. Every dropout in the layer draws its mask at the full shape
([B, heads, L, L] or [B, L, hidden]) and keeps the first row (``kernels.dropout.dropout_leading_rows``),
so the random stream, and the loss for a given seed, are those of the full forward.
``speed.forward`` uses it for training calls; the model's outputs are not affected outside the block.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.kernels.dropout import dropout_leading_rows, zero_padded
from lorakit.speed.attention import FAST_DROPOUT_FLAG, LORAKIT_SDPA, masked_softmax
from lorakit.speed.dropout import FastDropout
from lorakit.speed.families import is_first_token_classifier
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", LORAKIT_SDPA)
_LAYER_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.self.dropout",
                "attention.output.dense", "attention.output.dropout", "attention.output.LayerNorm",
                "intermediate", "output.dense", "output.dropout", "output.LayerNorm")


def _has(module: nn.Module, path: str) -> bool:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return False
    return True


def first_token_layer(model: nn.Module) -> nn.Module | None:
    """The last encoder layer of a first-token classifier whose structure this module knows, else None."""
    config = getattr(model, "config", None)
    if not is_first_token_classifier(model) or config is None:
        return None
    if getattr(config, "_attn_implementation", None) not in ATTENTION_IMPLEMENTATIONS or config.is_decoder:
        return None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(getattr(body, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not layers:
        return None
    layer = layers[-1]
    if not all(_has(layer, part) for part in _LAYER_PARTS) or getattr(layer, "chunk_size_feed_forward", 0):
        return None
    return layer if _returns_hidden_states(type(layer)) else None


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


def _first_token_forward(layer: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                         *args, **kwargs) -> Tensor:
    """The layer's output at position 0 only, [B, 1, hidden] (see the module docstring)."""
    sa, so = layer.attention.self, layer.attention.output
    b, length, width = hidden_states.shape
    first = hidden_states[:, :1]
    d = sa.attention_head_size
    q = sa.query(first).view(b, 1, -1, d).transpose(1, 2)
    k = sa.key(hidden_states).view(b, length, -1, d).transpose(1, 2)
    v = sa.value(hidden_states).view(b, length, -1, d).transpose(1, 2)
    context = _first_query_attention(sa, q, k, v, attention_mask).transpose(1, 2).reshape(b, 1, -1)
    full = (b, length, width)
    attended = so.LayerNorm(_dropout(so.dropout, so.dense(context), full) + first)
    out = layer.output
    return out.LayerNorm(_dropout(out.dropout, out.dense(layer.intermediate(attended)), full) + attended)


@contextlib.contextmanager
def first_token_only(layer: nn.Module | None) -> Iterator[None]:
    """Within the block, ``layer`` (from ``first_token_layer``) returns only its first row; a no-op for None."""
    if layer is None:
        yield
        return
    own = layer.__dict__.get("forward")  # a forward set on the instance (by a hook library) is put back
    layer.forward = types.MethodType(_first_token_forward, layer)
    try:
        yield
    finally:
        if own is None:
            del layer.forward
        else:
            layer.forward = own
