"""The hooks of an adapter variant (after PEFT's ``LoraVariant``, tuners/lora/variants.py).

A variant is what one adapter adds to plain LoRA (y = W0 x + b + s B A drop(x)): how its factors start, a
per-feature scale of its layer's output, how it folds into W0 and back, which tensors beside A and B it trains
and saves, what its config refuses, and what it installs on the whole model. ``LoraLinear`` calls the hooks and
holds no variant's name; ``variants.of(config)`` picks an adapter's variant from its LoraConfig. Variants keep no
per-layer state themselves: their tensors live on the layer (``lora_magnitude_vector``, or buffers through
``keep``), so they move with ``model.to`` and one variant object serves every layer of an adapter.

A base variant (``Lora``, ``Pissa``) sets up A and B; a ``Wrapper`` (``Dora``, ``Celora``) adds to the variant it
wraps and hands every hook it does not change on to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


class Variant:
    """Plain LoRA's behaviour for every hook; a variant overrides what it changes."""

    name = "lora"
    flag = ""  # shown by LoraLinear.extra_repr, e.g. ", dora"
    rewrites_base = False  # its init changes W0, so a file saved unconverted only fits the changed base
    one_per_model: str | None = None  # why a model holding this adapter can hold no other (None: it can)
    active_alone: str | None = None  # the adapter's description when it must act alone (no second active, no mixed batch)
    combine_refusal: str | None = None  # why add_weighted_adapter cannot combine it (None: it can)
    needs_whole_weights: str | None = None  # its option, when it needs every process to hold whole frozen weights
    file_kind = "a plain LoRA adapter"  # an adapter file's tensors and this adapter's must be of one kind to load
    init_name = "kaiming"  # LoraConfig.init
    peft_init: Any = True  # PEFT's init_lora_weights for it

    @classmethod
    def selected(cls, cfg: Any) -> bool:
        """Whether a LoraConfig asks for this variant (wrappers; base variants are chosen by ``cfg.init``)."""
        return False

    # ------------------------------------------------------------------ config and model
    def validate(self, cfg: Any) -> None:
        """Raise ConfigError for a LoraConfig this variant cannot run."""

    def plan(self, model: nn.Module, cfg: Any, targets: list[str]) -> Any:
        """Before attach changes the model: check what is needed, return the config to attach with."""
        return cfg

    def install(self, model: nn.Module) -> None:
        """After attach has wrapped the targets: set up what spans layers."""

    def uninstall(self, model: nn.Module) -> None:
        """Undo ``install`` (unload)."""

    @classmethod
    def step_hooks(cls, model: nn.Module) -> list:
        """Objects with ``after_step(step, model)`` a training loop calls after every optimizer step."""
        return []

    def saved_config(self, cfg: Any, convert: bool) -> Any:
        """The config written beside the tensors of ``file_tensors(..., convert)``."""
        return cfg

    def extra_shapes(self, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        """File-key suffix -> shape of each tensor this variant saves beside A and B."""
        return {}

    # ------------------------------------------------------------------ one layer
    def init(self, layer: nn.Module, name: str) -> None:
        """Initialise adapter ``name``'s tensors in ``layer`` (run under torch.no_grad)."""

    def scale_output(self, layer: nn.Module, name: str) -> Tensor | None:
        """g, one factor per output feature: the layer computes g * (W0 x + s B A drop(x)) + b (None: g = 1)."""
        return None

    def merge(self, layer: nn.Module, name: str) -> None:
        """W0 <- W0 + s B A."""
        layer.storage.add_(layer.delta_weight(name))

    def unmerge(self, layer: nn.Module, name: str) -> None:
        """W0 <- W0 - s B A."""
        layer.storage.add_(-layer.delta_weight(name))

    def restore_base(self, layer: nn.Module, name: str) -> None:
        """Give W0 back the value it had before ``init`` (unload without merging)."""

    def extra_parameters(self, layer: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """File-key suffix -> each trained tensor besides A and B (saved, loaded, counted, switched with the adapter)."""
        return {}

    def remove(self, layer: nn.Module, name: str) -> None:
        """Drop what ``init`` added to ``layer`` besides A and B (delete_adapter)."""

    def convert_for_save(self, layer: nn.Module, name: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """(A, B) as written to a file for the unmodified base model."""
        return a, b

    def file_tensors(self, layer: nn.Module, name: str, convert: bool = True) -> dict[str, Tensor]:
        """File-key suffix -> tensor of adapter ``name`` in ``layer`` (PEFT's keys without the module path)."""
        a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
        if convert:
            a, b = self.convert_for_save(layer, name, a, b)
        extra = {key: p.detach() for key, p in self.extra_parameters(layer, name).items()}
        return {"lora_A.weight": a, "lora_B.weight": b, **extra}

    # ------------------------------------------------------------------ tensors kept on the layer
    def _buffer(self, name: str, key: str) -> str:
        return f"{self.name}_{key}_{name}"

    def keep(self, layer: nn.Module, name: str, key: str, value: Tensor) -> None:
        """Keep ``value`` on ``layer`` for adapter ``name`` (a buffer outside the state_dict, moved with the model)."""
        layer.register_buffer(self._buffer(name, key), value, persistent=False)

    def kept(self, layer: nn.Module, name: str, key: str) -> Tensor | None:
        return layer._buffers.get(self._buffer(name, key))

    def take(self, layer: nn.Module, name: str, key: str) -> Tensor | None:
        """``kept``, then forgotten."""
        return layer._buffers.pop(self._buffer(name, key), None)

    def __repr__(self) -> str:
        return type(self).__name__ + "()"


@dataclass
class AdapterSettings:
    """One adapter's hyper-parameters and variant in one layer (its tensors live in the layer's lora_A, lora_B, ...)."""

    r: int
    alpha: float
    rslora: bool
    dropout_p: float
    variant: Variant

    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


class Wrapper(Variant):
    """A variant added on top of another (``inner``); every hook it does not override is the inner variant's."""

    def __init__(self, inner: Variant) -> None:
        self.inner = inner

    flag = property(lambda self: self.inner.flag)
    rewrites_base = property(lambda self: self.inner.rewrites_base)
    one_per_model = property(lambda self: self.inner.one_per_model)
    active_alone = property(lambda self: self.inner.active_alone)
    combine_refusal = property(lambda self: self.inner.combine_refusal)
    needs_whole_weights = property(lambda self: self.inner.needs_whole_weights)
    file_kind = property(lambda self: self.inner.file_kind)
    init_name = property(lambda self: self.inner.init_name)
    peft_init = property(lambda self: self.inner.peft_init)

    def validate(self, cfg: Any) -> None:
        self.inner.validate(cfg)

    def plan(self, model: nn.Module, cfg: Any, targets: list[str]) -> Any:
        return self.inner.plan(model, cfg, targets)

    def install(self, model: nn.Module) -> None:
        self.inner.install(model)

    def uninstall(self, model: nn.Module) -> None:
        self.inner.uninstall(model)

    def saved_config(self, cfg: Any, convert: bool) -> Any:
        return self.inner.saved_config(cfg, convert)

    def extra_shapes(self, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        return self.inner.extra_shapes(in_features, out_features)

    def init(self, layer: nn.Module, name: str) -> None:
        self.inner.init(layer, name)

    def scale_output(self, layer: nn.Module, name: str) -> Tensor | None:
        return self.inner.scale_output(layer, name)

    def merge(self, layer: nn.Module, name: str) -> None:
        self.inner.merge(layer, name)

    def unmerge(self, layer: nn.Module, name: str) -> None:
        self.inner.unmerge(layer, name)

    def restore_base(self, layer: nn.Module, name: str) -> None:
        self.inner.restore_base(layer, name)

    def extra_parameters(self, layer: nn.Module, name: str) -> dict[str, nn.Parameter]:
        return self.inner.extra_parameters(layer, name)

    def remove(self, layer: nn.Module, name: str) -> None:
        self.inner.remove(layer, name)

    def convert_for_save(self, layer: nn.Module, name: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return self.inner.convert_for_save(layer, name, a, b)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"
