"""Several named adapters on one model (issue 18): PEFT parity of outputs, gradients and files per name,
add_weighted_adapter (linear, cat, svd), mixed-batch inference, and what stays refused."""

import copy
import re

import peft
import pytest
import torch

import lorakit
import lorakit.limits.norm_cap
from lorakit.adapters import layer as layer_module
from lorakit.adapters import storage as storage_module
from lorakit.adapters.attach import lora_layers, state
from lorakit.bench.versus_peft import ours_name
from lorakit.errors import AdapterFileError, ConfigError, LorakitError
from lorakit.train.apply import describe

# (model, adapter "default"'s targets, adapter "b"'s targets): b covers other modules in part, as PEFT allows.
CASES = [
    ("llama", ["q_proj", "v_proj", "down_proj"], ["v_proj", "o_proj"]),
    ("bert", ["query", "value"], ["value", "key"]),
    ("gpt2", ["c_attn"], ["c_attn", "c_fc"]),  # Conv1D
]


def output(model, ids, mask, **kw):
    out = model(input_ids=ids, attention_mask=mask, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def two_adapter_twins(base, targets_a, targets_b):
    """PEFT's model with adapters "default" (r=4) and "b" (r=2, rsLoRA), random non-zero factors, and lorakit's
    holding the same values."""
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets_a,
                                                                    init_lora_weights=False))
    twin.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets_b, use_rslora=True,
                                          init_lora_weights=False))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ours = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, targets=targets_a))
    lorakit.attach(ours, lorakit.LoraConfig(r=2, alpha=6, targets=targets_b, rslora=True), name="b")
    theirs = dict(twin.named_parameters())
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if ".lora_" in n:
                dict(ours.named_parameters())[ours_name(n)].copy_(theirs[n])
    return ours, twin.eval()


@pytest.mark.parametrize("kind,targets_a,targets_b", CASES)
def test_each_active_set_gives_peft_outputs_and_gradients(make_model, token_batch, kind, targets_a, targets_b):
    base = make_model(kind)
    ours, twin = two_adapter_twins(base, targets_a, targets_b)
    assert lorakit.adapter_names(ours) == ["default", "b"] and lorakit.active_adapters(ours) == ["default"]
    ids, mask = token_batch()
    for active in ("default", "b", ["default", "b"]):
        lorakit.set_adapter(ours, active)
        twin.base_model.set_adapter(active)
        a, b = output(ours, ids, mask), output(twin, ids, mask)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=str(active))
        ours.zero_grad(), twin.zero_grad()
        a.square().mean().backward()
        b.square().mean().backward()
        theirs = {ours_name(n): p.grad for n, p in twin.named_parameters() if p.requires_grad}
        mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
        assert set(mine) == set(theirs), active  # only the active adapters train
        names = [active] if isinstance(active, str) else active
        assert all(any(f".{a}." in n or n.endswith(f".{a}") for a in names) for n in mine)
        for n, grad in mine.items():
            torch.testing.assert_close(grad, theirs[n], rtol=1e-5, atol=1e-6, msg=n)
    with lorakit.disabled(ours):
        torch.testing.assert_close(output(ours, ids, mask), output(base, ids, mask), atol=1e-6, rtol=0)


def test_one_active_adapter_runs_the_fused_kernel(make_model, token_batch, monkeypatch):
    base = make_model("llama")
    ours, _ = two_adapter_twins(base, *CASES[0][1:])
    calls = {"fused": 0, "plain": 0}
    fused, plain = storage_module.lora_linear, layer_module.LoraLinear._adapter_term

    def count_fused(*args, **kw):
        calls["fused"] += 1
        return fused(*args, **kw)

    def count_plain(self, *args, **kw):
        calls["plain"] += 1
        return plain(self, *args, **kw)

    monkeypatch.setattr(storage_module, "lora_linear", count_fused)
    monkeypatch.setattr(layer_module.LoraLinear, "_adapter_term", count_plain)
    ids, mask = token_batch()
    output(ours, ids, mask)
    assert calls == {"fused": len(list(lora_layers(ours, "default"))), "plain": 0}


