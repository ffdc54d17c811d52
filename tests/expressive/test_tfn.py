import math

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.expressive.tfn import TFN, tfn_adapters


def inputs(n=20, d=16, tokens=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, tokens, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("depth,tol", [(1, 1e-10), (2, 1e-6)])
def test_exact_at_half_the_width(depth, tol):
    """Acceptance 3: same-depth random TFNs (D=16, H=2, N=10) match at R = ceil(D/2), and not at R - 1.

    Exact in exact arithmetic; in float64 depth 1 lands at ~1e-12 relative, depth 2 at up to ~1e-8:
    the second layer sees Z = T Zbar with T = W_2 Wbar_2^{-1}, whose condition number (up to ~4e3 for
    these Gaussian weights) multiplies the rounding of the logits."""
    d = 16
    x = inputs(d=d)
    for seed in range(3):
        frozen = TFN.random(d, 2, depth, seed=10 + seed)
        target = TFN.random(d, 2, depth, seed=20 + seed)
        adapted = tfn_adapters(frozen, target, math.ceil(d / 2))
        ref = target(x)
        assert (adapted(x) - ref).abs().max() <= tol * max(1.0, float(ref.abs().max()))
        assert all(b.shape == (d, 8) and a.shape == (8, d) for b, a in adapted.adapters.values())
        # every adapted weight is the frozen one plus its rank-8 update
        for name, (b, a) in adapted.adapters.items():
            if name == "w_out":
                continue
            _, li, key, *head = name.split(".")
            before = frozen.layers[int(li)][key].detach()
            after = adapted.layers[int(li)][key].detach()
            if head:
                before, after = before[int(head[0])], after[int(head[0])]
            torch.testing.assert_close(after - before, b @ a)
        short = tfn_adapters(frozen, target, math.ceil(d / 2) - 1)
        assert (short(x) - ref).abs().max() > 1e-4


def test_bad_input():
    frozen = TFN.random(8, 2, 2, seed=0)
    with pytest.raises(ConfigError, match="target depth 1 != frozen depth 2"):
        tfn_adapters(frozen, TFN.random(8, 2, 1), 4)
    with pytest.raises(ConfigError, match="same width and heads"):
        tfn_adapters(frozen, TFN.random(8, 1, 2), 4)
    with pytest.raises(ConfigError, match="rank 0"):
        tfn_adapters(frozen, TFN.random(8, 2, 2, seed=1), 0)
    with pytest.raises(ConfigError, match=r"x must be \[n, D=8, N tokens\]"):
        frozen(torch.zeros(2, 4, 3, dtype=torch.float64))
    with pytest.raises(ConfigError, match="layer 1: wk must be"):
        TFN([{"wq": torch.zeros(1, 4, 4)}], torch.zeros(4, 4))
