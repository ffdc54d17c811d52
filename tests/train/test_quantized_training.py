"""lorakit train --base-dtype int8 / int4 (issue 29): a tiny Llama trains on a packed base through the CLI; run.json
records the format; the adapter is PEFT's and loads on the float base; a resume with another format, --shard, and a
group size the widths do not allow are refused in one line; the dry-run plan counts int4 < bf16 < fp32; merge of an
int4-trained adapter writes what merging on the float base writes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.adapters.storage import QuantizedLinear
from lorakit.cli import main
from lorakit.train.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore")


def cli(capsys, *args):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's refusal of a value that is not a choice
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def llama64_dir(tmp_path_factory, minilm_tokenizer):
    """A tiny Llama whose widths (64, 128) every block and group size divides, saved as a user's model would be."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=minilm_tokenizer.pad_token_id, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama64")
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    minilm_tokenizer.save_pretrained(path)
    return str(path)


def train_args(model, data, out, *extra):
    return ["train", "--model", model, "--data", data, "--task", "causal-lm", "--steps", "3", "--batch-size", "4",
            "--max-length", "32", "--rank", "4", "--lr", "1e-2", "--save-every", "3", "--log-every", "1",
            "--eval-limit", "8", "--out", out, "--quiet", "--no-packing", *extra]


RUNS = {"int8": ["--base-dtype", "int8"], "nf4": ["--base-dtype", "int4"],
        "int4-g32": ["--base-dtype", "int4", "--quant-format", "int4", "--group-size", "32"]}
FORMATS = {"int8": "int8", "nf4": "nf4 g64", "int4-g32": "int4 g32"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama64_dir, corpus_txt):
    root = tmp_path_factory.mktemp("quantized-runs")
    for name, flags in RUNS.items():
        assert main([str(a) for a in train_args(llama64_dir, corpus_txt, root / name, *flags)]) == 0, name
    return root


def losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("event") == "train"]


@pytest.mark.parametrize("name", list(RUNS))
def test_a_packed_base_trains_and_run_json_records_its_format(runs, llama64_dir, name):
    out = runs / name
    report = json.loads((out / "run.json").read_text())
    assert report["precision"]["base_format"] == FORMATS[name]
    assert report["memory_plan"]["settings"]["base_format"] == FORMATS[name]
    assert f"--base-dtype {'int8' if name == 'int8' else 'int4'}" in report["precision"]["why"]
    seen = losses(out)
    assert len(seen) == 3 and all(torch.isfinite(torch.tensor(seen))) and seen[-1] < seen[0]
    saved = load_file(out / "adapter_model.safetensors")  # PEFT's file: lora_A / lora_B only, no packed tensor
    assert saved and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in saved)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # the adapters moved from B = 0
    base = load_model(llama64_dir, "causal-lm", dtype="fp32").model  # the adapter loads on the float base
    lorakit.load_adapter(base, out)
    layer = base.model.layers[0].self_attn.q_proj
    key = next(k for k in saved if "layers.0.self_attn.q_proj.lora_B" in k)
    assert torch.equal(layer.B.float(), saved[key].float())


