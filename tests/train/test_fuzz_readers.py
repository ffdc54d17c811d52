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
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
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


turn_values = st.one_of(json_values, st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "model", "",
                                                       "hi", " "]))
turns = st.lists(st.one_of(json_values, st.dictionaries(
    st.sampled_from(["role", "content", "from", "value", "tool_calls", "name", "weight"]), turn_values, max_size=4)),
    max_size=4)


@FUZZ
@given(st.lists(st.dictionaries(st.sampled_from(["messages", "conversations", "prompt", "completion", "system", "text"]),
                                st.one_of(turns, turn_values), min_size=1, max_size=3), min_size=1, max_size=5),
       st.booleans(), st.sampled_from(["assistant", "all"]))
def test_conversation_rows_wrong_documents(tmp_path_factory, smollm2_tokenizer, rows, skip, loss_on):
    """Rows shaped like conversations, right or wrong: a lorakit error, or rows whose labels are their ids or -100."""
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    try:
        ds = load_data(str(path), "causal-lm", smollm2_tokenizer, 64, skip_bad_rows=skip, loss_on=loss_on, split=False)
    except LorakitError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    for row in ds.eval:
        assert all(label in (token, -100) for token, label in zip(row["input_ids"], row["labels"]))
        assert "\ufeff" not in smollm2_tokenizer.decode(row["input_ids"])


# ---------------------------------------------------------------------- adapter_config.json values: types, regexes, nesting
regexish = st.text(alphabet="qkv_proj.*+?()[]{}|\\^$0123456789", max_size=10)
config_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 70) | st.floats(allow_nan=True) | regexish
                             | st.sampled_from(["true", "false", "all-linear", "none", "lora_only", "SEQ_CLS", "gaussian",
                                                "pissa", "LORA", "q_proj", "v_proj"]),
                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(regexish, inner, max_size=3),
                             max_leaves=8)


@FUZZ
@given(st.fixed_dictionaries({"peft_type": st.just("LORA"), "target_modules": config_values},
                             optional={k: config_values for k in [k for k in PEFT_KEYS if k not in ("peft_type", "target_modules")]
                                       + ["fan_in_fan_out", "use_dora",
                                                                              "layers_to_transform", "inference_mode",
                                                                              "base_model_name_or_path"]}))
def test_adapter_config_values_reach_attach_cleanly(tmp_path_factory, doc):
    """Whatever the file holds: a LorakitError, or a config whose fields have their types and that attaches."""
    from conftest import tiny_model

    import lorakit

    folder = tmp_path_factory.mktemp("adapter")
    (folder / "adapter_config.json").write_text(json.dumps(doc))
    try:
        cfg = read_config(folder)
    except LorakitError as exc:
        assert str(exc)
        return
    assert isinstance(cfg.rslora, bool) and isinstance(cfg.r, int) and isinstance(cfg.bias, str)
    assert cfg.base_model is None or isinstance(cfg.base_model, str)
    assert refuses_cleanly(lambda: lorakit.attach(tiny_model("llama"), cfg))


# ---------------------------------------------------------------------- command-line option values
TRAIN_FLAGS = ["--task", "--text-column", "--label-column", "--targets", "--rank", "--rank-pattern", "--alpha", "--layers",
               "--layers-pattern",
               "--dropout", "--init", "--backward", "--keep-ratio", "--refresh-every", "--svd-rank", "--selection",
               "--attention", "--attention-tolerance", "--norm-cap", "--norm-every", "--epochs", "--steps",
               "--batch-size", "--grad-accum", "--lr", "--weight-decay", "--warmup", "--max-grad-norm", "--max-length",
               "--seed", "--eval-every", "--eval-limit", "--save-every", "--log-every", "--max-bad-steps", "--device",
               "--out", "--eval-data", "--data", "--model"]
option_values = st.one_of(st.text(max_size=12), st.integers(-2**70, 2**70).map(str),
                          st.floats(allow_nan=True, allow_infinity=True).map(str),
                          st.sampled_from(["nan", "inf", "-inf", "0", "-1", "1e400", "cuda", "cuda:7", "mps", "meta",
                                           "builtin:hamlet", "builtin:nothing", "a=1,b=x", "q_proj=0.5", "[", ".", "/",
                                           "balanced", "auto", "poly", "..", "/dev/null", "\\x00"]))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(TRAIN_FLAGS), option_values), min_size=1, max_size=3))
def test_train_option_values_give_a_lorakit_error(tmp_path_factory, sentiment_csv, options):
    """Random values for `lorakit train` options, on a model directory that does not exist: every call ends in
    exit status 2 (a lorakit error or argparse's), never in another exception and never by training."""
    import contextlib
    import io

    from lorakit.cli import main

    work = tmp_path_factory.mktemp("cwd")
    argv = ["train", "--model", str(work / "no-model"), "--data", sentiment_csv, "--out", str(work / "out"), "--quiet"]
    for flag, value in options:
        argv += [flag, value] if not value.startswith("-") else [f"{flag}={value}"]
    cwd = os.getcwd()
    os.chdir(work)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code
    finally:
        os.chdir(cwd)
    assert code == 2, (argv, err.getvalue())
    assert err.getvalue().startswith("lorakit: error:"), (argv, err.getvalue())
