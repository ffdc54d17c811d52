"""lorakit's attention functions in transformers, and attention for training on CPU.

The one registration point: ``register_attention(name, function, mask)`` adds a function to
transformers' AttentionInterface (and its mask builder to AttentionMaskInterface);
``switch_attention(model, name)`` makes a model dispatch to it; ``attention_modules(model)`` are
the modules that call it. ``lorakit.limits`` registers its polynomial / auto attention here.

``use_fast_attention(model)`` registers ``lorakit_sdpa``, transformers' SDPA attention with two
changes measured on CPU, and switches a model that uses "sdpa" to it. On CPU tensors it
- computes 16-bit inputs in float32: torch's CPU flash attention is 2.5-3x slower in bf16 than in
  float32 (a MiniLM layer at 16 x 128, forward + backward: 49-61 vs 19-23 ms;
  ``benchmarks/profile_step.py --micro``);
- with attention dropout in training, where SDPA falls back to its unfused path anyway, runs that
  path itself without SDPA's extra passes (separate q and k scaling, the fully-masked-row guard):
  products in the input dtype, softmax in float32, then torch's dropout drawn as SDPA draws it (the
  same masks for the same seed), or with ``fast_dropout``, ``kernels.dropout.fast_dropout``.
Everything else, and every non-CPU tensor, goes to transformers' ``sdpa_attention_forward`` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lorakit.kernels.dropout import fast_dropout

LORAKIT_SDPA = "lorakit_sdpa"
LOW_PRECISION = (torch.bfloat16, torch.float16)
FAST_DROPOUT_FLAG = "lorakit_fast_dropout"


def upcast_on_cpu(*tensors):
    """16-bit CPU tensors as float32 (others unchanged), for kernels that are slower in 16 bits on CPU."""
    return tuple(t.float() if t is not None and t.device.type == "cpu" and t.dtype in LOW_PRECISION else t
                 for t in tensors)


def _repeat_heads(key, value, heads: int):
    kv_heads = key.shape[1]
    if kv_heads == heads:
        return key, value
    return key.repeat_interleave(heads // kv_heads, 1), value.repeat_interleave(heads // kv_heads, 1)


def _dropout_attention(module, query, key, value, attention_mask, dropout: float, scaling, is_causal, fast: bool):
    """softmax(q k^T * scale + mask), dropout, then @ v: products in the input dtype, softmax in float32. Dropout is
    ``fast_dropout``, or torch's, drawn exactly as SDPA's unfused path draws it (the same masks for the same seed)."""
    key, value = _repeat_heads(key, value, query.shape[1])
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    lq, lk = query.shape[2], key.shape[2]
    if causal and attention_mask is None and lq > 1:
        scores.masked_fill_(torch.ones(lq, lk, dtype=torch.bool, device=scores.device).triu(lk - lq + 1), float("-inf"))
    probs = masked_softmax(scores, attention_mask).to(query.dtype)
    probs = fast_dropout(probs, dropout) if fast else torch.nn.functional.dropout(probs, dropout, True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def masked_softmax(scores, attention_mask):
    """softmax over the last dim of float32 ``scores`` (changed in place) under a boolean (True: attend) or additive
    mask; a query that may attend to nothing gets 0, as SDPA gives."""
    empty_rows = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, float("-inf"))
            empty_rows = ~attention_mask.any(-1, keepdim=True)
        else:
            scores.add_(attention_mask.float())
    probs = torch.softmax(scores, -1)
    if empty_rows is not None and bool(empty_rows.any()):
        probs = probs.masked_fill(empty_rows, 0.0)
    return probs


def lorakit_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           is_causal=None, **kwargs):
    """AttentionInterface function (q [B, H, L, d], k, v [B, Hkv, L, d]) -> ([B, L, H, d], None); see the module docstring."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if dropout > 0.0 and module.training:
        return _dropout_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                  getattr(module, FAST_DROPOUT_FLAG, False))
    dtype = query.dtype
    q, k, v = upcast_on_cpu(query, key, value)
    mask = attention_mask
    if mask is not None and mask.is_floating_point():
        (mask,) = upcast_on_cpu(mask)
    out, weights = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                                          **kwargs)
    return out.to(dtype), weights


def register_attention(name: str, function: Callable, mask: Callable | None = None) -> None:
    """Register ``function`` as attention implementation ``name`` with transformers, and ``mask`` (default:
    transformers' SDPA mask) as its mask builder (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, mask or sdpa_mask)


def switch_attention(model: nn.Module, name: str) -> bool:
    """Make a transformers model dispatch its attention to implementation ``name``; whether it now does."""
    if not hasattr(model, "set_attn_implementation"):
        return False
    model.set_attn_implementation(name)
    return getattr(model.config, "_attn_implementation", None) == name


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that call the attention interface: they hold a config and a ``scaling`` or ``is_causal``."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "config") and (hasattr(module, "scaling") or hasattr(module, "is_causal")) \
                and not hasattr(module, "get_input_embeddings"):
            found[name] = module
    return found


def use_fast_attention(model: nn.Module, *, fast_dropout: bool = False) -> bool:
    """Switch a transformers model that uses "sdpa" (or lorakit_sdpa already) to ``lorakit_sdpa``; returns
    whether it did. Other implementations (eager, flash, lorakit poly/auto) are left alone."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", LORAKIT_SDPA):
        return False
    register_attention(LORAKIT_SDPA, lorakit_sdpa_attention)
    if not switch_attention(model, LORAKIT_SDPA):
        return False
    for module in attention_modules(model).values():
        setattr(module, FAST_DROPOUT_FLAG, fast_dropout)
    return True
