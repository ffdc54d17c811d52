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
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from lorakit.errors import AdapterFileError, ConfigError, DataError, LorakitError
from lorakit.options import is_finite, is_int, is_seed
from lorakit.train.chat import CHAT_TEMPLATE_FILE, end_of_turn_ids, read_chat_template

# Where the chat template a tokenizer talks with came from (a --chat-template FILE, the adapter's file), for errors.
_TEMPLATE_SOURCE: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


class ContextTooLong(ConfigError):
    """The prompt plus the tokens to generate do not fit in the model's context."""


def use_template(tokenizer, template: str, source: str) -> None:
    """Talk through ``template`` (Jinja text read from ``source``, which errors name)."""
    tokenizer.chat_template = template
    try:
        _TEMPLATE_SOURCE[tokenizer] = source
    except TypeError:  # a tokenizer that cannot be weakly referenced: errors say "the chat template"
        pass


def template_source(tokenizer) -> str:
    try:
        return _TEMPLATE_SOURCE.get(tokenizer) or "the tokenizer's chat template"
    except TypeError:
        return "the chat template"


def _apply_template(tokenizer, turns: list[dict[str, str]]) -> str:
    """The conversation rendered with the generation prompt; a template that fails at render time (its
    raise_exception(...), an undefined attribute, a type error) is one DataError naming the template's file."""
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2's TemplateError / UndefinedError, the template's own raise_exception()
        said = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        roles = ", ".join(t["role"] for t in turns)
        raise DataError(f"{template_source(tokenizer)} failed to render the conversation (roles: {roles}): "
                        f"{type(exc).__name__}: {said}; fix the template or pass --chat-template FILE "
                        "(--raw feeds the prompt without one)") from None
    if not isinstance(text, str):
        raise DataError(f"{template_source(tokenizer)} rendered {type(text).__name__}, not text; fix the template")
    return text


def prompt_ids(tokenizer, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
               system: str | None = None, raw: bool = False) -> list[int]:
    """The token ids the model continues: ``prompt`` as one user turn (or ``messages``) in the chat template with
    the generation prompt added; with ``raw`` (or a tokenizer without a template) ``prompt`` as it is."""
    if (prompt is None) == (messages is None):
        raise ConfigError("give a prompt or messages, not both and not neither")
    if raw and system is not None:
        raise ConfigError("a system turn needs the chat template, and raw=True (--raw) feeds the prompt without it; "
                          "drop --system or --raw")
    if raw or not getattr(tokenizer, "chat_template", None):
        if messages is not None:
            raise ConfigError("messages need a chat template; the tokenizer has none: pass --chat-template FILE")
        return list(tokenizer(prompt)["input_ids"])
    turns = list(messages) if messages is not None else [{"role": "user", "content": prompt}]
    if system and (not turns or turns[0]["role"] != "system"):
        turns.insert(0, {"role": "system", "content": system})
    text = _apply_template(tokenizer, turns)
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


# many parameters: `lorakit generate`'s sampling options, each a keyword (the CLI passes them by name)
@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
             system: str | None = None, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, raw: bool = False, stream: TextIO | Callable[[str], Any] | None = None) -> str:
    """The model's reply to ``prompt`` (or to the conversation ``messages``), as text without special tokens.

    ``stream``: a file (sys.stdout) or a function that receives the text piece by piece as it is generated.
    """
    if not is_int(max_new_tokens, 1):
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    check_sampling(temperature, top_p, seed)
    ids = prompt_ids(tokenizer, prompt, messages=messages, system=system, raw=raw)
    check_context(model, len(ids), max_new_tokens)
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


