"""The memory plan (train.memory_plan): parameter counts from configs, the rows' behaviour, the memory a process may
use, the one-line refusal, and the estimate against measured peaks of config-built models (in subprocesses)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from lorakit import LoraConfig
from lorakit.errors import ConfigError
from lorakit.train.precision import default_quant
from lorakit.train.memory_plan import (
    GB,
    MemoryPlan,
    available_memory,
    check_fits,
    count_parameters,
    parse_memory,
    plan_memory,
)

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=500)
DECODERS = {
    "llama": dict(TINY),
    "llama-biased": dict(TINY, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "mistral": dict(TINY),
    "qwen2": dict(TINY, tie_word_embeddings=False),
    "qwen3": dict(TINY, head_dim=24),
    "gemma": dict(TINY, head_dim=32),
    "gemma2": dict(TINY, head_dim=32),
    "gemma3_text": dict(TINY, head_dim=32),
}
ENCODERS = {"bert": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
                         max_position_embeddings=64),
            "roberta": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=300, max_position_embeddings=66)}


def config_of(name: str, **extra):
    kwargs = dict(DECODERS.get(name) or ENCODERS[name], **extra)
    return AutoConfig.for_model(name.split("-")[0], **kwargs)


def built(config, task: str):
    auto = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


# ------------------------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("name", sorted(DECODERS))
@pytest.mark.parametrize("task", ["causal-lm", "classify"])
def test_decoder_parameters_are_those_of_the_built_model(name, task):
    config = config_of(name, num_labels=3)
    assert count_parameters(config, task) == sum(p.numel() for p in built(config, task).parameters())


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_parameters_are_those_of_the_built_classifier(name):
    config = config_of(name, num_labels=5)
    assert count_parameters(config, "classify") == sum(p.numel() for p in built(config, "classify").parameters())


def test_another_family_is_counted_on_the_meta_device():
    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=64)
    plan = plan_memory(config, targets="all-linear", rank=4)
    assert plan.settings["parameters"] == sum(p.numel() for p in built(config, "causal-lm").parameters())
    assert plan.settings["layout"] == "decoder (meta)" and plan.settings["adapted_layers"] == 2 * 4


def test_adapter_rows_follow_the_targets():
    config = config_of("llama")
    H, I, d, n = 64, 160, 16, 3
    qv = plan_memory(config, targets="attn-qv", rank=8)
    assert qv.settings["trainable_parameters"] == n * 8 * ((H + 4 * d) + (H + 2 * d))
    every = plan_memory(config, targets="all-linear", rank=8)
    per_layer = 2 * (H + 4 * d) + 2 * (H + 2 * d) + 2 * (H + I) + (I + H)
    assert every.settings["trainable_parameters"] == n * 8 * per_layer
    some = plan_memory(config, targets=LoraConfig(r=8, targets="attn-qv", layers_to_transform=[0]))
    assert some.settings["adapted_layers"] == 2
    bert = plan_memory(config_of("bert", num_labels=2), task="classify", targets="attn-qv", rank=4, seq_len=32)
    assert dict(bert.rows)["classifier head + AdamW state (fp32)"] == 16 * (64 * 2 + 2)


# ------------------------------------------------------------------------------------------ the rows
def activations(plan: MemoryPlan) -> int:
    return next(b for what, b in plan.rows if what.startswith("activations"))


def test_checkpointing_lowers_the_activations():
    config = config_of("llama", num_hidden_layers=16)
    full = plan_memory(config, batch_size=4, seq_len=512)
    checkpointed = plan_memory(config, batch_size=4, seq_len=512, gradient_checkpointing=True)
    assert activations(checkpointed) < activations(full) / 3
    assert "checkpointed" in next(w for w, _ in checkpointed.rows if w.startswith("activations"))


def test_bf16_halves_the_weights_row():
    config = config_of("llama")
    fp32 = dict(plan_memory(config, base_dtype=torch.float32).rows)
    bf16 = dict(plan_memory(config, base_dtype="bf16").rows)
    assert bf16["frozen weights (bf16)"] * 2 == fp32["frozen weights (fp32)"]
    wide = dict(plan_memory(config, base_dtype="bf16", compute_dtype=torch.float32).rows)
    assert wide["widened fp32 copy of the largest frozen weight"] == 4 * 500 * 64  # the head


def test_activations_grow_with_the_tokens_and_processes_split_the_batch():
    config = config_of("llama")
    assert activations(plan_memory(config, batch_size=2, seq_len=256)) > activations(plan_memory(config, seq_len=256))
    two = plan_memory(config, batch_size=4, seq_len=64, processes=2)
    assert two.settings["micro_batch"] == 2 and any(w == "DDP buckets" for w, _ in two.rows)


def test_the_table_and_the_dict():
    plan = plan_memory(config_of("llama"), seq_len=64)
    assert plan.total == sum(b for _, b in plan.rows)
    text = plan.table((20 * GB, "MemAvailable"))
    assert "total (peak resident)" in text and "available (MemAvailable)" in text and text.count(" GB") == len(plan.rows) + 2
    assert json.loads(json.dumps(plan.to_dict()))["total_bytes"] == plan.total


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="batch_size=0"):
        plan_memory(config_of("llama"), batch_size=0)
    with pytest.raises(ConfigError, match="task='lm'"):
        plan_memory(config_of("llama"), task="lm")
    with pytest.raises(ConfigError, match="'int8'"):
        plan_memory(config_of("llama"), base_dtype="int8")


# ------------------------------------------------------------------------------------------ available memory
@pytest.mark.parametrize("text,expected", [("22GB", 22 * 10**9), ("22.5GiB", int(22.5 * 2**30)), ("20000MB", 2 * 10**10),
                                           ("512M", 512 * 2**20), ("123456", 123456), (4096, 4096), (" 1.5 gb ", 1.5e9)])
def test_max_memory_spellings(text, expected):
    assert parse_memory(text) == int(expected)


@pytest.mark.parametrize("bad", ["22 gigs", "GB", "-3GB", "0", "1e9", ""])
def test_a_bad_max_memory_is_named(bad):
    with pytest.raises(ConfigError, match="--max-memory"):
        parse_memory(bad)


def fake_machine(tmp_path, meminfo_kib=None, v2=None, v1=None):
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    cgroup.mkdir()
    (proc / "self" / "cgroup").write_text("0::/\n")
    if meminfo_kib is not None:
        (proc / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {meminfo_kib} kB\n")
    if v2 is not None:
        limit, current, inactive = v2
        (cgroup / "memory.max").write_text(f"{limit}\n")
        (cgroup / "memory.current").write_text(f"{current}\n")
        (cgroup / "memory.stat").write_text(f"anon 1\ninactive_file {inactive}\n")
    if v1 is not None:
        (cgroup / "memory").mkdir()
        (cgroup / "memory" / "memory.limit_in_bytes").write_text(f"{v1[0]}\n")
        (cgroup / "memory" / "memory.usage_in_bytes").write_text(f"{v1[1]}\n")
    return dict(proc=proc, cgroup=cgroup)


def test_available_memory_is_the_smallest_source(tmp_path):
    paths = fake_machine(tmp_path, meminfo_kib=20_000_000, v2=(16 * 10**9, 4 * 10**9, 10**9))
    assert available_memory(**paths) == (13 * 10**9, "cgroup limit")  # 16 - (4 - 1 reclaimable)
    assert available_memory("10GB", **paths) == (10 * 10**9, "--max-memory")
    assert available_memory("30GB", **paths) == (13 * 10**9, "cgroup limit")


def test_available_memory_without_a_limit(tmp_path):
    paths = fake_machine(tmp_path / "a", meminfo_kib=1000, v2=("max", 5, 0))
    assert available_memory(**paths) == (1024000, "MemAvailable")
    paths = fake_machine(tmp_path / "b", meminfo_kib=10**8, v1=(8 * 10**9, 3 * 10**9))
    assert available_memory(**paths) == (5 * 10**9, "cgroup limit")
    paths = fake_machine(tmp_path / "c", meminfo_kib=1000, v1=(2**63 - 4096, 10))
    assert available_memory(**paths)[1] == "MemAvailable"


def test_this_machine():
    limit, source = available_memory()
    assert limit > 0 and source in ("MemAvailable", "cgroup limit")


# ------------------------------------------------------------------------------------------ refusing early
MID = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
           vocab_size=32000)


def planner(config):
    return lambda s: plan_memory(config, **s)


def test_a_plan_that_fits_passes():
    config = AutoConfig.for_model("llama", **MID)
    settings = dict(base_dtype="fp32", gradient_checkpointing=False, batch_size=2, seq_len=256)
    check_fits(planner(config), settings, (100 * GB, "MemAvailable"))


def test_the_refusal_names_the_estimate_the_limit_and_what_fits():
    config = AutoConfig.for_model("llama", **MID)
    settings = dict(base_dtype="fp32", gradient_checkpointing=False, batch_size=8, seq_len=2048, grad_accum=1)
    need = plan_memory(config, **settings).total
    limit = int(need * 0.6)
    with pytest.raises(ConfigError) as caught:
        check_fits(planner(config), settings, (limit, "MemAvailable"))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"the run needs ~{need / GB:.1f} GB, {limit / GB:.1f} GB available (MemAvailable); fits with ")
    assert "--gradient-checkpointing (~" in message
    for option in message.split("fits with ")[1].split(", or "):  # every option named fits, at the size it says
        flags, size = option.rsplit(" (~", 1)
        changed = dict(settings)
        words = flags.split()
        for i, word in enumerate(words):
            if word == "--gradient-checkpointing":
                changed["gradient_checkpointing"] = True
            elif word == "--base-dtype":
                changed["base_dtype"] = words[i + 1]
                if words[i + 1] in ("int8", "int4"):  # a packed base: its linears packed, the rest bf16
                    changed.update(base_dtype="bf16", quant=default_quant(words[i + 1]))
            elif word == "--batch-size":
                changed["batch_size"], changed["grad_accum"] = int(words[i + 1]), int(words[i + 3])
                assert changed["batch_size"] * changed["grad_accum"] == 8  # the same global batch
            elif word == "--max-length":
                changed["seq_len"] = int(words[i + 1])
        total = plan_memory(config, **changed).total
        assert total <= limit and size == f"{total / GB:.1f} GB)"


def test_two_changes_when_one_is_not_enough():
    config = AutoConfig.for_model("llama", **dict(MID, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                                  vocab_size=64000))
    settings = dict(base_dtype="fp32", gradient_checkpointing=False, batch_size=1, seq_len=4096)
    total = lambda **change: plan_memory(config, **dict(settings, **change)).total  # noqa: E731
    limit = total(base_dtype="bf16", gradient_checkpointing=True) + GB // 100
    assert limit < min(total(base_dtype="bf16"), total(gradient_checkpointing=True, seq_len=32))
    with pytest.raises(ConfigError, match=r"fits with --base-dtype bf16 --gradient-checkpointing \(~"):
        check_fits(planner(config), settings, (limit, "cgroup limit"))


LLAMA_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=40, vocab_size=32000)


@pytest.mark.parametrize("base,offered", [(None, "int8"), ("int8", "int4")])
def test_a_base_too_big_for_the_machine_is_offered_a_packed_one(base, offered):
    """A 13B Llama in bf16 (26 GB) on 16 GB: no float change fits, --base-dtype int8 (13 GB) does; an int8 base that
    does not fit is offered int4. The option named is the plan's own total for that base."""
    config = AutoConfig.for_model("llama", **LLAMA_13B)
    settings = dict(base_dtype="bf16", compute_dtype="fp32", gradient_checkpointing=True, batch_size=1, seq_len=512,
                    quant=default_quant(base) if base else None)
    limit = 16 * GB if base is None else plan_memory(config, **settings).total - GB
    option = plan_memory(config, **dict(settings, quant=default_quant(offered))).total
    with pytest.raises(ConfigError, match=rf"; fits with --base-dtype {offered} \(~{option / GB:.1f} GB\)"):
        check_fits(planner(config), settings, (limit, "MemAvailable"))


