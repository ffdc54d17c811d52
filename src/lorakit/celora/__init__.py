"""CE-LoRA (Chen et al. 2025): an approximate frozen-weight backward for LoRA layers.

    cfg = lorakit.LoraConfig(r=16, alpha=32, targets="all-linear", backward="celora",
                             celora=lorakit.CeloraConfig(keep_ratio=None, refresh_every=200, svd_rank=None, selection="score"))
    model = lorakit.attach(model, cfg)
    ...  loss.backward(); optimizer.step(); lorakit.celora.step(model)   # plain PyTorch loop

``lorakit train --backward celora`` drives ``step`` itself. ``flops(model, tokens)`` counts
what the approximation saves.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorakit.celora.flops import FlopReport, flops
from lorakit.celora.plan import KEEP_PRESETS, balanced_rank, keep_ratios, plan_layers
from lorakit.celora.selector import SELECTIONS, FeatureSelector, SelectorSpec

_ATTR = "_lorakit_celora"


class Controller:
    """The model-wide optimizer-step counter and the selectors it drives."""

    def __init__(self, selectors: dict[str, FeatureSelector], refresh_every: int) -> None:
        self.selectors = selectors
        self.refresh_every = refresh_every
        self.step = 0

    def end_step(self) -> int:
        self.step += 1
        next_is_refresh = self.step % self.refresh_every == 0
        return sum(sel.end_step(next_is_refresh) for sel in self.selectors.values())

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "selectors": {n: s.state_dict() for n, s in self.selectors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        for name, s in state["selectors"].items():
            self.selectors[name].load_state_dict(s)


def install(model: nn.Module, layers: dict[str, nn.Module], specs: dict[str, SelectorSpec], refresh_every: int) -> Controller:
    """Give each planned layer a FeatureSelector as its frozen-weight input gradient."""
    selectors = {}
    for name, spec in specs.items():
        sel = FeatureSelector(layers[name], spec)
        layers[name].frozen_input_grad = sel
        selectors[name] = sel
    controller = Controller(selectors, refresh_every)
    setattr(model, _ATTR, controller)
    return controller


def controller(model: nn.Module) -> Controller | None:
    return getattr(model, _ATTR, None)


def uninstall(model: nn.Module) -> None:
    ctl = controller(model)
    if ctl is None:
        return
    for sel in ctl.selectors.values():
        sel.layer.frozen_input_grad = None
    delattr(model, _ATTR)


def step(model: nn.Module) -> int:
    """Call once after every optimizer step; returns how many layers refreshed their features."""
    ctl = controller(model)
    return ctl.end_step() if ctl is not None else 0


class Refresher:
    """The trainer's per-step hook: ``step(model)`` after each optimizer step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def after_step(self, step_number: int, model: nn.Module) -> dict[str, Any] | None:
        refreshed = step(model)
        return {"celora_refreshed_layers": refreshed} if refreshed else None

    def state_dict(self) -> dict[str, Any]:
        return controller(self.model).state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        controller(self.model).load_state_dict(state)


__all__ = [
    "Controller", "FeatureSelector", "FlopReport", "KEEP_PRESETS", "Refresher", "SELECTIONS", "SelectorSpec",
    "balanced_rank", "controller", "flops", "install", "keep_ratios", "plan_layers", "step", "uninstall",
]
