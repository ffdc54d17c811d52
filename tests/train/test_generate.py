"""lorakit generate and lorakit.generate: the base plus the adapter, the chat template applied, streamed."""

import io

import pytest
import torch

import lorakit
from lorakit import cli
from lorakit.train.generate import chat_loop, prompt_ids
from lorakit.train.models import load_model


@pytest.fixture(scope="module")
def chat_adapter(tiny_chat_llama_dir, tmp_path_factory):
    """An adapter with non-zero B on the tiny chat Llama, saved as lorakit train saves one."""
    loaded = load_model(tiny_chat_llama_dir, "causal-lm")
    lorakit.attach(loaded.model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear", base_model=tiny_chat_llama_dir))
    torch.manual_seed(3)
    for _, layer in lorakit.lora_layers(loaded.model):
        layer.B.data.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("chat-adapter")
    lorakit.save_adapter(loaded.model, out, metadata={"lorakit_task": "causal-lm"})
    return str(out)


def merged_greedy(adapter, base, text, n):
    """What transformers' own generate gives with the merged weights (no lorakit in the loop)."""
    from transformers import AutoModelForCausalLM

    from lorakit.train.apply import load_with_adapter

    loaded, _, _ = load_with_adapter(adapter, base)
    plain = lorakit.unload(loaded.model, merge=True).eval()
    reference = AutoModelForCausalLM.from_pretrained(base).eval()
    reference.load_state_dict(plain.state_dict())
    ids = prompt_ids(loaded.tokenizer, text)
    out = reference.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id,
                             eos_token_id=[loaded.tokenizer.eos_token_id])
    return loaded.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True), out[0, len(ids):].tolist()


def test_cli_greedy_output_equals_merged_model_generate(chat_adapter, tiny_chat_llama_dir, capsys):
    expected, new_ids = merged_greedy(chat_adapter, tiny_chat_llama_dir, "What is 7 times 8?", 12)
    assert len(new_ids) == 12 and expected.strip()  # a random model talks until max_new_tokens
    code = cli.main(["generate", "--adapter", chat_adapter, "--prompt", "What is 7 times 8?", "--max-new-tokens", "12"])
    assert code == 0
    assert capsys.readouterr().out == expected + "\n"


def test_library_generate_streams_what_it_returns(chat_adapter, tiny_chat_llama_dir):
    from lorakit.train.apply import load_for_generation

    loaded = load_for_generation(chat_adapter)
    pieces = []
    reply = lorakit.generate(loaded.model, loaded.tokenizer, "Hello", max_new_tokens=10, stream=pieces.append)
    assert "".join(pieces) == reply and len(pieces) > 1
    expected, _ = merged_greedy(chat_adapter, tiny_chat_llama_dir, "Hello", 10)
    assert reply == expected
    # the prompt is the chat template with the generation prompt added
    text = loaded.tokenizer.decode(prompt_ids(loaded.tokenizer, "Hello", system="Be brief."))
    assert text.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n") and "Be brief." in text
    # sampling is reproducible with a seed, and differs from greedy
    a = lorakit.generate(loaded.model, loaded.tokenizer, "Hello", max_new_tokens=10, temperature=1.5, top_p=0.9, seed=1)
    b = lorakit.generate(loaded.model, loaded.tokenizer, "Hello", max_new_tokens=10, temperature=1.5, top_p=0.9, seed=1)
    assert a == b != reply


def test_generation_stops_at_the_end_of_turn(chat_adapter):
    from lorakit.train.apply import load_for_generation

    loaded = load_for_generation(chat_adapter)
    tok = loaded.tokenizer
    tok.eos_token = "<|endoftext|>"  # EOS is not the template's end of turn, as in Gemma's
    end = tok.convert_tokens_to_ids("<|im_end|>")
    seen = []

    def after_two(module, args, logits):  # the end of turn becomes the likeliest token at the third new token
        seen.append(1)
        if len(seen) == 3:
            logits[..., end] += 1e4
        return logits

    hook = loaded.model.get_output_embeddings().register_forward_hook(after_two)
    try:
        reply = lorakit.generate(loaded.model, tok, "Hi", max_new_tokens=20)
    finally:
        hook.remove()
    assert len(seen) == 3 and reply.strip()


