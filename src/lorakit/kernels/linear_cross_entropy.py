"""Output projection and cross-entropy in one pass over row chunks, never holding the N x V logits.

For hidden states X [N, H], output weight W [V, H] (bias b [V]) and labels y [N] (ignore_index
rows excluded), with n the number of labelled rows (or a given divisor, transformers'
``num_items_in_batch`` under gradient accumulation):

    u_i = s (W x_i + b),   z_i = c tanh(u_i / c)  (logit soft-capping, Gemma 2/3; z_i = u_i without a cap)
    loss = (1/n) sum_i (logsumexp(z_i) - z_i[y_i])
    dz_i = (softmax(z_i) - onehot(y_i)) / n       (0 for ignored rows),   du_i = dz_i (1 - tanh^2(u_i / c))
    dX = s dU W,   dW = s dU^T X,   db = s sum_i du_i

with s the logit scale (Cohere's ``logit_scale``, 1 / Granite's ``logits_scaling``; 1 otherwise).

The gradients are formed during the forward pass, chunk by chunk, in one reused logits buffer:
the unfused path (logits, their float copy, log_softmax, its gradient, each N x V: 200 MB apiece
for 1,024 tokens of a 49k vocabulary) costs more in page faults and memory passes than the
exponentials themselves. The backward only scales the stored gradients by the incoming one.
Logits are accumulated and normalised in float32 whatever the input precision (as transformers'
loss does with ``logits.float()``).

On CPU the chunk buffers (96 MB of float32 logits, plus a 16-bit one for bf16 inputs) are kept
between calls, one set per thread: fresh pages cost ~0.25 ms a MB on this kind of machine (the
kernel zeroes each one at first touch), ~25 ms a chunk, about what its exponentials cost.
A 16-bit head computing in fp32 is widened a block at a time into the workspace's weight buffer.
``release_workspace()`` frees them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit.kernels import workspace

IGNORE_INDEX = -100  # the label of a position without loss (PyTorch's and transformers' convention)
CHUNK_BYTES = 96 * 2**20  # logits per chunk (rows = this / (4 V), at least 32): 512 rows for a 49k vocabulary


def chunk_rows(vocab: int, rows: int) -> int:
    return max(1, min(rows, max(32, CHUNK_BYTES // (4 * vocab))))


def scratch(numel: int, dtype: torch.dtype, device: torch.device, slot: str = "logits") -> Tensor:
    """A flat buffer of ``numel`` elements for use within one call (``kernels.workspace``: on CPU the same memory
    every call, per thread, slot and dtype, grown when a call needs more; elsewhere a new tensor)."""
    return workspace.scratch((numel,), dtype, device, slot)


release_workspace = workspace.release  # frees this thread's kept CPU buffers (the next call allocates them again)


WIDEN_ELEMENTS = 2**24  # a 16-bit head computing in fp32 is widened this many weights at a time (64 MB)


@dataclass(frozen=True)
class PackedRows:
    """A frozen head held packed (an int8 / 4-bit ``--quantize-head``): its [V, H] ``shape``, the ``dtype`` it had,
    and ``rows(dtype, rows, out)``, which writes W[rows] dequantised into ``out``. The loss reads it a block of
    ~WIDEN_ELEMENTS weights at a time, so the head never exists whole in float."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    rows: Callable[[torch.dtype, slice, Tensor], Tensor]
    requires_grad = False

    def dim(self) -> int:
        return 2


