"""Which layers CE-LoRA approximates and how (celora.plan): the balanced rank, bad options, presets."""

import copy

import pytest
import torch

from celora_models import batches, llama, randomise_b
import lorakit
from lorakit import celora
from lorakit.errors import ConfigError


def test_balanced_rank_lowers_trainable_rank_and_files_say_so(tmp_path):
    import peft

    base = llama()
    model = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=8, targets="all-linear", backward="celora",
                                                                        celora=lorakit.CeloraConfig(svd_rank="balanced")))
    ranks = {n.rsplit(".", 1)[1]: layer.r for n, layer in lorakit.lora_layers(model)}
    assert ranks == {"q_proj": 8, "k_proj": 8, "v_proj": 7, "o_proj": 7, "gate_proj": 8, "up_proj": 7, "down_proj": 7}
    sel = celora.controller(model).selectors["model.layers.0.mlp.up_proj"]
    assert sel.spec.svd_rank == 7 and model.get_submodule("model.layers.0.mlp.up_proj").celora_B0.shape == (128, 7)
    randomise_b(model)
    lorakit.save_adapter(model, tmp_path)
    ids = batches(1)[0]
    twin = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(twin(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw,needle", [
    (dict(keep_ratio=0.0), "keep_ratio=0.0 must be in (0, 1]"),
    (dict(keep_ratio=1.5), "keep_ratio=1.5 must be in (0, 1]"),
    (dict(keep_ratio={"v_proj": -0.1}), "keep_ratio['v_proj']=-0.1"),
    (dict(keep_ratio={"w_proj": 0.5}), "keep_ratio key 'w_proj' matches no adapted module"),
    (dict(svd_rank=32), "svd_rank=32 for model.layers.0.self_attn.v_proj must be below min(in, out) = 32"),
    (dict(svd_rank=-1), "svd_rank=-1"),
    (dict(selection="random"), "selection='random'"),
    (dict(refresh_every=0), "refresh_every=0"),
])
def test_bad_celora_options(kw, needle):
    with pytest.raises(ConfigError, match=__import__("re").escape(needle)):
        lorakit.attach(llama(), lorakit.LoraConfig(r=4, targets="all-linear", backward="celora",
                                                   celora=lorakit.CeloraConfig(**kw)))


def test_unknown_architecture_needs_explicit_keep_ratio(make_model):
    model = make_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ConfigError, match="no CE-LoRA keep-ratio preset for model_type 'mystery'"):
        lorakit.attach(model, lorakit.LoraConfig(r=2, targets=["q_proj", "v_proj"], backward="celora"))