def test_chat_loop_keeps_the_conversation(chat_adapter):
    from lorakit.train.apply import load_for_generation

    loaded = load_for_generation(chat_adapter)
    lines = iter(["Hi", "/reset", "What is 2 plus 2?", "And 3 plus 3?", "/exit"])
    out = io.StringIO()
    messages = chat_loop(loaded.model, loaded.tokenizer, system="Be brief.", read=lambda prompt: next(lines), out=out,
                         max_new_tokens=4)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == "What is 2 plus 2?" and out.getvalue().count("model> ") == 3


def test_adapter_chat_template_is_used(chat_adapter, tiny_chat_llama_dir, tmp_path):
    import shutil

    from conftest import GEMMA3_TEMPLATE
    from lorakit.train.apply import load_for_generation

    copy = tmp_path / "adapter"
    shutil.copytree(chat_adapter, copy)
    shutil.copy(GEMMA3_TEMPLATE, copy / "chat_template.jinja")
    loaded = load_for_generation(str(copy))
    assert loaded.tokenizer.decode(prompt_ids(loaded.tokenizer, "Hi")).endswith("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize("args,match", [
    (["--temperature", "-1"], "argument --temperature: -1 is not a finite number >= 0"),
    (["--top-p", "0"], "argument --top-p: 0 is not a number in (0, 1]"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: 0 is not a positive integer"),
    (["--chat-template", "/nonexistent.jinja"], "no such file"),
])
def test_bad_options_are_one_line(chat_adapter, args, match, capsys):
    try:
        code = cli.main(["generate", "--adapter", chat_adapter, "--prompt", "Hi", *args])
    except SystemExit as exc:  # argparse's errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lorakit: error:") and match in err and err.count("\n") == 1


