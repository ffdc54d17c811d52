"""Chat data: conversations formatted with the tokenizer's chat template, the loss on assistant turns.

Rows (JSONL or Parquet), as TRL and the dataset hubs write them:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
    {"system": "...", "messages": [...]}                       a system turn put first
    {"prompt": [messages], "completion": [messages]}           TRL's conversational prompt-completion

A conversation is rendered once with ``tokenizer.apply_chat_template`` and tokenised whole (no
special tokens added: the template writes them), so the tokens are exactly the ones the model sees
when it is asked with the same template. Which tokens carry a loss is found in character space: the
text a trained turn adds is

    render(messages[: i + 1])[len(render(messages[:i], add_generation_prompt=True)):]

(its content and the template's end-of-turn marker, trailing whitespace excluded), and a token is
trained when its characters fall in such a span (TRL's ``assistant_only_loss``, without needing
``{% generation %}`` markers in the template). ``loss_on="all"`` trains every token instead.

A conversation longer than ``max_length`` tokens is cut at ``max_length``; one with no trained
token left is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import DataError
from lorakit.kernels.linear_cross_entropy import IGNORE_INDEX

LOSS_ON = ("assistant", "all")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # written next to an adapter trained on conversations
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class ChatRows:
    rows: list[dict[str, Any]]  # {"input_ids": [...], "labels": [...]} with -100 where no loss
    cut: int = 0  # conversations cut at max_length (still trained)
    dropped: int = 0  # conversations with no trained token within max_length


def is_chat_row(row: dict[str, Any]) -> bool:
    """A row of conversational data: ``messages``, or TRL's prompt/completion given as lists of turns."""
    return "messages" in row or (isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list))


def read_chat_template(path: str | Path) -> str:
    """The Jinja text of a ``--chat-template FILE`` (a .jinja file, or a tokenizer_config.json holding one)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--chat-template {path}: no such file; give a Jinja template file (e.g. "
                        "examples/chat_templates/gemma3.jinja)")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        import json

        try:
            text = json.loads(text).get("chat_template")
        except (ValueError, AttributeError):
            text = None
        if not isinstance(text, str):
            raise DataError(f"--chat-template {path}: a JSON file must hold a \"chat_template\" string (as "
                            "tokenizer_config.json does)")
    if "{{" not in text and "{%" not in text:
        raise DataError(f"--chat-template {path} holds no Jinja ({{{{ ... }}}} or {{% ... %}}); it is not a chat template")
    return text


def use_chat_template(tokenizer, template: str | None, source: str = "") -> None:
    """Set ``template`` on ``tokenizer``; without one the tokenizer must bring its own."""
    if template is not None:
        tokenizer.chat_template = template
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source or 'this data'} holds conversations but the tokenizer has no chat template to format "
                        "them; pass --chat-template FILE (a Jinja template, e.g. examples/chat_templates/gemma3.jinja "
                        "for Gemma 3)")


def conversation(row: dict[str, Any], where: str) -> tuple[list[dict[str, str]], set[int]]:
    """(messages, indices of the turns that are trained) of one row; checks the turns' shape."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        messages = list(messages)
        system = row.get("system")
        if system not in (None, ""):
            if not isinstance(system, str):
                raise DataError(f"{where}: \"system\" must be a string")
            if _role(messages[0], where) == "system":
                raise DataError(f"{where}: a \"system\" field and a system turn in \"messages\"; keep one of them")
            messages.insert(0, {"role": "system", "content": system})
        trained = {i for i, m in enumerate(messages) if _role(m, where) == "assistant"}
    else:
        prompt, completion = list(row["prompt"]), list(row["completion"])
        if not completion:
            raise DataError(f"{where}: \"completion\" is an empty list; it must hold the turn(s) to train on")
        messages = prompt + completion
        trained = set(range(len(prompt), len(messages)))
    for i, m in enumerate(messages):
        _role(m, where)
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {i + 1} has content {type(content).__name__}; lorakit trains on text turns "
                            "(\"content\": a string)")
    if not trained:
        raise DataError(f"{where}: no assistant turn to train on; every conversation needs one (or use --loss-on all "
                        "with text rows)")
    return [{"role": m["role"], "content": m["content"]} for m in messages], trained


def _role(message: Any, where: str) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
        raise DataError(f"{where}: each turn must be an object with \"role\" and \"content\", got "
                        f"{str(message)[:60]}")
    if message["role"] not in ROLES:
        raise DataError(f"{where}: role {message['role']!r} is not one of {', '.join(ROLES)}")
    return message["role"]


def render(tokenizer, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def trained_spans(tokenizer, messages: list[dict[str, str]], trained: set[int], where: str) -> tuple[str, list[tuple[int, int]]]:
    """(the whole conversation's text, character spans of the trained turns)."""
    try:
        text = render(tokenizer, messages)
        spans = []
        for i in sorted(trained):
            before = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
            through = render(tokenizer, messages[: i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError(f"{where}: the chat template renders turn {i + 1} differently once later turns follow "
                                "(it rewrites earlier turns), so the assistant tokens cannot be located; use --loss-on all "
                                "or a --chat-template FILE that renders each turn the same way")
            end = len(through.rstrip())
            spans.append((len(before), max(end, len(before))))
    except DataError:
        raise
    except Exception as exc:  # jinja2's TemplateError and the template's own raise_exception()
        raise DataError(f"{where}: the chat template refused this conversation: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    return text, spans


def tokens_and_mask(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` (tokenised whole, no special tokens added) and which of them lie in ``spans``."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        inside = [any(s < b and max(e, s + 1) > a for a, b in spans) for s, e in enc["offset_mapping"]]
        return ids, inside
    # a slow tokenizer has no offsets: tokenise the pieces between span edges one by one
    ids, inside, at = [], [], 0
    for a, b in spans + [(len(text), len(text))]:
        for piece, trained in ((text[at:a], False), (text[a:b], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                inside += [trained] * len(piece_ids)
        at = b
    return ids, inside


def chat_rows(tokenizer, rows: list[dict[str, Any]], max_length: int, *, loss_on: str = "assistant",
              source: str = "") -> ChatRows:
    """Tokenised conversations with their loss masks (see the module docstring)."""
    if loss_on not in LOSS_ON:
        raise DataError(f"--loss-on {loss_on!r} is not one of {', '.join(LOSS_ON)}")
    out = ChatRows([])
    for n, row in enumerate(rows, 1):
        where = f"{source}, row {n}" if source else f"row {n}"
        messages, trained = conversation(row, where)
        text, spans = trained_spans(tokenizer, messages, trained, where)
        ids, inside = tokens_and_mask(tokenizer, text, spans)
        labels = list(ids) if loss_on == "all" else [t if keep else IGNORE_INDEX for t, keep in zip(ids, inside)]
        cut = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        if len(ids) < 2 or all(label == IGNORE_INDEX for label in labels[1:]):
            out.dropped += 1
            continue
        out.cut += cut
        out.rows.append({"input_ids": ids, "labels": labels})
    return out


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token(s) the chat template closes an assistant turn with (``<|im_end|>``, ``<end_of_turn>`` ...), to stop
    generation at; found by rendering a one-word reply. Empty when the template adds none."""
    try:
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        text, spans = trained_spans(tokenizer, messages, {1}, "end of turn")
    except DataError:
        return []
    a, b = spans[0]
    close = text[a:b]
    close = close[close.rfind("Hello") + len("Hello"):] if "Hello" in close else ""
    if not close.strip():
        return []
    ids = tokenizer(close.strip(), add_special_tokens=False)["input_ids"]
    return ids[-1:] if ids else []
