"""Gradient-trained baselines for the expressive-power experiments (Zeng & Lee, ICLR 2024, their protocol).

- ``AdaptedNet``: a frozen stack of D x D layers (ReLU between layers for an FNN, none for a linear
  model) with LoRA updates B_l A_l on every layer (A Gaussian, B = 0), optionally tuned biases,
  or, for final-layer tuning (FLT), full trainable weights on the last k layers and nothing else.
- ``fit`` / ``mse``: Adam on fresh N(0, I) batches every epoch, squared error against the target.
- ``grid_search``: the paper's protocol: every (lr, weight decay) of the grid is trained, the one
  with the lowest validation MSE is kept, its test MSE is reported (paper: 5000 epochs, lr
  {1e-2, 1e-3, 1e-4} x wd {0, 1e-4, 1e-3, 1e-2}, batch 256, 5000 test samples; our defaults are
  smaller so CPU runs take seconds, and every budget is an argument).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from lorakit.errors import ConfigError

Target = Callable[[Tensor], Tensor]


class AdaptedNet(nn.Module):
    """x [n, D] -> [n, D]: z = W'_l z + b_l per layer, ReLU between layers when ``relu``."""

    def __init__(self, weights: list[Tensor], biases: list[Tensor] | None, *, rank: int = 0, relu: bool = True,
                 tune_bias: bool = True, final_layers: int = 0, seed: int = 0) -> None:
        super().__init__()
        d, depth = weights[0].shape[0], len(weights)
        if rank < 0 or (rank == 0) == (final_layers == 0):
            raise ConfigError("give either rank >= 1 (LoRA on every layer) or final_layers >= 1 (final-layer tuning)")
        if final_layers > depth:
            raise ConfigError(f"final_layers={final_layers} > depth {depth}")
        gen = torch.Generator().manual_seed(seed)
        self.relu = relu
        self.frozen = [w.detach().clone() for w in weights]
        biases = biases if biases is not None else [torch.zeros(d, dtype=weights[0].dtype)] * depth
        self.full = nn.ParameterList()
        self.lora_a = nn.ParameterList()
        self.lora_b = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.first_full = depth - final_layers if final_layers else depth
        for i, (w, b) in enumerate(zip(weights, biases)):
            if rank:
                a = torch.randn(rank, d, generator=gen, dtype=w.dtype) / math.sqrt(d)
                self.lora_a.append(nn.Parameter(a))
                self.lora_b.append(nn.Parameter(torch.zeros(d, rank, dtype=w.dtype)))
            if i >= self.first_full:
                self.full.append(nn.Parameter(w.detach().clone()))
            trainable_bias = (tune_bias and bool(rank)) or i >= self.first_full
            self.biases.append(nn.Parameter(b.detach().clone(), requires_grad=trainable_bias))

    def weight(self, i: int) -> Tensor:
        if i >= self.first_full:
            return self.full[i - self.first_full]
        w = self.frozen[i]
        if len(self.lora_a):
            w = w + self.lora_b[i] @ self.lora_a[i]
        return w

    def forward(self, x: Tensor) -> Tensor:
        z = x
        n = len(self.frozen)
        for i in range(n):
            z = z @ self.weight(i).T + self.biases[i]
            if self.relu and i < n - 1:
                z = torch.relu(z)
        return z

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def mse(model: Callable[[Tensor], Tensor], target: Target, n: int, dim: int, seed: int, dtype=torch.float32) -> float:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=dtype)
    with torch.no_grad():
        return float((model(x) - target(x)).pow(2).sum(-1).mean())


@contextlib.contextmanager
def single_thread():
    """These models are tiny (D x D with D ~ 16): thread start-up and, on a shared machine, spinning
    threads cost more than the arithmetic, so the baselines run on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(model: AdaptedNet, target: Target, *, epochs: int, lr: float, weight_decay: float, batch: int = 256,
        seed: int = 0) -> AdaptedNet:
    """Adam (weight decay as in torch.optim.Adam) on a fresh N(0, I) batch every epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    dim = model.frozen[0].shape[0]
    dtype = model.frozen[0].dtype
    with single_thread():
        for _ in range(epochs):
            x = torch.randn(batch, dim, generator=gen, dtype=dtype)
            with torch.no_grad():
                y = target(x)
            loss = (model(x) - y).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


@dataclass
class GridResult:
    test_mse: float
    lr: float
    weight_decay: float
    validation_mse: float
    trainable_parameters: int
    tried: list[dict] = field(default_factory=list)


