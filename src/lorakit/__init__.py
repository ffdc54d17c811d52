"""lorakit: fast LoRA fine-tuning that tells you what your adapters can and cannot do.

    import lorakit
    cfg = lorakit.LoraConfig(r=8, alpha=16, targets="attn-qv")
    model = lorakit.attach(model, cfg)         # its own forward is now the fast one in training calls (fast=False: not)
    lorakit.save_adapter(model, "out/")        # PEFT format
    lorakit.load_adapter(model, "out/")        # ours or PEFT's
    lorakit.merge(model); lorakit.unmerge(model); base = lorakit.unload(model, merge=True)
    lorakit.use_bf16(model)                    # frozen weights in bf16, adapters and optimizer in fp32
    lorakit.quantize(model, bits=4)            # frozen weights in NF4 (QLoRA); bits=8: int8; format="int4"
    lorakit.attach(model, other, name="b"); lorakit.set_adapter(model, "b")   # several named adapters
    print(lorakit.summary(model))
    print(lorakit.generate(model, tokenizer, "What is 7 times 8?"))   # a causal LM's reply, chat template applied
"""

from lorakit.adapters import (  # noqa: E402
    CeloraConfig,
    LoraConfig,
    NormControl,
    LoraLinear,
    active_adapters,
    adapter_names,
    add_weighted_adapter,
    attach,
    delete_adapter,
    disabled,
    is_attached,
    load_adapter,
    lora_layers,
    merge,
    quantize,
    read_config,
    save_adapter,
    set_adapter,
    summary,
    unload,
    unmerge,
)
from lorakit.adapters.io import lorakit_version  # noqa: E402
from lorakit.adapters.precision import use_bf16  # noqa: E402
from lorakit.errors import LorakitError  # noqa: E402

__version__ = lorakit_version()  # pyproject.toml's, as installed

__all__ = [
    "CeloraConfig", "LoraConfig", "NormControl", "LoraLinear", "LorakitError", "active_adapters", "adapter_names", "add_weighted_adapter", "attach",
    "delete_adapter", "disabled", "is_attached", "load_adapter", "lora_layers", "merge", "quantize", "read_config", "save_adapter",
    "set_adapter", "summary", "unload", "unmerge", "use_bf16", "__version__",
]


def __getattr__(name: str):
    """``lorakit.generate`` and ``lorakit.export_gguf``: loaded on first use (they bring transformers with them)."""
    if name == "generate":
        from lorakit.train.generate import generate

        return generate
    if name == "export_gguf":
        from lorakit.export import export_gguf

        return export_gguf
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
