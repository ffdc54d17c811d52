"""lorakit: fast LoRA fine-tuning that tells you what your adapters can and cannot do.

    import lorakit
    cfg = lorakit.LoraConfig(r=8, alpha=16, targets="attn-qv")
    model = lorakit.attach(model, cfg)         # its own forward is now the fast one in training calls (fast=False: not)
    lorakit.save_adapter(model, "out/")        # PEFT format
    lorakit.load_adapter(model, "out/")        # ours or PEFT's
    lorakit.merge(model); lorakit.unmerge(model); base = lorakit.unload(model, merge=True)
    lorakit.use_bf16(model)                    # frozen weights in bf16, adapters and optimizer in fp32
    lorakit.attach(model, other, name="b"); lorakit.set_adapter(model, "b")   # several named adapters
    print(lorakit.summary(model))
"""

__version__ = "0.1.0"

from lorakit.adapters import (  # noqa: E402
    LoraConfig,
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
    read_config,
    save_adapter,
    set_adapter,
    summary,
    unload,
    unmerge,
)
from lorakit.adapters.precision import use_bf16  # noqa: E402
from lorakit.errors import LorakitError  # noqa: E402

__all__ = [
    "LoraConfig", "LoraLinear", "LorakitError", "active_adapters", "adapter_names", "add_weighted_adapter", "attach",
    "delete_adapter", "disabled", "is_attached", "load_adapter", "lora_layers", "merge", "read_config", "save_adapter",
    "set_adapter", "summary", "unload", "unmerge", "use_bf16", "__version__",
]
