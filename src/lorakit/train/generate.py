"""Trying a trained adapter: text from the base model plus the adapter, no merge needed.

    reply = lorakit.generate(model, tokenizer, "What is 7 times 8?")            # one user turn
    reply = lorakit.generate(model, tokenizer, messages=[...], temperature=0.7)  # a conversation
    lorakit generate --adapter out/ --prompt "What is 7 times 8?"               # the same from the shell
    lorakit generate --adapter out/ --chat                                      # an interactive loop

The prompt goes through the tokenizer's chat template (the one the adapter was trained with when
its directory holds chat_template.jinja) with the generation prompt added; ``raw=True`` feeds the
text as it is. Decoding is transformers' ``model.generate`` (so the adapted model's own generate works
the same: ``model.generate(**tokenizer.apply_chat_template(messages, add_generation_prompt=True,
return_dict=True, return_tensors="pt"))``): greedy at temperature 0, else sampling with
``temperature`` and ``top_p``. It stops at EOS or at the template's end-of-turn token.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.train.chat import CHAT_TEMPLATE_FILE, end_of_turn_ids, read_chat_template


def prompt_ids(tokenizer, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
               system: str | None = None, raw: bool = False) -> list[int]:
    """The token ids the model continues: ``prompt`` as one user turn (or ``messages``) in the chat template with
    the generation prompt added; with ``raw`` (or a tokenizer without a template) ``prompt`` as it is."""
    if (prompt is None) == (messages is None):
        raise ConfigError("give a prompt or messages, not both and not neither")
    if raw or not getattr(tokenizer, "chat_template", None):
        if messages is not None:
            raise ConfigError("messages need a chat template; the tokenizer has none: pass --chat-template FILE")
        return list(tokenizer(prompt)["input_ids"])
    turns = list(messages) if messages is not None else [{"role": "user", "content": prompt}]
    if system and (not turns or turns[0]["role"] != "system"):
        turns.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _Streamer:
    """transformers' streamer protocol (put / end): writes each finished piece of text to ``write`` as it comes."""

    def __init__(self, tokenizer, write: Callable[[str], Any], prompt_length: int) -> None:
        self.tokenizer, self.write, self.skip = tokenizer, write, prompt_length
        self.ids: list[int] = []
        self.shown = 0

    def put(self, value: torch.Tensor) -> None:
        tokens = value.reshape(-1).tolist()
        if self.skip:  # the first call carries the prompt
            self.skip, tokens = 0, []
        self.ids += tokens
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        self.write(text[self.shown :])
        self.shown = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.write(text[self.shown :])
        self.shown = len(text)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
             system: str | None = None, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, raw: bool = False, stream: TextIO | Callable[[str], Any] | None = None) -> str:
    """The model's reply to ``prompt`` (or to the conversation ``messages``), as text without special tokens.

    ``stream``: a file (sys.stdout) or a function that receives the text piece by piece as it is generated.
    """
    if not (isinstance(max_new_tokens, int) and max_new_tokens > 0):
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not (temperature >= 0 and temperature == temperature):
        raise ConfigError(f"temperature={temperature!r} must be >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p!r} must be in (0, 1]")
    ids = prompt_ids(tokenizer, prompt, messages=messages, system=system, raw=raw)
    device = next(model.parameters()).device
    stop = [t for t in [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)] if t is not None]
    sampling: dict[str, Any] = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0
                                else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
    if seed is not None:
        torch.manual_seed(seed)
    streamer = None
    if stream is not None:
        write = stream if callable(stream) else _file_writer(stream)
        streamer = _Streamer(tokenizer, write, len(ids))
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                             max_new_tokens=max_new_tokens, eos_token_id=sorted(set(stop)) or None,
                             pad_token_id=tokenizer.pad_token_id, use_cache=True, streamer=streamer, **sampling)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def _file_writer(fh: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        fh.write(text)
        fh.flush()

    return write


def adapter_chat_template(adapter: str | None, template_file: str | None) -> str | None:
    """The chat template to talk with: --chat-template FILE, else the one saved with the adapter, else None (the
    tokenizer's own)."""
    if template_file:
        return read_chat_template(template_file)
    if adapter and (Path(adapter) / CHAT_TEMPLATE_FILE).is_file():
        return read_chat_template(Path(adapter) / CHAT_TEMPLATE_FILE)
    return None


def chat_loop(model: nn.Module, tokenizer, *, system: str | None = None, read: Callable[[str], str] = input,
              out: TextIO = sys.stdout, **options: Any) -> list[dict[str, str]]:
    """Talk with the model turn by turn: each line read is a user turn, the reply is streamed to ``out``. An empty
    line, "/exit" or end of input ends it; "/reset" forgets the conversation. Returns the conversation."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return messages
        if line.strip() in ("", "/exit", "/quit"):
            return messages
        if line.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": line})
        out.write("model> ")
        reply = generate(model, tokenizer, messages=messages, stream=out, **options)
        out.write("\n")
        messages.append({"role": "assistant", "content": reply})
