"""Activation checkpointing: each layer keeps its input only and is recomputed in the backward.

``use_gradient_checkpointing(model)`` is transformers' own per-layer checkpointing
(``model.gradient_checkpointing_enable``), non-reentrant (``torch.utils.checkpoint`` with
``use_reentrant=False``): a decoder or encoder layer's activations exist for one layer at a time,
at the cost of one more forward per layer (~1/3 of a step's products). Being transformers' own, the
same model trains the same way from ``lorakit train --gradient-checkpointing``, an own loop, HF
``Trainer(gradient_checkpointing=True)`` or TRL, and ``model.gradient_checkpointing_enable()`` called
by the user is the same thing. Combined with lorakit's paths:

- the fused head (``speed.fused_head``) runs after the last layer: it is not recomputed;
- the first-token classifier (``speed.first_token``) computes its last layer for one row, without
  checkpointing it (that layer's activations are one row; ``first_token_only`` turns it off there);
- the recompute draws the same dropout masks (torch restores the RNG state), and CE-LoRA's cached
  features are read in the backward only, which runs once per layer: the recompute neither refreshes
  nor changes them;
- gradients equal those without checkpointing (fp32: to rounding, ~1e-7 relative).

transformers' ``gradient_checkpointing_enable()`` also makes the embeddings' output require a gradient
(for reentrant checkpointing); lorakit's turns that off, so the first layer computes no input gradient,
as without checkpointing. Through transformers' own call (HF Trainer's) the adapters' gradients are the
same, and CE-LoRA's first-layer selectors also score that (unused) input gradient.
"""

from __future__ import annotations

from torch import nn

from lorakit.errors import ConfigError

CHECKPOINTING = {"use_reentrant": False}


def use_gradient_checkpointing(model: nn.Module) -> None:
    """Checkpoint every layer of ``model`` (see the module docstring); a model transformers cannot checkpoint is
    refused in one line."""
    if not getattr(model, "supports_gradient_checkpointing", False) or not hasattr(model, "gradient_checkpointing_enable"):
        raise ConfigError(f"--gradient-checkpointing: {type(model).__name__} does not support activation checkpointing "
                          "in transformers; drop --gradient-checkpointing (lower --batch-size or --max-length instead)")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name (the old one warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(CHECKPOINTING))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINTING))
    if getattr(model, "_require_grads_hook", None) is not None and hasattr(model, "disable_input_require_grads"):
        # transformers makes the embeddings' output require a gradient, which only reentrant checkpointing needs:
        # it would cost the first layer's dX product (thrown away at the frozen embeddings) at every step
        model.disable_input_require_grads()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a cache is not built in training calls; transformers would warn every step


def is_checkpointing(model: nn.Module) -> bool:
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))
