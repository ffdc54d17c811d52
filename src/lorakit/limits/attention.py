"""Attention implementations for Hugging Face models: "poly", "auto", "softmax1", "exact".

They are registered with transformers' ``AttentionInterface`` (the attention function) and
``AttentionMaskInterface`` (the mask it receives) as ``lorakit_<mode>``, so any model that
dispatches attention through the interface (Llama, Qwen, Mistral, OPT, GPT-2, BERT, ...) can use
them: ``use_attention(model, "auto", tolerance=1e-3)``.

- exact: softmax attention (torch's scaled_dot_product_attention).
- poly: the polynomial attention of ``lorakit.kernels.poly_attention`` with a fixed even
  degree (``degree=``), or per call the smallest degree whose certified bound meets the
  tolerance (up to ``max_degree``). Attention-probability dropout is not applied (the weights
  are never formed).
- auto: per layer and per call, from the certified logit bound G = beta max||q|| max||k||
  (O(L d)): poly with the smallest degree g whose bound 2 eps / (1 - eps),
  eps = G^(g+1) e^G / (g+1)!, is <= tolerance, when poly is also predicted faster than exact
  attention at this length (L >= crossover_per_feature * C(d + g, g)); exact otherwise. Its
  output is therefore always within tolerance * max|v| of softmax attention.
- softmax1: exp(x_i) / (1 + sum_j exp(x_j)) (the "outlier-free" softmax of the paper's
  experiment), for models trained with it.

Each attention module keeps an ``AttentionPolicy`` (``module.lorakit_attention``) with its
settings and the decisions it made (counts per implementation, the last G, degree and length).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.speed.attention import attention_modules, register_attention, switch_attention, upcast_on_cpu
from lorakit.errors import ConfigError, ModelError
from lorakit.kernels.poly_attention import num_features, poly_attention
from lorakit.limits.bounds import logit_bound, output_error_bound, smallest_degree

MODES = ("poly", "auto", "softmax1", "exact")
# auto predicts poly faster than exact attention when L >= crossover_per_feature * C(d + g, g).
# From this project's CPU benchmark (benchmarks/results/poly_attention.json, fwd+bwd, degree 2):
# crossover lengths / feature counts were 1617/561 = 2.9 and 3171/2145 = 1.5 without a causal mask,
# 3265/561 = 5.8 and 8364/2145 = 3.9 with one; rounded up. Override with crossover_per_feature=.
CROSSOVER_PER_FEATURE = {False: 3.0, True: 6.0}


@dataclass
class AttentionPolicy:
    """How one attention module computes attention, and what it decided so far."""

    mode: str = "auto"
    tolerance: float = 1e-3
    degree: int | None = None  # poly: a fixed degree; None = smallest meeting the tolerance
    max_degree: int = 8
    max_features: int = 20_000  # degrees whose feature count C(d + g, g) exceeds this are not considered
    crossover_per_feature: float | None = None  # None: CROSSOVER_PER_FEATURE by causal or not
    decisions: Counter = field(default_factory=Counter)
    last: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"attention={self.mode!r} is not one of {MODES}")
        if not (isinstance(self.tolerance, (int, float)) and math.isfinite(self.tolerance) and self.tolerance > 0):
            raise ConfigError(f"tolerance={self.tolerance!r} must be a positive number (e.g. 1e-3): the allowed "
                              "attention-output error relative to max|v|")
        for name in ("degree", "max_degree"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 2):
                raise ConfigError(f"{name}={value!r} must be a positive even integer (2, 4, 6, 8)")
        if self.crossover_per_feature is not None and not self.crossover_per_feature >= 0:
            raise ConfigError(f"crossover_per_feature={self.crossover_per_feature!r} must be >= 0")

    def choose(self, gamma: float, length: int, head_dim: int, causal: bool = False) -> tuple[str, int | None, str]:
        """(implementation, degree, reason) for one call with certified logit bound ``gamma``."""
        if self.mode in ("exact", "softmax1"):
            return self.mode, None, "fixed"
        top = self.max_degree
        while top > 2 and num_features(head_dim, top) > self.max_features:
            top -= 2
        degree = self.degree or smallest_degree(gamma, self.tolerance, top)
        if self.mode == "poly":
            if degree is None:
                return "poly", top, f"uncertified: G={gamma:.3g} needs a degree above {top}"
            return "poly", degree, "fixed degree" if self.degree else "certified"
        if degree is None or output_error_bound(gamma, degree) > self.tolerance:
            return "exact", None, f"G={gamma:.3g}: no degree <= {top} meets tolerance {self.tolerance:g}"
        per_feature = self.crossover_per_feature if self.crossover_per_feature is not None else CROSSOVER_PER_FEATURE[causal]
        needed = per_feature * num_features(head_dim, degree)
        if length < needed:
            return "exact", None, f"L={length} below the predicted crossover {needed:.0f} for degree {degree}"
        return "poly", degree, "certified and predicted faster"

    def summary(self) -> str:
        return ", ".join(f"{k} x{v}" for k, v in sorted(self.decisions.items())) or "no calls yet"


# ---------------------------------------------------------------------- masks
def key_padding_and_causal(mask: Tensor | None, causal: bool, batch: int, lq: int, lk: int) -> Tensor:
    """The allowed positions as a bool tensor broadcastable to [B, H, Lq, Lk] (for exact paths)."""
    if mask is None:
        allowed = torch.ones(1, 1, lq, lk, dtype=torch.bool)
    elif mask.dim() == 2:
        allowed = mask.bool()[:, None, None, :]
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask > -1e4
    if causal:
        tri = torch.ones(lq, lk, dtype=torch.bool, device=allowed.device).tril(lk - lq)
        allowed = allowed & tri
    return allowed


def _mask_function(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function=None, attention_mask: Tensor | None = None, **kwargs):
    """Masks for lorakit attention: a 2-D key-padding mask (or None) for plain causal and bidirectional
    masks without a cache offset (poly attention then never sees an L x L mask); sdpa's 4-D mask otherwise."""
    from transformers import masking_utils as mu

    kwargs.pop("allow_is_causal_skip", None)  # sliding-window callers (Gemma 2/3) pass it; lorakit needs a real mask
    mask_function = mask_function or mu.causal_mask_function
    plain = mask_function in (mu.causal_mask_function, getattr(mu, "bidirectional_mask_function", None))
    if plain and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        if attention_mask is None:
            return None
        attention_mask = attention_mask[:, -kv_length:].bool()
        return None if attention_mask.all() else attention_mask
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                        allow_is_causal_skip=False, **kwargs)


