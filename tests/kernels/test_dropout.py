"""fast_dropout: the drop rate asked for, an unbiased output, the same mask forward and backward."""

import pytest
import torch

from lorakit.kernels.dropout import FastDropout, fast_dropout


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
