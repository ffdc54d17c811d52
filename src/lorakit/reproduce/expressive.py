"""Reproductions of the expressive power of LoRA (Zeng & Lee, ICLR 2024) on synthetic models.

Experiments (``lorakit reproduce expressive --experiment NAME``), width D = 16, frozen and target
models random and independent per seed, median over seeds, each writing NAME.csv and NAME.png:

- linear: Lbar = 1, L = 2, R = 1..8: the construction (its MSE is ||prod W' - Wbar||_F^2, exact for
  N(0, I) inputs) against gradient-trained LoRA, for a random and a "pretrained" frozen model (full
  weights trained on the target until the MSE is a third of where it started).
- fnn: ReLU FNNs Lbar = 1, L = 2 and Lbar = 2, L = 4: construction vs gradient-trained LoRA (biases tuned).
- flt: Lbar = 1, L = 8: LoRA of rank R against tuning the last k layers in full (equal parameters at R = k).
- tfn: the simplified transformer (H = 2, N = 10 tokens), L in {1, 2}: construction vs gradient-trained LoRA.
- depth: Lbar = 1, frozen depth L = 2..14: the smallest rank at which the construction is exact (relative MSE
  <= 1e-8 in float64), vs ceil(D / L); deep random stacks can be float64-limited (said per row).
- bias: gradient-trained LoRA on the FNN (Lbar = 1, L = 2) with and without bias tuning.

Defaults finish in minutes on 2 cores (3 seeds, 300 epochs, lr {1e-2, 1e-3} x wd {0, 1e-3});
``--full`` uses the paper's budget (5 seeds, 5000 epochs, lr {1e-2, 1e-3, 1e-4} x wd {0, 1e-4, 1e-3, 1e-2}).
"""

from __future__ import annotations

import math
from statistics import median
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from lorakit.files import write_atomic
from lorakit.options import fill_defaults, option
from lorakit.reproduce import BudgetOptions
from lorakit.train.config import OutputOptions
from lorakit.reproduce import write_csv

EXPERIMENTS = ("linear", "fnn", "flt", "tfn", "depth", "bias")


@dataclass
class Budget:
    width: int = 16
    seeds: int = 3
    epochs: int = 300
    lrs: tuple[float, ...] = (1e-2, 1e-3)
    weight_decays: tuple[float, ...] = (0.0, 1e-3)
    test: int = 5000

    @classmethod
    def full(cls) -> "Budget":
        return cls(seeds=5, epochs=5000, lrs=(1e-2, 1e-3, 1e-4), weight_decays=(0.0, 1e-4, 1e-3, 1e-2))

    @classmethod
    def quick(cls) -> "Budget":
        return cls(width=8, seeds=2, epochs=30, lrs=(1e-2,), weight_decays=(0.0,), test=500)


@dataclass
class ExpressiveRun(BudgetOptions, OutputOptions):
    """The options of ``lorakit reproduce expressive``."""

    OMIT: ClassVar[tuple[str, ...]] = ("overwrite",)
    DEFAULTS: ClassVar[dict[str, Any]] = {"out": "reproduce/expressive"}
    NOTES: ClassVar[dict[str, str]] = {"quick": "D = 8, 2 seeds, 30 epochs"}

    experiments: str = option(",".join(EXPERIMENTS), "comma-separated: " + ", ".join(EXPERIMENTS),
                              flag="--experiment", default_text="all")

    def __post_init__(self) -> None:
        fill_defaults(self)

    def budget(self) -> "Budget":
        return Budget.full() if self.full else Budget.quick() if self.quick else Budget()

    def run(self) -> dict[str, list]:
        return run(self.out, tuple(e.strip() for e in self.experiments.split(",") if e.strip()), self.budget())


def _grid(budget: Budget, make, target, seed: int):
    from lorakit.expressive.baselines import grid_search

    return grid_search(make, target, epochs=budget.epochs, lrs=budget.lrs, weight_decays=budget.weight_decays,
                       test=budget.test, seed=seed)


def _fnn_pair(d: int, frozen_depth: int, target_depth: int, seed: int):
    from lorakit.expressive.fnn import FNN

    return FNN.random(d, frozen_depth, seed=2 * seed, dtype=torch.float64), FNN.random(d, target_depth, seed=2 * seed + 1, dtype=torch.float64)


def _as32(fnn) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [w.detach().float() for w in fnn.weights], [b.detach().float() for b in fnn.biases]


def _test_inputs(d: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(20_000 + seed), dtype=torch.float64)


