"""The fast forward of an adapted model, for whoever calls it.

``make_fast(model)`` (``lorakit.attach`` calls it; ``attach(..., fast=False)`` does not) gives the
model instance a subclass of its own class -- same name, same signature, same weights -- whose
``forward``, in a training call (``model.training`` and autograd on), takes the fast path of its
family (``speed.families``):

- causal LM with labels: the fused head and cross-entropy (``speed.fused_head``), ``logits`` None;
- encoder sequence classifier: the last layer computes the one row the head reads (``speed.first_token``);

and attention goes through ``speed.attention``'s lorakit_sdpa on CPU, the RMSNorm layers through
``speed.norms``' fused function (which keeps no float32 copies for the backward). Every other call -- evaluation,
``torch.no_grad()``, generation, outputs the fast path does not produce (hidden states, attentions, a
cache), a family or a call it does not cover -- is the model's own forward, unchanged. So the
speed is the same from ``lorakit train``, an own loop (``model(**batch).loss.backward()``), HF
``Trainer`` (which passes ``num_items_in_batch``: honoured) or TRL. The class swap, rather than a
patched instance method, keeps ``copy.deepcopy``, ``inspect.signature`` (HF Trainer reads it) and
``type(model).__name__`` right. ``remove_fast(model)`` restores the class; ``with own_forward(model):``
runs the model's own forward for a block.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.speed.attention import LORAKIT_SDPA, switch_attention, use_fast_attention
from lorakit.speed.families import causal_lm_parts
from lorakit.speed.first_token import first_token_layer, first_token_only
from lorakit.speed.fused_head import fused_loss_forward
from lorakit.speed.norms import fast_norms, restore_norms
from lorakit.speed.same_name import remake, same_name_subclass

FAST_ATTR = "_lorakit_fast"
_SUBCLASSES: dict[type, type] = {}
_EXTRA_OUTPUTS = ("output_hidden_states", "output_attentions", "output_router_logits")  # (the last: MoE aux loss)


@dataclass
class FastPath:
    """What make_fast installed on a model."""

    kind: str | None  # "fused-head", "first-token", or None (the family has no fast forward)
    original_class: type
    attention: bool  # switched from sdpa to lorakit_sdpa
    norms: int = 0  # RMSNorm modules running kernels.rms_norm in training calls

    def describe(self) -> str:
        what = {"fused-head": "causal-LM loss with the head fused (logits None in training calls)",
                "first-token": "the last encoder layer computes the one row the classifier reads",
                None: "the model's own forward (no fast path for this family)"}[self.kind]
        norms = f"; {self.norms} RMSNorm layers fused" if self.norms else ""
        return f"{what}{'; lorakit_sdpa attention' if self.attention else ''}{norms}"


def fast_kind(model: nn.Module) -> str | None:
    """The fast path this model's family has ("fused-head", "first-token"), or None."""
    if causal_lm_parts(model) is not None:
        return "fused-head"
    if first_token_layer(model) is not None:
        return "first-token"
    return None


def make_fast(model: nn.Module) -> FastPath:
    """Install the fast forward and attention (see the module docstring). Idempotent."""
    existing = getattr(model, FAST_ATTR, None)
    if existing is not None:
        return existing
    attention = use_fast_attention(model)
    kind = fast_kind(model)
    cls = type(model)
    if kind is not None:
        model.__class__ = _fast_subclass(cls)
    path = FastPath(kind, cls, attention, fast_norms(model))
    setattr(model, FAST_ATTR, path)
    return path


def remove_fast(model: nn.Module) -> None:
    """Give the model its own class, forward and attention implementation back (a no-op if make_fast did not run)."""
    path = model.__dict__.pop(FAST_ATTR, None)
    if path is None:
        return
    model.__class__ = path.original_class
    restore_norms(model)
    if path.attention and getattr(model.config, "_attn_implementation", None) == LORAKIT_SDPA:
        switch_attention(model, "sdpa")


def fast_path(model: nn.Module) -> FastPath | None:
    return getattr(model, FAST_ATTR, None)


@contextlib.contextmanager
def own_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model runs its own forward (the reference the fast one is tested against)."""
    path = fast_path(model)
    if path is None or path.kind is None:
        yield model
        return
    fast_class = type(model)
    model.__class__ = path.original_class
    try:
        yield model
    finally:
        model.__class__ = fast_class


def _fast_subclass(cls: type) -> type:
    if cls not in _SUBCLASSES:
        own = cls.forward
        signature = inspect.signature(own)

        @functools.wraps(own)
        def forward(self, *args, **kwargs):
            path = self.__dict__.get(FAST_ATTR)
            if path is None or path.kind is None or not (self.training and torch.is_grad_enabled()) or _wants_more(self, kwargs):
                return own(self, *args, **kwargs)
            if path.kind == "first-token":
                with first_token_only(first_token_layer(self)):
                    return own(self, *args, **kwargs)
            parts = causal_lm_parts(self)
            if parts is not None:
                bound = signature.bind(self, *args, **kwargs).arguments
                bound.pop("self")
                for name, p in signature.parameters.items():
                    if p.kind is inspect.Parameter.VAR_KEYWORD:
                        bound.update(bound.pop(name, {}))
                out = fused_loss_forward(parts, bound)
                if out is not None:
                    return out
            return own(self, *args, **kwargs)

        # the same name as the model's class: HF Trainer, save_pretrained and lorakit read type(model).__name__
        _SUBCLASSES[cls] = same_name_subclass(cls, {"forward": forward}, _fast_subclass)
    return _SUBCLASSES[cls]


def _remake(make, args):
    """Unpickling a fast model pickled before ``speed.same_name`` (its reduce named this function)."""
    return remake(make, args, _fast_subclass)


def _wants_more(model: nn.Module, kwargs: dict) -> bool:
    """The call asks for outputs the fast paths do not produce (all hidden states, attention weights, the router
    logits a mixture-of-experts decoder adds its load-balancing loss from)."""
    config = getattr(model, "config", None)
    return any(kwargs[k] if kwargs.get(k) is not None else getattr(config, k, False) for k in _EXTRA_OUTPUTS)
