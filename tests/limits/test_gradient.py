
import pytest
import torch

from lorakit.kernels.poly_attention import poly_attention
from lorakit.limits.bounds import gradient_bounds
from lorakit.limits.gradient import LoraHead, approximate_gradient, autograd_gradient, exact_gradient


def target(head, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(head.x.shape[0], head.weights["v"].shape[1], generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("adaptation", ["partial", "full"])
@pytest.mark.parametrize("gamma", [0.5, 3.0, None])
def test_exact_explicit_gradient_matches_autograd(adaptation, gamma):
    """Acceptance 2: the O(L^2) explicit formula equals autograd to 1e-8 (float64)."""
    head = LoraHead.random(40, 12, 6, 3, adaptation, gamma=gamma, seed=1)
    y = target(head)
    got, want = exact_gradient(head, y), autograd_gradient(head, y)
    assert set(got.grads) == set(want.grads) == {f"{m}_{mu}" for mu in ("q", "k", "v") if mu in head.adapters for m in "AB"}
    for name, g in want.grads.items():
        assert g.abs().max() > 1e-6  # the check is not vacuous
        torch.testing.assert_close(got.grads[name], g, rtol=0, atol=1e-8)
    assert got.loss == pytest.approx(want.loss, rel=1e-12)


@pytest.mark.parametrize("adaptation", ["partial", "full"])
@pytest.mark.parametrize("gamma,degree", [(0.25, 2), (1.0, 2), (1.0, 4), (2.0, 6), (3.0, 8)])
def test_approximate_gradient_within_its_bound(adaptation, gamma, degree):
    """Acceptance 2: steps 1-6 agree with the exact gradient within the certified bound."""
    head = LoraHead.random(48, 8, 3 if degree == 8 else 4, 2, adaptation, gamma=gamma, seed=3)
    assert head.logit_bound() == pytest.approx(gamma)
    y = target(head)
    exact, approx = exact_gradient(head, y), approximate_gradient(head, y, degree)
    assert approx.gamma == pytest.approx(gamma)
    for name, g in exact.grads.items():
        err = (approx.grads[name] - g).abs()
        assert (err <= approx.bounds[name] + 1e-12).all(), name
        assert err.max() > 0  # it is an approximation, not the exact formula again


def test_approximation_improves_with_degree():
    head = LoraHead.random(64, 8, 4, 2, "full", gamma=1.5, seed=5)
    y = target(head)
    exact = exact_gradient(head, y).grads["A_q"]
    errs = [(approximate_gradient(head, y, g, with_bounds=False).grads["A_q"] - exact).abs().max() for g in (2, 4, 6)]
    assert errs[0] > errs[1] > errs[2]


def test_poly_attention_lora_gradient_against_the_explicit_reference():
    """The kernel's autograd gradient of a LoRA head, checked against the exact explicit gradient."""
    head = LoraHead.random(30, 8, 4, 2, "full", gamma=1.0, seed=9)
    y = target(head)
    leaves = {}
    for mu, (b, a) in head.adapters.items():
        leaves[mu] = (b.clone().requires_grad_(), a.clone().requires_grad_())
    lifted = LoraHead(head.x, head.weights, leaves, head.lora_scale, head.scale)
    q, k, v = (lifted.projection(mu)[None, None] for mu in ("q", "k", "v"))
    z = poly_attention(q, k, v, scale=head.scale, degree=4)[0, 0]
    loss = 0.5 * (z - y).pow(2).sum()
    names = [(mu, i) for mu in leaves for i in range(2)]
    grads = torch.autograd.grad(loss, [leaves[mu][i] for mu, i in names])
    exact = exact_gradient(head, y)
    # bound: the kernel differentiates p_g (p' = p_{g-1}); push the per-projection bounds through X, B, A
    qd, kd, vd = (head.projection(mu).detach() for mu in ("q", "k", "v"))
    w = torch.softmax(head.scale * qd @ kd.T, -1)
    e = (z.detach() - (w @ vd)).abs().max()
    gb = gradient_bounds(w, qd, kd, vd, (z - y).detach(), scale=head.scale, gamma=1.0, degree=4, e_m=float(e))
    per = {"q": gb.dq, "k": gb.dk, "v": gb.dv}
    for (mu, i), g in zip(names, grads):
        b, a = head.adapters[mu]
        dw = head.x.abs().T @ per[mu]
        bound = head.lora_scale * (dw @ a.abs().T if i == 0 else b.abs().T @ dw)
        want = exact.grads[("B_" if i == 0 else "A_") + mu]
        assert ((g - want).abs() <= bound + 1e-12).all()
        assert (g - want).abs().max() < 1e-2 * want.abs().max()


def test_bad_input():
    with pytest.raises(ValueError, match="adaptation='half'"):
        LoraHead.random(8, 4, 2, 1, "half")
    head = LoraHead.random(8, 4, 2, 1)
    with pytest.raises(ValueError, match="degree=3"):
        approximate_gradient(head, target(head), 3)
    with pytest.raises(ValueError, match="do not fit"):
        LoraHead(head.x, head.weights, {"q": (torch.zeros(4, 2), torch.zeros(3, 2))}, 1.0, 0.5)
    with pytest.raises(ValueError, match=r"only 'q', 'k', 'v'"):
        LoraHead(head.x, head.weights, {"o": (torch.zeros(4, 2), torch.zeros(2, 2))}, 1.0, 0.5)
