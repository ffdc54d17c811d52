"""Chat data: the loss mask covers exactly the assistant tokens of the template; row shapes; errors."""

import copy
import json

import pytest

from conftest import CHAT_DATA, GEMMA3_TEMPLATE
from lorakit.errors import DataError
from lorakit.train import chat as C
from lorakit.train import data as D

CONVERSATION = {"system": "Be brief.", "messages": [
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "2 plus 2 is 4."},
    {"role": "user", "content": "And the opposite of hot?"},
    {"role": "assistant", "content": "The opposite of \"hot\" is \"cold\"."},
]}


def trained_runs(row):
    """The runs of consecutive trained tokens, as token id lists."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.fixture
def gemma3_tokenizer(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = C.read_chat_template(GEMMA3_TEMPLATE)
    return tok


@pytest.mark.parametrize("template,end", [("smollm2", "<|im_end|>"), ("gemma3", "<end_of_turn>")])
def test_mask_is_exactly_the_assistant_turns(template, end, smollm2_tokenizer, gemma3_tokenizer):
    tok = smollm2_tokenizer if template == "smollm2" else gemma3_tokenizer
    out = C.chat_rows(tok, [CONVERSATION], 512)
    (row,) = out.rows
    messages = [{"role": "system", "content": "Be brief."}] + CONVERSATION["messages"]
    # the tokens are exactly the template's, tokenised whole
    assert row["input_ids"] == list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    runs = trained_runs(row)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [reply + end for reply in replies]
    # nothing else is trained: the untrained tokens hold the system and user turns and the template's markers
    untrained = tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label == -100])
    assert "Be brief." in untrained and "What is 2 plus 2?" in untrained
    assert all(reply not in untrained for reply in replies)


def test_gemma3_template_renders_as_gemma_does(gemma3_tokenizer):
    text = C.render(gemma3_tokenizer, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                       {"role": "assistant", "content": " A "}])
    assert text == f"{gemma3_tokenizer.bos_token}<start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"


def test_prompt_completion_trains_the_completion_only(smollm2_tokenizer):
    row = {"prompt": [{"role": "user", "content": "Name a colour."}], "completion": [{"role": "assistant", "content": "Blue."}]}
    (out,) = C.chat_rows(smollm2_tokenizer, [row], 256).rows
    assert [smollm2_tokenizer.decode(r) for r in trained_runs(out)] == ["Blue.<|im_end|>"]


def test_loss_on_all_trains_every_token(smollm2_tokenizer):
    (row,) = C.chat_rows(smollm2_tokenizer, [CONVERSATION], 512, loss_on="all").rows
    assert row["labels"] == row["input_ids"]


def test_long_conversations_are_cut_or_dropped_and_counted(tmp_path, smollm2_tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 50}]}
    out = C.chat_rows(smollm2_tokenizer, [long_prompt, short], 40)
    assert out.dropped == 1 and out.cut == 1 and len(out.rows) == 1 and len(out.rows[0]["input_ids"]) == 40
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [long_prompt] + [short] * 30))
    ds = D.load_data(str(path), "causal-lm", smollm2_tokenizer, 40)
    assert any("dropped 1 conversation" in n and "--max-length" in n for n in ds.notes)
    assert ds.conversations


def test_no_chat_template_names_the_fix(tmp_path, smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n")
    with pytest.raises(DataError, match="no chat template.*--chat-template FILE"):
        D.load_data(str(path), "causal-lm", tok, 128)
    ds = D.load_data(str(path), "causal-lm", tok, 128, chat_template=C.read_chat_template(GEMMA3_TEMPLATE), split=False)
    assert len(ds.eval) == 1


@pytest.mark.parametrize("row,match", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "content int"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"system": "s", "messages": [{"role": "system", "content": "t"}, {"role": "assistant", "content": "a"}]}, "keep one"),
])
def test_bad_conversations_name_the_row(row, match, smollm2_tokenizer):
    with pytest.raises(DataError, match=match) as err:
        C.chat_rows(smollm2_tokenizer, [CONVERSATION, row], 128, source="f.jsonl")
    assert "f.jsonl, row 2" in str(err.value)


def test_template_that_refuses_a_conversation_is_one_line(gemma3_tokenizer):
    two_users = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                              {"role": "assistant", "content": "c"}]}
    with pytest.raises(DataError, match="the chat template refused this conversation.*alternate"):
        C.chat_rows(gemma3_tokenizer, [two_users], 128)


def test_bad_template_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        C.read_chat_template(tmp_path / "none.jinja")
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(DataError, match="holds no Jinja"):
        C.read_chat_template(tmp_path / "t.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert C.read_chat_template(tmp_path / "tokenizer_config.json") == "{{ messages }}"


def test_parquet_rows_equal_jsonl_rows(tmp_path, smollm2_tokenizer):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [json.loads(line) for line in CHAT_DATA.read_text().splitlines()[:40]]
    rows = [{"messages": r["messages"]} for r in rows]  # one schema for every row
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    a = D.load_data(str(tmp_path / "c.jsonl"), "causal-lm", smollm2_tokenizer, 128, split=False)
    b = D.load_data(str(tmp_path / "c.parquet"), "causal-lm", smollm2_tokenizer, 128, split=False)
    assert a.eval == b.eval and len(a.eval) == 40
    assert D.infer_task(str(tmp_path / "c.parquet")) == "causal-lm"


def test_trl_string_prompt_completion_rows(tmp_path, smollm2_tokenizer):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "Q: 2+2?", "completion": " 4"}) + "\n")
    (row,) = D.load_data(str(path), "causal-lm", smollm2_tokenizer, 64, split=False).eval
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert smollm2_tokenizer.decode(trained) == " 4" + smollm2_tokenizer.eos_token
    (row,) = D.load_data(str(path), "causal-lm", smollm2_tokenizer, 64, split=False, loss_on="all").eval
    assert row["labels"] == row["input_ids"]


def test_shipped_chat_data_reads(smollm2_tokenizer):
    ds = D.load_data(str(CHAT_DATA), "causal-lm", smollm2_tokenizer, 256)
    assert len(ds.train) + len(ds.eval) == 320 and ds.conversations
    assert C.end_of_turn_ids(smollm2_tokenizer) == [smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_smollm2_packed_and_padded_chat_losses_agree(smollm2_tokenizer):
    import torch

    from lorakit.train.models import load_model
    from lorakit.train.packing import pack_rows, packing_is_exact

    rows = D.load_data(str(CHAT_DATA), "causal-lm", smollm2_tokenizer, 256, split=False).eval[:12]
    model = load_model("builtin:smollm2", "causal-lm", tokenizer=smollm2_tokenizer).model
    assert packing_is_exact(model, rows)
    with torch.no_grad():
        padded = model(**D.collate(rows, smollm2_tokenizer.pad_token_id), use_cache=False).loss
        packed = model(**D.collate(pack_rows(rows, 256), smollm2_tokenizer.pad_token_id), use_cache=False).loss
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)


def test_chat_fine_tune_lowers_the_assistant_loss_and_keeps_the_template(tmp_path, capsys):
    from lorakit import cli

    out = tmp_path / "chat"
    code = cli.main(["train", "--model", "builtin:smollm2", "--data", str(CHAT_DATA), "--steps", "4", "--batch-size", "2",
                     "--max-length", "128", "--lr", "2e-3", "--targets", "all-linear", "--eval-limit", "8",
                     "--out", str(out)])
    assert code == 0
    said = capsys.readouterr().out
    assert "note: packing: 288 rows in" in said
    report = json.loads((out / "run.json").read_text())
    before, after = report["result"]["before"]["eval_loss"], report["result"]["after"]["eval_loss"]
    assert after < before - 0.05, (before, after)
    assert (out / "chat_template.jinja").read_text().startswith("{% for message in messages %}")
    code = cli.main(["generate", "--adapter", str(out), "--prompt", "What is 3 plus 4?", "--max-new-tokens", "8"])
    assert code == 0 and capsys.readouterr().out.strip()


def test_a_chat_template_for_text_data_is_reported_unused(tiny_llama_dir, corpus_txt):
    from lorakit.train.trainer import TrainConfig, prepare

    _, data = prepare(TrainConfig(model=tiny_llama_dir, data=corpus_txt, chat_template=str(GEMMA3_TEMPLATE)))
    assert any("--chat-template" in n and "is not used" in n for n in data.notes) and not data.conversations
