"""Exact LoRA constructions for the paper's simplified transformer (Zeng & Lee, ICLR 2024, the TFN case).

TFN of depth L, width D, H heads, on X in R^{D x N} (a column per token; batches [n, D, N]):

    Attn_l(Z) = sum_h W_O^h W_V^h Z softmax((W_K^h Z)^T (W_Q^h Z))      (softmax over keys, per query column)
    Z_l = W_2 ReLU(W_1 Attn_l(Z_{l-1}) + b_1 1^T) + b_2 1^T,              output W_o Z_L,

with full D x D matrices per head, no skip connections, no LayerNorm, no softmax scale.

Construction for a target of the same depth (every weight gets a LoRA update of rank R; the
FFN biases are tuned). Keep Z_{l-1} = T_{l-1} Zbar_{l-1} (T_0 = I) and S_l = W_1^{-1} Wbar_1:

- per head, the query-key product: (W_K + dK)^T (W_Q + dQ) = T^{-T} Wbar_K^T Wbar_Q T^{-1} and the
  value-output product: (W_O + dO)(W_V + dV) = S_l Wbar_O Wbar_V T^{-1}: each is the linear
  construction with two layers, exact at R >= ceil(D / 2). Then Attn_l(Z) = S_l Attn-bar_l(Zbar);
- b_1 = bbar_1 gives the target's hidden layer exactly;
- l < L: T_l = W_2 Wbar_2^{-1}, b_2 = T_l bbar_2, so Z_l = T_l Zbar_l (no update of W_2 needed);
- l = L: the pair (W_2, W_o) gets the linear construction (W_o + dW_o)(W_2 + dW_2) = Wbar_o Wbar_2 and
  b_2 = (W_o + dW_o)^{-1} Wbar_o bbar_2, so the output equals the target's.

Rank ceil(D / 2) because every factor the target fixes is a product of two adapted matrices.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from lorakit.errors import ConfigError
from lorakit.expressive.linear import SingularMatrixError, linear_adapters, per_layer_ranks

_NAMES = ("wq", "wk", "wv", "wo")


class TFN(nn.Module):
    """The simplified transformer of the module docstring; x: [n, D, N] -> [n, D, N]."""

    def __init__(self, layers: list[dict[str, Tensor]], w_out: Tensor) -> None:
        super().__init__()
        if not layers:
            raise ConfigError("a TFN needs at least one layer")
        heads, d = layers[0]["wq"].shape[0], w_out.shape[0]
        shapes = {"wq": (heads, d, d), "wk": (heads, d, d), "wv": (heads, d, d), "wo": (heads, d, d),
                  "w1": (d, d), "w2": (d, d), "b1": (d,), "b2": (d,)}
        self.layers = nn.ModuleList()
        for i, layer in enumerate(layers, 1):
            params = nn.ParameterDict()
            for name, shape in shapes.items():
                if name not in layer or tuple(layer[name].shape) != shape:
                    got = list(layer[name].shape) if name in layer else "missing"
                    raise ConfigError(f"layer {i}: {name} must be {list(shape)}, got {got}")
                params[name] = nn.Parameter(layer[name].clone())
            self.layers.append(params)
        if tuple(w_out.shape) != (d, d):
            raise ConfigError(f"w_out must be {d} x {d}, got {list(w_out.shape)}")
        self.w_out = nn.Parameter(w_out.clone())

    @property
    def width(self) -> int:
        return self.w_out.shape[0]

    @property
    def heads(self) -> int:
        return self.layers[0]["wq"].shape[0]

    @property
    def depth(self) -> int:
        return len(self.layers)

    @classmethod
    def random(cls, width: int, heads: int, depth: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> "TFN":
        """Weights N(0, 1/D), biases N(0, 1)."""
        if min(width, heads, depth) <= 0:
            raise ConfigError(f"width={width}, heads={heads} and depth={depth} must be positive")
        gen = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
        layers = []
        for _ in range(depth):
            layer = {name: rnd(heads, width, width) / math.sqrt(width) for name in _NAMES}
            layer.update(w1=rnd(width, width) / math.sqrt(width), w2=rnd(width, width) / math.sqrt(width),
                         b1=rnd(width), b2=rnd(width))
            layers.append(layer)
        return cls(layers, rnd(width, width) / math.sqrt(width))

    def run(self, x: Tensor, update: Callable[[int, str, int | None], Tensor | None] | None = None) -> Tensor:
        """The forward pass with optional weight updates: ``update(layer, name, head)`` returns a delta to add
        to that weight (layer -1 is the output matrix) or None. ``forward`` is ``run`` without updates."""
        if x.dim() != 3 or x.shape[1] != self.width:
            raise ConfigError(f"x must be [n, D={self.width}, N tokens], got {list(x.shape)}")

        def weight(li: int, name: str, h: int | None = None) -> Tensor:
            base = self.w_out if li < 0 else self.layers[li][name] if h is None else self.layers[li][name][h]
            delta = update(li, name, h) if update is not None else None
            return base if delta is None else base + delta

        z = x
        for li, layer in enumerate(self.layers):
            att = torch.zeros_like(z)
            for h in range(self.heads):
                q, k, v = weight(li, "wq", h) @ z, weight(li, "wk", h) @ z, weight(li, "wv", h) @ z
                att = att + weight(li, "wo", h) @ (v @ torch.softmax(k.transpose(-1, -2) @ q, dim=-2))  # softmax over keys
            hidden = torch.relu(weight(li, "w1") @ att + layer["b1"][:, None])
            z = weight(li, "w2") @ hidden + layer["b2"][:, None]
        return weight(-1, "w_out") @ z

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)


class AdaptedTFN(TFN):
    """A TFN with the constructed adapters added and the FFN biases tuned; ``adapters[name] = (B, A)``."""

    adapters: dict[str, tuple[Tensor, Tensor]]


def _inv(m: Tensor, what: str) -> Tensor:
    if torch.linalg.matrix_rank(m) < m.shape[0]:
        raise SingularMatrixError(f"{what} is singular; the TFN construction inverts it")
    return torch.linalg.inv(m)


@torch.no_grad()
def tfn_adapters(frozen: TFN, target: TFN, rank: int, *, pinv: bool = False) -> AdaptedTFN:
    """The construction of the module docstring for a same-depth target; exact at rank >= ceil(D / 2)."""
    if (frozen.width, frozen.heads) != (target.width, target.heads):
        raise ConfigError(f"frozen (D={frozen.width}, H={frozen.heads}) and target (D={target.width}, H={target.heads}) "
                          "must have the same width and heads")
    if frozen.depth != target.depth:
        raise ConfigError(f"target depth {target.depth} != frozen depth {frozen.depth}: the TFN construction (the paper's "
                          "result) covers same-depth targets only")
    d = frozen.width
    per_layer_ranks(rank, 1, d)  # validates 1 <= rank <= D
    adapters: dict[str, tuple[Tensor, Tensor]] = {}
    layers = []
    t = torch.eye(d, dtype=frozen.w_out.dtype)
    w_out = frozen.w_out.detach().clone()
    for li, (fl, tl) in enumerate(zip(frozen.layers, target.layers)):
        f = {k: v.detach() for k, v in fl.items()}
        g = {k: v.detach() for k, v in tl.items()}
        t_inv = _inv(t, f"the layer-{li + 1} input transform T")
        s = _inv(f["w1"], f"frozen W_1 of layer {li + 1}") @ g["w1"]
        new = {name: f[name].clone() for name in f}
        for h in range(frozen.heads):
            qk = linear_adapters([f["wq"][h], f["wk"][h].T], t_inv.T @ g["wk"][h].T @ g["wq"][h] @ t_inv, rank, pinv=pinv)
            (bq, aq), (bk, ak) = qk.adapters
            new["wq"][h] += bq @ aq
            new["wk"][h] += (bk @ ak).T
            adapters[f"layers.{li}.wq.{h}"], adapters[f"layers.{li}.wk.{h}"] = (bq, aq), (ak.T, bk.T)
            vo = linear_adapters([f["wv"][h], f["wo"][h]], s @ g["wo"][h] @ g["wv"][h] @ t_inv, rank, pinv=pinv)
            (bv, av), (bo, ao) = vo.adapters
            new["wv"][h] += bv @ av
            new["wo"][h] += bo @ ao
            adapters[f"layers.{li}.wv.{h}"], adapters[f"layers.{li}.wo.{h}"] = (bv, av), (bo, ao)
        new["b1"] = g["b1"].clone()
        if li < frozen.depth - 1:
            t = f["w2"] @ _inv(g["w2"], f"target W_2 of layer {li + 1}")
            new["b2"] = t @ g["b2"]
        else:
            last = linear_adapters([f["w2"], frozen.w_out.detach()], target.w_out.detach() @ g["w2"], rank, pinv=pinv)
            (b2, a2), (bo, ao) = last.adapters
            new["w2"] = f["w2"] + b2 @ a2
            w_out = frozen.w_out.detach() + bo @ ao
            adapters[f"layers.{li}.w2"], adapters["w_out"] = (b2, a2), (bo, ao)
            new["b2"] = _inv(w_out, "the adapted output matrix") @ target.w_out.detach() @ g["b2"]
        layers.append(new)
    out = AdaptedTFN(layers, w_out)
    out.adapters = adapters
    return out
