"""The options of ``lorakit export``, declared once (the command line is generated from them)."""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.errors import ConfigError
from lorakit.export.writer import OUTTYPES
from lorakit.options import option

FORMATS = ("gguf-lora", "gguf")


@dataclass
class ExportConfig:
    adapter: str = option(help="a training run's output directory (an adapter directory) or a PEFT LoRA adapter "
                          "directory", positional=True, metavar="RUN_OR_ADAPTER")
    out: str | None = option(None, "the .gguf file to write (with --ollama, its Modelfile is written beside it as "
                             "NAME.Modelfile)")
    format: str = option("gguf-lora", "gguf-lora: a llama.cpp LoRA adapter (llama-cli --lora, Ollama ADAPTER); "
                         "gguf: the base with the adapter merged, tokenizer and chat template included", choices=FORMATS)
    outtype: str | None = option(None, "tensor encoding", choices=OUTTYPES,
                                 default_text="f32 for gguf-lora, f16 for gguf")
    model: str | None = option(None, "the base model (.gguf, model directory or builtin:NAME)",
                               default_text="the base recorded in the adapter")
    ollama: bool = option(False, "also write an Ollama Modelfile (FROM, ADAPTER, TEMPLATE, PARAMETER stop) and print "
                          "the ollama create line")
    overwrite: bool = option(False, "replace --out (and the Modelfile) when they exist")

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("--out is required: name the .gguf file to write (e.g. --out adapter.gguf)")