def test_nothing_fits_names_the_smallest_plan():
    config = AutoConfig.for_model("llama", **MID)
    settings = dict(base_dtype="fp32", gradient_checkpointing=False, batch_size=4, seq_len=512)
    with pytest.raises(ConfigError, match=r"available \(--max-memory\); nothing fits: the smallest plan, --base-dtype int4 "
                                          r"--gradient-checkpointing --batch-size 1 --grad-accum 4 --max-length 32, needs ~"):
        check_fits(planner(config), settings, (GB // 2, "--max-memory"))


# ------------------------------------------------------------------------------------------ against measured peaks
MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from transformers import AutoConfig, AutoModelForCausalLM
    import lorakit
    s = json.loads(sys.argv[1])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int4": torch.bfloat16}[s["dtype"]]
    config = AutoConfig.for_model("llama", **s["config"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if s["dtype"] == "int4":  # --base-dtype int4: the frozen linears packed (nf4 g64), the rest bf16
        lorakit.quantize(model, bits=4)
    model = lorakit.attach(model, lorakit.LoraConfig(r=16, targets="all-linear"))
    if type(model.lm_head).__name__ != "Linear":  # the fused loss wants a plain nn.Linear head; it widens the weight itself
        model.lm_head.__class__ = torch.nn.Linear
    widened = getattr(model, "_lorakit_widened", None)
    compute = "fp32" if dtype == torch.float32 or (widened is not None and widened.storage is not None) else "bf16"
    if s["gc"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, config.vocab_size, (s["batch"], s["seq"]))
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(json.dumps({"peak": peak, "compute": compute}))
""")
SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=32000)


@pytest.mark.parametrize("setting", [dict(dtype="fp32", gc=False, batch=1, seq=256),
                                     dict(dtype="fp32", gc=True, batch=2, seq=512),
                                     dict(dtype="bf16", gc=False, batch=1, seq=256),
                                     dict(dtype="int4", gc=True, batch=1, seq=512)], ids=["fp32", "fp32-gc", "bf16", "int4-gc"])
def test_the_plan_is_within_15_percent_of_the_measured_peak(setting):
    setting = dict(setting, config=SMALL)
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(setting)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    packed = setting["dtype"] == "int4"
    plan = plan_memory(AutoConfig.for_model("llama", **SMALL), base_dtype="bf16" if packed else setting["dtype"],
                       quant=default_quant("int4") if packed else None, batch_size=setting["batch"],
                       seq_len=setting["seq"], rank=16, targets="all-linear", gradient_checkpointing=setting["gc"],
                       compute_dtype=measured["compute"])
    ratio = plan.total / measured["peak"]
    assert 0.85 <= ratio <= 1.15, f"plan {plan.total / GB:.3f} GB, measured {measured['peak'] / GB:.3f} GB\n{plan.table()}"
