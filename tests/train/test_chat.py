"""Chat data: the loss mask covers exactly the assistant tokens of the template; row shapes; errors."""

import copy
import json

import pytest

from conftest import CHAT_DATA, GEMMA3_TEMPLATE, refused
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
    from lorakit.train import TrainConfig
    from lorakit.train.job import prepare

    _, data = prepare(TrainConfig(model=tiny_llama_dir, data=corpus_txt, chat_template=str(GEMMA3_TEMPLATE)))
    assert any("--chat-template" in n and "is not used" in n for n in data.notes) and not data.conversations


# ---------------------------------------------------------------------- issue 33: nothing lost, nothing silently wrong
def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def turns(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


CHATML_WITH_HEADER = ("{{ bos_token }}SYSTEM: be kind\n{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template", ["smollm2", "header"])
@pytest.mark.parametrize("messages", [
    turns(("assistant", "Hello"), ("user", "hi"), ("assistant", "Bye")),
    turns(("assistant", "Hello")),
    turns(("assistant", "Hello"), ("assistant", "Bye")),
])
def test_a_first_assistant_turn_trains_only_its_own_text(template, messages, smollm2_tokenizer):
    """The template's injected system prompt and role header before a conversation's first turn are not trained."""
    tok = copy.deepcopy(smollm2_tokenizer)
    if template == "header":
        tok.chat_template = CHATML_WITH_HEADER
    for row, conversation in (({"messages": messages}, messages), ({"prompt": [], "completion": messages[:1]}, messages[:1])):
        (out,) = C.chat_rows(tok, [row], 256).rows
        assert [tok.decode(r) for r in trained_runs(out)] == [m["content"] + "<|im_end|>" for m in conversation
                                                              if m["role"] == "assistant"]
        untrained = tok.decode([t for t, label in zip(out["input_ids"], out["labels"]) if label == -100])
        assert ("You are a helpful AI assistant" if template == "smollm2" else "SYSTEM: be kind") in untrained


@pytest.mark.parametrize("row", [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2 plus 2?"},
                       {"from": "gpt", "value": "2 plus 2 is 4."}, {"from": "user", "value": "And the opposite of hot?"},
                       {"from": "assistant", "value": "The opposite of \"hot\" is \"cold\"."}]},
    {"system": "Be brief.", "conversations": [{"from": "human", "value": "What is 2 plus 2?"},
                                              {"from": "model", "value": "2 plus 2 is 4."},
                                              {"from": "human", "value": "And the opposite of hot?"},
                                              {"from": "gpt", "value": "The opposite of \"hot\" is \"cold\"."}]},
    {"messages": [{"from": "system", "value": "Be brief."}] + [{"from": {"user": "human", "assistant": "gpt"}[m["role"]],
                                                                "value": m["content"]} for m in CONVERSATION["messages"]]},
])
def test_sharegpt_rows_are_read_as_conversations(row, tmp_path, smollm2_tokenizer):
    expected = C.chat_rows(smollm2_tokenizer, [CONVERSATION], 512).rows
    assert C.is_chat_row(row)
    assert C.chat_rows(smollm2_tokenizer, [row], 512).rows == expected
    path = write_rows(tmp_path / "sharegpt.jsonl", [row, row])  # --text-column is not asked: the rows are conversations
    ds = D.load_data(path, "causal-lm", smollm2_tokenizer, 512, text_column="conversations", split=False)
    assert ds.conversations and ds.eval == expected * 2


