"""A new adapter from a weighted combination of a model's adapters (PEFT's ``add_weighted_adapter``).

For adapters i with weights w_i, scales s_i and factors (A_i, B_i), the new adapter has scale 1 and

    cat:     A = [w_1 s_1 A_1; ...; w_n s_n A_n],  B = [B_1, ..., B_n]   rank sum r_i;  B A = sum_i w_i s_i B_i A_i exactly
    svd:     sum_i w_i s_i B_i A_i = U S V^T,  B = U_k S_k,  A = V_k^T        rank k = svd_rank (default max r_i);
             the best rank-k approximation of the combined update (exact when k >= its rank)
    linear:  A = sum_i sign(w_i) sqrt(|w_i s_i|) A_i,  B = sum_i sqrt(|w_i s_i|) B_i   (equal ranks; the cross
             terms B_i A_j make this a rough approximation, as PEFT warns)

A layer that lacks one of the adapters combines the others. PEFT gives the new adapter
lora_alpha = r and adapters[0]'s use_rslora; lorakit's has scale exactly 1 (alpha = r, no rsLoRA),
which is the same unless the adapters use rsLoRA (where PEFT's result is off by sqrt(r)).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from lorakit.adapters import variants
from lorakit.adapters.attach import attach, lora_layers, state
from lorakit.adapters.config import NormControl
from lorakit.adapters.targets import Resolution
from lorakit.errors import ConfigError, LorakitError

COMBINATIONS = ("svd", "linear", "cat")


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str, *,
                         combination_type: str = "svd", svd_rank: int | None = None) -> nn.Module:
    """Add adapter ``adapter_name`` = the ``weights``-weighted combination of ``adapters`` (see the module
    docstring), inactive like any added adapter; ``set_adapter(model, adapter_name)`` to use it."""
    st = state(model)
    adapters = _names(adapters, st)
    weights = _weights(weights, adapters)
    if combination_type not in COMBINATIONS:
        raise ConfigError(f"combination_type={combination_type!r} is not one of {', '.join(COMBINATIONS)} "
                          "(PEFT's ties/dare/magnitude_prune variants are not implemented)")
    refusals = {a: variants.of(st.adapters[a].config).combine_refusal for a in adapters}
    refused = [a for a, why in refusals.items() if why]
    if refused:
        raise ConfigError(f"add_weighted_adapter: {refused} are {refusals[refused[0]]}; combine plain LoRA adapters")
    combination = "linear" if len(adapters) == 1 else combination_type
    configs = [st.adapters[a].config for a in adapters]
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination == "linear":
        if len(set(ranks)) != 1:
            raise ConfigError(f"combination_type='linear' needs adapters of one rank; {dict(zip(adapters, ranks))} "
                              "differ. Use 'cat' (exact) or 'svd'")
        rank = ranks[0]
    elif combination == "cat":
        rank = sum(ranks)
    else:
        rank = max(ranks) if svd_rank is None else svd_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"svd_rank={svd_rank!r} must be a positive integer")
    targets = list(dict.fromkeys(t for a in adapters for t in st.adapters[a].targets))
    cfg = configs[0].replace(r=rank, alpha=float(rank), rslora=False, rank_pattern={}, alpha_pattern={}, targets=targets,
                             layers_to_transform=None, layers_pattern=None, exclude=None, use_dora=False, init="kaiming",
                             modules_to_save=[], norm_control=NormControl())
    attach(model, cfg, name=adapter_name, resolution=Resolution(targets, [], []))
    with torch.no_grad():
        for path, layer in lora_layers(model, adapter_name):
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.settings]
            a_new, b_new = _combine(layer, present, combination, rank, path)
            layer.lora_A[adapter_name].weight.copy_(a_new)
            layer.lora_B[adapter_name].weight.copy_(b_new)
    return model


def _names(adapters, st) -> list[str]:
    """``adapters`` as a list of the model's adapter names; a plain string is one name (as set_adapter takes it)."""
    if isinstance(adapters, str):
        adapters = [adapters]
    elif not isinstance(adapters, Sequence) or isinstance(adapters, (bytes, bytearray)):
        raise ConfigError(f"add_weighted_adapter: adapters={adapters!r} must be a list of adapter names (or one name); "
                          f"the model has {sorted(st.adapters)}")
    adapters = list(adapters)
    unknown = [a for a in adapters if not isinstance(a, str) or a not in st.adapters]
    if not adapters or unknown:
        raise LorakitError(f"add_weighted_adapter: {unknown or adapters!r} are not adapters of the model; it has {sorted(st.adapters)}")
    return adapters


def _weights(weights, adapters: list[str]) -> list[float]:
    """One finite real number per adapter (not a string, not a bool, not None)."""
    listed = (list(weights) if hasattr(weights, "__iter__") and hasattr(weights, "__len__")
              and not isinstance(weights, (str, bytes, bytearray)) else None)
    ok = listed is not None and len(listed) == len(adapters)
    ok = ok and all(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) for w in listed)
    if not ok:
        raise ConfigError(f"add_weighted_adapter: weights={weights!r} must be {len(adapters)} finite numbers, one per "
                          f"adapter of {adapters} (e.g. {[round(1 / len(adapters), 2)] * len(adapters)})")
    return [float(w) for w in listed]


def _combine(layer, present: list[tuple[str, float]], combination: str, rank: int, path: str):
    """(A, B) of the combined adapter in one layer, [rank, in] and [out, rank]."""
    a_new = layer.lora_A[present[0][0]].weight.new_zeros(rank, layer.in_features)
    b_new = a_new.new_zeros(layer.out_features, rank)
    if combination == "cat":
        at = 0
        for name, w in present:
            s, r = layer.settings[name], layer.settings[name].r
            a_new[at:at + r] = w * s.scale * layer.lora_A[name].weight
            b_new[:, at:at + r] = layer.lora_B[name].weight
            at += r
    elif combination == "svd":
        delta = sum(w * layer.delta_weight(name) for name, w in present)
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, sv.numel())
        b_new[:, :k] = u[:, :k] * sv[:k]
        a_new[:k] = vh[:k]
    else:
        for name, w in present:
            if layer.settings[name].r != rank:
                raise ConfigError(f"{path}: adapter {name!r} has rank {layer.settings[name].r} here, not {rank}; "
                                  "combination_type='linear' needs one rank in every layer. Use 'cat' or 'svd'")
            root = math.sqrt(abs(w * layer.settings[name].scale))
            a_new += math.copysign(root, w * layer.settings[name].scale) * layer.lora_A[name].weight
            b_new += root * layer.lora_B[name].weight
    return a_new, b_new
