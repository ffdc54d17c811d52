"""fast_dropout: the drop rate asked for, an unbiased output, the same mask forward and backward; dropout_leading_rows:
the masks of a dropout of the whole tensor."""

import pytest
import torch

from lorakit.kernels.dropout import dropout_leading_rows, fast_dropout
from lorakit.speed.dropout import FastDropout


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rate_unbiased_and_gradient_uses_the_same_mask(p, dtype):
    torch.manual_seed(0)
    x = torch.ones(400, 1000, dtype=dtype, requires_grad=True)
    y = fast_dropout(x, p)
    assert y.dtype == dtype
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5 + 1e-4  # within 4 standard deviations
    assert abs(y.float().mean().item() - 1.0) < 0.01  # unbiased
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(x.grad.float(), 2.0 * y.detach().float())


def test_reproducible_identity_in_eval_and_module_drop_in():
    x = torch.randn(64, 64)
    torch.manual_seed(3)
    a = fast_dropout(x, 0.2)
    torch.manual_seed(3)
    torch.testing.assert_close(a, fast_dropout(x, 0.2))
    assert fast_dropout(x, 0.2, training=False) is x
    module = FastDropout(0.3).eval()
    assert module(x) is x and isinstance(module, torch.nn.Dropout)
    with pytest.raises(ValueError, match="must be in"):
        fast_dropout(x, 1.0)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("full_shape, dim, rows", [((3, 7, 5), 1, 1), ((2, 3, 6, 6), 2, 1), ((4, 9, 2), 1, 3)])
def test_leading_rows_draw_the_full_tensors_mask(fast, full_shape, dim, rows):
    full = torch.randn(full_shape, requires_grad=True)
    torch.manual_seed(11)
    ref = (fast_dropout(full, 0.3) if fast else torch.nn.functional.dropout(full, 0.3, True)).narrow(dim, 0, rows)
    after_full = torch.get_rng_state()
    x = full.detach().narrow(dim, 0, rows).clone().requires_grad_()
    torch.manual_seed(11)
    got = dropout_leading_rows(x, full_shape, dim, 0.3, fast=fast)
    assert torch.equal(got, ref)  # the same mask and scale, bit for bit
    assert torch.equal(torch.get_rng_state(), after_full)  # and the same random numbers consumed
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, full.grad.narrow(dim, 0, rows))
    assert dropout_leading_rows(x, full_shape, dim, 0.0) is x