# ---------------------------------------------------------------------- experiments
def linear(budget: Budget, log) -> list[dict[str, Any]]:
    from lorakit.expressive.baselines import AdaptedNet
    from lorakit.expressive.linear import linear_adapters

    d, rows = budget.width, []
    for frozen_kind in ("random", "pretrained"):
        for rank in range(1, d // 2 + 1):
            cons, gd = [], []
            for seed in range(budget.seeds):
                gen = torch.Generator().manual_seed(seed)
                frozen = [torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d) for _ in range(2)]
                target = torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
                if frozen_kind == "pretrained":
                    frozen = _pretrain_linear(frozen, target, seed)
                c = linear_adapters(frozen, target, rank)
                cons.append(c.frobenius_error ** 2)  # E||(W' - Wbar) x||^2 for x ~ N(0, I)
                t32 = target.float()
                g = _grid(budget, lambda: AdaptedNet([w.float() for w in frozen], None, rank=rank, relu=False, tune_bias=False,
                                                     seed=seed), lambda x: x @ t32.T, seed)
                gd.append(g.test_mse)
            rows.append({"frozen": frozen_kind, "rank": rank, "construction_mse": median(cons), "gd_mse": median(gd)})
            log(f"linear {frozen_kind} R={rank}: construction {rows[-1]['construction_mse']:.2e}, GD {rows[-1]['gd_mse']:.2e}")
    return rows


