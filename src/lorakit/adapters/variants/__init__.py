"""Adapter variants as strategy objects (after PEFT's ``LoraVariant``): what one adapter adds to plain LoRA.

    variant = variants.of(lora_config)       # e.g. Celora(Dora(Lora('kaiming')))
    variant.validate(lora_config); cfg = variant.plan(model, cfg, targets); ...; variant.install(model)

One module per variant, each with its formula and paper: ``lora`` (plain LoRA, kaiming/gaussian init), ``pissa``
(SVD init, residual base), ``dora`` (magnitude and direction), ``celora`` (approximate frozen-weight backward).
The two tables below are the registry: a new variant is a new module plus one row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lorakit.adapters.variants.base import Variant, Wrapper
from lorakit.adapters.variants.celora import Celora
from lorakit.adapters.variants.dora import Dora
from lorakit.adapters.variants.lora import Lora
from lorakit.adapters.variants.pissa import Pissa

# LoraConfig.init -> the base variant that sets up A and B
BASES: dict[str, Callable[[str], Variant]] = {"kaiming": Lora, "gaussian": Lora, "pissa": Pissa}
# variants added on top, innermost first, each where its ``selected(config)`` says so
WRAPPERS: tuple[type[Wrapper], ...] = (Dora, Celora)


def of(cfg: Any) -> Variant:
    """The variant of an adapter with LoraConfig ``cfg`` (not validated: ``validate(cfg)`` does that)."""
    variant = BASES[cfg.init](cfg.init)
    for wrapper in WRAPPERS:
        if wrapper.selected(cfg):
            variant = wrapper(variant)
    return variant


def peft_init(init: str) -> Any:
    """PEFT's init_lora_weights for LoraConfig.init ``init``."""
    return BASES[init](init).peft_init


def init_from_peft(value: Any) -> str | None:
    """LoraConfig.init for PEFT's init_lora_weights ``value``; None where lorakit has no such init."""
    return next((init for init, make in BASES.items() if make(init).reads_peft(value)), None)


def step_hooks(model: nn.Module) -> list:
    """What the model's installed variants ask a training loop to run after every optimizer step
    (objects with ``after_step(step, model)``; none where no such variant is attached)."""
    return [hook for variant in (*dict.fromkeys(BASES.values()), *WRAPPERS) for hook in variant.step_hooks(model)]


__all__ = ["BASES", "Celora", "Dora", "Lora", "Pissa", "Variant", "WRAPPERS", "Wrapper", "init_from_peft", "of",
           "peft_init", "step_hooks"]
