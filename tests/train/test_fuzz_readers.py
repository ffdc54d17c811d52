"""Fuzzing the readers of user files: random bytes and well-formed but wrong documents give a lorakit error
(or a valid result), never an unhandled exception."""

import json
import os
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.adapters.io import read_config, read_tensors
from lorakit.errors import LorakitError
from lorakit.train.data import load_data, read_rows

# LORAKIT_FUZZ_EXAMPLES=1500 for a longer hunt (passes, 30 s)
FUZZ = settings(max_examples=int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                           | st.text(max_size=12), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
PEFT_KEYS = ["r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora", "modules_to_save",
             "rank_pattern", "alpha_pattern", "task_type", "peft_type", "init_lora_weights", "exclude_modules"]


def refuses_cleanly(call):
    try:
        call()
    except LorakitError as exc:
        assert str(exc)  # a message for the user
    return True


@FUZZ
@given(st.binary(max_size=300))
def test_adapter_config_random_bytes(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("adapter")
    (folder / "adapter_config.json").write_bytes(raw)
    assert refuses_cleanly(lambda: read_config(folder))


@FUZZ
@given(st.dictionaries(st.sampled_from(PEFT_KEYS) | st.text(max_size=8), json_values, max_size=8))
def test_adapter_config_wrong_documents(tmp_path_factory, doc):
    folder = tmp_path_factory.mktemp("adapter")
    (folder / "adapter_config.json").write_text(json.dumps(doc))
    assert refuses_cleanly(lambda: read_config(folder))


@FUZZ
@given(st.binary(max_size=300))
def test_adapter_weights_random_bytes(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("adapter")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q"]}))
    (folder / "adapter_model.safetensors").write_bytes(raw)
    assert refuses_cleanly(lambda: read_tensors(folder))


@FUZZ
@given(st.sampled_from([".csv", ".tsv", ".jsonl", ".txt"]), st.binary(max_size=400))
def test_data_files_random_bytes(tmp_path_factory, suffix, raw):
    path = tmp_path_factory.mktemp("data") / f"data{suffix}"
    path.write_bytes(raw)
    assert refuses_cleanly(lambda: read_rows(path))


cells = st.text(alphabet=string.printable, max_size=15)


@FUZZ
@given(st.lists(st.dictionaries(st.sampled_from(["text", "label", "prompt", "response", "x"]), json_values,
                                max_size=4), max_size=6),
       st.sampled_from(["classify", "causal-lm"]))
def test_jsonl_wrong_documents(tmp_path_factory, minilm_tokenizer, rows, task):
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert refuses_cleanly(lambda: load_data(str(path), task, minilm_tokenizer, 32))


@FUZZ
@given(st.lists(st.lists(cells, min_size=1, max_size=3), max_size=8), st.sampled_from(["classify", "causal-lm"]))
def test_csv_wrong_documents(tmp_path_factory, minilm_tokenizer, rows, task):
    path = tmp_path_factory.mktemp("data") / "data.csv"
    path.write_text("text,label\n" + "\n".join(",".join(r) for r in rows))
    assert refuses_cleanly(lambda: load_data(str(path), task, minilm_tokenizer, 32))
