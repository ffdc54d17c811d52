"""An Ollama ``Modelfile`` beside an exported GGUF (``ollama create NAME -f FILE``).

    FROM ./model.gguf                       the merged export
    FROM /path/to/base.gguf                 or the base GGUF with the LoRA export on top
    ADAPTER ./adapter.gguf
    TEMPLATE \"\"\"...\"\"\"                     the chat format, as Ollama's Go template
    PARAMETER stop "<end-of-turn token>"

Ollama's templates are Go templates, not the tokenizer's Jinja, so the chat format is recognised from the Jinja
template's markers (ChatML ``<|im_start|>``: SmolLM2, Qwen; Gemma's ``<start_of_turn>``; Llama 3's
``<|start_header_id|>``) and written as Ollama's own template for it. A template of another kind is left out: Ollama
then reads the GGUF's ``tokenizer.chat_template`` itself. The chat template is the adapter's (``chat_template.jinja``,
saved by ``lorakit train --chat-template``), else the base tokenizer's.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import ExportError
from lorakit.files import write_atomic

CHATML = ("<|im_start|>", """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
""", ("<|im_end|>", "<|im_start|>"))
GEMMA = ("<start_of_turn>", """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "user") (eq .Role "system") }}<start_of_turn>user
{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}""", ("<end_of_turn>",))
LLAMA3 = ("<|start_header_id|>", """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

""", ("<|eot_id|>",))
KNOWN = (CHATML, GEMMA, LLAMA3)


@dataclass
class ModelfilePlan:
    path: Path
    text: str


def chat_template(source) -> str | None:
    """The adapter's chat template, else the base tokenizer's, else None."""
    saved = source.saved_chat_template()
    if saved is not None:
        return saved
    from lorakit.train.models import load_tokenizer

    return getattr(load_tokenizer(source.spec), "chat_template", None) or None


def go_template(jinja: str | None) -> tuple[str, tuple[str, ...]] | None:
    """(Ollama's template, stop strings) for a Jinja chat template of a known format, else None."""
    for marker, template, stops in KNOWN:
        if jinja and marker in jinja:
            return template, stops
    return None


def plan(source, out: Path, format: str, overwrite: bool) -> ModelfilePlan:
    """The Modelfile for ``out``: ``<out stem>.Modelfile`` beside it; refused, before anything is written, when it
    exists (without ``overwrite``) or when the base is not a GGUF file Ollama can put an adapter on."""
    path = out.with_name(out.stem + ".Modelfile")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} (the Modelfile of --ollama) exists; move it or pass --overwrite to replace it")
    if format == "gguf-lora":
        if source.base_gguf is None:
            raise ExportError(f"--ollama with --format gguf-lora needs the base as a GGUF file, and {source.spec} is a "
                              "model directory; export the merged model (--format gguf --ollama) instead")
        lines = [f"FROM {source.base_gguf.resolve()}", f"ADAPTER ./{out.name}"]
    else:
        lines = [f"FROM ./{out.name}"]
    known = go_template(chat_template(source))
    if known is not None:
        template, stops = known
        lines.append(f'TEMPLATE """{template}"""')
        lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    else:
        lines.append("# TEMPLATE left out: Ollama reads the chat template from the GGUF (tokenizer.chat_template)")
    return ModelfilePlan(path, "\n".join(lines) + "\n")


def write(p: ModelfilePlan) -> Path:
    def fill(tmp: str) -> None:
        Path(tmp).write_text(p.text)

    write_atomic(p.path, fill)
    return p.path


def create_command(p: Path) -> str:
    """The ``ollama create`` line for a written Modelfile."""
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in p.name.removesuffix(".Modelfile").lower())
    return f"ollama create {name or 'lorakit'} -f {shlex.quote(str(p))}"