@pytest.mark.parametrize("row,match", [
    ({"prompt": "Name a colour.", "completion": turns(("assistant", "Blue."))},
     "\"prompt\" is \"Name a colour.\" and \"completion\" [{"),
    ({"prompt": turns(("user", "Name a colour.")), "completion": "Blue."}, "prompt/completion rows hold two strings, or two lists"),
    ({"prompt": {"q": "Name a colour."}, "response": "Blue."}, "'prompt' is a dict ({\"q\": \"Name a colour.\"}); it must be a string"),
    ({"prompt": "Name a colour.", "response": ["Blue."]}, "'response' is a list ([\"Blue.\"]); it must be a string"),
    ({"prompt": "Name a colour.", "completion": 7}, "'completion' is a int (7); it must be a string"),
    ({"messages": [{"role": "user", "content": ["Name", "a colour"]}, {"role": "assistant", "content": "Blue."}]},
     "turn 1 has content list ([\"Name\", \"a colour\"]); a turn's content must be a string"),
    ({"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}, {"role": "assistant", "content": "Blue."}]},
     "turn 1 has content dict"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "Blue."}]}, "turn 1 has value int (3)"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "text": "Blue."}]}, "turn 2 has no \"value\""),
    ({"conversations": "human: hi"}, "\"conversations\" must be a non-empty list of turns"),
    ({"messages": [["user", "hi"], ["assistant", "Blue."]]}, "turn 1 is [\"user\", \"hi\"]; each turn must be an object"),
    ({"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "Blue."}]}, "turn 1 has role 'robot'"),
    ({"messages": turns(("user", "hi"), ("assistant", "Blue.")), "conversations": turns(("user", "hi"))}, "keep one"),
])
def test_values_of_the_wrong_shape_are_refused_not_trained_as_repr(row, match, tmp_path, smollm2_tokenizer):
    first = (CONVERSATION if C.is_chat_row(row) else
             {"prompt": "Q?", "response" if "response" in row else "completion": "A."})
    path = write_rows(tmp_path / "d.jsonl", [first, row])
    with pytest.raises(DataError) as err:
        D.load_data(path, "causal-lm", smollm2_tokenizer, 128)
    assert f"d.jsonl, row 2" in str(err.value) and match in str(err.value), str(err.value)


@pytest.mark.parametrize("task,row,column", [
    ("causal-lm", {"text": ["a", "b"]}, "text"),
    ("causal-lm", {"text": {"a": 1}}, "text"),
    ("causal-lm", {"text": 12}, "text"),
    ("classify", {"text": ["good", "film"], "label": 1}, "text"),
    ("classify", {"text": {"t": "x"}, "label": 0}, "text"),
])
def test_a_text_that_is_not_a_string_is_refused(task, row, column, tmp_path, smollm2_tokenizer):
    good = {"text": "a fine film", "label": 1} if task == "classify" else {"text": "a fine film"}
    other = dict(good, label=0) if task == "classify" else good
    path = write_rows(tmp_path / "d.jsonl", [good, other, row])
    with pytest.raises(DataError, match=rf"d.jsonl, row 3: '{column}' is a {type(row[column]).__name__} .*must be a "
                                        "string.*--skip-bad-rows"):
        D.load_data(path, task, smollm2_tokenizer, 64)
    ds = D.load_data(path, task, smollm2_tokenizer, 64, skip_bad_rows=True, split=False)
    assert ds.bad_rows == 1 and len(ds.eval) == 2 and "skipped 1 malformed" in ds.notes[0]