@pytest.mark.parametrize("kind,targets_a,targets_b", CASES)
def test_files_both_ways_per_name(make_model, token_batch, tmp_path, kind, targets_a, targets_b):
    base = make_model(kind)
    ours, twin = two_adapter_twins(base, targets_a, targets_b)
    ids, mask = token_batch()
    # lorakit writes PEFT's layout: "default" in the directory, "b" in a subfolder; PEFT reads both.
    lorakit.save_adapter(ours, tmp_path / "ours")
    assert (tmp_path / "ours/adapter_config.json").is_file() and (tmp_path / "ours/b/adapter_model.safetensors").is_file()
    assert "other named adapters here: b" in describe(tmp_path / "ours")  # lorakit info
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    in_peft.load_adapter(str(tmp_path / "ours/b"), adapter_name="b")
    in_peft.eval()
    # PEFT writes the same layout; lorakit reads both, by name.
    twin.save_pretrained(str(tmp_path / "peft"))
    in_ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    lorakit.load_adapter(in_ours, tmp_path / "peft/b", adapter="b")
    assert lorakit.adapter_names(in_ours) == ["default", "b"] and lorakit.active_adapters(in_ours) == ["default"]
    for active in ("default", "b"):
        for model in (ours, in_ours):
            lorakit.set_adapter(model, active)
        for model in (twin, in_peft):
            model.set_adapter(active)
        want = output(twin, ids, mask)
        for model in (ours, in_peft, in_ours):
            torch.testing.assert_close(output(model, ids, mask), want, atol=1e-5, rtol=0, msg=active)
    # one name on its own: "b" goes to its subfolder, as PEFT's save_pretrained(selected_adapters=["b"])
    lorakit.save_adapter(ours, tmp_path / "only-b", adapter="b")
    assert not (tmp_path / "only-b/adapter_config.json").exists() and lorakit.read_config(tmp_path / "only-b/b").r == 2


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_add_weighted_adapter_equals_peft(make_model, token_batch, kind, combination):
    base = make_model(kind)
    targets = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "gpt2": ["c_attn"]}[kind]
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                    init_lora_weights=False))
    twin.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    ours = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, targets=targets))
    lorakit.attach(ours, lorakit.LoraConfig(r=4, alpha=16, targets=targets), name="b")
    g = torch.Generator().manual_seed(2)
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                params[ours_name(n)].copy_(p)
    weights = [0.7, -0.4]
    twin.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=combination)
    lorakit.add_weighted_adapter(ours, ["default", "b"], weights, "mix", combination_type=combination)
    twin.set_adapter("mix")
    lorakit.set_adapter(ours, "mix")
    for name, layer in lora_layers(ours, "mix"):
        ref = twin.get_submodule("base_model.model." + name)
        delta = ref.get_delta_weight("mix")
        torch.testing.assert_close(layer.delta_weight("mix"), delta.T if layer.fan_in_fan_out else delta,
                                   atol=1e-4, rtol=0, msg=name)
    ids, mask = token_batch()
    torch.testing.assert_close(output(ours, ids, mask), output(twin.eval(), ids, mask), atol=1e-4, rtol=0)
    if combination == "cat":  # exact: the combined update is the weighted sum of the updates
        for _, layer in lora_layers(ours, "mix"):
            want = weights[0] * layer.delta_weight("default") + weights[1] * layer.delta_weight("b")
            torch.testing.assert_close(layer.delta_weight("mix"), want, atol=1e-6, rtol=0)


def test_add_weighted_adapter_refusals(make_model):
    model = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=4, targets=["q_proj"]))
    lorakit.attach(model, lorakit.LoraConfig(r=2, targets=["q_proj"]), name="b")
    with pytest.raises(ConfigError, match="'linear' needs adapters of one rank"):
        lorakit.add_weighted_adapter(model, ["default", "b"], [1, 1], "m", combination_type="linear")
    with pytest.raises(ConfigError, match="weights=.*must be 2 finite numbers"):
        lorakit.add_weighted_adapter(model, ["default", "b"], [1], "m")
    with pytest.raises(ConfigError, match="'ties' is not one of svd, linear, cat"):
        lorakit.add_weighted_adapter(model, ["default", "b"], [1, 1], "m", combination_type="ties")
    with pytest.raises(LorakitError, match=r"\['c'\] are not adapters of the model"):
        lorakit.add_weighted_adapter(model, ["default", "c"], [1, 1], "m")
    lorakit.add_weighted_adapter(model, ["default", "b"], [1, 1], "m", combination_type="svd", svd_rank=3)
    assert {layer.settings["m"].r for _, layer in lora_layers(model, "m")} == {3}


