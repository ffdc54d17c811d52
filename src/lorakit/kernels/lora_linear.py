"""The LoRA linear layer as one autograd function.

Forward:   y = x W0^T + b + s * (drop(x) A^T) B^T          x: [N, in], W0: [out, in]
Backward (G = dL/dy, u = G B, an N x r "thin" intermediate):
    dB = s * G^T (drop(x) A^T)          [out, r]
    dA = s * u^T drop(x)                [r, in]
    dX = G W0 + s * u A  (* dropout mask / (1 - p) on the adapter share)
    db = sum_n G[n]
dX is formed in one buffer: G W0 first, then the adapter share accumulated into it in place.
Only drop(x) (needed for dA), the thin s-free product t = drop(x) A^T (needed for dB) and
the dropout mask are saved; nothing is saved for what does not need a gradient (the first
adapted layer of a network, whose input is a frozen embedding, gets no dX at all).

The product G W0 is the frozen-weight activation gradient that CE-LoRA approximates
(Chen et al. 2025, section 3); a caller supplies its approximation through
``frozen_input_grad``, a function G -> dX_base, while dA, dB and the adapter share of dX
stay exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lorakit.kernels.workspace import widened

FrozenInputGrad = Callable[[Tensor], Tensor]


def product_dtype(x: Tensor) -> torch.dtype:
    """The dtype a product with input ``x`` runs in: autocast's where it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p, training, frozen_input_grad):
        device_type = x.device.type
        compute_dtype = product_dtype(x)
        lead_shape = x.shape[:-1]
        out_features = weight.shape[0]
        with torch.autocast(device_type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            if x2.dtype != compute_dtype:
                x2 = x2.to(compute_dtype)
            w = widened(weight, compute_dtype)  # a bf16 W0 under fp32 compute: into the reused scratch buffer
            a = lora_A if lora_A.dtype == compute_dtype else lora_A.to(compute_dtype)
            b_ = lora_B if lora_B.dtype == compute_dtype else lora_B.to(compute_dtype)
            mask = None
            if dropout_p > 0.0 and training:
                x_drop, mask = torch.native_dropout(x2, dropout_p, True)
            else:
                x_drop = x2
            if bias is not None:
                y = torch.addmm(bias.to(compute_dtype), x2, w.t())
            else:
                y = torch.mm(x2, w.t())
            t = torch.mm(x_drop, a.t())  # [N, r]
            y.addmm_(t, b_.t(), alpha=scale)

        needs_x, needs_w, needs_b, needs_a, needs_bb = ctx.needs_input_grad[:5]
        ctx.save_for_backward(
            x_drop if needs_a else None,
            x2 if (needs_w and mask is not None) else (x_drop if needs_w else None),
            weight if (needs_x and frozen_input_grad is None) else None,  # G W0 is frozen_input_grad's otherwise
            lora_A,
            lora_B,
            t if needs_bb else None,
            mask,
        )
        ctx.scale = scale
        ctx.dropout_p = dropout_p
        ctx.compute_dtype = compute_dtype
        ctx.frozen_input_grad = frozen_input_grad
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.weight_dtype = weight.dtype
        return y.view(*lead_shape, out_features)

    @staticmethod
    def backward(ctx, grad_out):
        x_drop, x_full, weight, lora_A, lora_B, t, mask = ctx.saved_tensors
        needs_x, needs_w, needs_b, needs_a, needs_bb = ctx.needs_input_grad[:5]
        s = ctx.scale
        cd = ctx.compute_dtype
        device_type = grad_out.device.type
        dx = dw = db = da = dbb = None
        with torch.autocast(device_type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1])
            if g.dtype != cd:
                g = g.to(cd)
            a = lora_A if lora_A.dtype == cd else lora_A.to(cd)
            b_ = lora_B if lora_B.dtype == cd else lora_B.to(cd)
            u = torch.mm(g, b_) if (needs_a or needs_x) else None  # [N, r]
            if needs_bb:
                dbb = torch.mm(g.t(), t).mul_(s).to(lora_B.dtype)
            if needs_a:
                da = torch.mm(u.t(), x_drop).mul_(s).to(lora_A.dtype)
            if needs_x:
                if ctx.frozen_input_grad is not None:
                    dx = ctx.frozen_input_grad(g)
                else:
                    dx = torch.mm(g, widened(weight, cd))
                if mask is None:
                    dx.addmm_(u, a, alpha=s)
                else:
                    share = torch.mm(u, a)
                    share.mul_(mask).mul_(s / (1.0 - ctx.dropout_p))
                    dx.add_(share)
                dx = dx.view(ctx.x_shape)
                if dx.dtype != ctx.x_dtype:
                    dx = dx.to(ctx.x_dtype)
            if needs_w:
                dw = torch.mm(g.t(), x_full).to(ctx.weight_dtype)
            if needs_b:
                db = g.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, da, dbb, None, None, None, None


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
    frozen_input_grad: FrozenInputGrad | None = None,
) -> Tensor:
    """y = x W^T + b + scale * (dropout(x) A^T) B^T with the fused backward described above.

    weight: [out, in] (pass ``conv1d.weight.t()`` for a GPT-2 style Conv1D); lora_A: [r, in];
    lora_B: [out, r]; x: [..., in]. ``frozen_input_grad`` replaces G W0 in the backward.
    """
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), float(dropout_p), bool(training), frozen_input_grad)
