"""The options of ``lorakit export``, declared once (the command line is generated from them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorakit.errors import ConfigError
from lorakit.export.writer import OUTTYPES
from lorakit.options import option
from lorakit.train.config import ModelOptions, OutputOptions

FORMATS = ("gguf-lora", "gguf")


@dataclass(kw_only=True)  # the adapter, required, after the groups' fields
class ExportConfig(OutputOptions, ModelOptions):
    OMIT: ClassVar[tuple[str, ...]] = ("base_dtype", "device")
    NOTES: ClassVar[dict[str, str]] = {
        "out": "the .gguf file to write (with --ollama, its Modelfile is written beside it as NAME.Modelfile)",
        "overwrite": "replace --out (and the Modelfile) when they exist",
        "model": "the base model (.gguf, model directory or builtin:NAME)"}

    adapter: str = option(help="a training run's output directory (an adapter directory) or a PEFT LoRA adapter "
                          "directory", positional=True, metavar="RUN_OR_ADAPTER")
    format: str = option("gguf-lora", "gguf-lora: a llama.cpp LoRA adapter (llama-cli --lora, Ollama ADAPTER); "
                         "gguf: the base with the adapter merged, tokenizer and chat template included", choices=FORMATS)
    outtype: str | None = option(None, "tensor encoding", choices=OUTTYPES,
                                 default_text="f32 for gguf-lora, f16 for gguf")
    ollama: bool = option(False, "also write an Ollama Modelfile (FROM, ADAPTER, TEMPLATE, PARAMETER stop) and print "
                          "the ollama create line")

    def export_arguments(self) -> dict[str, Any]:
        """export_gguf's keyword arguments."""
        return {"format": self.format, "outtype": self.outtype, "model": self.model, "ollama": self.ollama,
                "overwrite": self.overwrite}

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("--out is required: name the .gguf file to write (e.g. --out adapter.gguf)")
