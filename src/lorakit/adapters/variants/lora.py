"""Plain LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):

    W = W0 + s B A,   A: r x in, B: out x r,   s = alpha / r (alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023)

B starts at 0, so the adapted model starts as the base model; A starts random:
    kaiming:  A ~ Kaiming-uniform(a = sqrt 5), nn.Linear's default (PEFT's default, init_lora_weights=True)
    gaussian: A ~ N(0, 1/r^2) (PEFT's init_lora_weights="gaussian")
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from lorakit.adapters.variants.base import Variant
from lorakit.errors import ConfigError

# LoraConfig.init -> (how A starts, PEFT's init_lora_weights value)
INITS = {
    "kaiming": (lambda a, r: nn.init.kaiming_uniform_(a, a=math.sqrt(5)), True),
    "gaussian": (lambda a, r: nn.init.normal_(a, std=1.0 / r), "gaussian"),
}


class Lora(Variant):
    """W0 + s B A with B = 0 and A from ``init`` (see the module docstring)."""

    def __init__(self, init: str = "kaiming") -> None:
        if init not in INITS:
            raise ConfigError(f"init={init!r} is not one of {', '.join(map(repr, INITS))} (plain LoRA)")
        self.init_name = init
        self.peft_init = INITS[init][1]

    def reads_peft(self, value: Any) -> bool:
        """Whether PEFT's init_lora_weights ``value`` asks for this init (True/False/None: the file holds the weights)."""
        if isinstance(self.peft_init, str):
            return isinstance(value, str) and value.lower() == self.peft_init
        return value in (True, False, None)

    def init(self, layer: nn.Module, name: str) -> None:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        INITS[self.init_name][0](a, layer.settings[name].r)
        nn.init.zeros_(b)

    def __repr__(self) -> str:
        return f"Lora({self.init_name!r})"