def _vocab_blocks(weight: Tensor | PackedRows, dtype: torch.dtype):
    """(first row, rows of ``weight`` in ``dtype``): the whole weight when it is stored in ``dtype``; else blocks of
    ~WIDEN_ELEMENTS weights widened (or dequantised) one at a time into the workspace, so a bf16 or packed head
    computing in fp32 never exists whole in fp32 (a Llama-3 head: 2.1 GB). Each block is valid until the next."""
    if isinstance(weight, Tensor) and weight.dtype == dtype:
        yield 0, weight
        return
    step = max(256, WIDEN_ELEMENTS // max(1, weight.shape[1]))
    for v0 in range(0, weight.shape[0], step):
        if isinstance(weight, PackedRows):
            rows = slice(v0, min(v0 + step, weight.shape[0]))
            out = workspace.scratch((rows.stop - v0, weight.shape[1]), dtype, weight.device)
            yield v0, weight.rows(dtype, rows, out)
        else:
            yield v0, workspace.widened(weight[v0 : v0 + step], dtype)


def _logits(weight: Tensor, bias: Tensor | None, x: Tensor, out: Tensor) -> None:
    """out [V, rows] = W x^T + b, in the dtype of x."""
    for v0, w in _vocab_blocks(weight, x.dtype):
        o = out[v0 : v0 + w.shape[0]]
        if bias is not None:
            torch.addmm(bias[v0 : v0 + w.shape[0]].to(x.dtype).unsqueeze(1), w, x.t(), out=o)
        else:
            torch.mm(w, x.t(), out=o)


def _input_grad(g: Tensor, weight: Tensor, out: Tensor) -> None:
    """out [rows, H] = g^T W for g [V, rows], in the dtype of g."""
    if isinstance(weight, Tensor) and weight.dtype == g.dtype:
        torch.mm(g.t(), weight, out=out)
        return
    out.zero_()
    for v0, w in _vocab_blocks(weight, g.dtype):
        out.addmm_(g[v0 : v0 + w.shape[0]].t(), w)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, divisor, chunk, scale, softcap):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = torch.empty_like(hidden) if need_x else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = chunk or chunk_rows(vocab, n_rows)
        # Logits are formed transposed, [V, rows] = W X_c^T: on MKL this GEMM layout runs ~1.3x faster
        # than X_c W^T for a tall W, and the reductions over V become column reductions.
        buffer = scratch(vocab * rows, hidden.dtype, hidden.device)
        wide = scratch(vocab * rows, torch.float32, hidden.device, "wide") if hidden.dtype != torch.float32 else None
        slope = scratch(vocab * rows, torch.float32, hidden.device, "slope") if softcap else None
        per_row = 1.0 / divisor
        for start in range(0, n_rows, rows):
            stop = min(start + rows, n_rows)
            x, y, ok = hidden[start:stop], labels[start:stop], valid[start:stop]
            z_in = buffer[: vocab * (stop - start)].view(vocab, stop - start)  # logits in the input dtype
            _logits(weight, bias, x, z_in)
            zt = z_in if wide is None else wide[: z_in.numel()].view_as(z_in).copy_(z_in)
            if scale != 1.0:
                zt.mul_(scale)
            if softcap:  # z = c tanh(u / c); keep 1 - tanh^2 for the chain rule
                zt.div_(softcap).tanh_()
                d = torch.mul(zt, zt, out=slope[: zt.numel()].view_as(zt)).neg_().add_(1.0)
                zt.mul_(softcap)
            safe = torch.where(ok, y, 0).unsqueeze(0)
            target = zt.gather(0, safe).squeeze(0)
            top = zt.amax(0, keepdim=True)
            zt.sub_(top).exp_()
            norm = zt.sum(0, keepdim=True)
            lse = (top + norm.log()).squeeze(0)
            total += ((lse - target) * ok).sum()
            if dx is None and dw is None and db is None:
                continue
            weights = (ok.to(zt.dtype) * per_row).unsqueeze(0)
            zt.mul_(weights / norm)  # softmax / n on labelled rows, 0 elsewhere
            zt.scatter_add_(0, safe, -weights)
            if softcap:
                zt.mul_(d)
            if scale != 1.0:
                zt.mul_(scale)
            g = zt if wide is None else z_in.copy_(zt)
            if dx is not None:
                _input_grad(g, weight, dx[start:stop])
            if dw is not None:
                dw.addmm_(zt, x.float() if x.dtype != torch.float32 else x)
            if db is not None:
                db += zt.sum(1)
        ctx.save_for_backward(dx, dw, db)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total * per_row

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw, db = ctx.saved_tensors
        wd, bd = ctx.dtypes
        gx = dx * grad_loss.to(dx.dtype) if dx is not None else None
        gw = (dw * grad_loss).to(wd) if dw is not None else None
        gb = (db * grad_loss).to(bd) if db is not None else None
        return gx, gw, gb, None, None, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor | PackedRows, labels: Tensor, bias: Tensor | None = None, *,
                         ignore_index: int = IGNORE_INDEX, chunk: int | None = None, scale: float = 1.0,
                         softcap: float | None = None, divisor: float | Tensor | None = None) -> Tensor:
    """Mean cross-entropy of ``softcap(scale * (hidden @ weight.T + bias))`` against ``labels`` (see the module
    docstring); with ``divisor`` the summed cross-entropy / divisor (transformers' ``num_items_in_batch``).

    hidden: [..., H]; weight: [V, H] (or a frozen packed head, ``PackedRows``); labels: [...] (ints, ``ignore_index`` rows skipped); returns a
    float32 scalar, NaN when no row is labelled and no divisor is given (as torch's mean cross-entropy).
    Under autocast the products run in the autocast dtype (bf16 / fp16) whatever the dtype of ``hidden``,
    as the unfused ``F.linear`` head does, and the logits are widened to float32 for the loss.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels of shape {list(labels.shape)} do not match hidden states {list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight of shape {list(weight.shape)} does not map hidden size {hidden.shape[-1]} to a vocabulary")
    h = hidden.reshape(-1, hidden.shape[-1])
    device = h.device.type
    if torch.is_autocast_enabled(device):  # the products in the autocast dtype, as the unfused head's F.linear
        h = h.to(torch.get_autocast_dtype(device))
    # a frozen 16-bit head under fp32 activations (speed.widen) is widened a block at a time inside the function
    widen_inside = isinstance(weight, PackedRows) or (
        not weight.requires_grad and h.dtype == torch.float32 and weight.dtype in (torch.bfloat16, torch.float16)
        and (bias is None or not bias.requires_grad))
    w = weight if weight.dtype == h.dtype or widen_inside else weight.to(h.dtype)
    b = bias if bias is None or bias.dtype == h.dtype or widen_inside else bias.to(h.dtype)
    if isinstance(weight, PackedRows) and b is not None and b.requires_grad:
        raise ValueError("a packed head's bias cannot train through the fused loss; keep the head in float")
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    count = int(valid.sum())
    by = float(divisor) if divisor is not None else float(max(count, 1))
    with torch.autocast(device, enabled=False):  # the chunk products write into preallocated buffers (out=)
        loss = LinearCrossEntropyFunction.apply(h, w, b, labels, valid, by, chunk, float(scale), float(softcap or 0.0))
    return loss if count or divisor is not None else loss * float("nan")
