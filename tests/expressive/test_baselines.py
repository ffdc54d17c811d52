import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.expressive.baselines import AdaptedNet, fit, grid_search, mse
from lorakit.expressive.fnn import FNN


def pair(seed=0):
    frozen, target = FNN.random(8, 2, seed=seed), FNN.random(8, 1, seed=seed + 1)
    return [w.detach() for w in frozen.weights], [b.detach() for b in frozen.biases], target


def test_lora_net_starts_at_the_frozen_model_and_learns():
    w, b, target = pair()
    net = AdaptedNet(w, b, rank=2)
    frozen = FNN(w, b)
    x = torch.randn(16, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), frozen(x))  # B = 0 at the start
    assert net.trainable_parameters() == 2 * (2 * 8 * 2) + 2 * 8  # A, B per layer and the biases
    before = mse(net, target, 500, 8, seed=1)
    fit(net, target, epochs=200, lr=1e-2, weight_decay=0.0)
    assert mse(net, target, 500, 8, seed=1) < 0.5 * before


def test_final_layer_tuning_and_frozen_biases():
    w, b, target = pair()
    flt = AdaptedNet(w, b, final_layers=1)
    assert flt.trainable_parameters() == 8 * 8 + 8
    no_bias = AdaptedNet(w, b, rank=1, tune_bias=False)
    assert no_bias.trainable_parameters() == 2 * (2 * 8)
    with pytest.raises(ConfigError, match="either rank"):
        AdaptedNet(w, b, rank=1, final_layers=1)
    with pytest.raises(ConfigError, match="final_layers=3 > depth 2"):
        AdaptedNet(w, b, final_layers=3)


def test_grid_search_selects_on_validation():
    w, b, target = pair()
    res = grid_search(lambda: AdaptedNet(w, b, rank=2), target, epochs=50, lrs=(1e-2, 1e-5), weight_decays=(0.0,), test=500)
    assert len(res.tried) == 2
    assert res.validation_mse == min(t["validation_mse"] for t in res.tried)
    assert res.lr == 1e-2 and res.test_mse > 0


def test_tfn_lora_starts_at_the_frozen_model_and_learns():
    from lorakit.expressive.baselines import TFNLoRA, tfn_grid_search
    from lorakit.expressive.tfn import TFN

    frozen, target = TFN.random(8, 2, 1, seed=0, dtype=torch.float32), TFN.random(8, 2, 1, seed=1, dtype=torch.float32)
    net = TFNLoRA(frozen, rank=2)
    x = torch.randn(4, 8, 5)
    with torch.no_grad():
        torch.testing.assert_close(net(x), frozen(x))
    res = tfn_grid_search(frozen, target, 2, epochs=60, lrs=(1e-2,), weight_decays=(0.0,), test=200)
    with torch.no_grad():
        start = float((frozen(x) - target(x)).pow(2).sum(1).mean())
    assert 0 < res.test_mse < start