@pytest.mark.parametrize("weights", [None, ["0.5", "0.5"], ["a", 1], [True, 1], [1, None], 0.5, "11", [1, float("nan")],
                                     [1, float("inf")], [1, 2, 3], {"default": 1, "b": 1}.values()])
def test_add_weighted_adapter_weights_must_be_numbers(make_model, weights):
    """None, strings, bools and non-finite weights are a ConfigError naming them (were TypeError / ValueError, or "0.5"
    silently read as a number)."""
    model = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=4, targets=["q_proj"]))
    lorakit.attach(model, lorakit.LoraConfig(r=2, targets=["q_proj"]), name="b")
    if weights is not None and not isinstance(weights, (list, str, float)):  # dict values: two numbers, accepted
        lorakit.add_weighted_adapter(model, ["default", "b"], weights, "m")
        assert "m" in lorakit.adapter_names(model)
        return
    needle = f"add_weighted_adapter: weights={weights!r} must be 2 finite numbers, one per adapter of ['default', 'b']"
    with pytest.raises(ConfigError, match="^" + re.escape(needle)):
        lorakit.add_weighted_adapter(model, ["default", "b"], weights, "m")
    assert lorakit.adapter_names(model) == ["default", "b"]  # nothing added


def test_add_weighted_adapter_names(make_model):
    """A plain string is one adapter name, as set_adapter takes it (it used to be split into letters)."""
    model = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=4, targets=["q_proj"]))
    lorakit.attach(model, lorakit.LoraConfig(r=2, targets=["q_proj"]), name="b")
    lorakit.add_weighted_adapter(model, "default", [0.5], "halved")
    for _, layer in lora_layers(model, "halved"):
        torch.testing.assert_close(layer.delta_weight("halved"), 0.5 * layer.delta_weight("default"), atol=1e-6, rtol=0)
    for adapters, error, needle in [
            ("c", LorakitError, "add_weighted_adapter: ['c'] are not adapters of the model; it has ['b', 'default', 'halved']"),
            ([], LorakitError, "add_weighted_adapter: [] are not adapters of the model"),
            ([1, "b"], LorakitError, "add_weighted_adapter: [1] are not adapters of the model"),
            (None, ConfigError, "add_weighted_adapter: adapters=None must be a list of adapter names (or one name)"),
            ({"default", "b"}, ConfigError, "must be a list of adapter names (or one name)")]:
        with pytest.raises(error, match=re.escape(needle)) as info:
            lorakit.add_weighted_adapter(model, adapters, [1.0], "m")
        assert type(info.value) is error, repr(info.value)  # the precise type, not a subclass