def test_a_classifier_adapter_is_refused(tmp_path, tiny_bert_dir, sentiment_csv, capsys):
    from lorakit.train import TrainConfig, run

    run(TrainConfig(model=tiny_bert_dir, data=sentiment_csv, steps=1, batch_size=8, out=str(tmp_path / "cls"), quiet=True,
                    eval_limit=8))
    code = cli.main(["generate", "--adapter", str(tmp_path / "cls"), "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert code == 2 and "classify adapter; lorakit generate needs a causal-LM one" in err


# ---------------------------------------------------------------------- issue 33: nothing accepted without effect
def generate_cli(capsys, *args, stdin=None, monkeypatch=None):
    capsys.readouterr()
    try:
        code = cli.main(["generate", *map(str, args)])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args, needle):
    code, out, err = generate_cli(capsys, *args)
    assert code == 2 and err.startswith("lorakit: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err


@pytest.mark.parametrize("args,needle", [
    (["--chat", "--raw"], "--raw feeds --prompt as it is, without the chat template, so --chat would do nothing"),
    (["--prompt", "Hi", "--raw", "--system", "Be brief."], "so --system would do nothing; drop --raw or --system"),
    (["--prompt", "Hi", "--raw", "--chat-template", "x.jinja"], "so --chat-template would do nothing"),
    (["--prompt", "Hi", "--temperature", "inf"], "argument --temperature: inf is not a finite number >= 0"),
    (["--prompt", "Hi", "--temperature", "nan"], "argument --temperature: nan is not a finite number >= 0"),
    (["--prompt", "Hi", "--temperature", "-0.5"], "argument --temperature: -0.5 is not a finite number >= 0"),
    (["--prompt", "Hi", "--temperature", "0.7", "--top-p", "0"], "argument --top-p: 0 is not a number in (0, 1]"),
    (["--prompt", "Hi", "--temperature", "0.7", "--top-p", "1.01"], "argument --top-p: 1.01 is not a number in (0, 1]"),
    (["--prompt", "Hi", "--temperature", "0.7", "--top-p=-inf"], "argument --top-p: -inf is not a number in (0, 1]"),
    (["--prompt", "Hi", "--top-p", "0.9"], "--top-p acts only when sampling, and --temperature 0 decodes greedily"),
    (["--prompt", "Hi", "--seed", "3"], "--seed acts only when sampling"),
    (["--prompt", "Hi", "--seed", "3", "--top-p", "0.5"], "--top-p and --seed act only when sampling"),
    (["--prompt", "Hi", "--max-new-tokens", "100000"],
     "--max-new-tokens 100000 is more than the model's context of 512 positions"),
    (["--prompt", "Hi", "--max-new-tokens", "505"], "plus --max-new-tokens 505 are more than the model's context of 512"),
    (["--chat", "--max-new-tokens", "512"], "--max-new-tokens 512 is more than the model's context of 512 positions"),
])
def test_generate_options_without_effect_or_out_of_range(chat_adapter, capsys, monkeypatch, args, needle):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    refused(capsys, "--adapter", chat_adapter, *args, needle=needle)


def test_library_generate_refuses_the_same(chat_adapter):
    from lorakit.errors import ConfigError
    from lorakit.train.apply import load_for_generation

    loaded = load_for_generation(chat_adapter)
    for kw, needle in [({"temperature": float("inf")}, "temperature=inf must be a finite number >= 0"),
                       ({"temperature": float("nan")}, "temperature=nan"),
                       ({"temperature": 0.5, "top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
                       ({"temperature": 0.5, "top_p": float("nan")}, "top_p=nan must be in (0, 1]"),
                       ({"top_p": 0.5}, "--top-p acts only when sampling"),
                       ({"seed": 1}, "--seed acts only when sampling"),
                       ({"max_new_tokens": 10**6}, "is more than the model's context of 512 positions"),
                       ({"max_new_tokens": True}, "max_new_tokens=True must be a positive integer"),
                       ({"raw": True, "system": "Be brief."}, "a system turn needs the chat template")]:
        with pytest.raises(ConfigError) as info:
            lorakit.generate(loaded.model, loaded.tokenizer, "Hi", **kw)
        assert needle in str(info.value)


@pytest.mark.parametrize("stdin", ["closed", "none", "empty"])
def test_chat_ends_cleanly_at_the_end_of_input(chat_adapter, capsys, monkeypatch, stdin):
    if stdin == "closed":
        fh = io.StringIO("")
        fh.close()
    monkeypatch.setattr("sys.stdin", {"closed": fh if stdin == "closed" else None, "none": None,
                                      "empty": io.StringIO("")}[stdin])
    code, out, err = generate_cli(capsys, "--adapter", chat_adapter, "--chat", "--max-new-tokens", "3")
    assert code == 0 and "Traceback" not in err and out.endswith("\n"), err


def test_chat_turn_past_the_context_is_not_answered(chat_adapter):
    from lorakit.train.apply import load_for_generation

    loaded = load_for_generation(chat_adapter)
    lines = iter(["word " * 600, "Hi", "/exit"])
    out = io.StringIO()
    messages = chat_loop(loaded.model, loaded.tokenizer, read=lambda prompt: next(lines), out=out, max_new_tokens=4)
    assert "lorakit: the prompt is" in out.getvalue() and "no room to reply" in out.getvalue()
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "Hi"


NOT_UTF8 = b"{% for m in messages %}{{ m['content'] }}\xff\xfe{% endfor %}"
SYNTAX_ERROR = "{% for m in messages %}{{ m['content'] }}{% endfor"
RAISES = "{{ raise_exception('this template takes no user turns') }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
UNDEFINED = "{% for m in messages %}{{ m['content'].nothing() }}{% endfor %}"


@pytest.mark.parametrize("content,needle", [
    (NOT_UTF8, "is not UTF-8 text"),
    (SYNTAX_ERROR, "Jinja syntax error on line 1"),
    (RAISES, "failed to render the conversation (roles: user): TemplateError: this template takes no user turns"),
    (UNDEFINED, "failed to render the conversation (roles: user): UndefinedError"),
    ("DIRECTORY", ""),
])
@pytest.mark.parametrize("where", ["--chat-template", "adapter"])
def test_bad_chat_templates_are_one_line_naming_the_file(chat_adapter, capsys, tmp_path, content, needle, where):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(chat_adapter, adapter)
    path = adapter / "chat_template.jinja" if where == "adapter" else tmp_path / "mine.jinja"
    if content == "DIRECTORY":
        path.mkdir()
        needle = "is a directory" if where == "--chat-template" else "(the chat template saved with the adapter) is not a file"
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    extra = ["--chat-template", path] if where == "--chat-template" else []
    err = refused(capsys, "--adapter", adapter, "--prompt", "Hi", "--max-new-tokens", "2", *extra, needle=needle)
    assert str(path) in err
