"""RMSNorm layers of an adapted model run ``kernels.rms_norm`` in training calls, for whoever calls the model.

``fast_norms(model)`` (``make_fast`` calls it) gives each RMSNorm module a subclass of its own class -- same name,
same weight -- whose forward, when autograd records (grad enabled, autocast off), is ``kernels.rms_norm.rms_norm``
in the style its class computes; every other call (evaluation, ``no_grad``, generation) is the class's own forward.
Which style a class computes is not read from a table of names: a class is taken only if, on a probe (a copy of
one of its modules with a random weight, a random bf16 and float32 input), the fused function gives its own
forward's output and gradients (bf16: the same output bits, gradients within one unit in the last place of the
largest; float32: within 1e-5 relative). A class neither style reproduces -- another formula, another cast order,
a custom kernel -- keeps its own forward. ``restore_norms`` gives every module its class back. Pickling and deepcopy keep the fused class (``speed.same_name``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.kernels.rms_norm import STYLES, rms_norm
from lorakit.speed.same_name import same_name_subclass

_STYLE_OF: dict[type, str | None] = {}  # each class's probed style (None: neither reproduces it)
_SUBCLASSES: dict[type, type] = {}
# per dtype: relative tolerances of (output, input gradient, weight gradient); the bf16 output must be the same bits
# (that pins the cast order), its gradients may differ in the last place (the row sums run in another order)
_PROBE_TOLERANCE = {torch.bfloat16: (0.0, 2.0**-7, 2.0**-7), torch.float32: (1e-5, 1e-5, 1e-5)}


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _candidate(module: nn.Module) -> bool:
    """An RMSNorm-like module: a class named *RMSNorm with one 1-D weight and an epsilon."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1
            and _eps(module) is not None and len(list(module.parameters())) == 1)


def _outputs(fn, x: torch.Tensor, weight: nn.Parameter) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(True)
    y = fn(x)
    y.backward(torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype).view_as(y))
    out = [y.detach(), x.grad, weight.grad.clone()]
    weight.grad = None
    return out


def _reproduces(own: nn.Module, style: str) -> bool:
    """The fused function gives ``own``'s forward output, input and weight gradients on the probe inputs."""
    eps = _eps(own)
    generator = torch.Generator().manual_seed(0)
    for dtype, tolerances in _PROBE_TOLERANCE.items():
        probe = copy.deepcopy(own).to(dtype).requires_grad_(True)  # (a frozen weight: its gradient checked too)
        with torch.no_grad():
            probe.weight.copy_(torch.randn(probe.weight.shape, generator=generator) * 0.5 + 0.5)
        x = torch.randn(3, 5, probe.weight.shape[0], generator=generator).to(dtype) * 3.0
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            want = _outputs(probe, x, probe.weight)
            got = _outputs(lambda t: rms_norm(t, probe.weight, eps, style), x, probe.weight)
        for a, b, tolerance in zip(want, got, tolerances):
            if a.dtype != b.dtype or a.shape != b.shape or \
                    not torch.allclose(a.float(), b.float(), rtol=tolerance, atol=tolerance * a.abs().max().item()):
                return False
    return True


def probed_style(module: nn.Module) -> str | None:
    """The style of ``kernels.rms_norm`` that reproduces this module's class, or None (probed once per class)."""
    cls = type(module)
    if cls not in _STYLE_OF:
        try:
            _STYLE_OF[cls] = next((s for s in STYLES if _reproduces(module, s)), None)
        except Exception:  # a module the probe cannot run (meta weights, odd signatures): keep its own forward
            _STYLE_OF[cls] = None
    return _STYLE_OF[cls]


def _fast_class(cls: type) -> type:
    if cls not in _SUBCLASSES:
        def forward(self, x):
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad) and \
                    not torch.is_autocast_enabled(x.device.type):
                return rms_norm(x, self.weight, _eps(self), _STYLE_OF[cls])
            return cls.forward(self, x)

        _SUBCLASSES[cls] = same_name_subclass(cls, {"forward": forward}, _fast_class)
    return _SUBCLASSES[cls]


def fast_norms(model: nn.Module) -> int:
    """Give every RMSNorm module whose class a style reproduces the fused forward; returns how many. Idempotent."""
    count = 0
    for module in model.modules():
        if type(module) in _SUBCLASSES.values():
            count += 1
        elif _candidate(module) and probed_style(module) is not None:
            module.__class__ = _fast_class(type(module))
            count += 1
    return count


def restore_norms(model: nn.Module) -> None:
    """Every module ``fast_norms`` changed gets its own class back."""
    originals = {fast: cls for cls, fast in _SUBCLASSES.items()}
    for module in model.modules():
        if type(module) in originals:
            module.__class__ = originals[type(module)]
