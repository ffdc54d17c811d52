"""TrainConfig holds a LoraConfig and every option is declared once (issue 16): each LoraConfig field is a
`lorakit train` flag, round-trips through run.json, and `lorakit train --help` is generated from the fields."""

import dataclasses
import json
import re

import pytest

from lorakit import cli
from lorakit import options as opt
from lorakit.adapters import CeloraConfig, LoraConfig, NormControl
from lorakit.errors import ConfigError
from lorakit.train import TrainConfig
from lorakit.train.config import TrainCommand, resume_differences

# A value other than the default for every LoraConfig field, as typed on the command line and as parsed.
LORA_EXAMPLES = {
    "r": ("--rank", "4", 4),
    "alpha": ("--alpha", "12", 12.0),
    "targets": ("--targets", "q_proj,k_proj,v_proj", ["q_proj", "k_proj", "v_proj"]),
    "dropout": ("--dropout", "0.1", 0.1),
    "bias": ("--bias", "lora_only", "lora_only"),
    "rslora": ("--rslora", None, True),
    "init": ("--init", "gaussian", "gaussian"),
    "modules_to_save": ("--modules-to-save", "lm_head", ["lm_head"]),
    "exclude": ("--exclude", "k_proj", ["k_proj"]),  # a plain name is a name (a suffix), as in a list
    "rank_pattern": ("--rank-pattern", "v_proj=2", {"v_proj": 2}),
    "alpha_pattern": ("--alpha-pattern", "v_proj=6", {"v_proj": 6.0}),
    "use_dora": ("--dora", None, True),
    "layers_to_transform": ("--layers", "1", [1]),
    "layers_pattern": ("--layers-pattern", "layers", "layers"),
    "task_type": ("--task-type", "CAUSAL_LM", "CAUSAL_LM"),
    "base_model": ("--base-model", "my-org/my-base", "my-org/my-base"),
    "backward": ("--backward", "celora", "celora"),
    "celora.keep_ratio": ("--keep-ratio", "0.5", 0.5),
    "celora.refresh_every": ("--refresh-every", "3", 3),
    "celora.svd_rank": ("--svd-rank", "2", 2),
    "celora.selection": ("--selection", "weight", "weight"),
    "norm_control.cap": ("--norm-cap", "0.5", 0.5),
}


