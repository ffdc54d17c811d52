import math

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.expressive.linear import SingularMatrixError, linear_adapters, linear_error, min_rank, product


def instance(d, layers, seed, target_rank=None):
    gen = torch.Generator().manual_seed(seed)
    # random layers around the identity (like pretrained residual blocks): well conditioned, so float64
    # accuracy is not eaten by the inverses (see LinearConstruction.condition)
    frozen = [0.5 * torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d) + torch.eye(d, dtype=torch.float64)
              for _ in range(layers)]
    target = torch.randn(d, d, generator=gen, dtype=torch.float64)
    if target_rank is not None:  # E = target - prod has rank target_rank
        u = torch.randn(d, target_rank, generator=gen, dtype=torch.float64)
        target = product(frozen) + u @ torch.randn(target_rank, d, generator=gen, dtype=torch.float64)
    return frozen, target


@pytest.mark.parametrize("d", [8, 16, 32])
@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_construction_reaches_the_optimum(d, layers):
    """Acceptance 1: spectral error = sigma_{RL+1}(E) to 1e-8 relative; adapters of the requested rank; exact from ceil(D/L)."""
    frozen, target = instance(d, layers, seed=d * 10 + layers)
    e = target - product(frozen)
    s = torch.linalg.svdvals(e)
    for r in range(1, math.ceil(d / layers) + 1):
        c = linear_adapters(frozen, target, r)
        assert c.condition < 1e6
        assert all(b.shape == (d, r) and a.shape == (r, d) for b, a in c.adapters)
        assert all(torch.linalg.matrix_rank(b @ a) <= r for b, a in c.adapters)
        optimum = float(s[r * layers]) if r * layers < d else 0.0
        assert c.optimal_spectral_error == pytest.approx(optimum, abs=1e-12)
        assert linear_error(frozen, target, r)[0] == pytest.approx(optimum, abs=1e-12)
        if r * layers < d:
            assert abs(c.spectral_error - optimum) <= 1e-8 * optimum
            assert c.frobenius_error == pytest.approx(float(s[r * layers:].pow(2).sum().sqrt()), rel=1e-8)
        else:
            assert c.spectral_error <= 1e-10 * float(s[0])
    assert min_rank(frozen, target) == math.ceil(d / layers)


def test_low_rank_error_needs_only_ceil_rank_over_l():
    frozen, target = instance(16, 3, seed=5, target_rank=5)
    assert min_rank(frozen, target) == 2  # ceil(5 / 3)
    assert linear_adapters(frozen, target, 2).spectral_error <= 1e-10
    assert linear_adapters(frozen, target, 1).spectral_error > 1e-3


def test_per_layer_ranks_exact_iff_sum_reaches_rank_e():
    frozen, target = instance(8, 3, seed=7, target_rank=6)
    for ranks in ([1, 2, 3], [3, 3, 1], [6, 1, 1], [2, 2, 2]):
        c = linear_adapters(frozen, target, ranks)
        assert [b.shape[1] for b, _ in c.adapters] == ranks
        assert c.spectral_error <= 1e-10
    for ranks in ([1, 1, 3], [2, 2, 1]):
        c = linear_adapters(frozen, target, ranks)
        assert c.spectral_error > 1e-3 and abs(c.spectral_error - c.optimal_spectral_error) <= 1e-8 * c.optimal_spectral_error


def test_bad_input():
    frozen, target = instance(4, 2, seed=1)
    with pytest.raises(ConfigError, match="rank 0 for layer 1"):
        linear_adapters(frozen, target, 0)
    with pytest.raises(ConfigError, match="rank -1"):
        linear_adapters(frozen, target, [-1, 1])
    with pytest.raises(ConfigError, match="square"):
        linear_adapters(frozen, torch.zeros(4, 3, dtype=torch.float64), 1)
    with pytest.raises(ConfigError, match=r"frozen\[1\] \(layer 2\) has shape \[3, 3\]"):
        linear_adapters([frozen[0], torch.eye(3, dtype=torch.float64)], target, 1)
    with pytest.raises(ConfigError, match="2 entries for 3 layers"):
        linear_adapters(frozen + [frozen[0]], target, [1, 1])
    singular = [frozen[0], torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))]
    with pytest.raises(SingularMatrixError, match=r"frozen W_2 \(layer 2\) is singular"):
        linear_adapters(singular, target, 1)
    c = linear_adapters(singular, target, 1, pinv=True)  # falls back and reports the error it reached
    assert c.pseudo_inverse_used and c.spectral_error >= c.optimal_spectral_error - 1e-12