def _pretrain_linear(frozen: list[torch.Tensor], target: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Full weights trained on the target until the MSE falls to a third of its start (a closer frozen model)."""
    from lorakit.expressive.linear import product

    from lorakit.expressive.baselines import single_thread

    ws = [w.clone().requires_grad_(True) for w in frozen]
    start = float((product([w.detach() for w in ws]) - target).pow(2).sum())
    opt = torch.optim.Adam(ws, lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    with single_thread():
        for _ in range(20_000):
            x = torch.randn(256, target.shape[0], generator=gen, dtype=target.dtype)
            loss = (x @ (product(ws) - target).T).pow(2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if float((product([w.detach() for w in ws]) - target).pow(2).sum()) <= start / 3:
                break
    return [w.detach() for w in ws]


def fnn(budget: Budget, log) -> list[dict[str, Any]]:
    from lorakit.expressive.baselines import AdaptedNet
    from lorakit.expressive.fnn import fnn_adapters

    d, rows = budget.width, []
    for target_depth, frozen_depth in ((1, 2), (2, 4)):
        for rank in range(1, d // 2 + 1):
            cons, gd = [], []
            for seed in range(budget.seeds):
                frozen, target = _fnn_pair(d, frozen_depth, target_depth, seed)
                x = _test_inputs(d, budget.test, seed)
                adapted = fnn_adapters(frozen, target, rank, input_bound=float(x.norm(dim=1).max()))
                with torch.no_grad():
                    cons.append(float((adapted(x) - target(x)).pow(2).sum(-1).mean()))
                w, b = _as32(frozen)
                t32 = _float_fnn(target)
                g = _grid(budget, lambda: AdaptedNet(w, b, rank=rank, seed=seed), t32, seed)
                gd.append(g.test_mse)
            rows.append({"target_depth": target_depth, "frozen_depth": frozen_depth, "rank": rank,
                         "construction_mse": median(cons), "gd_mse": median(gd)})
            log(f"fnn Lbar={target_depth} L={frozen_depth} R={rank}: construction {rows[-1]['construction_mse']:.2e}, "
                f"GD {rows[-1]['gd_mse']:.2e}")
    return rows


def _float_fnn(model):
    """A float32 copy of a float64 FNN target (the baselines train in float32)."""
    from lorakit.expressive.fnn import FNN

    return FNN([w.detach().float() for w in model.weights], [b.detach().float() for b in model.biases])


def flt(budget: Budget, log) -> list[dict[str, Any]]:
    from lorakit.expressive.baselines import AdaptedNet

    from lorakit.expressive.fnn import fnn_adapters

    d, depth, rows = budget.width, 8, []
    for k in range(1, 5):
        lora, tuned, cons, params = [], [], [], {}
        for seed in range(budget.seeds):
            frozen, target = _fnn_pair(d, depth, 1, seed)
            x = _test_inputs(d, budget.test, seed)
            with torch.no_grad():
                adapted = fnn_adapters(frozen, target, k, input_bound=float(x.norm(dim=1).max()))
                cons.append(float((adapted(x) - target(x)).pow(2).sum(-1).mean()))
            w, b = _as32(frozen)
            t32 = _float_fnn(target)
            g1 = _grid(budget, lambda: AdaptedNet(w, b, rank=k, seed=seed), t32, seed)
            g2 = _grid(budget, lambda: AdaptedNet(w, b, final_layers=k, seed=seed), t32, seed)
            lora.append(g1.test_mse)
            tuned.append(g2.test_mse)
            params = {"lora_params": g1.trainable_parameters, "flt_params": g2.trainable_parameters}
        rows.append({"rank_or_layers": k, "lora_mse": median(lora), "flt_mse": median(tuned),
                     "lora_construction_mse": median(cons), **params})
        log(f"flt k=R={k}: LoRA {rows[-1]['lora_mse']:.2e} ({params['lora_params']} params; construction "
            f"{rows[-1]['lora_construction_mse']:.2e}), "
            f"final {k} layers {rows[-1]['flt_mse']:.2e} ({params['flt_params']} params)")
    return rows


def tfn(budget: Budget, log) -> list[dict[str, Any]]:
    from lorakit.expressive.baselines import tfn_grid_search
    from lorakit.expressive.tfn import TFN, tfn_adapters

    d, rows = budget.width, []
    for depth in (1, 2):
        for rank in range(1, d // 2 + 1):
            errs, gd = [], []
            for seed in range(budget.seeds):
                frozen, target = TFN.random(d, 2, depth, seed=2 * seed), TFN.random(d, 2, depth, seed=2 * seed + 1)
                x = torch.randn(200, d, 10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                with torch.no_grad():
                    errs.append(float((tfn_adapters(frozen, target, rank)(x) - target(x)).pow(2).sum(1).mean()))
                f32 = TFN.random(d, 2, depth, seed=2 * seed, dtype=torch.float32)
                t32 = TFN.random(d, 2, depth, seed=2 * seed + 1, dtype=torch.float32)
                gd.append(tfn_grid_search(f32, t32, rank, epochs=budget.epochs, lrs=budget.lrs,
                                          weight_decays=budget.weight_decays, test=min(budget.test, 2000), seed=seed).test_mse)
            rows.append({"depth": depth, "rank": rank, "construction_mse": median(errs), "gd_mse": median(gd)})
            log(f"tfn L={depth} R={rank}: construction {rows[-1]['construction_mse']:.2e}, GD {rows[-1]['gd_mse']:.2e}")
    return rows


def depth(budget: Budget, log) -> list[dict[str, Any]]:
    """Smallest rank whose construction reaches relative MSE <= 1e-8 (float64), per frozen depth.

    Deep random frozen stacks make the construction's partial products exponentially ill-conditioned
    and its linearising biases huge (|b| ~ 1e13 at L = 10, 1e20 at L = 14 for D = 16), so float64
    cancellation can defeat it although it is exact in exact arithmetic: such rows say so
    (required_rank None, float64_limited True) instead of reporting a rank."""
    from lorakit.expressive.fnn import fnn_adapters
    from lorakit.expressive.linear import SingularMatrixError

    d, rows = budget.width, []
    for frozen_depth in range(2, 15, 2):
        needed, limited, at_theory, biggest = [], 0, [], []
        theory = math.ceil(d / frozen_depth)
        for seed in range(budget.seeds):
            frozen, target = _fnn_pair(d, frozen_depth, 1, seed)
            x = _test_inputs(d, 500, seed)
            bound = float(x.norm(dim=1).max())
            with torch.no_grad():
                scale = float(target(x).pow(2).sum(-1).mean())
                found = None
                for rank in range(1, d + 1):
                    try:
                        adapted = fnn_adapters(frozen, target, rank, input_bound=bound)
                    except SingularMatrixError:  # numerically singular partial product: float64-limited too
                        continue
                    rel = float((adapted(x) - target(x)).pow(2).sum(-1).mean()) / scale
                    if rank == theory:
                        at_theory.append(rel)
                        biggest.append(max(float(b.abs().max()) for b in adapted.biases))
                    if rel <= 1e-8:
                        found = rank
                        break
                if found is None or found > theory:  # exact arithmetic guarantees the theory rank: rounding failed
                    limited += 1
                else:
                    needed.append(found)
        rows.append({"frozen_depth": frozen_depth, "theory_ceil_D_over_L": theory,
                     "required_rank": median(needed) if len(needed) > budget.seeds // 2 else None,
                     "float64_limited_seeds": limited, "relative_mse_at_theory_rank": median(at_theory) if at_theory else None,
                     "max_abs_bias_at_theory_rank": median(biggest) if biggest else None})
        at = rows[-1]["relative_mse_at_theory_rank"]
        log(f"depth L={frozen_depth}: required rank {rows[-1]['required_rank']} (theory {theory}); relative MSE at the "
            f"theory rank {'n/a (singular)' if at is None else f'{at:.1e}'}, biases up to {rows[-1]['max_abs_bias_at_theory_rank'] or 0:.1e}"
            + (f"; float64-limited in {limited} of {budget.seeds} seeds" if limited else ""))
    return rows


def bias(budget: Budget, log) -> list[dict[str, Any]]:
    from lorakit.expressive.baselines import AdaptedNet

    d, rows = budget.width, []
    for rank in range(1, d // 2 + 1):
        result = {}
        for tune in (True, False):
            vals = []
            for seed in range(budget.seeds):
                frozen, target = _fnn_pair(d, 2, 1, seed)
                w, b = _as32(frozen)
                g = _grid(budget, lambda: AdaptedNet(w, b, rank=rank, tune_bias=tune, seed=seed), _float_fnn(target), seed)
                vals.append(g.test_mse)
            result["with_bias_tuning_mse" if tune else "without_bias_tuning_mse"] = median(vals)
        rows.append({"rank": rank, **result})
        log(f"bias R={rank}: with {result['with_bias_tuning_mse']:.2e}, without {result['without_bias_tuning_mse']:.2e}")
    return rows


RUNNERS: dict[str, Callable[[Budget, Callable], list[dict[str, Any]]]] = {
    "linear": linear, "fnn": fnn, "flt": flt, "tfn": tfn, "depth": depth, "bias": bias}


# ---------------------------------------------------------------------- output
def run(out: str | Path, experiments: tuple[str, ...] = EXPERIMENTS, budget: Budget | None = None, log=print) -> dict[str, list]:
    budget = budget or Budget()
    unknown = [e for e in experiments if e not in RUNNERS]
    if unknown:
        from lorakit.errors import ConfigError

        raise ConfigError(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in experiments:
        rows = RUNNERS[name](budget, log)
        write_csv(out / f"{name}.csv", rows)
        _plot(out / f"{name}.png", name, rows, budget)
        results[name] = rows
        log(f"wrote {out / name}.csv and .png")
    return results


def _plot(path: Path, name: str, rows: list[dict[str, Any]], budget: Budget) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    floor = 1e-30
    if name in ("linear", "fnn"):
        key = "frozen" if name == "linear" else "frozen_depth"
        for group in dict.fromkeys(r[key] for r in rows):
            mine = [r for r in rows if r[key] == group]
            label = group if name == "linear" else f"Lbar={mine[0]['target_depth']}, L={group}"
            ax.plot([r["rank"] for r in mine], [max(r["construction_mse"], floor) for r in mine], "o-", label=f"construction, {label}")
            ax.plot([r["rank"] for r in mine], [max(r["gd_mse"], floor) for r in mine], "s--", label=f"gradient descent, {label}")
        ax.set_xlabel("LoRA rank R")
    elif name == "flt":
        ax.plot([r["rank_or_layers"] for r in rows], [r["lora_mse"] for r in rows], "o-", label="LoRA, rank R on all 8 layers")
        ax.plot([r["rank_or_layers"] for r in rows], [r["flt_mse"] for r in rows], "s--", label="final k layers tuned")
        ax.plot([r["rank_or_layers"] for r in rows], [max(r["lora_construction_mse"], floor) for r in rows], "^:",
                label="LoRA construction")
        ax.set_xlabel("R = k (equal trainable parameters)")
    elif name == "tfn":
        for dep in (1, 2):
            mine = [r for r in rows if r["depth"] == dep]
            ax.plot([r["rank"] for r in mine], [max(r["construction_mse"], floor) for r in mine], "o-", label=f"construction, L={dep}")
            ax.plot([r["rank"] for r in mine], [max(r["gd_mse"], floor) for r in mine], "s--", label=f"gradient descent, L={dep}")
        ax.axvline(math.ceil(budget.width / 2), color="gray", ls=":", label="ceil(D/2)")
        ax.set_xlabel("LoRA rank R")
    elif name == "depth":
        ok = [r for r in rows if r["required_rank"] is not None]
        ax.plot([r["frozen_depth"] for r in ok], [r["required_rank"] for r in ok], "o-", label="required rank (construction exact, float64)")
        for r in rows:
            if r["required_rank"] is None:
                ax.annotate("float64-limited", (r["frozen_depth"], r["theory_ceil_D_over_L"]), fontsize=7, rotation=60)
        ax.plot([r["frozen_depth"] for r in rows], [r["theory_ceil_D_over_L"] for r in rows], "k:", label="ceil(D / L)")
        ax.set_xlabel("frozen depth L (target depth 1)")
        ax.set_ylabel("rank")
    elif name == "bias":
        ax.plot([r["rank"] for r in rows], [r["with_bias_tuning_mse"] for r in rows], "o-", label="biases tuned")
        ax.plot([r["rank"] for r in rows], [r["without_bias_tuning_mse"] for r in rows], "s--", label="biases frozen")
        ax.set_xlabel("LoRA rank R")
    if name != "depth":
        ax.set_yscale("log")
        ax.set_ylabel(f"test MSE (median of {budget.seeds} seeds)")
    ax.set_title(f"expressive power of LoRA: {name} (D = {budget.width})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
