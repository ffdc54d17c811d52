"""fused_head: which decoders get the fused loss, and the kernel's logit scale and soft-cap against the plain ops."""

import pytest
import torch

import lorakit
from lorakit.kernels.linear_cross_entropy import linear_cross_entropy
from lorakit.architectures import families_with
from lorakit.speed.families import causal_lm_parts

CAUSAL_LM = families_with("lm_head")
from lorakit.speed.fused_head import shifted_labels


@pytest.mark.parametrize("scale,softcap,divisor", [(1.0, None, None), (0.25, None, None), (1.0, 2.0, None),
                                                   (0.5, 3.0, 17.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_softcap_and_divisor_equal_the_plain_ops(scale, softcap, divisor, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(50, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :3] = -100
    ours = linear_cross_entropy(hidden, weight, labels, bias, scale=scale, softcap=softcap, divisor=divisor, chunk=4)
    z = (hidden @ weight.T + bias) * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    ce = torch.nn.functional.cross_entropy(z.reshape(-1, 50).float(), labels.reshape(-1), reduction="sum")
    ref = ce / (divisor if divisor else int((labels != -100).sum()))
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(ours, (hidden, weight, bias))
    for got, want in zip(grads, torch.autograd.grad(ref, (hidden, weight, bias))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_which_decoders_get_the_fused_loss(make_model):
    for kind in ("llama", "opt", "gpt2"):
        model = make_model(kind)
        assert model.config.model_type in CAUSAL_LM and causal_lm_parts(model) is not None
    assert causal_lm_parts(make_model("bert-cls")) is None  # not a causal LM
    head_adapted = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "lm_head"]))
    assert causal_lm_parts(head_adapted) is None  # an adapter on the head: not a plain nn.Linear
    assert shifted_labels(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, -100]]