# ---------------------------------------------------------------------- the attention functions
def _exact(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, causal: bool, scale: float, dropout: float) -> Tensor:
    """SDPA; 16-bit CPU inputs computed in float32 (see lorakit.speed.attention)."""
    dtype = q.dtype
    q, k, v = upcast_on_cpu(q, k, v)
    if allowed is not None and allowed.is_floating_point():
        (allowed,) = upcast_on_cpu(allowed)
    return _sdpa(q, k, v, allowed, causal, scale, dropout).to(dtype)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, causal: bool, scale: float, dropout: float) -> Tensor:
    if allowed is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale,
                                                                is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale,
                                                            enable_gqa=q.shape[1] != k.shape[1])


def softmax1_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, causal: bool, scale: float,
                       dropout: float = 0.0) -> Tensor:
    """out_i = sum_j exp(s_ij) v_j / (1 + sum_j exp(s_ij)): softmax with an extra zero logit whose value is 0."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = scale * (q.float() @ k.float().transpose(-1, -2))
    ok = key_padding_and_causal(allowed, causal, q.shape[0], q.shape[2], k.shape[2]).to(s.device)
    s = s.masked_fill(~ok, -math.inf)
    m = s.amax(-1, keepdim=True).clamp_min(0.0)  # the extra logit is 0, so the max is >= 0
    e = torch.exp(s - m)
    w = e / (torch.exp(-m) + e.sum(-1, keepdim=True))
    if dropout > 0:
        w = torch.nn.functional.dropout(w, dropout)
    return (w @ v.float()).to(q.dtype)


def lorakit_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                              dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                              *, mode: str = "auto", **kwargs) -> tuple[Tensor, None]:
    """AttentionInterface function: q [B, H, L, d], k, v [B, Hkv, L, d]; returns ([B, L, H, d], None)."""
    policy = getattr(module, "lorakit_attention", None)
    if policy is None:
        policy = AttentionPolicy(mode=mode)
        module.lorakit_attention = policy
    extras = [name for name in ("softcap", "position_bias", "s_aux") if kwargs.get(name) is not None]
    if extras:
        if policy.mode in ("poly", "softmax1"):
            raise ModelError(f"{type(module).__name__} passes {extras[0]}; lorakit '{policy.mode}' attention does "
                             "not support it. Use attention 'exact' or 'auto' for this model")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and query.shape[2] > 1
        mask = attention_mask
        if mask is not None and mask.dim() == 2:
            mask = key_padding_and_causal(mask, causal, query.shape[0], query.shape[2], key.shape[2]).to(query.device)
        _record(policy, "exact", None, math.nan, key.shape[2], f"{extras[0]} is not supported by poly attention")
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    lq, lk = query.shape[2], key.shape[2]
    causal_flag = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask_4d = attention_mask is not None and attention_mask.dim() == 4
    causal = bool(causal_flag) and lq > 1 and not mask_4d
    dropout = dropout if module.training else 0.0
    key_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    gamma = float(logit_bound(query.detach(), key.detach(), scale, key_mask).max()) if policy.mode in ("poly", "auto") else math.nan
    impl, degree, reason = policy.choose(gamma, lk, query.shape[-1], causal or mask_4d)
    if impl == "poly":
        try:
            out = poly_attention(query, key, value, scale=scale, degree=degree, causal=causal, mask=attention_mask)
        except ValueError as err:
            if policy.mode == "poly":
                raise ModelError(f"poly attention in {type(module).__name__}: {err}") from err
            impl, degree, reason = "exact", None, str(err)
    if impl == "softmax1":
        out = softmax1_attention(query, key, value, attention_mask, causal, scale, dropout)
    elif impl == "exact":
        mask = attention_mask  # 4-D masks (bool or additive, possibly a bias) go to SDPA as they are
        if mask is not None and mask.dim() == 2:
            mask = key_padding_and_causal(mask, causal, query.shape[0], lq, lk).to(query.device)
        out = _exact(query, key, value, mask, causal and mask is None, scale, dropout)
    _record(policy, impl, degree, gamma, lk, reason)
    return out.transpose(1, 2).contiguous(), None


def _record(policy: AttentionPolicy, impl: str, degree: int | None, gamma: float, length: int, reason: str) -> None:
    label = impl if degree is None else f"{impl}-{degree}"
    policy.decisions[label] += 1
    bound = output_error_bound(gamma, degree) if degree is not None and math.isfinite(gamma) else (0.0 if impl == "exact" else math.nan)
    policy.last = {"impl": label, "gamma": gamma, "length": length, "bound": bound, "reason": reason}


def _registered_name(mode: str) -> str:
    return f"lorakit_{mode}"


def register() -> None:
    """Register lorakit_poly / _auto / _softmax1 / _exact with transformers (idempotent)."""
    import functools

    for mode in MODES:
        fn = functools.partial(lorakit_attention_forward, mode=mode)
        fn.__name__ = f"lorakit_{mode}_attention"  # type: ignore[attr-defined]
        register_attention(_registered_name(mode), fn, _mask_function)


def use_attention(model: nn.Module, mode: str, tolerance: float = 1e-3, *, degree: int | None = None,
                  max_degree: int = 8, crossover_per_feature: float | None = None) -> nn.Module:
    """Switch every attention layer of a transformers model to a lorakit implementation (in place).

    mode: "poly" | "auto" | "softmax1" | "exact" (see the module docstring). Returns the model.
    """
    if mode not in MODES:
        raise ConfigError(f"attention mode {mode!r} is not one of {MODES}")
    policy_args = dict(mode=mode, tolerance=tolerance, degree=degree, max_degree=max_degree,
                       crossover_per_feature=crossover_per_feature)
    AttentionPolicy(**policy_args)  # validate before touching the model
    if not hasattr(model, "set_attn_implementation"):
        raise ModelError(f"{type(model).__name__} is not a transformers PreTrainedModel; lorakit attention plugs into "
                         "transformers' AttentionInterface")
    register()
    try:
        switched = switch_attention(model, _registered_name(mode))
    except (ValueError, ImportError) as err:
        raise ModelError(f"{type(model).__name__} cannot switch attention implementation: {err}") from err
    if not switched:
        raise ModelError(f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface; "
                         "lorakit attention cannot be used with it")
    modules = attention_modules(model)
    if not modules:
        raise ModelError(f"found no attention modules in {type(model).__name__}")
    for module in modules.values():
        module.lorakit_attention = AttentionPolicy(**policy_args)
    return model


def decisions(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per attention module: decision counts and the last decision (G, degree, bound, reason)."""
    return {name: {"counts": dict(m.lorakit_attention.decisions), **m.lorakit_attention.last}
            for name, m in attention_modules(model).items() if getattr(m, "lorakit_attention", None) is not None}


def reset_decisions(model: nn.Module) -> None:
    for m in attention_modules(model).values():
        policy = getattr(m, "lorakit_attention", None)
        if policy is not None:
            policy.decisions.clear()
            policy.last = {}