@pytest.mark.parametrize("turn,match", [
    ({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]},
     "turn 2 has \"tool_calls\": tool-call turns are not supported"),
    ({"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
     "turn 2 has \"function_call\": tool-call turns are not supported"),
    ({"role": "assistant", "content": "Blue.", "name": "bot"}, "turn 2 has \"name\""),
    ({"role": "assistant", "content": "Blue.", "reasoning_content": "Think."}, "turn 2 has \"reasoning_content\""),
    ({"role": "assistant", "content": "Blue.", "weight": 0}, "turn 2 has \"weight\""),
    ({"role": "assistant", "content": ""}, "turn 2 is an assistant turn with empty content"),
    ({"role": "assistant", "content": "  \n"}, "turn 2 is an assistant turn with empty content"),
    ({"from": "gpt", "value": ""}, "turn 2 is an assistant turn with empty value"),
    ({"role": "assistant", "content": None}, "turn 2 has content null"),
    ({"role": "assistant"}, "turn 2 has no \"content\""),
])
def test_turns_with_tool_calls_or_no_reply_are_refused(turn, match, smollm2_tokenizer):
    row = {"messages": [{"role": "user", "content": "Name a colour."}, turn]}
    with pytest.raises(DataError) as err:
        C.chat_rows(smollm2_tokenizer, [CONVERSATION, row], 128, source="f.jsonl")
    assert "f.jsonl, row 2: " in str(err.value) and match in str(err.value), str(err.value)
    assert C.chat_rows(smollm2_tokenizer, [CONVERSATION, row], 128, skip_bad_rows=True).bad == 1


def test_harmless_turn_fields_are_accepted(smollm2_tokenizer):
    row = {"messages": [{"role": "user", "content": "hi", "name": None, "tool_calls": None, "weight": None},
                        {"role": "assistant", "content": "Blue.", "tool_calls": [], "weight": 1}]}
    plain = {"messages": turns(("user", "hi"), ("assistant", "Blue."))}
    assert C.chat_rows(smollm2_tokenizer, [row], 64).rows == C.chat_rows(smollm2_tokenizer, [plain], 64).rows


@pytest.mark.parametrize("completion", [
    turns(("user", "Blue.")),
    turns(("assistant", "Blue."), ("user", "Thanks.")),
    turns(("system", "Be brief.")),
])
def test_a_completion_must_be_assistant_turns(completion, smollm2_tokenizer):
    row = {"prompt": turns(("user", "Name a colour.")), "completion": completion}
    with pytest.raises(DataError, match=r"row 1: completion turn \d has role '(user|system)'; the completion must be "
                                        "assistant turns"):
        C.chat_rows(smollm2_tokenizer, [row], 128)


@pytest.mark.parametrize("name", ["t.jinja", "tokenizer_config.json"])
def test_a_template_file_with_a_byte_order_mark(name, tmp_path, smollm2_tokenizer):
    prefix = b"\xef\xbb\xbf"
    text = GEMMA3_TEMPLATE.read_text()
    body = json.dumps({"chat_template": text}).encode() if name.endswith(".json") else text.encode()
    (tmp_path / name).write_bytes(prefix + body)
    template = C.read_chat_template(tmp_path / name)
    assert template == text and "\ufeff" not in template
    tok = copy.deepcopy(smollm2_tokenizer)
    C.use_chat_template(tok, "\ufeff" + template)
    (row,) = C.chat_rows(tok, [CONVERSATION], 256).rows
    assert "\ufeff" not in tok.decode(row["input_ids"]) and "\ufeff" not in tok.chat_template


@pytest.mark.parametrize("content,needle", [
    (b"\xff\xfe{\x00{\x00", "is not UTF-8 text (byte 0 is b'\\xff'); save it as UTF-8"),
    (b"{{ bos_token }}\xe9{{ messages }}", "is not UTF-8 text (byte 15"),
    (b"{% for m in messages %}{{ m.content }}", "Jinja syntax error on line 1"),
    (b"{{ messages[0].content }\n", "Jinja syntax error on line 1"),
    (b"{% for m in messages %}\n{{ m.content | no_such_filter }}{% endfor %}", "Jinja syntax error on line 2"),
    (b"", "is empty; give a Jinja chat template"),
    (b"  \n\n", "is empty; give a Jinja chat template"),
    (b"\xef\xbb\xbf", "is empty; give a Jinja chat template"),
    (None, "is a directory; give the template file"),
])
def test_bad_template_files_are_one_error_line(content, needle, tmp_path, capsys, tiny_chat_llama_dir):
    path = tmp_path / "t.jinja"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match="--chat-template .*t.jinja") as err:
        C.read_chat_template(path)
    assert needle in str(err.value)
    refused(capsys, "train", "--model", tiny_chat_llama_dir, "--data", CHAT_DATA, "--chat-template", path,
            "--out", tmp_path / "out", needle=needle)


