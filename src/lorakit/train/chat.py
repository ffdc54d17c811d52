"""Chat data: conversations formatted with the tokenizer's chat template, the loss on assistant turns.

Rows (JSONL or Parquet), as TRL and the dataset hubs write them:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
    {"system": "...", "messages": [...]}                       a system turn put first
    {"prompt": [messages], "completion": [messages]}           TRL's conversational prompt-completion
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}   ShareGPT

ShareGPT turns ({"from", "value"}, also accepted in "messages") are read as {"role", "content"}: from
human/user is user, gpt/assistant/model is assistant, system is system. A turn's content must be a
string; a turn with tool calls, a name or reasoning fields is refused (the template would never see them).

A conversation is rendered once with ``tokenizer.apply_chat_template`` and tokenised whole (no
special tokens added: the template writes them), so the tokens are exactly the ones the model sees
when it is asked with the same template. Which tokens carry a loss is found in character space: the
text a trained turn adds is

    render(messages[: i + 1])[len(render(messages[:i], add_generation_prompt=True)):]

(what the model writes after the generation prompt: its content and the template's end-of-turn marker,
trailing whitespace excluded; a conversation's first turn starts at its content, so a system prompt or
header the template puts before it is not trained), and a token is trained when its characters fall in
such a span (TRL's ``assistant_only_loss``, without needing ``{% generation %}`` markers in the
template). ``loss_on="all"`` trains every token instead. Every turn's content must appear in the
rendered text, else the template is refused.

A conversation longer than ``max_length`` tokens is cut at ``max_length`` (turns past the cut are not
rendered one by one, so a long conversation costs time linear in its length); one with no trained
token left is dropped and counted.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lorakit.errors import DataError
from lorakit.kernels.linear_cross_entropy import IGNORE_INDEX
from lorakit.train.chat_template import read_chat_template, template_syntax_error, use_chat_template  # noqa: F401

LOSS_ON = ("assistant", "all")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # written next to an adapter trained on conversations
ROLES = ("system", "user", "assistant", "tool")
ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
              "model": "assistant", "tool": "tool"}  # a turn's role (or ShareGPT "from") -> the role the template gets
TURN_LISTS = ("messages", "conversations")  # the row fields holding a conversation
# Turn fields the template would never see (lorakit passes role and content only): refused, not dropped.
_TOOL_CALLS = "tool-call turns are not supported (lorakit trains text turns); drop such rows"
_REASONING = "reasoning fields are not passed to the chat template; write the reasoning into the content or drop the field"
UNSUPPORTED_FIELDS = {
    "tool_calls": _TOOL_CALLS,
    "function_call": _TOOL_CALLS,
    "name": "a turn's \"name\" is not passed to the chat template; drop the field or write the name into the content",
    "reasoning_content": _REASONING,
    "thinking": _REASONING,
    "reasoning": _REASONING,
    "weight": "per-turn \"weight\" is not supported (every assistant turn is trained); drop the field, and the turns "
              "it weights 0",
}
_PROBE = "\ue000lorakit\ue001"  # content no turn holds: where a template writes a turn's content


@dataclass
class ChatRows:
    """Tokenised rows (conversations, or prompt/response rows in data.py) and what was cut, dropped or skipped."""

    rows: list[dict[str, Any]]  # {"input_ids": [...], "labels": [...]} with -100 where no loss
    cut: int = 0  # rows cut at max_length (still trained)
    dropped: int = 0  # rows with no trained token within max_length
    need: int = 0  # the smallest max_length that would keep a dropped row (0: none dropped)
    bad: int = 0  # malformed rows skipped (skip_bad_rows)
    first_bad: str = ""  # the error of the first of them


def is_chat_row(row: dict[str, Any]) -> bool:
    """A row of conversational data: ``messages`` or ``conversations`` (ShareGPT), or TRL's prompt/completion with a
    list of turns on either side (a list on one side only is refused later, by ``conversation``)."""
    if any(row.get(key) is not None for key in TURN_LISTS):
        return True
    return "prompt" in row and "completion" in row and (isinstance(row["prompt"], list) or
                                                         isinstance(row["completion"], list))


# ---------------------------------------------------------------------- rows
def conversation(row: dict[str, Any], where: str) -> tuple[list[dict[str, str]], set[int], list[str]]:
    """(messages as {"role", "content"}, indices of the turns that are trained, each turn's name for messages) of one
    row; refuses any other shape with ``where`` and the expected one."""
    lists = [key for key in TURN_LISTS if row.get(key) is not None]
    if len(lists) > 1:
        raise DataError(f"{where}: both \"messages\" and \"conversations\"; keep one of them")
    if lists:
        key = lists[0]
        raw = row[key]
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{where}: \"{key}\" must be a non-empty list of turns ({{\"role\", \"content\"}} objects, or "
                            f"ShareGPT's {{\"from\", \"value\"}}), got {preview(raw)}")
        names = [f"turn {i}" for i in range(1, len(raw) + 1)]
        messages = [_turn(m, where, name) for m, name in zip(raw, names)]
        system = row.get("system")
        if system not in (None, ""):
            if not isinstance(system, str):
                raise DataError(f"{where}: \"system\" is {preview(system)}; it must be a string")
            if messages[0]["role"] == "system":
                raise DataError(f"{where}: a \"system\" field and a system turn in \"{key}\"; keep one of them")
            messages.insert(0, {"role": "system", "content": system})
            names.insert(0, "the \"system\" field")
        trained = {i for i, m in enumerate(messages) if m["role"] == "assistant"}
    else:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise DataError(f"{where}: \"prompt\" is {preview(prompt)} and \"completion\" {preview(completion)}; "
                            "prompt/completion rows hold two strings, or two lists of {\"role\", \"content\"} turns")
        if not completion:
            raise DataError(f"{where}: \"completion\" is an empty list; it must hold the turn(s) to train on")
        names = [f"prompt turn {i}" for i in range(1, len(prompt) + 1)]
        names += [f"completion turn {i}" for i in range(1, len(completion) + 1)]
        messages = [_turn(m, where, name) for m, name in zip(prompt + completion, names)]
        for i in range(len(prompt), len(messages)):
            if messages[i]["role"] != "assistant":
                raise DataError(f"{where}: {names[i]} has role {messages[i]['role']!r}; the completion must be assistant "
                                "turns (the ones trained): move other turns into \"prompt\"")
        trained = set(range(len(prompt), len(messages)))
    if not trained:
        raise DataError(f"{where}: no assistant turn to train on; every conversation needs one (or use --loss-on all "
                        "with text rows)")
    return messages, trained, names


def _turn(message: Any, where: str, name: str) -> dict[str, str]:
    """One turn as {"role", "content"}: a {"role", "content"} or ShareGPT {"from", "value"} object of text."""
    shape = "{\"role\": ..., \"content\": \"...\"} (or ShareGPT's {\"from\": ..., \"value\": \"...\"})"
    if not isinstance(message, dict):
        raise DataError(f"{where}: {name} is {preview(message)}; each turn must be an object {shape}")
    if message.get("role") is not None and message.get("from") is not None:
        raise DataError(f"{where}: {name} has both \"role\" and \"from\"; give one of them")
    role_key, text_key = ("role", "content") if message.get("role") is not None else ("from", "value")
    role = message.get(role_key)
    if role is None:
        raise DataError(f"{where}: {name} has no \"role\" (or \"from\"); each turn must be an object {shape}")
    if not isinstance(role, str) or role.strip().lower() not in ROLE_NAMES:
        raise DataError(f"{where}: {name} has role {role!r}; roles are {', '.join(ROLES)} (ShareGPT's human, gpt and "
                        "model are read as user, assistant and assistant)")
    role = ROLE_NAMES[role.strip().lower()]
    for field, why in UNSUPPORTED_FIELDS.items():
        value = message.get(field)
        if (value is not None and value != 1) if field == "weight" else value not in (None, "", [], {}):
            raise DataError(f"{where}: {name} has \"{field}\": {why}")
    if text_key not in message:
        raise DataError(f"{where}: {name} has no \"{text_key}\"; each turn must be an object {shape}")
    content = message[text_key]
    if not isinstance(content, str):
        kind = "null" if content is None else type(content).__name__
        raise DataError(f"{where}: {name} has {text_key} {kind} ({preview(content)}); a turn's {text_key} must be a "
                        "string (lorakit trains text turns)")
    if role == "assistant" and not content.strip():
        raise DataError(f"{where}: {name} is an assistant turn with empty {text_key}; give it the reply to train on, "
                        "or drop the row")
    return {"role": role, "content": content}


def preview(value: Any) -> str:
    """A value as JSON for an error message, cut at 60 characters."""
    import json

    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return (text[:57] + "...") if len(text) > 60 else text


# ---------------------------------------------------------------------- rendering and masks
def render(tokenizer, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _render(tokenizer, messages: list[dict[str, str]], where: str, *, generation_prompt: bool = False) -> str:
    """``render``, a failure of the template (its raise_exception(), a missing variable ...) a one-line DataError."""
    try:
        return render(tokenizer, messages, generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2's TemplateError and the template's own raise_exception()
        said = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise DataError(f"{where}: the chat template refused this conversation: {type(exc).__name__}: {said}; fix the "
                        "row, or pass --skip-bad-rows to skip such rows") from None


def _content_not_rendered(where: str, template: str, name: str, content: str, place: str) -> DataError:
    return DataError(f"{where}: {template} does not write {name}'s content ({preview(content)}) {place}; a chat template "
                     "must render each message's \"content\": fix it, or pass --chat-template FILE")


def check_rendered(text: str, messages: list[dict[str, str]], names: list[str], where: str,
                   template: str = "the chat template") -> None:
    """Refuse a rendering ``text`` that lacks a turn's content (a template that never writes ``content``)."""
    at = 0
    for message, name in zip(messages, names):
        content = message["content"].strip()
        if not content:
            continue
        found = text.find(content, at)
        if found >= 0:
            at = found + len(content)
        elif content not in text:  # (in the text, out of order: a template that moves the system prompt)
            raise _content_not_rendered(where, template, name, content, "into the conversation")


# many parameters: one conversation as rendered (messages, trained turns, text, names) and where it came from
def turn_spans(tokenizer, messages: list[dict[str, str]], trained: set[int], text: str, names: list[str], where: str,
               template: str = "the chat template") -> Iterator[tuple[int, int]]:
    """Character spans in ``text`` (the whole conversation rendered) of the trained turns, in order, rendered one
    by one as they are asked for (stop asking once past the cut: each costs renders of the conversation so far)."""
    for i in sorted(trained):
        through = _render(tokenizer, messages[: i + 1], where)
        if i:
            before = _render(tokenizer, messages[:i], where, generation_prompt=True)
            start = len(before)
        else:  # no generation prompt to start from: start where the template writes the content
            before = ""
            probe = _render(tokenizer, [{"role": messages[0]["role"], "content": _PROBE}], where)
            start = len(os.path.commonprefix([through, probe]))
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(f"{where}: the chat template renders {names[i]} differently once later turns follow "
                            "(it rewrites earlier turns), so the assistant tokens cannot be located; use --loss-on all "
                            "or a --chat-template FILE that renders each turn the same way")
        end = len(through.rstrip())
        if messages[i]["content"].strip() not in through[start:end]:
            raise _content_not_rendered(where, template, names[i], messages[i]["content"], "where it renders the turn")
        yield start, end


def tokens_and_mask(tokenizer, text: str, spans: Iterator[tuple[int, int]] | list[tuple[int, int]],
                    max_length: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` (tokenised whole, no special tokens added) and which of them lie in ``spans``. With
    ``max_length``, spans are taken from the iterator only while they can reach the first ``max_length`` tokens
    (plus one more, so the first trained token is known); the ids are all of them (a slow tokenizer: at least
    ``max_length + 1`` when there are more)."""
    spans = iter(spans)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [(s, max(e, s + 1)) for s, e in enc["offset_mapping"]]
        reach = max((e for _, e in offsets[:max_length]), default=0) if max_length is not None and len(ids) > max_length \
            else len(text) + 1
        taken = []
        for a, b in spans:
            taken.append((a, b))
            if a >= reach:  # no token within max_length reaches it
                break
        return ids, _inside(offsets, taken)
    # a slow tokenizer has no offsets: tokenise the pieces between span edges one by one
    ids, inside, at = [], [], 0

    def add(piece: str, trained: bool) -> None:
        if piece:
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids.extend(piece_ids)
            inside.extend([trained] * len(piece_ids))

    for a, b in spans:
        add(text[at:a], False)
        add(text[a:b], True)
        at = max(at, b)
        if max_length is not None and len(ids) > max_length:
            return ids, inside
    add(text[at:], False)
    return ids, inside


def _inside(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Whether each token's characters [s, e) meet a span [a, b)."""
    merged: list[list[int]] = []
    for a, b in sorted(span for span in spans if span[0] < span[1]):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    ends = [b for _, b in merged]
    inside = []
    for s, e in offsets:
        k = bisect.bisect_right(ends, s)  # the first span ending after s: the only one that can meet [s, e)
        inside.append(k < len(merged) and merged[k][0] < e)
    return inside


# many parameters: the rows and their length, then keyword options data.py passes from its DataSpec
def chat_rows(tokenizer, rows: list[dict[str, Any]], max_length: int, *, loss_on: str = "assistant",
              source: str = "", template: str = "the chat template", skip_bad_rows: bool = False,
              numbers: list[int] | None = None) -> ChatRows:
    """Tokenised conversations with their loss masks (see the module docstring). ``numbers``: each row's number for
    messages (default 1, 2, ...); ``skip_bad_rows``: a malformed row is counted in ``bad`` instead of an error."""
    if loss_on not in LOSS_ON:
        raise DataError(f"--loss-on {loss_on!r} is not one of {', '.join(LOSS_ON)}")
    out = ChatRows([])
    for k, row in enumerate(rows):
        n = numbers[k] if numbers is not None else k + 1
        where = f"{source}, row {n}" if source else f"row {n}"
        try:
            messages, trained, names = conversation(row, where)
            text = _render(tokenizer, messages, where)
            check_rendered(text, messages, names, where, template)
            spans = turn_spans(tokenizer, messages, trained, text, names, where, template) if loss_on == "assistant" \
                else iter(())
            ids, inside = tokens_and_mask(tokenizer, text, spans, max_length)
        except DataError as exc:
            if not skip_bad_rows:
                raise
            out.bad += 1
            out.first_bad = out.first_bad or str(exc)
            continue
        labels = list(ids) if loss_on == "all" else [t if keep else IGNORE_INDEX for t, keep in zip(ids, inside)]
        cut = len(ids) > max_length
        if len(ids) < 2 or all(label == IGNORE_INDEX for label in labels[1:max_length]):
            out.dropped += 1
            first = next((t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX), None)
            need = max(first or 1, 1) + 1
            out.need = min(out.need, need) if out.need else need
            continue
        out.cut += cut
        out.rows.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return out


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token(s) the chat template closes an assistant turn with (``<|im_end|>``, ``<end_of_turn>`` ...), to stop
    generation at; found by rendering a one-word reply. Empty when the template adds none."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        text = _render(tokenizer, messages, "end of turn")
        ((a, b),) = turn_spans(tokenizer, messages, {1}, text, ["turn 1", "turn 2"], "end of turn")
    except DataError:
        return []
    close = text[a:b]
    close = close[close.rfind("Hello") + len("Hello"):] if "Hello" in close else ""
    if not close.strip():
        return []
    ids = tokenizer(close.strip(), add_special_tokens=False)["input_ids"]
    return ids[-1:] if ids else []
