import copy
import re

import pytest
import torch

import lorakit
from lorakit.adapters.attach import lora_layers
from lorakit.errors import ConfigError, LorakitError, TargetError


def adapted(model):
    return sorted(name for name, _ in lora_layers(model))


def test_presets_resolve_by_architecture(make_model):
    bert = lorakit.attach(make_model("bert-cls"), lorakit.LoraConfig(targets="attn-qv", r=2))
    assert adapted(bert) == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    llama = lorakit.attach(make_model("llama"), lorakit.LoraConfig(targets="attn-qkv", r=2))
    assert [n.rsplit(".", 1)[1] for n in adapted(llama)] == ["k_proj", "q_proj", "v_proj"] * 2
    opt = lorakit.attach(make_model("opt"), lorakit.LoraConfig(targets="attn-qv", r=2))
    assert {n.rsplit(".", 1)[1] for n in adapted(opt)} == {"q_proj", "v_proj"}
    with pytest.warns(UserWarning, match="c_attn"):
        gpt2 = lorakit.attach(make_model("gpt2"), lorakit.LoraConfig(targets="attn-qv", r=2))
    assert {n.rsplit(".", 1)[1] for n in adapted(gpt2)} == {"c_attn"}


def test_all_linear_skips_output_head(make_model):
    llama = lorakit.attach(make_model("llama"), lorakit.LoraConfig(targets="all-linear", r=2))
    names = adapted(llama)
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    bert = lorakit.attach(make_model("bert-cls"), lorakit.LoraConfig(targets="all-linear", r=2))
    assert "classifier" not in adapted(bert) and "bert.pooler.dense" in adapted(bert)


def test_unknown_architecture_falls_back_to_names_and_says_so(make_model):
    model = make_model("llama")
    model.config.model_type = "my-new-arch"
    with pytest.warns(UserWarning, match="no preset; guessed"):
        lorakit.attach(model, lorakit.LoraConfig(targets="attn-qv", r=2))
    assert {n.rsplit(".", 1)[1] for n in adapted(model)} == {"q_proj", "v_proj"}
    assert "guessed" in str(lorakit.summary(model))


def test_regex_list_and_exclude(make_model):
    m = lorakit.attach(make_model("llama"), lorakit.LoraConfig(targets=r".*layers\.1\..*_proj", r=2))
    assert len(adapted(m)) == 7 and all(".layers.1." in n for n in adapted(m))
    m = lorakit.attach(make_model("llama"), lorakit.LoraConfig(targets=["q_proj", "layers.0.mlp.up_proj"], exclude=["layers.1.self_attn.q_proj"], r=2))
    assert adapted(m) == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"]


def test_unknown_target_lists_closest_names(make_model):
    with pytest.raises(TargetError, match=r"'q_projj'.*closest.*'q_proj'"):
        lorakit.attach(make_model("llama"), lorakit.LoraConfig(targets=["q_projj"], r=2))
    with pytest.raises(TargetError, match="not linear layers"):
        lorakit.attach(make_model("llama"), lorakit.LoraConfig(targets=r"model\.embed_tokens", r=2))
    with pytest.raises(TargetError, match="selects no linear layer"):
        lorakit.attach(make_model("llama"), lorakit.LoraConfig(targets=r"nothing.*", r=2))


def test_rank_larger_than_layer_is_refused_before_any_change(make_model):
    model = make_model("llama")  # k_proj is 32 -> 16
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"r=20 for model\.layers\.0\.self_attn\.k_proj exceeds min\(in, out\) = 16"):
        lorakit.attach(model, lorakit.LoraConfig(targets="attn-qkv", r=20))
    assert not lorakit.is_attached(model) and not adapted(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_only_adapters_heads_and_chosen_biases_train(make_model):
    m = lorakit.attach(make_model("bert-cls"), lorakit.LoraConfig(r=2))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or n.startswith("classifier.")}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    m = lorakit.attach(make_model("bert"), lorakit.LoraConfig(r=2, bias="lora_only"))
    biases = {n for n, p in m.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases and all(n.endswith("base_layer.bias") for n in biases)
    m = lorakit.attach(make_model("bert"), lorakit.LoraConfig(r=2, bias="all"))
    assert any(n.endswith("LayerNorm.bias") and p.requires_grad for n, p in m.named_parameters())


def test_attach_twice_is_an_error(make_model):
    m = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=2))
    with pytest.raises(LorakitError, match="already has an adapter named .default.; attach another name"):
        lorakit.attach(m, lorakit.LoraConfig(r=2))


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kind", ["bert-cls", "llama", "gpt2"])
def test_merge_unmerge_unload(make_model, token_batch, kind):
    """Acceptance 3: merged == adapter output (atol 1e-5); unmerge restores the base (atol 1e-6)."""
    base = make_model(kind)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    m = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, targets="all-linear"))
    _randomise(m)
    ids, mask = token_batch()
    with torch.no_grad():
        adapter_out = m(input_ids=ids, attention_mask=mask).logits
        lorakit.merge(m)
        merged_out = m(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(merged_out, adapter_out, atol=1e-5, rtol=0)
        lorakit.unmerge(m)
        for name, layer in lora_layers(m):
            torch.testing.assert_close(layer.base_layer.weight, base_state[f"{name}.weight"], atol=1e-6, rtol=0)
        with lorakit.disabled(m):
            torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits)
        plain = lorakit.unload(m, merge=True)
        assert not adapted(plain) and not lorakit.is_attached(plain)
        assert set(plain.state_dict()) == set(base_state)
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits, adapter_out, atol=1e-5, rtol=0)


