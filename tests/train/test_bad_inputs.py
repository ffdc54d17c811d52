"""Bad input gets one `lorakit: error:` line naming the value and the fix, never a traceback, and nothing is
quietly read wrong (issue 15: items 5, 7-10, 13 and the tracebacks it lists)."""

import bz2
import gzip
import json
import os
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli import main
from lorakit.errors import ConfigError, LorakitError
from lorakit.train.data import infer_task, load_data
from conftest import cli, refused


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_bert_dir, sentiment_csv):
    out = tmp_path_factory.mktemp("adapter") / "run"
    assert main(["train", "--model", tiny_bert_dir, "--data", sentiment_csv, "--steps", "2", "--batch-size", "8",
                 "--rank", "4", "--out", str(out), "--quiet"]) == 0
    return out


def copy_adapter(adapter, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter / name, target)
    return target


def edit_config(folder, **changes):
    doc = json.loads((folder / "adapter_config.json").read_text())
    doc.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(doc))


# ---------------------------------------------------------------------- output paths, checked before the model loads
@pytest.mark.parametrize("kind", ["file", "dangling", "loop"])
def test_bad_out_paths_before_anything_loads(capsys, tmp_path, adapter, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("mine")
    elif kind == "dangling":
        os.symlink(tmp_path / "nowhere", out)
    else:
        os.symlink(out, out)
    needle = {"file": "is a file, not a directory", "dangling": "which does not exist", "loop": "symlink loop"}[kind]
    missing = tmp_path / "no-such-model"  # the out is refused first, so the model is never looked at
    refused(capsys, "train", "--model", missing, "--data", "builtin:rotten-tomatoes", "--out", out, needle=needle)
    refused(capsys, "norms", "--model", missing, "--out", out, needle=needle)
    refused(capsys, "merge", "--adapter", adapter, "--model", missing, "--out", out, needle=needle)
    refused(capsys, "rank-advice", "--model", missing, "--data", "x.csv", "--tol", "0.5", "--out", out, needle=needle)
    if kind == "file":
        assert out.read_text() == "mine"


# ---------------------------------------------------------------------- model directories
def test_model_directory_without_tokenizer_files(capsys, tmp_path, tiny_bert_dir, sentiment_csv):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_bert_dir, name), model)
    refused(capsys, "train", "--model", model, "--data", sentiment_csv, "--out", tmp_path / "o",
            needle="has no tokenizer files")


@pytest.fixture
def broken_model(tmp_path, tiny_bert_dir):
    def make(damage):
        model = tmp_path / "model"
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(tiny_bert_dir, model)
        damage(model)
        return model

    return make


def _config(model, change):
    doc = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(change(doc)))


def _pickle_bomb(model):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /tmp/lorakit-pwned",))

    (model / "model.safetensors").unlink()
    with open(model / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"bert.embeddings.word_embeddings.weight": Evil()}, fh)


@pytest.mark.parametrize("damage,needle", [
    (lambda m: _config(m, lambda d: [d]), "could not read the config"),
    (lambda m: _config(m, lambda d: {**d, "hidden_size": "32"}), "hidden_size"),
    (lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:-5000]),
     "the model files are damaged or incomplete"),
    (_pickle_bomb, "could not load"),
])
def test_damaged_model_directories(capsys, broken_model, sentiment_csv, tmp_path, damage, needle):
    model = broken_model(damage)
    refused(capsys, "train", "--model", model, "--data", sentiment_csv, "--out", tmp_path / "o", needle=needle)
    assert not os.path.exists("/tmp/lorakit-pwned")


def test_saved_classifier_with_another_number_of_labels(capsys, tmp_path, tiny_bert_dir, sentiment_csv):
    import transformers as tf

    three = tf.BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    three.save_pretrained(tmp_path / "cls3")
    for name in os.listdir(tiny_bert_dir):
        if "token" in name or name == "vocab.txt":
            shutil.copy(os.path.join(tiny_bert_dir, name), tmp_path / "cls3")
    refused(capsys, "train", "--model", tmp_path / "cls3", "--data", sentiment_csv, "--out", tmp_path / "o",
            needle="classifier head of another size than the 2 labels")


