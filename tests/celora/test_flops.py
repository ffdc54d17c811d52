"""What CE-LoRA saves (celora.flops), counted per layer."""

from celora_models import llama
import lorakit
from lorakit import celora


def test_flops_of_one_layer():
    model = lorakit.attach(llama(), lorakit.LoraConfig(r=4, targets=["layers.1.mlp.up_proj", "layers.1.mlp.down_proj"],
                                                       backward="celora",
                                                       celora=lorakit.CeloraConfig(keep_ratio={"up_proj": 0.5}, svd_rank=2)))
    report = celora.flops(model, 10)
    up = next(layer for layer in report.layers if layer.name.endswith("layers.1.mlp.up_proj"))
    n, i, o, r, k, r0 = 10, 64, 128, 4, 64, 2
    assert up.forward == 2 * n * i * o + 2 * n * r * (i + o)
    assert up.backward_exact == 4 * n * r * (i + o) + 2 * n * o * i
    assert up.backward_approx == 4 * n * r * (i + o) + 2 * n * (k * i + o * r0 + r0 * i)
    down = next(layer for layer in report.layers if layer.name.endswith("layers.1.mlp.down_proj"))
    assert down.keep_ratio is None and down.backward_approx == down.backward_exact
    assert 0 < report.saving < report.backward_saving < 1
    assert "saves" in str(report)