def _best_of_grid(lrs, weight_decays, train: Callable[[float, float], nn.Module],
                  validate: Callable[[nn.Module], float]) -> tuple[float, float, float, nn.Module, list[dict]]:
    """Train every (lr, wd); keep the one with the lowest validation MSE: (val, lr, wd, model, tried)."""
    best, tried = None, []
    for lr in lrs:
        for wd in weight_decays:
            model = train(lr, wd)
            val = validate(model)
            tried.append({"lr": lr, "weight_decay": wd, "validation_mse": val})
            if best is None or val < best[0]:
                best = (val, lr, wd, model)
    return (*best, tried)


def grid_search(make: Callable[[], AdaptedNet], target: Target, *, epochs: int = 300, lrs=(1e-2, 1e-3),
                weight_decays=(0.0, 1e-3), batch: int = 256, validation: int = 1000, test: int = 5000,
                seed: int = 0) -> GridResult:
    """Train every (lr, wd), keep the best on validation, report its test MSE."""
    def train(lr: float, wd: float) -> AdaptedNet:
        return fit(make(), target, epochs=epochs, lr=lr, weight_decay=wd, batch=batch, seed=seed)

    def score(model: AdaptedNet, n: int, offset: int) -> float:
        return mse(model, target, n, model.frozen[0].shape[0], seed=offset + seed, dtype=model.frozen[0].dtype)

    val, lr, wd, model, tried = _best_of_grid(lrs, weight_decays, train, lambda m: score(m, validation, 10_000))
    return GridResult(score(model, test, 20_000), lr, wd, val, model.trainable_parameters(), tried)


class TFNLoRA(nn.Module):
    """Gradient-trained LoRA on a frozen TFN: rank-R updates on W_Q, W_K, W_V, W_O of every head and
    layer, on the last FFN's W_2 and the output matrix (where the construction puts them), and tuned
    FFN biases. x: [n, D, N]."""

    def __init__(self, frozen, rank: int, seed: int = 0) -> None:
        super().__init__()
        from lorakit.expressive.tfn import TFN

        self.net = TFN([{k: v.detach() for k, v in layer.items()} for layer in frozen.layers], frozen.w_out.detach())
        for p in self.net.parameters():
            p.requires_grad_(False)
        d, gen = frozen.width, torch.Generator().manual_seed(seed)
        self.factors = nn.ParameterDict()
        self.keys: list[tuple[int, str, int | None]] = []
        last = frozen.depth - 1
        for li, layer in enumerate(self.net.layers):
            for name in ("wq", "wk", "wv", "wo"):
                for h in range(layer[name].shape[0]):
                    self.keys.append((li, name, h))
            if li == last:
                self.keys.append((li, "w2", None))
            layer["b1"].requires_grad_(True)
            layer["b2"].requires_grad_(True)
        self.keys.append((-1, "w_out", None))
        self.adapted = set(self.keys)
        dtype = frozen.w_out.dtype
        for li, name, h in self.keys:
            key = f"{li}_{name}_{h}"
            self.factors[key + "_a"] = nn.Parameter(torch.randn(rank, d, generator=gen, dtype=dtype) / math.sqrt(d))
            self.factors[key + "_b"] = nn.Parameter(torch.zeros(d, rank, dtype=dtype))

    def _delta(self, li: int, name: str, h: int | None) -> Tensor:
        key = f"{li}_{name}_{h}"
        return self.factors[key + "_b"] @ self.factors[key + "_a"]

    def forward(self, x: Tensor) -> Tensor:
        return self.net.run(x, lambda li, name, h: self._delta(li, name, h) if (li, name, h) in self.adapted else None)


def tfn_grid_search(frozen, target, rank: int, *, epochs: int = 300, lrs=(1e-2, 1e-3), weight_decays=(0.0, 1e-3),
                    batch: int = 64, tokens: int = 10, validation: int = 500, test: int = 2000, seed: int = 0) -> GridResult:
    """The baselines' protocol for a TFN: fresh N(0, I) [batch, D, tokens] inputs every epoch, best (lr, wd) on validation."""
    d, dtype = frozen.width, frozen.w_out.dtype

    def loss_of(model, n, s):
        x = torch.randn(n, d, tokens, generator=torch.Generator().manual_seed(s), dtype=dtype)
        with torch.no_grad():
            return float((model(x) - target(x)).pow(2).sum(1).mean())

    def train(lr: float, wd: float) -> TFNLoRA:
        model = TFNLoRA(frozen, rank, seed=seed)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=wd)
        gen = torch.Generator().manual_seed(seed)
        with single_thread():
            for _ in range(epochs):
                x = torch.randn(batch, d, tokens, generator=gen, dtype=dtype)
                with torch.no_grad():
                    y = target(x)
                loss = (model(x) - y).pow(2).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return model

    val, lr, wd, model, tried = _best_of_grid(lrs, weight_decays, train, lambda m: loss_of(m, validation, 10_000 + seed))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return GridResult(loss_of(model, test, 20_000 + seed), lr, wd, val, trainable, tried)