# ---------------------------------------------------------------------- option values
@pytest.mark.parametrize("args,needle", [
    (["--warmup", "inf"], "warmup=inf must be a finite number"),
    (["--weight-decay", "nan"], "weight_decay=nan must be a finite number"),
    (["--seed", str(2**64)], f"argument --seed: {2**64} is not a seed; give an integer from 0 to 2**63 - 1"),
    (["--seed", "-1"], "argument --seed: -1 is not a seed; give an integer from 0 to 2**63 - 1"),
    (["--device", "foo"], "device='foo' is not a device"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "device='cuda"),
    (["--max-length", "100000"], "--max-length 100000 is longer than"),
    (["--rank", "x"], "argument --rank: 'x' is not a positive integer; give 1 or more"),
    (["--rank-pattern", "query=x"], "use name=r,name=r or a JSON file"),
])
def test_bad_option_values(capsys, tiny_bert_dir, sentiment_csv, tmp_path, args, needle):
    refused(capsys, "train", "--model", tiny_bert_dir, "--data", sentiment_csv, "--out", tmp_path / "o", *args,
            needle=needle)
    assert not (tmp_path / "o").exists()


def test_max_length_one_on_a_model_with_bos(capsys, tiny_llama_dir, corpus_txt, tmp_path):
    refused(capsys, "train", "--model", tiny_llama_dir, "--data", corpus_txt, "--max-length", "1", "--out", tmp_path / "o",
            needle="a causal LM needs two or more")


@pytest.mark.parametrize("content,needle", [
    ({"query": 4, "(": 2}, "rank_pattern key '(' is not a valid regex"),
    ("[" * 100000, "cannot read"),
    ({"rank_pattern": [1, 2]}, "expected {module: rank}"),
])
def test_bad_rank_pattern_files(capsys, tiny_bert_dir, sentiment_csv, tmp_path, content, needle):
    path = tmp_path / "advice.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    refused(capsys, "train", "--model", tiny_bert_dir, "--data", sentiment_csv, "--rank-pattern", path,
            "--out", tmp_path / "o", needle=needle)


# ---------------------------------------------------------------------- adapter files
@pytest.mark.parametrize("changes,needle", [
    ({"use_rslora": "false"}, "use_rslora='false' must be true/false"),
    ({"fan_in_fan_out": 1}, "fan_in_fan_out=1 must be true/false"),
    ({"base_model_name_or_path": 123}, "base_model_name_or_path=123 must be a string"),
    ({"exclude_modules": "("}, "exclude='(' is not a valid regex"),
    ({"exclude_modules": 7}, "exclude_modules=7 must be a string or a list of strings"),
    ({"rank_pattern": {"[": 2}}, "rank_pattern key '[' is not a valid regex"),
    ({"alpha_pattern": ["query"]}, "alpha_pattern=['query'] must be an object"),
    ({"target_modules": [1, 2]}, "target_modules=[1, 2] must be a string or a list of strings"),
    ({"lora_dropout": "0.1"}, "lora_dropout='0.1' must be a number, not str"),
])
def test_adapter_config_values_are_type_checked(capsys, adapter, tmp_path, changes, needle):
    folder = copy_adapter(adapter, tmp_path)
    edit_config(folder, **changes)
    for command in (["info", folder], ["eval", "--adapter", folder]):
        refused(capsys, *command, needle=needle)


def test_deeply_nested_adapter_config(capsys, adapter, tmp_path):
    folder = copy_adapter(adapter, tmp_path)
    (folder / "adapter_config.json").write_text("[" * 100000)
    refused(capsys, "info", folder, needle="is not valid JSON")


