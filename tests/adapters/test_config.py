import math

import pytest

from lorakit import LoraConfig
from lorakit.errors import ConfigError


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(r=0), "r=0"),
        (dict(r=-2), "r=-2"),
        (dict(r=2.5), "r=2.5"),
        (dict(alpha=0), "alpha=0"),
        (dict(alpha=-1.0), "alpha=-1.0"),
        (dict(alpha=float("nan")), "alpha=nan"),
        (dict(dropout=1.0), "dropout=1.0"),
        (dict(bias="some"), "bias='some'"),
        (dict(init="xavier"), "init='xavier'"),
        (dict(targets=""), "targets=''"),
        (dict(targets=[]), "targets=[]"),
        (dict(targets="(unclosed"), "valid regex"),
        (dict(rank_pattern={"q_proj": 0}), "rank_pattern['q_proj']=0"),
        (dict(task_type="CLASSIFY"), "task_type='CLASSIFY'"),
    ],
)
def test_bad_values_name_themselves(kwargs, needle):
    with pytest.raises(ConfigError, match=__import__("re").escape(needle)):
        LoraConfig(**kwargs)


def test_scale_and_patterns():
    cfg = LoraConfig(r=8, alpha=16, rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 4})
    assert cfg.scale_for("model.layers.1.self_attn.q_proj") == 2.0
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert cfg.scale_for("model.layers.0.self_attn.q_proj") == 8.0
    assert cfg.scale_for("model.layers.3.self_attn.v_proj") == 0.5
    assert LoraConfig(r=16, alpha=32, rslora=True).scale_for("x") == pytest.approx(32 / math.sqrt(16))
    # a pattern key must match a whole dotted suffix, as in PEFT
    assert cfg.rank_for("model.layers.10.self_attn.q_proj") == 8


def test_peft_round_trip():
    cfg = LoraConfig(r=4, alpha=8, dropout=0.1, bias="lora_only", rslora=True, init="gaussian",
                     modules_to_save=["classifier"], rank_pattern={"query": 2}, task_type="SEQ_CLS")
    doc = cfg.to_peft(["query", "value"], fan_in_fan_out=False)
    assert doc["peft_type"] == "LORA" and doc["lora_alpha"] == 8 and doc["use_rslora"] is True
    back = LoraConfig.from_peft(doc)
    assert back.replace(targets="attn-qv") == cfg.replace(targets="attn-qv")
    assert back.targets == ["query", "value"]


@pytest.mark.parametrize(
    "doc,needle",
    [
        ({"peft_type": "IA3", "target_modules": ["q"]}, "peft_type='IA3'"),
        ({"peft_type": "LORA", "target_modules": ["q"], "lora_bias": True}, "lora_bias=True"),
        ({"peft_type": "LORA", "target_modules": []}, "target_modules is empty"),
        ({"peft_type": "LORA", "target_modules": ["q"], "r": "eight"}, "r='eight'"),
        ({"peft_type": "LORA", "target_modules": ["q"], "init_lora_weights": "loftq"}, "init_lora_weights='loftq'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_from_peft_refuses_what_it_cannot_honour(doc, needle):
    with pytest.raises(ConfigError, match=__import__("re").escape(needle)):
        LoraConfig.from_peft(doc)


def test_unknown_peft_fields_warn():
    with pytest.warns(UserWarning, match="future_field"):
        LoraConfig.from_peft({"peft_type": "LORA", "target_modules": ["q"], "future_field": 3})
