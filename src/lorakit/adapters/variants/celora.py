"""CE-LoRA (Chen et al. 2025, "CE-LoRA: Computation-Efficient LoRA Fine-Tuning for Language Models"),
``LoraConfig(backward="celora")``: the frozen weight's share of the input gradient, G W0, is approximated in the
layers the plan picks, while dA, dB and the adapter's share of dX stay exact:

    dX ~= G_I W0[I, :] + (G - G_I-part) B0 A0    (I: the kept output features, B0 A0 the frozen rank-r0 SVD of W0)

The features I are re-selected every ``refresh_every`` optimizer steps from the accumulated column norms of G
(``lorakit.celora.selector``, sections 3-4). This variant plans the layers before attach changes the model (with
svd_rank="balanced" the approximated layers' trainable rank becomes int(7r/8), recorded in rank_pattern), then
installs one FeatureSelector per planned layer as its ``frozen_input_grad`` and the model-wide step counter that
``step_hooks`` hands to a training loop. The adapter's own tensors and files are those of the variant it wraps.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorakit import celora
from lorakit.adapters.variants.base import Variant, Wrapper
from lorakit.celora.selector import SelectorSpec
from lorakit.module_kinds import linear_shape


class Celora(Wrapper):
    """See the module docstring."""

    name = "celora"

    def __init__(self, inner: Variant) -> None:
        super().__init__(inner)
        self.specs: dict[str, SelectorSpec] = {}  # the plan of the last ``plan`` call, installed by ``install``
        self.refresh_every = 0

    @classmethod
    def selected(cls, cfg: Any) -> bool:
        return cfg.backward == "celora"

    @property
    def one_per_model(self) -> str | None:
        return self.inner.one_per_model or "backward='celora' (its approximation is installed per layer)"

    needs_whole_weights = "--backward celora"  # each layer's feature cache and Double-LoRA SVD read the whole W0

    def plan(self, model: nn.Module, cfg: Any, targets: list[str]) -> Any:
        """CE-LoRA's per-layer plan, validated before anything is modified."""
        cfg = self.inner.plan(model, cfg, targets)
        shapes = {n: (*linear_shape(model.get_submodule(n)), cfg.rank_for(n)) for n in targets}
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        ce = cfg.celora
        self.specs = celora.plan_layers(model_type, shapes, keep_ratio=ce.keep_ratio, svd_rank=ce.svd_rank,
                                        selection=ce.selection)
        self.refresh_every = ce.refresh_every
        if ce.svd_rank == "balanced":
            pattern = dict(cfg.rank_pattern)
            pattern.update({name: celora.balanced_rank(cfg.rank_for(name)) for name in self.specs})
            cfg = cfg.replace(rank_pattern=pattern)
        return cfg

    def install(self, model: nn.Module) -> None:
        self.inner.install(model)
        if self.specs:
            celora.install(model, {n: model.get_submodule(n) for n in self.specs}, self.specs, self.refresh_every)

    def uninstall(self, model: nn.Module) -> None:
        celora.uninstall(model)
        self.inner.uninstall(model)

    @classmethod
    def step_hooks(cls, model: nn.Module) -> list:
        """The feature refresh, on a model where ``install`` put the step counter."""
        return [celora.Refresher(model)] if celora.controller(model) is not None else []