def test_non_finite_adapter_weights_are_refused_at_load(capsys, adapter, tmp_path, sentiment_csv):
    folder = copy_adapter(adapter, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    save_file(tensors, folder / "adapter_model.safetensors", metadata=meta)
    refused(capsys, "eval", "--adapter", folder, "--data", sentiment_csv, needle="NaN or infinite value(s)")


@pytest.mark.parametrize("meta_change,needle", [
    ({"lorakit_labels": "not json"}, "is not a list of two or more distinct label names"),
    ({"lorakit_labels": json.dumps(["only"])}, "is not a list of two or more distinct label names"),
    ({"lorakit_labels": json.dumps(["a", "b", "c"])}, "has shape"),  # more labels than the saved head
    ({"lorakit_task": "translate"}, "lorakit_task='translate'"),
])
def test_bad_label_metadata(capsys, adapter, tmp_path, sentiment_csv, meta_change, needle):
    folder = copy_adapter(adapter, tmp_path)
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
        meta = dict(fh.metadata())
    meta.update(meta_change)
    save_file(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.safetensors", metadata=meta)
    refused(capsys, "eval", "--adapter", folder, "--data", sentiment_csv, needle=needle)
    code, _, err = cli(capsys, "info", folder)
    assert "Traceback" not in err


@pytest.mark.parametrize("payload,needle", [
    ([1, 2, 3], "holds a list, not a dict of named tensors"),
    ({1: torch.zeros(2)}, "not a dict of named tensors"),
    ("PICKLE", "could not be read as a weights-only torch file"),
])
def test_bad_adapter_model_bin(capsys, adapter, tmp_path, payload, needle):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(adapter / "adapter_config.json", folder)
    if payload == "PICKLE":
        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned > /tmp/lorakit-pwned",))

        with open(folder / "adapter_model.bin", "wb") as fh:
            pickle.dump({"x": Evil()}, fh)
    else:
        torch.save(payload, folder / "adapter_model.bin")
    refused(capsys, "info", folder, needle=needle)
    assert not os.path.exists("/tmp/lorakit-pwned")


def test_info_on_a_zero_dimensional_factor(capsys, adapter, tmp_path):
    folder = copy_adapter(adapter, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.tensor(1.0)
    save_file(tensors, folder / "adapter_model.safetensors")
    refused(capsys, "info", folder, needle="a LoRA factor is a matrix")


def test_a_peft_classifier_adapter_without_task_type_round_trips(make_model, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = make_model("bert-cls")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))  # no task_type
    peft_model.save_pretrained(tmp_path / "peft")
    ours = lorakit.load_adapter(make_model("bert-cls"), tmp_path / "peft")
    lorakit.save_adapter(ours, tmp_path / "again")
    first = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["task_type"] is None and again["modules_to_save"] == first["modules_to_save"]
    PeftModel.from_pretrained(make_model("bert-cls"), tmp_path / "again")  # PEFT loads what we wrote


# ---------------------------------------------------------------------- data files
def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_labels_are_normalised(tmp_path, minilm_tokenizer):
    rows = [{"text": f"row {i}", "label": v} for i, v in enumerate([1, 1.0, "1", " 1 ", 0, "0.0", 0.0] * 3)]
    ds = load_data(str(write_jsonl(tmp_path / "n.jsonl", rows)), "classify", minilm_tokenizer, 16)
    assert ds.label_names == ["0", "1"]
    rows = [{"text": f"row {i}", "label": v} for i, v in enumerate([True, "true", "True", False, "false"] * 3)]
    ds = load_data(str(write_jsonl(tmp_path / "b.jsonl", rows)), "classify", minilm_tokenizer, 16)
    assert ds.label_names == ["false", "true"]


@pytest.mark.parametrize("bad", [{"a": 1}, [1], None, float("nan")])
def test_jsonl_labels_that_are_not_scalars(tmp_path, minilm_tokenizer, bad):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": bad}]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(LorakitError, match=r"row 3"):
        load_data(str(path), "classify", minilm_tokenizer, 16)


def test_task_is_decided_from_every_row(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a"}, {"text": "b", "label": 1}, {"text": "c", "label": 0}])
    with pytest.raises(LorakitError, match="1 of 3 rows|2 of 3 rows have a 'label' field"):
        infer_task(str(path))
    assert infer_task(str(write_jsonl(tmp_path / "lm.jsonl", [{"text": "a"}, {"text": "b"}]))) == "causal-lm"


def test_byte_order_mark_and_long_fields(tmp_path, minilm_tokenizer):
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes(b"\xef\xbb\xbftext,label\n" + b"".join(f"word {i},{i % 2}\n".encode() for i in range(20)))
    assert load_data(str(csv_path), "classify", minilm_tokenizer, 16).label_names == ["0", "1"]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps({"text": f"w {i}", "label": i % 2}).encode() + b"\n"
                                                 for i in range(20)))
    assert infer_task(str(jsonl)) == "classify"
    long = tmp_path / "long.csv"
    long.write_text("text,label\n" + "".join(f"{'word ' * 40000},{i % 2}\n" for i in range(4)))  # 200 KB fields
    assert len(load_data(str(long), "classify", minilm_tokenizer, 16).train) == 3


@pytest.mark.parametrize("suffix,opener", [(".csv.gz", gzip.compress), (".csv.bz2", bz2.compress)])
def test_corrupt_compressed_data(capsys, tmp_path, tiny_bert_dir, suffix, opener):
    raw = opener(b"text,label\n" + b"".join(f"some words {i},{i % 2}\n".encode() for i in range(2000)))
    path = tmp_path / f"data{suffix}"
    path.write_bytes(raw[:40] + bytes(b ^ 0x5A for b in raw[40:400]) + raw[400:])
    refused(capsys, "train", "--model", tiny_bert_dir, "--data", path, "--out", tmp_path / "o",
            needle="could not be read")


# ---------------------------------------------------------------------- --attention auto on sliding-window layers
@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory, minilm_tokenizer):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              max_position_embeddings=256, sliding_window=4, pad_token_id=minilm_tokenizer.pad_token_id,
                              layer_types=["sliding_attention", "full_attention"])
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    tf.Gemma3ForCausalLM(cfg).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