def lora_paths(cls=LoraConfig, prefix=""):
    out = []
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            out += lora_paths(f.metadata["cls"], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def lookup(config, path):
    for part in path.split("."):
        config = getattr(config, part)
    return config


def argv(*names):
    out = []
    for name in names:
        flag, text, _ = LORA_EXAMPLES[name]
        out += [flag] if text is None else [flag, text]
    return out


def parse_train(args):
    return opt.from_flags(TrainCommand, cli.parser().parse_args(["train", *args])).train


def test_every_lora_field_has_an_example_here():
    assert sorted(lora_paths()) == sorted(LORA_EXAMPLES), "a LoraConfig field without a lorakit train example"


def test_every_field_is_declared_with_help():
    assert opt.fields_without_help(TrainConfig) == []


@pytest.mark.parametrize("path", sorted(LORA_EXAMPLES))
def test_each_lora_field_is_settable_from_lorakit_train(path):
    flag, _, value = LORA_EXAMPLES[path]
    needs = {"layers_pattern": ("layers_to_transform",)}.get(path, ())  # it names the list --layers indexes
    cfg = parse_train(argv(path, *needs))
    assert lookup(cfg.lora, path) == value
    assert opt.spelling(TrainConfig, f"lora.{path}") == flag
    assert lookup(TrainConfig().lora, path) != value  # the example changes something
    changed = [p for p in LORA_EXAMPLES if lookup(cfg.lora, p) != lookup(TrainConfig().lora, p)]
    assert changed == sorted([path, *needs], key=list(LORA_EXAMPLES).index)


def test_help_is_generated_from_the_fields(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for fl in opt.flags(TrainConfig):
        words = " ".join(fl.help.split()[:6])
        assert fl.spelling in shown and words in shown, (fl.path, words)
    assert "(default: 8)" in shown and "(default: attn-qv)" in shown  # defaults come from the dataclass
    assert "--nproc" in shown  # the launcher's own flag


def test_defaults_live_in_the_dataclass_alone():
    """No flag given: the configuration is TrainConfig()'s (argparse holds no defaults of its own)."""
    assert parse_train([]) == TrainConfig()
    assert parse_train(["--model", "builtin:smollm2"]).data == "builtin:hamlet"
    assert parse_train(["--task", "causal-lm"]).data == "builtin:hamlet"
    assert TrainConfig().data == "builtin:rotten-tomatoes"


def run_from_cli(tmp_path, model, data, names, capsys):
    out = tmp_path / "run"
    args = ["--model", model, "--data", data, "--out", str(out), "--steps", "2", "--batch-size", "4",
            "--max-length", "32", "--quiet", "--save-every", "1", *argv(*names)]
    code = cli.main(["train", *args])
    assert code == 0, capsys.readouterr().err
    return parse_train(args), json.loads((out / "run.json").read_text()), out


def test_run_json_round_trips_every_lora_field(tiny_llama_dir, corpus_txt, tmp_path, capsys):
    """Two real runs set every LoraConfig field to a non-default value (DoRA in the second: it refuses a norm cap);
    run.json's config reads back into the same TrainConfig, and the adapter file carries PEFT's fields."""
    everything_but_dora = [p for p in LORA_EXAMPLES if p != "use_dora"]
    cfg, doc, out = run_from_cli(tmp_path / "a", tiny_llama_dir, corpus_txt, everything_but_dora, capsys)
    assert TrainConfig.from_dict(doc["config"]) == dataclasses.replace(cfg, task="causal-lm")  # the task, as inferred
    assert doc["config"]["lora"]["celora"] == {"keep_ratio": 0.5, "refresh_every": 3, "svd_rank": 2, "selection": "weight"}
    peft = json.loads((out / "adapter_config.json").read_text())
    assert (peft["bias"], peft["exclude_modules"], peft["modules_to_save"], peft["layers_to_transform"],
            peft["layers_pattern"], peft["task_type"], peft["base_model_name_or_path"], peft["init_lora_weights"],
            peft["use_rslora"], peft["lora_dropout"]) == \
        ("lora_only", ["k_proj"], ["lm_head"], [1], "layers", "CAUSAL_LM", "my-org/my-base", "gaussian", True, 0.1)
    assert peft["rank_pattern"] == {"v_proj": 2} and peft["alpha_pattern"] == {"v_proj": 6.0}
    from safetensors.torch import load_file

    adapted = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in load_file(out / "adapter_model.safetensors")
               if ".lora_" in k}
    assert adapted == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}  # k_proj excluded
    cfg, doc, _ = run_from_cli(tmp_path / "b", tiny_llama_dir, corpus_txt, ["use_dora", "r", "targets"], capsys)
    assert TrainConfig.from_dict(doc["config"]) == dataclasses.replace(cfg, task="causal-lm") and cfg.lora.use_dora
    # the resume check reads the nested configuration and names the flag
    changed = TrainConfig.from_dict({**doc["config"], "lora": {**doc["config"]["lora"], "r": 8}})
    assert resume_differences(doc["config"], changed.to_dict()) == ["--rank 8 here, 4 in the checkpoint"]


def test_a_checkpoint_of_the_flat_configuration_is_compared_by_flag():
    """Checkpoints written before TrainConfig held a LoraConfig recorded rank=..., keep_ratio=...: still compared."""
    now = TrainConfig(lora=LoraConfig(r=4, celora=CeloraConfig(keep_ratio=0.5))).to_dict()
    flat = {k: v for k, v in now.items() if k != "lora"}
    flat.update(rank=4, alpha=16, targets="attn-qv", dropout=0.0, rslora=False, dora=False, init="kaiming",
                rank_pattern=None, layers=None, layers_pattern=None, backward="exact", keep_ratio=0.6,
                refresh_every=200, svd_rank=None, selection="score", norm_cap=None, extra={})
    assert resume_differences(flat, now) == ["--keep-ratio 0.5 here, 0.6 in the checkpoint"]


def test_bad_values_name_the_flag(capsys):
    with pytest.raises(SystemExit):  # the option's parser: one line naming the flag
        cli.main(["train", "--rank", "0"])
    assert capsys.readouterr().err.startswith("lorakit: error: argument --rank: 0 is not a positive integer")
    with pytest.raises(ConfigError, match="r=0 must be a positive integer"):  # the library's own check
        LoraConfig(r=0)
    assert cli.main(["train", "--norm-cap", "-1"]) == 2
    assert "norm_cap=-1.0 must be a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--keep-ratio", "half"])
    assert re.search(r"lorakit: error: argument --keep-ratio: 'half' is neither a number", capsys.readouterr().err)
    with pytest.raises(ConfigError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"rank": 4})
    with pytest.raises(ConfigError, match="must be a lorakit.LoraConfig"):
        TrainConfig(lora="r=4")
    with pytest.raises(ConfigError, match="norm_cap=0"):
        NormControl(0)


def test_a_checkpoint_that_saved_the_old_group_size_default_resumes():
    """Before --group-size had no value of its own, every checkpoint saved group_size=64 (float bases too)."""
    now = TrainConfig().to_dict()
    assert now["group_size"] is None
    assert resume_differences({**now, "group_size": 64}, now) == []
    assert resume_differences({**now, "group_size": 32}, now) == ["--group-size None here, 32 in the checkpoint"]