def test_load_model_packs_every_frozen_linear_but_the_head(llama64_dir):
    loaded = load_model(llama64_dir, "causal-lm", dtype="int4")
    packed = [n for n, m in loaded.model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(packed) == 14 and "lm_head" not in packed
    assert not any(p.dim() >= 2 and "proj" in n for n, p in loaded.model.named_parameters())
    assert loaded.model.model.layers[0].mlp.down_proj.format.name == "nf4"


@pytest.mark.parametrize("options", [dict(base_dtype="int8"), dict(base_dtype="int4"),
                                     dict(base_dtype="int4", double_quant=True, group_size=32),
                                     dict(base_dtype="int4", quant_format="int4", group_size=32),
                                     dict(base_dtype="int4", quantize_head=True)],
                         ids=["int8", "nf4", "nf4-dq-g32", "int4-g32", "nf4-head"])
def test_the_plan_counts_the_packed_bytes_load_model_holds(llama64_dir, corpus_txt, options):
    from lorakit.adapters.quantize import quantized_bytes
    from lorakit.train.config import TrainConfig
    from lorakit.train.plan import plan_run
    from lorakit.train.precision import quant_spec

    cfg = TrainConfig(model=llama64_dir, data=corpus_txt, task="causal-lm", max_length=32, dry_run=True, **options)
    rows = dict(plan_run(cfg).memory.rows)
    planned = next(b for what, b in rows.items() if what.startswith("frozen linear weights"))
    model = load_model(llama64_dir, "causal-lm", dtype=cfg.base_dtype, quant=quant_spec(cfg)).model
    assert planned == quantized_bytes(model)
    assert isinstance(model.lm_head, QuantizedLinear) == cfg.quantize_head


def test_eval_and_generate_take_a_packed_base(capsys, runs, corpus_txt):
    code, out, err = cli(capsys, "eval", "--adapter", runs / "nf4", "--base-dtype", "int4")
    assert code == 0, err
    code, out, err = cli(capsys, "generate", "--adapter", runs / "int8", "--base-dtype", "int8", "--prompt", "the cat", "--raw",
                         "--max-new-tokens", "3")
    assert code == 0, err


def test_eval_and_generate_load_the_format_the_adapter_trained_on(runs):
    from lorakit.train.apply import load_with_adapter

    loaded, _, _ = load_with_adapter(runs / "int4-g32", base_dtype="int4")
    fmt = loaded.model.model.layers[1].mlp.down_proj.format
    assert (fmt.name, fmt.group_size) == ("int4", 32)
    loaded, _, _ = load_with_adapter(runs / "nf4", base_dtype="int4")
    assert loaded.model.model.layers[1].mlp.down_proj.format.name == "nf4"


def test_resume_with_another_format_is_refused(capsys, runs, llama64_dir, corpus_txt):
    for other in (["--base-dtype", "int4", "--quant-format", "int4", "--group-size", "64"], ["--base-dtype", "int8"]):
        code, _, err = cli(capsys, *train_args(llama64_dir, corpus_txt, runs / "int4-g32", "--resume", *other))
        assert code == 2 and "was written by a different run" in err, err
        assert err.startswith("lorakit: error:") and len(err.strip().splitlines()) == 1
        assert "--group-size" in err or "--base-dtype" in err


@pytest.mark.parametrize("flags, words", [
    (["--base-dtype", "int4", "--shard"], ["--shard", "--base-dtype bf16"]),
    (["--base-dtype", "int4", "--group-size", "64"], ["--group-size 64", "in_features=32", "--base-dtype int8"]),
    (["--base-dtype", "int4", "--group-size", "128", "--model", "LLAMA64"], ["--group-size 128", "use --group-size 32 or 64"]),
    (["--base-dtype", "int4", "--group-size", "48"], ["--group-size"]),
    (["--quant-format", "int4"], ["--base-dtype int4"]),
    (["--base-dtype", "int4", "--quant-format", "int4", "--double-quant"], ["double_quant"]),
    (["--base-dtype", "int8", "--group-size", "32"], ["--group-size", "--base-dtype int4"]),
    (["--group-size", "32"], ["--group-size", "--base-dtype int4"]),
], ids=["shard", "group-size-does-not-divide", "group-size-names-the-fit", "group-size-not-a-choice",
        "format-without-packed-base", "dq-int4", "group-size-with-int8", "group-size-without-packed-base"])
def test_bad_packed_base_options_are_refused_in_one_line(capsys, tmp_path, tiny_llama_dir, llama64_dir, corpus_txt,
                                                         flags, words):
    flags = [llama64_dir if f == "LLAMA64" else f for f in flags]
    code, _, err = cli(capsys, *train_args(tiny_llama_dir, corpus_txt, tmp_path / "run", *flags))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorakit: error:"), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


def test_the_dry_run_plan_counts_packed_bytes(capsys, tmp_path, llama64_dir, corpus_txt):
    frozen = {}
    for dtype in ("fp32", "bf16", "int8", "int4"):
        code, out, err = cli(capsys, *train_args(llama64_dir, corpus_txt, tmp_path / dtype, "--base-dtype", dtype,
                                                 "--dry-run"))
        assert code == 0, err
        rows = [line for line in out.splitlines() if "frozen" in line]
        assert rows, out
        frozen[dtype] = rows
    from lorakit.train.config import TrainConfig
    from lorakit.train.plan import plan_run

    totals = {}
    for dtype in ("fp32", "bf16", "int8", "int4"):
        cfg = TrainConfig(model=llama64_dir, data=corpus_txt, task="causal-lm", base_dtype=dtype, max_length=32,
                          dry_run=True)
        rows = plan_run(cfg).memory.rows
        totals[dtype] = sum(b for what, b in rows if "frozen" in what)
    assert totals["int4"] < totals["int8"] < totals["bf16"] < totals["fp32"]
    assert any("nf4 g64" in line for line in frozen["int4"])


def test_merge_of_an_int4_trained_adapter_writes_the_float_merge(capsys, runs, llama64_dir, tmp_path):
    adapter = runs / "nf4"
    code, _, err = cli(capsys, "merge", "--adapter", adapter, "--model", llama64_dir, "--out", tmp_path / "merged")
    assert code == 0, err
    merged = load_file(next((tmp_path / "merged").glob("*.safetensors")))
    base = load_model(llama64_dir, "causal-lm", dtype="fp32").model
    lorakit.load_adapter(base, adapter)
    lorakit.merge(base)
    expected = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    name = "model.layers.0.self_attn.q_proj.weight"
    assert merged[name].dtype == torch.float32 and not torch.equal(merged[name], load_file(
        next(Path(llama64_dir).glob("*.safetensors")))[name])  # the adapter was merged in, at the float base's dtype
    for key, value in merged.items():
        assert torch.allclose(value.float(), expected[key].float(), atol=1e-6), key