def test_attention_auto_on_gemma3(capsys, tiny_gemma3_dir, corpus_txt, tmp_path):
    code, out, err = cli(capsys, "train", "--model", tiny_gemma3_dir, "--data", corpus_txt, "--steps", "2", "--batch-size",
                         "2", "--max-length", "16", "--attention", "auto", "--out", tmp_path / "o", "--quiet")
    assert code == 0, err
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["config"]["attention"] == "auto" and run["config"]["model"] == str(tiny_gemma3_dir)
    assert (tmp_path / "o" / "adapter_model.safetensors").exists() and "held-out loss:" in out
    code, out, err = cli(capsys, "norms", "--model", tiny_gemma3_dir, "--data", corpus_txt, "--attention", "auto",
                         "--max-length", "16", "--out", tmp_path / "n")
    assert code == 0, err
    assert f"wrote {tmp_path / 'n' / 'norms.json'} and {tmp_path / 'n' / 'norms.png'}" in out
    doc = json.loads((tmp_path / "n" / "norms.json").read_text())
    assert doc and (tmp_path / "n" / "norms.png").stat().st_size > 0


@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_lorakit_attention_keeps_the_sliding_window(tiny_gemma3_dir, mode):
    from transformers import AutoModelForCausalLM

    from lorakit.limits import use_attention

    ref = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, attn_implementation="eager").eval()
    ours = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir).eval()
    use_attention(ours, mode)
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits[0],
                                   ref(input_ids=ids, attention_mask=mask).logits[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits[1, 3:],
                                   ref(input_ids=ids, attention_mask=mask).logits[1, 3:], atol=1e-5, rtol=1e-4)


def test_labels_that_overflow_a_float(tmp_path, minilm_tokenizer):
    rows = [{"text": f"row {i}", "label": v} for i, v in enumerate([10**400, 0, "1e400", 10**400, 0, "1e400"] * 2)]
    ds = load_data(str(write_jsonl(tmp_path / "big.jsonl", rows)), "classify", minilm_tokenizer, 16)
    assert len(ds.label_names) == 3 and "1e400" in ds.label_names


