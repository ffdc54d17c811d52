"""Adapter files: round trip, and refusal of anything that does not fit (acceptance 2 and 6)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.adapters.attach import lora_layers
from lorakit.errors import AdapterFileError


def saved(make_model, tmp_path, kind="llama", **cfg):
    base = make_model(kind)
    m = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, **cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(m):
            layer.B.copy_(torch.randn(layer.B.shape, generator=g))
    lorakit.save_adapter(m, tmp_path, metadata={"note": "hello"})
    return base, m


def test_round_trip_and_format(make_model, tmp_path, token_batch):
    base, m = saved(make_model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["task_type"] == "CAUSAL_LM"
    assert list(cfg) == sorted(cfg)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    _, meta = lorakit.adapters.io.read_tensors(tmp_path)
    assert meta["format"] == "pt" and meta["note"] == "hello"
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    ids, mask = token_batch()
    torch.testing.assert_close(loaded(input_ids=ids).logits, m(input_ids=ids).logits)
    # loading into an already-attached model overwrites its adapter
    fresh = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=3))
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).logits, m(input_ids=ids).logits)


def test_load_into_merged_model_keeps_it_consistent(make_model, tmp_path, token_batch):
    base, m = saved(make_model, tmp_path)
    other = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4))
    lorakit.merge(other)
    lorakit.load_adapter(other, tmp_path)
    ids, _ = token_batch()
    torch.testing.assert_close(other(input_ids=ids).logits, m(input_ids=ids).logits, atol=1e-5, rtol=0)


def _rewrite(tmp_path, edit):
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_unknown_and_misshapen_keys_are_named(make_model, tmp_path):
    base, _ = saved(make_model, tmp_path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    _rewrite(tmp_path, lambda t: t.pop(key))
    with pytest.raises(AdapterFileError, match="missing.*layers.1.self_attn.v_proj.lora_B.weight"):
        lorakit.load_adapter(copy.deepcopy(base), tmp_path)

    _rewrite(tmp_path, lambda t: t.update({key: torch.zeros(16, 4), key.replace("v_proj", "w_proj"): torch.zeros(16, 4)}))
    with pytest.raises(AdapterFileError, match="w_proj.lora_B.weight.*closest"):
        lorakit.load_adapter(copy.deepcopy(base), tmp_path)

    _rewrite(tmp_path, lambda t: (t.pop(key.replace("v_proj", "w_proj")), t.update({key: torch.zeros(16, 3)})))
    untouched = copy.deepcopy(base)
    with pytest.raises(AdapterFileError, match=r"v_proj.lora_B.weight has shape \[16, 3\] but this model needs \[16, 4\]"):
        lorakit.load_adapter(untouched, tmp_path)
    assert not lorakit.is_attached(untouched)


def test_adapter_for_a_different_base_model(make_model, tmp_path):
    saved(make_model, tmp_path, kind="llama")
    other = make_model("llama")
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 40, bias=False)
    with pytest.raises(AdapterFileError, match="different base model"):
        lorakit.load_adapter(other, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_or_truncated_safetensors(make_model, tmp_path, damage):
    base, _ = saved(make_model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 50, "empty": b""}[damage])
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        lorakit.load_adapter(copy.deepcopy(base), tmp_path)


def test_bad_directory_and_config(make_model, tmp_path):
    base = make_model("llama")
    with pytest.raises(AdapterFileError, match="does not exist"):
        lorakit.load_adapter(base, tmp_path / "nope")
    with pytest.raises(AdapterFileError, match="adapter_config.json not found"):
        lorakit.load_adapter(base, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        lorakit.load_adapter(base, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"], "layer_replication": [[0, 1]]}))
    with pytest.raises(AdapterFileError, match="layer_replication"):
        lorakit.load_adapter(base, tmp_path)


def test_save_leaves_no_temporary_files(make_model, tmp_path):
    saved(make_model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ---------------------------------------------------------------------- issue 33, 4: a name is a name, never a path
PATH_NAMES = ["/abs/dir", "sub/dir", "..", "../up", "a\\b", ".hidden", "", " spaced", "x\x00y", "__base__", 3]


@pytest.mark.parametrize("name", PATH_NAMES, ids=repr)
def test_adapter_names_that_are_paths_are_refused_everywhere(make_model, tmp_path, name):
    from lorakit.errors import ConfigError

    m = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=4))
    lorakit.save_adapter(m, tmp_path / "saved")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    calls = [lambda: lorakit.attach(m, lorakit.LoraConfig(r=4), name=name),
             lambda: lorakit.load_adapter(m, tmp_path / "saved", adapter=name),
             lambda: lorakit.add_weighted_adapter(m, ["default"], [1.0], name, combination_type="linear"),
             lambda: lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=4), name=name)]
    for call in calls:
        with pytest.raises(ConfigError, match="must be a plain name of letters, digits"):
            call()
    assert lorakit.adapter_names(m) == ["default"]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written anywhere


def test_save_refuses_a_path_name_put_into_the_state_by_hand(make_model, tmp_path):
    from lorakit.adapters.attach import state
    from lorakit.errors import ConfigError

    m = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=4))
    lorakit.attach(m, lorakit.LoraConfig(r=4), name="second")
    st = state(m)
    st.adapters["../escaped"] = st.adapters.pop("second")
    with pytest.raises(ConfigError, match="'../escaped' must be a plain name"):
        lorakit.save_adapter(m, tmp_path / "out")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["task_b", "B-2", "ünïcode", "x1"])
def test_plain_names_save_into_their_subfolder(make_model, tmp_path, name):
    m = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=4))
    lorakit.attach(m, lorakit.LoraConfig(r=4), name=name)
    lorakit.save_adapter(m, tmp_path)
    assert (tmp_path / name / "adapter_model.safetensors").is_file()