@pytest.mark.parametrize("kind,targets_a,targets_b", CASES)
def test_mixed_batch_rows_equal_single_adapter_models(make_model, kind, targets_a, targets_b):
    base = make_model(kind)
    ours, twin = two_adapter_twins(base, targets_a, targets_b)
    rows = ["b", "__base__", "default", "b", "default"]
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 97, (len(rows), 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    mixed = output(ours, ids, mask, adapter_names=rows)
    for i, name in enumerate(rows):
        if name == "__base__":
            want = output(base, ids[i:i + 1], mask[i:i + 1])
        else:
            lorakit.set_adapter(ours, name)
            want = output(ours, ids[i:i + 1], mask[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], want, atol=1e-6, rtol=0, msg=f"row {i} ({name})")
    torch.testing.assert_close(mixed, output(twin, ids, mask, adapter_names=rows), atol=1e-5, rtol=0)
    assert all(layer.row_adapters is None for _, layer in lora_layers(ours))  # for that call only
    with pytest.raises(LorakitError, match="adapter_names has 2 names but the batch has 5 rows"):
        output(ours, ids, mask, adapter_names=["b", "b"])
    with pytest.raises(LorakitError, match=r"adapter_names holds \['c'\], which the model does not have"):
        output(ours, ids, mask, adapter_names=["c"] * 5)
    assert all(layer.row_adapters is None for _, layer in lora_layers(ours))  # cleared after a failed call too


def test_set_delete_train_and_unload(make_model, token_batch):
    base = make_model("llama")
    ours, _ = two_adapter_twins(base, ["q_proj", "v_proj"], ["v_proj"])
    lorakit.set_adapter(ours, "b")
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if ".lora_" in n}
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    ids, mask = token_batch()
    output(ours, ids, mask).square().mean().backward()
    opt.step()
    moved = {n for n, p in ours.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert moved and all(".b." in n for n in moved)  # the active adapter trains, the other one keeps its values
    # layers without "b" (q_proj) act as the base layer while "b" alone is active
    q = ours.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(3, 32)
    torch.testing.assert_close(q(x), q.base_layer(x), atol=0, rtol=0)
    assert set(lorakit.limits.norm_cap.cap_norms(ours, 0.01)) == {n for n, _ in lora_layers(ours, "b")}  # the active one
    text = str(lorakit.summary(ours))
    assert "q_proj [default]" in text and "v_proj [b, active]" in text
    with pytest.raises(LorakitError, match=r"set_adapter\('c'\): the model has adapters \['b', 'default'\]"):
        lorakit.set_adapter(ours, "c")
    merged = lorakit.unload(copy.deepcopy(ours), merge=True)  # the active adapter is merged, the other dropped
    torch.testing.assert_close(output(merged, ids, mask), output(ours, ids, mask), atol=1e-5, rtol=0)
    lorakit.delete_adapter(ours, "b")
    assert lorakit.adapter_names(ours) == ["default"] and lorakit.active_adapters(ours) == ["default"]
    assert not any(".b." in n or n.endswith(".b") for n, _ in ours.named_parameters())
    with pytest.raises(LorakitError, match="is the model's only adapter; remove it with lorakit.unload"):
        lorakit.delete_adapter(ours, "default")
    with pytest.raises(ConfigError, match="adapter name '__base__' must be"):
        lorakit.attach(ours, lorakit.LoraConfig(r=2), name="__base__")


def test_what_stays_refused_with_several_adapters(make_model, token_batch, tmp_path):
    cls = lorakit.attach(make_model("bert-cls"), lorakit.LoraConfig(r=2))
    with pytest.raises(ConfigError, match=r"modules_to_save=\['classifier'\] \(trained in place"):
        lorakit.attach(cls, lorakit.LoraConfig(r=2, modules_to_save=[]), name="b")
    model = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=2, targets=["q_proj"]))
    with pytest.raises(ConfigError, match="adapter 'b' has init='pissa'"):
        lorakit.attach(model, lorakit.LoraConfig(r=2, init="pissa"), name="b")
    lorakit.attach(model, lorakit.LoraConfig(r=2, targets=["v_proj"], use_dora=True), name="d")
    with pytest.raises(ConfigError, match="a DoRA adapter is active alone"):
        lorakit.set_adapter(model, ["default", "d"])
    ids, mask = token_batch()
    with pytest.raises(ConfigError, match="adapter_names with a DoRA adapter is not supported"):
        output(model, ids, mask, adapter_names=["d", "default"])
    lorakit.merge(model)
    with pytest.raises(LorakitError, match="merged into its weights; lorakit.unmerge"):
        lorakit.attach(model, lorakit.LoraConfig(r=2), name="c")
    with pytest.raises(LorakitError, match="adapter_names cannot be used while adapters are merged"):
        output(model, ids, mask, adapter_names=["default", "__base__"])
    lorakit.unmerge(model)
    # a plain-LoRA file cannot go into the DoRA adapter; under a new name it is added beside it
    lorakit.save_adapter(model, tmp_path, adapter="default")
    with pytest.raises(AdapterFileError) as info:
        lorakit.load_adapter(model, tmp_path, adapter="d")
    assert str(info.value) == (f"{tmp_path} holds a plain LoRA adapter but the model's adapter 'd' is a DoRA adapter; "
                               "call lorakit.unload(model, merge=False) first, load into the plain model, or load it "
                               "under another name")
    lorakit.load_adapter(model, tmp_path, adapter="copy")
    assert state(model).adapters["copy"].targets == state(model).adapters["default"].targets


def test_bf16_keeps_inactive_adapters_float32(make_model):
    model = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=2, targets=["q_proj"]))
    lorakit.attach(model, lorakit.LoraConfig(r=2, targets=["q_proj"]), name="b")
    lorakit.use_bf16(model, when="always")
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)