# ---------------------------------------------------------------------- every numeric option, one check (issue 33, item 5)
@pytest.mark.parametrize("args,needle", [
    (["eval", "--adapter", "A", "--batch-size", "-1"], "argument --batch-size: -1 is not a positive integer"),
    (["eval", "--adapter", "A", "--batch-size", "0"], "argument --batch-size: 0 is not a positive integer"),
    (["eval", "--adapter", "A", "--max-length", "0"], "argument --max-length: 0 is not a positive integer"),
    (["eval", "--adapter", "A", "--max-length", "-3"], "argument --max-length: -3 is not a positive integer"),
    (["eval", "--adapter", "A", "--max-length", "1.5"], "argument --max-length: '1.5' is not a positive integer"),
    (["generate", "--adapter", "A", "--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is not"),
    (["generate", "--adapter", "A", "--prompt", "hi", "--temperature", "inf"],
     "argument --temperature: inf is not a finite number >= 0"),
    (["generate", "--adapter", "A", "--prompt", "hi", "--temperature", "nan"], "argument --temperature: nan is not"),
    (["generate", "--adapter", "A", "--prompt", "hi", "--temperature", "-1"], "argument --temperature: -1 is not"),
    (["generate", "--adapter", "A", "--prompt", "hi", "--top-p", "0"], "argument --top-p: 0 is not a number in (0, 1]"),
    (["generate", "--adapter", "A", "--prompt", "hi", "--top-p", "1.5"], "argument --top-p: 1.5 is not a number in (0, 1]"),
    (["generate", "--adapter", "A", "--prompt", "hi", "--top-p", "nan"], "argument --top-p: nan is not"),
    (["generate", "--adapter", "A", "--prompt", "hi", "--seed", "-1"], "argument --seed: -1 is not a seed"),
    (["norms", "--model", "M", "--rows", "0"], "argument --rows: 0 is not a positive integer"),
    (["norms", "--model", "M", "--max-length", "-1"], "argument --max-length: -1 is not a positive integer"),
    (["norms", "--model", "M", "--attention-tolerance", "nan"], "argument --attention-tolerance: nan is not a finite number > 0"),
    (["norms", "--model", "M", "--tolerance", "-1"], "argument --tolerance: -1 is not a finite number > 0"),
    (["rank-advice", "--model", "M", "--data", "x.csv", "--tol", "nan"], "argument --tol: nan is not a number in [0, 1)"),
    (["rank-advice", "--model", "M", "--data", "x.csv", "--tol", "1"], "argument --tol: 1 is not a number in [0, 1)"),
    (["rank-advice", "--model", "M", "--data", "x.csv", "--budget", "0"], "argument --budget: 0 is not a positive integer"),
    (["rank-advice", "--model", "M", "--data", "x.csv", "--tol", "0.5", "--steps", "-1"], "argument --steps: -1 is not"),
    (["rank-advice", "--model", "M", "--data", "x.csv", "--tol", "0.5", "--lr", "inf"], "argument --lr: inf is not"),
    (["reproduce", "celora", "--seeds", "0"], "argument --seeds: 0 is not a positive integer"),
    (["reproduce", "celora", "--rank", "-1"], "argument --rank: -1 is not a positive integer"),
    (["reproduce", "celora", "--eval-limit", "0"], "argument --eval-limit: 0 is not"),
    (["reproduce", "celora", "--minilm-steps", "x"], "argument --minilm-steps: 'x' is not a positive integer"),
    (["reproduce", "norm-speed", "--length", "0"], "argument --length: 0 is not a positive integer"),
    (["reproduce", "norm-speed", "--epochs", "-1"], "argument --epochs: -1 is not a positive integer"),
    (["train", "--nproc", "0"], "argument --nproc: 0 is not a positive integer"),
])
def test_numeric_options_are_checked_at_the_boundary(capsys, tmp_path, args, needle):
    """Refused by argparse before anything is read (A, M and x.csv do not exist)."""
    args = [str(tmp_path / "A") if a == "A" else str(tmp_path / "M") if a == "M" else a for a in args]
    out = ["--out", tmp_path / "o"] if args[0] in ("norms", "rank-advice", "reproduce") else []
    refused(capsys, *args, *out, needle=needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,needle", [
    (["--max-grad-norm", "inf"], "max_grad_norm=inf must be a finite number > 0"),
    (["--max-grad-norm", "0"], "max_grad_norm=0.0 must be a finite number > 0"),
    (["--attention-tolerance", "nan"], "argument --attention-tolerance: nan is not a finite number > 0"),
    (["--attention-tolerance", "-1"], "argument --attention-tolerance: -1 is not a finite number > 0"),
    (["--warmup", "1.5"], "warmup=1.5 is a step count (>= 1) that is not whole"),
])
def test_train_numbers_that_were_accepted(capsys, tiny_bert_dir, sentiment_csv, tmp_path, args, needle):
    refused(capsys, "train", "--model", tiny_bert_dir, "--data", sentiment_csv, "--out", tmp_path / "o", *args,
            needle=needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("changes,needle", [
    ({"lr": float("inf")}, "--lr inf must be a finite number > 0"),
    ({"lr": 0.0}, "--lr 0.0 must be a finite number > 0"),
    ({"seed": -1}, "--seed -1 must be an integer from 0 to 2**63 - 1"),
    ({"warmup": -1}, "warmup=-1 must be an integer >= 0"),
    ({"quality_steps": 1.5}, "quality_steps=1.5 must be an integer >= 0"),
])
def test_bench_numbers_are_validated(changes, needle):
    pytest.importorskip("peft")
    from lorakit.bench.versus_peft import BenchConfig, BenchError

    with pytest.raises(BenchError) as info:
        BenchConfig(**changes).validate()
    assert needle in str(info.value)


@pytest.mark.parametrize("lora,needle", [({"alpha": float("nan")}, "alpha=nan must be a positive number"),
                                         ({"r": 0}, "r=0 must be a positive integer")])
def test_bench_adapter_numbers_are_validated_by_the_lora_config(lora, needle):
    """bench's adapter is a LoraConfig (its declarations and checks): a bad rank or alpha is refused there."""
    from lorakit.adapters import LoraConfig

    with pytest.raises(ConfigError, match=re.escape(needle)):
        LoraConfig(**lora)


# ---------------------------------------------------------------------- lorakit eval (issue 33, items 5 and 9)
@pytest.fixture(scope="module")
def lm_adapter(tmp_path_factory, tiny_llama_dir, corpus_txt):
    out = tmp_path_factory.mktemp("lm-adapter") / "run"
    assert main(["train", "--model", tiny_llama_dir, "--data", corpus_txt, "--steps", "1", "--batch-size", "4",
                 "--max-length", "32", "--rank", "2", "--out", str(out), "--quiet"]) == 0
    return out


def copy_run(adapter, tmp_path, run_json=None):
    """A copy of the adapter files with ``run_json`` (bytes, or a document) as its run.json (none: no run.json)."""
    folder = copy_adapter(adapter, tmp_path)
    if run_json is not None:
        (folder / "run.json").write_bytes(run_json if isinstance(run_json, bytes) else json.dumps(run_json).encode())
    return folder


def with_config(**changes):
    def make(adapter):
        doc = json.loads((adapter / "run.json").read_text())
        doc["config"].update(changes)
        return doc

    return make


@pytest.mark.parametrize("damage,needle", [
    (b'{"config": ', "run.json could not be read (JSONDecodeError"),
    (b'\xff\xfe{"config": {}}', "run.json could not be read (UnicodeDecodeError"),
    ([1, 2], 'run.json holds no "config" object'),
    ({"config": "x"}, 'run.json holds no "config" object'),
    (with_config(max_length="x"), "config.max_length='x' must be a positive integer"),
    (with_config(max_length=-2), "config.max_length=-2 must be a positive integer"),
    (with_config(data=5), "config.data=5 must be a string"),
    (with_config(text_column=["t"]), "config.text_column=['t'] must be a string"),
    (with_config(skip_bad_rows="yes"), "config.skip_bad_rows='yes' must be true/false"),
])
def test_eval_refuses_a_damaged_run_json(capsys, lm_adapter, tmp_path, damage, needle):
    """A run.json that does not parse no longer falls back to builtin:hamlet, and wrong types are no tracebacks."""
    folder = copy_run(lm_adapter, tmp_path, damage(lm_adapter) if callable(damage) else damage)
    err = refused(capsys, "eval", "--adapter", folder, needle=needle)
    assert str(folder / "run.json") in err and "--data FILE" in err


def test_eval_with_a_good_run_json_and_without_one(capsys, lm_adapter, tmp_path, corpus_txt):
    code, out, err = cli(capsys, "eval", "--adapter", lm_adapter, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["data"] == corpus_txt and res["rows"] > 0 and res["eval_loss"] > 1  # the training's held-out rows
    folder = copy_run(lm_adapter, tmp_path)  # no run.json: the built-in set of the task
    code, out, err = cli(capsys, "eval", "--adapter", folder, "--json")
    assert code == 0 and json.loads(out)["data"] == "builtin:hamlet", err


@pytest.mark.parametrize("args,needle", [
    (["--labels", "neg,pos"], "--labels neg,pos: label names are a classifier's, and "),
    (["--labels", "a,b,c"], "is a causal-lm adapter; drop --labels"),
    (["--label-column", "y"], "--label-column y: "),
    (["--max-length", "100000"], "--max-length 100000 is longer than"),
])
def test_eval_options_without_effect_on_a_causal_lm(capsys, lm_adapter, args, needle):
    refused(capsys, "eval", "--adapter", lm_adapter, *args, needle=needle)


def test_eval_library_checks_its_numbers(adapter):
    from lorakit.errors import ConfigError
    from lorakit.train.apply import evaluate_adapter

    for kw, needle in (({"batch_size": -1}, "batch_size=-1"), ({"batch_size": 0}, "batch_size=0"),
                       ({"max_length": 0}, "max_length=0"), ({"max_length": -3}, "max_length=-3")):
        with pytest.raises(ConfigError, match=needle):
            evaluate_adapter(str(adapter), **kw)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, tiny_bert_dir, sentiment_csv):
    """A run with checkpoints (where the training rows' fingerprint is recorded) on its own copy of the data."""
    root = tmp_path_factory.mktemp("checkpointed")
    data = root / "data.csv"
    shutil.copy(sentiment_csv, data)
    out = root / "run"
    assert main(["train", "--model", tiny_bert_dir, "--data", str(data), "--steps", "2", "--batch-size", "8",
                 "--rank", "2", "--save-every", "1", "--out", str(out), "--quiet"]) == 0
    return out, data


@pytest.mark.parametrize("edit", ["drop a row", "change a label", "append rows", "shuffle"])
def test_eval_refuses_a_data_file_edited_after_training(capsys, checkpointed, tmp_path, edit):
    out, data = checkpointed
    original = data.read_text()
    lines = original.splitlines(keepends=True)
    try:
        code, res, err = cli(capsys, "eval", "--adapter", out, "--json")
        assert code == 0, err
        before = json.loads(res)
        code, res, err = cli(capsys, "eval", "--adapter", out, "--json", "--max-length", "16")  # other options: same rows
        assert code == 0 and json.loads(res)["rows"] == before["rows"], err
        if edit == "drop a row":
            lines.pop(7)
        elif edit == "change a label":
            lines[3] = lines[3].replace(",neg", ",pos") if ",neg" in lines[3] else lines[3].replace(",pos", ",neg")
        elif edit == "append rows":
            lines += ["one more great film,pos\n"] * 3
        else:
            lines = lines[:1] + lines[1:][::-1]
        data.write_text("".join(lines))
        err = refused(capsys, "eval", "--adapter", out, needle=f"{data} has changed since {out} was trained on it")
        assert "--data FILE" in err
        code, res, err = cli(capsys, "eval", "--adapter", out, "--data", data, "--json")  # a file given is evaluated whole
        assert code == 0 and json.loads(res)["rows"] == len(lines) - 1, err
    finally:
        data.write_text(original)


def test_eval_reads_the_fingerprint_from_run_json(capsys, checkpointed, tmp_path):
    """run.json's "fingerprint" (when the trainer writes it) is used without any checkpoint."""
    out, data = checkpointed
    from lorakit.train import checkpoint as ckpt

    state = ckpt.load_state(ckpt.latest(out / "checkpoints").path)
    doc = json.loads((out / "run.json").read_text())
    doc["fingerprint"] = dict(state["fingerprint"])
    folder = copy_run(out, tmp_path, doc)
    code, _, err = cli(capsys, "eval", "--adapter", folder)
    assert code == 0, err
    doc["fingerprint"]["data"] = "0" * 64
    (folder / "run.json").write_text(json.dumps(doc))
    refused(capsys, "eval", "--adapter", folder, needle="has changed since")


def test_a_short_run_without_checkpoints_still_catches_edited_data(capsys, tiny_bert_dir, tmp_path):
    """The trainer writes the data fingerprint into run.json, so a run shorter than --save-every is checked too."""
    data = tmp_path / "s.csv"
    data.write_text("text,label\n" + "".join(f"row number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40)))
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_bert_dir, "--data", str(data), "--steps", "1", "--batch-size", "8", "--rank",
                 "2", "--out", str(out), "--quiet"]) == 0
    assert not (out / "checkpoints").exists() and "data" in json.loads((out / "run.json").read_text())["fingerprint"]
    data.write_text(data.read_text().replace(",neg", ",pos", 3))
    refused(capsys, "eval", "--adapter", out, needle="has changed since")


def test_a_missing_recorded_base_says_where_it_was_recorded(capsys, lm_adapter, tmp_path):
    for command in (["eval"], ["generate", "--prompt", "hi"], ["merge", "--out", tmp_path / "merged"]):
        (tmp_path / command[0]).mkdir()
        folder = copy_adapter(lm_adapter, tmp_path / command[0])
        edit_config(folder, base_model_name_or_path=str(tmp_path / "gone" / "model.gguf"))
        err = refused(capsys, *command[:1], "--adapter", folder, *command[1:], needle="adapter_config.json")
        assert "pass --model" in err and "gone" in err
    assert not (tmp_path / "merged").exists()


def test_info_on_a_file_says_it_is_a_file(capsys, lm_adapter):
    refused(capsys, "info", lm_adapter / "run.json", needle="is a file, not an adapter directory")


def test_reproduce_refuses_an_out_that_is_a_file_before_running(capsys, tmp_path):
    (tmp_path / "f.txt").write_text("mine")
    refused(capsys, "reproduce", "phase-transition", "--quick", "--out", tmp_path / "f.txt", needle="is a file")
    assert (tmp_path / "f.txt").read_text() == "mine"


def test_norms_of_a_classifier_adapter_measure_on_its_training_rows(capsys, adapter):
    code, out, err = cli(capsys, "norms", "--adapter", adapter, "--rows", "2", "--out", adapter.parent / "norms")
    assert code == 0, err  # before: the built-in sentiment set, whose labels the adapter was not trained on
    assert (adapter.parent / "norms" / "norms.json").is_file()


@pytest.mark.parametrize("name", ["half", "forward", "train", "to"])
def test_adapter_names_that_shadow_module_attributes_are_refused(make_model, name):
    from lorakit.errors import ConfigError

    m = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=4))
    with pytest.raises(ConfigError, match=f"adapter name '{name}' is the name of a torch.nn.Module attribute"):
        lorakit.attach(m, lorakit.LoraConfig(r=4), name=name)
    assert lorakit.adapter_names(m) == ["default"]


def test_adapter_names_per_row_must_be_a_list(make_model, token_batch):
    from lorakit.errors import ConfigError

    m = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=4))
    lorakit.attach(m, lorakit.LoraConfig(r=4), name="b")
    with pytest.raises(ConfigError, match="adapter_names='b' must be a list with one adapter name"):
        ids, mask = token_batch()
        m(input_ids=ids, attention_mask=mask, adapter_names="b")
