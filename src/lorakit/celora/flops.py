"""FLOPs of a training step's linear layers, exact vs CE-LoRA (multiply-add = 2 FLOPs).

For a layer with N tokens, W0 [out, in] and adapter rank r:
    forward                    2 N in out + 2 N r (in + out)
    backward, adapter          4 N r (in + out)     (u = G B, dB = G^T t, dA = u^T x, s u A)
    backward, frozen dX        2 N out in           exact
                               2 N (k in + out r0 + r0 in)   CE-LoRA, k = ceil(p out)
A frozen layer with no adapter costs 2 N in out forward and the same for dX. A layer whose
input does not require grad (the first projections of a network, fed by a frozen
embedding) has no dX at all; pass a ``batch`` to find those layers by tracing a forward
pass, otherwise every layer is assumed to need dX. Attention's L^2 terms, norms and
activations are not linear layers and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LayerFlops:
    name: str
    in_features: int
    out_features: int
    r: int  # 0 = frozen layer without adapter
    forward: int
    backward_exact: int
    backward_approx: int
    keep_ratio: float | None = None
    svd_rank: int | None = None
    needs_input_grad: bool = True


@dataclass
class FlopReport:
    tokens: int
    layers: list[LayerFlops] = field(default_factory=list)

    @property
    def forward(self) -> int:
        return sum(layer.forward for layer in self.layers)

    @property
    def backward_exact(self) -> int:
        return sum(layer.backward_exact for layer in self.layers)

    @property
    def backward_approx(self) -> int:
        return sum(layer.backward_approx for layer in self.layers)

    @property
    def saving(self) -> float:
        """Fraction of the linear layers' training FLOPs (forward + backward) that CE-LoRA removes."""
        exact = self.forward + self.backward_exact
        return 1.0 - (self.forward + self.backward_approx) / exact if exact else 0.0

    @property
    def backward_saving(self) -> float:
        return 1.0 - self.backward_approx / self.backward_exact if self.backward_exact else 0.0

    def approximated(self) -> list[LayerFlops]:
        return [layer for layer in self.layers if layer.keep_ratio is not None]

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "forward": self.forward, "backward_exact": self.backward_exact,
                "backward_approx": self.backward_approx, "saving": self.saving, "backward_saving": self.backward_saving,
                "layers": [layer.__dict__ for layer in self.layers]}

    def __str__(self) -> str:
        g, unit = (1e9, "GF") if self.forward >= 1e9 else (1e6, "MF")
        lines = [f"{'module':<48} {'in':>6} {'out':>6} {'r':>4} {'keep':>5} {'r0':>4} {'fwd ' + unit:>8} {'bwd ' + unit:>8} {'approx':>8}"]
        for layer in self.layers:
            keep = f"{layer.keep_ratio:.2f}" if layer.keep_ratio is not None else "-"
            r0 = str(layer.svd_rank) if layer.svd_rank is not None else "-"
            lines.append(f"{layer.name:<48} {layer.in_features:>6} {layer.out_features:>6} {layer.r:>4} {keep:>5} {r0:>4} "
                         f"{layer.forward / g:>8.3f} {layer.backward_exact / g:>8.3f} {layer.backward_approx / g:>8.3f}")
        lines.append(f"{self.tokens} tokens: forward {self.forward / g:.2f} {unit}LOP, backward {self.backward_exact / g:.2f} exact vs "
                     f"{self.backward_approx / g:.2f} CE-LoRA {unit}LOP; the linear layers' step saves {self.saving:.1%} "
                     f"(backward {self.backward_saving:.1%})")
        return "\n".join(lines)


def _linear_layers(model: nn.Module):
    """(name, module, LoraLinear or None) for every linear layer, adapters counted with their base."""
    from lorakit.module_kinds import is_adaptable, is_adapted

    skip: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if is_adapted(module):
            skip.add(name)
            yield name, module, module
        elif is_adaptable(module):
            yield name, module, None


def _trace_input_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, bool]:
    needs: dict[str, bool] = {}
    handles = []
    for name, module, _ in _linear_layers(model):
        handles.append(module.register_forward_hook(lambda m, inp, out, n=name: needs.__setitem__(n, bool(inp[0].requires_grad))))
    try:
        with torch.enable_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return needs


def flops(model: nn.Module, tokens: int, *, batch: dict[str, torch.Tensor] | None = None) -> FlopReport:
    """Per-layer forward and backward FLOPs for ``tokens`` tokens, exact vs CE-LoRA."""
    from lorakit.module_kinds import linear_shape
    from lorakit.kernels.amm import kept_features

    from lorakit.celora import controller

    needs = _trace_input_grads(model, batch) if batch is not None else {}
    ctl = controller(model)
    selectors = ctl.selectors if ctl is not None else {}
    report = FlopReport(tokens=tokens)
    n = tokens
    for name, module, lora in _linear_layers(model):
        if lora is not None:
            in_f, out_f, r = lora.in_features, lora.out_features, lora.r
        else:
            (in_f, out_f), r = linear_shape(module), 0
        need_dx = needs.get(name, True)
        fwd = 2 * n * in_f * out_f + 2 * n * r * (in_f + out_f)
        adapter_bwd = 4 * n * r * (in_f + out_f) - (2 * n * r * in_f if not need_dx else 0)
        frozen_dx = 2 * n * out_f * in_f if need_dx else 0
        approx_dx = frozen_dx
        keep = r0 = None
        sel = selectors.get(name)
        if sel is not None:
            keep, r0 = sel.spec.keep_ratio, sel.spec.svd_rank
            k = kept_features(keep, out_f)
            if need_dx and sel.spec.selection == "sample":  # G B0 over all features, G_I B0_I, then A0
                approx_dx = 2 * n * (k * in_f + out_f * r0 + k * r0 + r0 * in_f)
            elif need_dx and k < out_f:  # G_I W0_I + (G B0^J) A0
                approx_dx = 2 * n * (k * in_f + ((out_f * r0 + r0 * in_f) if r0 else 0))
        report.layers.append(LayerFlops(name, in_f, out_f, r, fwd, adapter_bwd + frozen_dx, adapter_bwd + approx_dx,
                                        keep, r0, need_dx))
    return report