def test_pissa_starts_at_the_base_function_and_unload_restores_it(make_model, token_batch):
    base = make_model("llama")
    m = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, targets="attn-qv", init="pissa"))
    ids, mask = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5, rtol=0)
        plain = lorakit.unload(m, merge=False)
        for k, v in base.state_dict().items():
            torch.testing.assert_close(plain.state_dict()[k], v, atol=1e-5, rtol=0)


def test_summary_counts(make_model):
    m = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=2, targets="attn-qv"))
    s = lorakit.summary(m)
    assert s.adapter_params == 2 * (2 * (32 + 32) + 2 * (32 + 16))
    assert s.trainable == s.adapter_params
    assert s.total == sum(p.numel() for p in m.parameters())
    assert re.search(r"4 adapted modules, 448 adapter parameters", str(s))


def test_an_exclude_that_excludes_nothing_is_said(make_model):
    with pytest.warns(UserWarning, match=r"exclude='k_proj' excludes none of the targets \(a regex is matched against the whole"):
        lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=2, targets="attn-qkv", exclude="k_proj"))


# ---------------------------------------------------------------------- issue 33: --layers / --layers-pattern that select less
@pytest.mark.parametrize("kind,layers,pattern,needle", [
    ("llama", [0, 1, 2], None, "layers_to_transform (--layers) 0-2 goes beyond the 2 layers of LlamaForCausalLM "
                               "(blocks 0-1): layer(s) 2 do not exist; choose --layers within 0-1"),
    ("llama", [5], None, "layer(s) 5 do not exist"),
    ("bert-cls", [0, 7, 8], None, "the 2 layers of BertForSequenceClassification (blocks 0-1): layer(s) 7-8 do not exist"),
    ("gpt2", [2], "h", "layer(s) 2 do not exist"),
    ("llama", [0], "nomatch", "layers_pattern='nomatch' (--layers-pattern) matches no numbered block list of "
                              "LlamaForCausalLM; its numbered block lists are named: 'layers' (2 blocks)"),
    ("bert-cls", [0], "layers", "its numbered block lists are named: 'layer' (2 blocks)"),
    ("gpt2", [0], ["nope", "blocks"], "its numbered block lists are named: 'h' (2 blocks)"),
])
def test_layers_beyond_the_model_are_refused(make_model, kind, layers, pattern, needle):
    model = make_model(kind)
    targets = "all-linear" if kind != "llama" else ["q_proj", "v_proj"]
    with pytest.raises(TargetError) as info:
        lorakit.attach(model, lorakit.LoraConfig(r=2, targets=targets, layers_to_transform=layers, layers_pattern=pattern))
    assert needle in str(info.value)
    assert not adapted(model)  # nothing attached


@pytest.mark.parametrize("kind,layers,pattern", [("llama", [1], None), ("llama", [0, 1], "layers"),
                                                 ("bert-cls", [1], "layer"), ("bert-cls", [0], "encoder.layer"),
                                                 ("gpt2", [0, 1], "h")])
def test_layers_within_the_model_still_work(make_model, kind, layers, pattern):
    model = lorakit.attach(make_model(kind), lorakit.LoraConfig(r=2, targets="attn-qv", layers_to_transform=layers,
                                                                layers_pattern=pattern))
    found = {int(re.search(r"\.(\d+)\.", n)[1]) for n in adapted(model)}
    assert found == set(layers)


def test_a_peft_file_naming_missing_layers_still_loads(make_model, tmp_path):
    """PEFT skips layers a model lacks; a file it wrote that way loads as PEFT loads it."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0, 5]))
    peft_model.save_pretrained(tmp_path)
    loaded = lorakit.load_adapter(make_model("llama"), tmp_path)
    assert adapted(loaded) == ["model.layers.0.self_attn.q_proj"]
