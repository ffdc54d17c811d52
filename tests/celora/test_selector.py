"""CE-LoRA's feature selectors (celora.selector) and their refresh schedule: exact at keep ratio 1, exact until
the first refresh, refreshes counted in optimizer steps."""

import pytest
import torch

from celora_models import batches, llama, pair, randomise_b, step_grads
import lorakit
from lorakit import celora
from lorakit.kernels.amm import select_top


@pytest.mark.parametrize("selection", ["score", "weight"])
def test_keep_ratio_one_gives_the_exact_gradients(selection):
    """Acceptance 1: keep_ratio 1.0 matches plain autograd (rtol 1e-5), before and after refreshes."""
    exact, approx = pair(keep_ratio=1.0, refresh_every=2, selection=selection)
    for ids in batches(5):
        a, b = step_grads(exact, ids), step_grads(approx, ids)
        for n in a:
            torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-8, msg=n)
    assert all(s.refreshes == 3 for s in celora.controller(approx).selectors.values())


def test_exact_until_the_first_refresh_then_approximate():
    exact, approx = pair(keep_ratio=0.5, refresh_every=100)
    ids = batches(2)
    first_e, first_a = step_grads(exact, ids[0]), step_grads(approx, ids[0])
    for n in first_e:
        torch.testing.assert_close(first_a[n], first_e[n], rtol=1e-5, atol=1e-8)
    second_e, second_a = step_grads(exact, ids[1]), step_grads(approx, ids[1])
    differs = [n for n in second_e if not torch.allclose(second_a[n], second_e[n], rtol=1e-4, atol=1e-7)]
    assert differs, "after the first refresh the frozen-weight dX is approximated"
    # layer 1's own adapter gradients do not depend on any approximated dX above them... the top
    # layer's down_proj sees the exact G from the head: its dA, dB stay exact
    top = "model.layers.1.mlp.down_proj.lora_B.default.weight"
    torch.testing.assert_close(second_a[top], second_e[top], rtol=1e-5, atol=1e-8)


def test_refresh_counts_optimizer_steps_under_gradient_accumulation():
    """Acceptance 3: with grad accumulation 4, refreshes follow optimizer steps, not forward calls,
    and the scores of a refresh step are summed over all its micro-batches."""
    model = lorakit.attach(llama(), lorakit.LoraConfig(r=4, targets="all-linear", backward="celora",
                                                             celora=lorakit.CeloraConfig(refresh_every=3, keep_ratio=0.5)))
    randomise_b(model)
    ctl = celora.controller(model)
    name = "model.layers.0.mlp.down_proj"
    sel = ctl.selectors[name]
    seen = []
    original = sel.__call__

    class Spy:
        def __call__(self, g):
            seen.append(g.detach().clone())
            return original(g)

    model.get_submodule(name).frozen_input_grad = Spy()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    history = []
    micro = iter(batches(4 * 7, seed=3))
    for step in range(7):
        seen.clear()
        exact_before = sel.exact or sel.refreshing
        for _ in range(4):
            ids = next(micro)
            (model(input_ids=ids, labels=ids).loss / 4).backward()
        opt.step()
        opt.zero_grad()
        idx_before = None if sel.idx is None else sel.idx.clone()
        celora.step(model)
        history.append((step, exact_before, sel.refreshes))
        if step in (0, 3, 6):
            col_sq = sum((g.float() ** 2).sum(0) for g in seen)
            expected = select_top(col_sq.sqrt() * model.get_submodule(name).celora_row_norms, sel.k)
            assert torch.equal(sel.idx, expected), f"step {step}: scores summed over the 4 micro-batches"
            assert len(seen) == 4
        elif idx_before is not None:
            assert torch.equal(sel.idx, idx_before), "no refresh between refresh steps"
    assert history == [(0, True, 1), (1, False, 1), (2, False, 1), (3, True, 2), (4, False, 2), (5, False, 2), (6, True, 3)]
