"""Layer selection (issue 18, third part): layers_to_transform / layers_pattern with PEFT's semantics, files both
ways, and lorakit train --layers."""

import copy
import json

import peft
import pytest
import torch

import lorakit
from lorakit.adapters.attach import lora_layers
from lorakit.errors import ConfigError, TargetError
from test_peft_parity import logits_of, randomise_adapters

CASES = [  # (model, targets, layers_to_transform, layers_pattern)
    ("llama", ["q_proj", "v_proj"], [1], None),
    ("llama", ["q_proj", "down_proj"], 0, "layers"),
    ("bert-cls", ["query", "value"], [1], "layer"),
    ("bert-cls", ["query", "key", "dense"], [0], None),
    ("gpt2", ["c_attn"], [1], "h"),
    ("gpt2", ["c_attn", "c_fc"], [0], None),
]


def peft_modules(model):
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")
                  and "default" in getattr(m, "lora_A", {}))


@pytest.mark.parametrize("kind,targets,layers,pattern", CASES)
def test_the_same_modules_as_peft_and_files_both_ways(make_model, token_batch, tmp_path, kind, targets, layers, pattern):
    base = make_model(kind)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, layers_to_transform=layers, layers_pattern=pattern,
                           init_lora_weights=False)
    twin = peft.get_peft_model(copy.deepcopy(base), pcfg)
    ours = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, targets=targets,
                                                                  layers_to_transform=layers, layers_pattern=pattern))
    assert sorted(n for n, _ in lora_layers(ours)) == peft_modules(twin)
    # PEFT's file in lorakit
    twin.save_pretrained(str(tmp_path / "peft"))
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    ids, mask = token_batch()
    torch.testing.assert_close(logits_of(loaded, ids, mask), logits_of(twin, ids, mask), atol=1e-5, rtol=0)
    # lorakit's file in PEFT
    randomise_adapters(ours)
    lorakit.save_adapter(ours, tmp_path / "ours")
    doc = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert doc["layers_to_transform"] == layers and doc["layers_pattern"] == pattern
    assert doc["target_modules"] == sorted(targets)  # leaf names plus the layers, as PEFT writes them
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert peft_modules(in_peft) == sorted(n for n, _ in lora_layers(ours))
    torch.testing.assert_close(logits_of(in_peft, ids, mask), logits_of(ours, ids, mask), atol=1e-5, rtol=0)


def test_presets_take_layers_and_full_paths_ignore_them(make_model):
    model = lorakit.attach(make_model("llama"), lorakit.LoraConfig(targets="attn-qv", layers_to_transform=[0]))
    assert sorted(n for n, _ in lora_layers(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    model = lorakit.attach(make_model("llama"), lorakit.LoraConfig(
        targets=["q_proj", "model.layers.1.mlp.down_proj"], layers_to_transform=[0]))
    assert sorted(n for n, _ in lora_layers(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def test_exclude_by_layer_index(make_model):
    """Excluding layers by index: a regex on the path, PEFT's exclude_modules semantics."""
    model = lorakit.attach(make_model("llama"), lorakit.LoraConfig(targets="attn-qkv", exclude=r".*\.layers\.1\..*"))
    assert {n.split(".")[2] for n, _ in lora_layers(model)} == {"0"}


@pytest.mark.parametrize("kw,needle", [
    (dict(layers_to_transform=[-1]), "must be a layer index >= 0"),
    (dict(layers_to_transform=[]), "non-empty list"),
    (dict(layers_to_transform=True), "must be a layer index"),
    (dict(targets=r".*q_proj", layers_to_transform=[0]), "cannot be used with the regex"),
    (dict(layers_pattern="layers"), "needs layers_to_transform"),
    (dict(layers_to_transform=[0], layers_pattern="("), "not a valid regex"),
])
def test_bad_layer_options(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        lorakit.LoraConfig(**{"targets": ["q_proj"], **kw})


def test_layers_beyond_the_model_select_nothing(make_model):
    with pytest.raises(TargetError, match=r"layers_to_transform \(--layers\) 7 goes beyond the 2 layers"):
        lorakit.attach(make_model("llama"), lorakit.LoraConfig(targets=["q_proj"], layers_to_transform=[7]))


def test_train_layers_flag(tiny_llama_dir, corpus_txt, tmp_path, capsys):
    from lorakit.cli import main

    code = main(["train", "--model", tiny_llama_dir, "--data", corpus_txt, "--steps", "2", "--batch-size", "2",
                 "--max-length", "16", "--targets", "all-linear", "--layers", "1", "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    cfg = lorakit.read_config(tmp_path / "o")
    assert cfg.layers_to_transform == [1]
    tensors, _ = lorakit.adapters.io.read_tensors(tmp_path / "o")
    assert tensors and all(".layers.1." in k for k in tensors)
    with pytest.raises(SystemExit):
        main(["train", "--layers", "3-1"])