def test_named_templates_in_a_tokenizer_config(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "{{ tools }}"},
                                                  {"name": "default", "template": "{{ messages }}"}]}))
    assert C.read_chat_template(path) == "{{ messages }}"


@pytest.mark.parametrize("template,turn", [
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n<|im_end|>\n{% endfor %}", "turn 1"),
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'user' %}{{ m.content }}{% endif %}<|im_end|>\n"
     "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "turn 2"),
    ("{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}<|im_end|>\n{% endif %}"
     "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "turn 1"),
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.contents }}<|im_end|>\n{% endfor %}", "turn 1"),
])
@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_a_template_that_does_not_render_content_is_refused(template, turn, loss_on, tmp_path, smollm2_tokenizer):
    path = write_rows(tmp_path / "c.jsonl", [{"messages": turns(("user", "Name a colour."), ("assistant", "Blue."))}] * 3)
    tok = copy.deepcopy(smollm2_tokenizer)
    with pytest.raises(DataError, match=rf"c.jsonl, row 1: the --chat-template file does not write {turn}'s content"):
        D.load_data(path, "causal-lm", tok, 128, chat_template=template, loss_on=loss_on)


@pytest.mark.parametrize("template,row,said", [
    ("{% if messages[0].role == 'system' %}{{ raise_exception('System turns are not supported here.') }}{% endif %}"
     "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
     {"system": "Be brief.", "messages": turns(("user", "hi"), ("assistant", "Blue."))},
     "TemplateError: System turns are not supported here."),
    (GEMMA3_TEMPLATE.read_text(), {"messages": turns(("user", "a"), ("user", "b"), ("assistant", "c"))},
     "TemplateError: Conversation roles must alternate user/assistant/user/assistant/..."),
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'tool' %}{{ m.tool_call_id.upper() }}{% endif %}"
     "{{ m.content }}<|im_end|>\n{% endfor %}",
     {"messages": turns(("user", "hi"), ("tool", "42"), ("assistant", "Blue."))},
     "UndefinedError: 'dict object' has no attribute 'tool_call_id'"),
])
def test_a_template_that_raises_on_a_row_is_one_line_with_the_row(template, row, said, tmp_path, capsys,
                                                                  tiny_chat_llama_dir):
    (tmp_path / "t.jinja").write_text(template)
    data = write_rows(tmp_path / "c.jsonl", [{"messages": turns(("user", "hi"), ("assistant", "Blue."))}, row])
    err = refused(capsys, "train", "--model", tiny_chat_llama_dir, "--data", data, "--chat-template",
                  tmp_path / "t.jinja", "--out", tmp_path / "out", needle="c.jsonl, row 2: the chat template refused")
    assert said in err
    from lorakit.train.models import load_tokenizer

    ds = D.load_data(data, "causal-lm", load_tokenizer(tiny_chat_llama_dir), 128, chat_template=template,
                     skip_bad_rows=True, split=False)
    assert ds.bad_rows == 1 and len(ds.eval) == 1 and "skipped 1 malformed" in ds.notes[0]


CHAT_ROW = {"messages": turns(("user", "Name a colour."), ("assistant", "Blue."))}