def check_sampling(temperature: float, top_p: float = 1.0, seed: int | None = None, *, given_top_p: bool | None = None) -> None:
    """temperature: a finite number >= 0; top_p in (0, 1]; seed an integer from 0 to 2**63 - 1. top_p and seed act
    only when sampling (temperature > 0): given with greedy decoding they would do nothing, and are refused.
    ``given_top_p``: whether top_p was given (the command line's default is unset), else top_p != 1."""
    if not (is_finite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature={temperature!r} must be a finite number >= 0 (0: greedy)")
    if not (is_finite(top_p) and 0 < top_p <= 1):
        raise ConfigError(f"top_p={top_p!r} must be in (0, 1]")
    if seed is not None and not is_seed(seed):
        raise ConfigError(f"seed={seed!r} must be an integer from 0 to 2**63 - 1")
    if temperature == 0:
        idle = [name for name, on in (("--top-p", top_p != 1 if given_top_p is None else given_top_p),
                                      ("--seed", seed is not None)) if on]
        if idle:
            raise ConfigError(f"{' and '.join(idle)} {'act' if len(idle) > 1 else 'acts'} only when sampling, and "
                              "--temperature 0 decodes greedily; "
                              f"give --temperature above 0 (e.g. 0.7), or drop {' and '.join(idle)}")


def context_length(model: nn.Module) -> int | None:
    """The most positions the model reads (its position embeddings), None when its config does not say."""
    from lorakit.train.models import max_positions

    config = getattr(model, "config", None)
    return max_positions(config) if config is not None else None


def check_context(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation that would run past the model's context (the prompt plus max_new_tokens)."""
    limit = context_length(model)
    if limit is None or prompt_tokens + max_new_tokens <= limit:
        return
    if max_new_tokens >= limit:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} is more than the model's context of {limit} positions "
                          f"(max_position_embeddings); use --max-new-tokens {max(1, limit - prompt_tokens)} or less")
    room = limit - prompt_tokens
    if room < 1:
        raise ContextTooLong(f"the prompt is {prompt_tokens} tokens and the model's context is {limit} positions "
                             "(max_position_embeddings): no room to reply; shorten the prompt (in --chat: /reset)")
    raise ContextTooLong(f"the prompt's {prompt_tokens} tokens plus --max-new-tokens {max_new_tokens} are more than "
                         f"the model's context of {limit} positions (max_position_embeddings); use --max-new-tokens "
                         f"{room} or less, or a shorter prompt")


def _file_writer(fh: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        fh.write(text)
        fh.flush()

    return write


def adapter_chat_template(adapter: str | None, template_file: str | None) -> tuple[str | None, str]:
    """(the chat template to talk with, where it came from, for errors): --chat-template FILE, else the one saved with
    the adapter, else None (the tokenizer's own). A damaged chat_template.jinja in the adapter (not UTF-8, a Jinja
    syntax error, a directory) is an AdapterFileError naming it, not skipped."""
    if template_file:
        return read_chat_template(template_file), f"--chat-template {template_file}"
    if not adapter:
        return None, "the tokenizer's chat template"
    path = Path(adapter) / CHAT_TEMPLATE_FILE
    if not path.exists() and not path.is_symlink():
        return None, "the tokenizer's chat template"
    source = f"{path} (the chat template saved with the adapter)"
    if not path.is_file():
        raise AdapterFileError(f"{source} is not a file; remove it (the tokenizer's template is then used) or pass "
                               "--chat-template FILE")
    try:
        return read_chat_template(path), source
    except LorakitError as exc:
        reason = str(exc).replace(f"--chat-template {path}", "").lstrip(" :").removesuffix("; fix the template")
        raise AdapterFileError(f"{source}: {reason}; fix or remove it, or pass --chat-template FILE") from None


def _read_line(prompt: str) -> str:
    """input(), a closed or missing standard input read as its end."""
    if sys.stdin is None or sys.stdin.closed:
        raise EOFError
    try:
        return input(prompt)
    except (OSError, ValueError):  # the descriptor went away under us, or "I/O operation on closed file"
        raise EOFError from None
    except RuntimeError as exc:  # "input(): lost sys.stdin"
        if "stdin" in str(exc):
            raise EOFError from None
        raise


def chat_loop(model: nn.Module, tokenizer, *, system: str | None = None, read: Callable[[str], str] = _read_line,
              out: TextIO | None = None, **options: Any) -> list[dict[str, str]]:
    """Talk with the model turn by turn: each line read is a user turn, the reply is streamed to ``out``. An empty
    line, "/exit" or end of input (a closed standard input too) ends it; "/reset" forgets the conversation. A turn
    that would run past the model's context is not answered: a line says so (/reset starts over). Returns the
    conversation."""
    out = sys.stdout if out is None else out  # (sys.stdout at call time, as the command line replaces it)
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
        try:
            ids = prompt_ids(tokenizer, messages=messages)
            check_context(model, len(ids), options.get("max_new_tokens", 128))
        except ContextTooLong as exc:
            messages.pop()
            out.write(f"lorakit: {exc}\n")
            continue
        out.write("model> ")
        reply = generate(model, tokenizer, messages=messages, stream=out, **options)
        out.write("\n")
        messages.append({"role": "assistant", "content": reply})
