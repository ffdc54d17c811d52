"""A llama.cpp LoRA adapter file (``llama-cli -m base.gguf --lora adapter.gguf``; Ollama's ``ADAPTER``).

The file, as llama.cpp's loader (llama-adapter.cpp) reads it: ``general.type = "adapter"``, ``adapter.type = "lora"``,
``adapter.lora.alpha``, the base's architecture, and for each adapted weight ``blk.N.<tensor>.weight`` the pair

    <name>.lora_a   A, r x in        (gguf shape [in, r])
    <name>.lora_b   B, out x r       (gguf shape [r, out]; query/key rows permuted as the base stores them)

llama.cpp computes y = W x + (alpha / r) B (A x), with one alpha for the file and r read from each B. lorakit's (and
PEFT's) scale s is per module: alpha_m / r_m, or alpha_m / sqrt(r_m) with rsLoRA, alpha_m and r_m from
alpha_pattern / rank_pattern. So B is written times s r / alpha: llama.cpp's (alpha / r) (s r / alpha) B A = s B A,
and a plain adapter's B is written as it is.

Refused (one line each, naming the alternative: the merged export, --format gguf): DoRA (a magnitude per row is no
LoRA pair), modules trained whole (modules_to_save) and trained biases (a LoRA file holds only pairs), and an adapted
output head that the base ties to its embeddings (llama.cpp applies no LoRA to a head the file does not hold).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lorakit.errors import ExportError
from lorakit.export.layout import GgufNames, gguf_layout
from lorakit.export.writer import Planned, encode, tensor_qtype, write_gguf

MERGED = "export the merged model instead: --format gguf"


def lora_pairs(source, names: GgufNames) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(GGUF weight name, A, B folded and permuted) of every adapted weight, refusing what a LoRA file cannot hold."""
    if any(lora.magnitude is not None for lora in source.merges.values()):
        raise ExportError(f"{source.adapter} is a DoRA adapter; llama.cpp's LoRA files hold no DoRA magnitudes. {MERGED}")
    if source.replaced:
        kind = "trained biases" if all(k.endswith(".bias") for k in source.replaced) else "modules trained whole"
        raise ExportError(f"{source.adapter} holds {kind} ({', '.join(sorted(source.replaced)[:3])}); a llama.cpp LoRA "
                          f"file holds only A/B pairs. {MERGED}")
    alpha = float(source.settings.alpha)
    if not np.isfinite(alpha) or alpha == 0:
        raise ExportError(f"lora_alpha={alpha}: llama.cpp reads alpha 0 as 'no scaling'; {MERGED}")
    base_tensors = _base_tensor_names(source.base_gguf)
    pairs = []
    for hf_name, lora in source.merges.items():
        name = names.name(hf_name)
        if name is None:
            raise ExportError(f"the adapter changes {hf_name}, which llama.cpp's {names.layout.arch} has no tensor for; "
                              f"{MERGED}")
        if base_tensors is not None and name not in base_tensors:
            tied = " (the base ties its output head to the token embeddings)" if name == "output.weight" else ""
            raise ExportError(f"the adapter changes {hf_name}, but {source.base_gguf} holds no {name}{tied}; {MERGED}")
        r = lora.A.shape[0]
        fold = lora.scale * r / alpha  # llama.cpp scales by alpha / r: this makes it s
        b = names.to_gguf_rows(hf_name, lora.B.to(torch.float32) * fold)
        pairs.append((name, lora.A.to(torch.float32), b))
    return pairs


def _base_tensor_names(base_gguf: Path | None) -> set[str] | None:
    if base_gguf is None:
        return None
    from gguf import GGUFReader

    return {t.name for t in GGUFReader(base_gguf).tensors}


def write_lora(source, out: Path, outtype: str) -> None:
    """Write ``source``'s adapter as a llama.cpp LoRA file at ``out``."""
    import gguf

    layout = gguf_layout(source.config)
    names = GgufNames(layout, source.config)
    pairs = lora_pairs(source, names)
    tensors = []
    for name, a, b in pairs:
        for suffix, t in ((".lora_a", a), (".lora_b", b)):
            values = t.numpy()
            qtype = tensor_qtype(name + suffix, values.shape, outtype)
            tensors.append(Planned(name + suffix, tuple(values.shape), qtype, lambda v=values, q=qtype: encode(v, q)))

    def metadata(writer) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(source.settings.alpha))
        writer.add_name(f"{Path(source.adapter).resolve().name} (LoRA for {source.spec})")
        writer.add_string("general.source.lorakit_base", str(source.spec))
        if source.base_gguf is not None:
            from lorakit.train.models import file_sha256

            writer.add_string("general.source.lorakit_base_sha256", file_sha256(source.base_gguf))

    write_gguf(out, layout.arch, metadata, tensors)