@pytest.mark.parametrize("rows,kind,first", [
    ([CHAT_ROW, {"text": "plain text"}], "a text row", "conversation"),
    ([CHAT_ROW, CHAT_ROW, {"prompt": "Q?", "response": "A."}], "a prompt/response row", "conversation"),
    ([CHAT_ROW, {"prompt": "Q?", "completion": "A."}], "a prompt/response row", "conversation"),
    ([{"prompt": "Q?", "response": "A."}, CHAT_ROW], "a conversation", "prompt/response"),
    ([{"text": "plain text"}, {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
     "a conversation", "text"),
    ([{"text": "plain text"}, {"prompt": "Q?", "response": "A."}], "a prompt/response row", "text"),
])
def test_mixed_row_kinds_name_the_row_or_are_skipped(rows, kind, first, tmp_path, smollm2_tokenizer):
    path = write_rows(tmp_path / "mixed.jsonl", rows + rows[:1] * 3)
    n = len(rows)
    with pytest.raises(DataError) as err:
        D.load_data(path, "causal-lm", smollm2_tokenizer, 128)
    said = str(err.value)
    assert f"mixed.jsonl, row {n} is {kind}" in said and f"row 1 makes the file one of {first} rows" in said, said
    assert "--skip-bad-rows" in said
    ds = D.load_data(path, "causal-lm", smollm2_tokenizer, 128, skip_bad_rows=True, split=False)
    assert ds.bad_rows == 1 and len(ds.eval) == len(rows) + 2 and ds.notes[0] == f"skipped 1 malformed row(s) in {path}"


BAD_CHAT_ROWS = [
    {"messages": turns(("robot", "hi"), ("assistant", "yo"))},
    {"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]},
    {"messages": turns(("user", 3), ("assistant", "yo"))},
    {"messages": turns(("user", "hi"))},
    {"messages": []},
    {"messages": "hi"},
    {"prompt": turns(("user", "hi")), "completion": turns(("user", "yo"))},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [{}]}]},
    {"messages": turns(("user", "a"), ("user", "b"), ("assistant", "c"))},  # refused by the Gemma 3 template
    {"text": "plain"},
]


@pytest.mark.parametrize("bad", range(len(BAD_CHAT_ROWS)))
def test_skip_bad_rows_skips_malformed_conversations_and_counts_them(bad, tmp_path, gemma3_tokenizer):
    path = write_rows(tmp_path / "c.jsonl", [CHAT_ROW, BAD_CHAT_ROWS[bad], CHAT_ROW, BAD_CHAT_ROWS[bad], CHAT_ROW])
    with pytest.raises(DataError, match=r"c.jsonl, row 2[: ]"):
        D.load_data(path, "causal-lm", gemma3_tokenizer, 128)
    ds = D.load_data(path, "causal-lm", gemma3_tokenizer, 128, skip_bad_rows=True, split=False)
    assert ds.bad_rows == 2 and len(ds.eval) == 3 and ds.notes[0] == f"skipped 2 malformed row(s) in {path}"
    assert ds.eval == D.load_data(write_rows(tmp_path / "good.jsonl", [CHAT_ROW] * 3), "causal-lm", gemma3_tokenizer,
                                  128, split=False).eval


def test_a_file_of_only_bad_rows_says_what_the_first_was(tmp_path, smollm2_tokenizer):
    path = write_rows(tmp_path / "c.jsonl", [{"messages": turns(("robot", "hi"), ("assistant", "yo"))}] * 2)
    with pytest.raises(DataError, match=r"c.jsonl: no usable rows: every row was skipped as malformed \(2 in all\); the "
                                        r"first: .*c.jsonl, row 1: turn 1 has role 'robot'"):
        D.load_data(path, "causal-lm", smollm2_tokenizer, 128, skip_bad_rows=True)


