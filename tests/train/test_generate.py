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
    (["--temperature", "-1"], "temperature=-1.0 must be >= 0"),
    (["--top-p", "0"], "top_p=0.0 must be in"),
    (["--max-new-tokens", "0"], "max_new_tokens=0 must be a positive integer"),
    (["--chat-template", "/nonexistent.jinja"], "no such file"),
])
def test_bad_options_are_one_line(chat_adapter, args, match, capsys):
    code = cli.main(["generate", "--adapter", chat_adapter, "--prompt", "Hi", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lorakit: error:") and match in err and err.count("\n") == 1


def test_a_classifier_adapter_is_refused(tmp_path, tiny_bert_dir, sentiment_csv, capsys):
    from lorakit.train import TrainConfig, run

    run(TrainConfig(model=tiny_bert_dir, data=sentiment_csv, steps=1, batch_size=8, out=str(tmp_path / "cls"), quiet=True,
                    eval_limit=8))
    code = cli.main(["generate", "--adapter", str(tmp_path / "cls"), "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert code == 2 and "classify adapter; lorakit generate needs a causal-LM one" in err