@pytest.mark.parametrize("rows", [
    [{"messages": turns(("user", "word " * 60), ("assistant", "ok"))}, {"system": "be " * 40, **CHAT_ROW}],
    [{"prompt": turns(("user", "word " * 60)), "completion": turns(("assistant", "ok"))}] * 2,
    [{"prompt": "word " * 60, "response": "ok"}, {"prompt": "word " * 45, "response": "ok"}],
    [{"prompt": "word " * 60, "completion": "ok"}] * 3,
])
def test_all_rows_cut_away_by_max_length_say_which_max_length_keeps_them(rows, tmp_path, smollm2_tokenizer):
    path = write_rows(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError) as err:
        D.load_data(path, "causal-lm", smollm2_tokenizer, 20)
    said = str(err.value)
    assert f"all {len(rows)} " in said and "within --max-length 20 (the prompt fills it); raise --max-length to " in said, said
    need = int(said.split("raise --max-length to ")[1].split()[0])
    assert need > 20
    assert len(D.load_data(path, "causal-lm", smollm2_tokenizer, need, split=False).eval) >= 1
    with pytest.raises(DataError, match="raise --max-length to"):
        D.load_data(path, "causal-lm", smollm2_tokenizer, need - 1, split=False)


def reference_rows(tok, row, max_length):
    """The loss mask as lorakit made it before issue 33 (every turn rendered), for conversations opening with a user."""
    messages = ([{"role": "system", "content": row["system"]}] if "system" in row else []) + row["messages"]
    text = C.render(tok, messages)
    spans = [(len(C.render(tok, messages[:i], generation_prompt=True)), len(C.render(tok, messages[: i + 1]).rstrip()))
             for i, m in enumerate(messages) if m["role"] == "assistant"]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [any(s < b and max(e, s + 1) > a for a, b in spans) for s, e in enc["offset_mapping"]]
    ids = list(enc["input_ids"])
    return {"input_ids": ids[:max_length], "labels": [t if k else -100 for t, k in zip(ids, inside)][:max_length]}


def long_conversation(pairs):
    return {"messages": [m for i in range(pairs) for m in turns(("user", f"Question {i}: what is {i} plus {i}?"),
                                                               ("assistant", f"{i} plus {i} is {2 * i}."))]}


@pytest.mark.parametrize("max_length", [48, 64, 257, 1000, 5000])
def test_cut_conversations_are_masked_as_when_every_turn_is_rendered(max_length, smollm2_tokenizer, gemma3_tokenizer):
    for tok in (smollm2_tokenizer, gemma3_tokenizer):
        row = dict(long_conversation(60), system="Be brief.")
        (out,) = C.chat_rows(tok, [row], max_length).rows
        assert out == reference_rows(tok, row, max_length)


class SlowTokenizer:
    """A tokenizer without offsets (what a slow, Python tokenizer gives), over SmolLM2's."""

    is_fast = False

    def __init__(self, tok):
        self.tok = tok

    def apply_chat_template(self, *args, **kwargs):
        return self.tok.apply_chat_template(*args, **kwargs)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]}


@pytest.mark.parametrize("slow", [False, True])
def test_a_long_conversation_renders_only_the_turns_that_fit(slow, monkeypatch, smollm2_tokenizer):
    """2000 turn pairs, --max-length 256: the renders are bounded by the turns within 256 tokens, not all 4000 turns
    (each render of a prefix costs its length: rendering every prefix took 47 s on one row)."""
    tok = SlowTokenizer(smollm2_tokenizer) if slow else smollm2_tokenizer
    calls = []
    render = C.render
    monkeypatch.setattr(C, "render", lambda *a, **k: calls.append(len(a[1])) or render(*a, **k))
    out = C.chat_rows(tok, [long_conversation(2000)], 256)
    (row,) = out.rows
    fitted = len(trained_runs(row))
    assert out.cut == 1 and len(row["input_ids"]) == 256 and 5 < fitted < 20
    assert len(calls) <= 2 * (fitted + 1) + 1, len(calls)  # the whole once, two per assistant turn within (+1 past)
    assert sum(calls) < 4000 + 2 * 50 * 50  # the whole conversation once, then short prefixes
    replies = [m["content"] + "<|im_end|>" for m in long_conversation(fitted)["messages"] if m["role"] == "assistant"]
    assert [smollm2_tokenizer.decode(r) for r in trained_runs(row)][:fitted - 1] == replies[:fitted - 1]
