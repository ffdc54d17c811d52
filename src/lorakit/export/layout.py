"""Where a Hugging Face weight lies in a llama.cpp GGUF file: its tensor name and the order of its rows.

The family's ``GgufLayout`` (architectures.py) gives the GGUF architecture; gguf-py's ``TensorNameMap`` for that
architecture gives each tensor's name (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``), as
llama.cpp's own converter names them. Llama-family query and key rows are stored permuted for llama.cpp's rotary
embedding (pairs (i, i + d/2) of a head made adjacent), with h = the heads of the projection (the KV heads for k):

    to_gguf_rows(W) = W.reshape(h, 2, d/2, ...).swapaxes(1, 2).reshape(W.shape)        (convert_hf_to_gguf's permute)
    from_gguf_rows  = its inverse: W.reshape(h, d/2, 2, ...).swapaxes(1, 2).reshape(W.shape)

A LoRA delta s B A of such a weight permutes with it: P(W + s B A) = P W + s (P B) A, so an adapter's B is stored
permuted and its A as it is. Gemma's RMSNorm weights are stored as 1 + w (``norm_offset``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit.architectures import GgufLayout, family, families_with, is_encoder
from lorakit.errors import ExportError


def gguf_layout(config) -> GgufLayout:
    """The GGUF layout of a model's family; an ExportError naming the families llama.cpp runs for any other."""
    model_type = getattr(config, "model_type", None)
    f = family(model_type)
    if is_encoder(model_type):
        raise ExportError(f"the base is a {model_type} encoder; llama.cpp and Ollama run decoders (causal LMs). "
                          "Use `lorakit merge` for a transformers model directory instead")
    if f is None or f.gguf is None:
        known = ", ".join(sorted(families_with("gguf")))
        raise ExportError(f"lorakit exports GGUF for the decoder families {known}; the base is {model_type!r}. "
                          "Use `lorakit merge` for a transformers model directory instead")
    return f.gguf


def _text_config(config):
    return getattr(config, "text_config", None) or config


@dataclass
class GgufNames:
    """GGUF names and row order of one model's weights (``layout`` of its family, ``config`` its transformers
    config)."""

    layout: GgufLayout
    config: object

    def __post_init__(self) -> None:
        import gguf

        text = _text_config(self.config)
        arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.layout.arch)
        self.arch = arch
        self._map = gguf.get_tensor_name_map(arch, int(text.num_hidden_layers))
        self.heads = int(text.num_attention_heads)
        self.kv_heads = int(getattr(text, "num_key_value_heads", None) or self.heads)

    def name(self, hf_name: str) -> str | None:
        """``blk.3.attn_q.weight`` for ``model.layers.3.self_attn.q_proj.weight``; None for a tensor llama.cpp has
        no name for."""
        return self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def _heads(self, hf_name: str) -> int | None:
        if not self.layout.permute_qk:
            return None
        leaf = hf_name.rsplit(".", 2)[-2] if hf_name.endswith((".weight", ".bias")) else hf_name.rsplit(".", 1)[-1]
        return {"q_proj": self.heads, "k_proj": self.kv_heads}.get(leaf)

    def to_gguf_rows(self, hf_name: str, rows: Tensor) -> Tensor:
        """``rows`` (the weight, a bias, or an adapter's B: one row per output feature) in the file's row order."""
        h = self._heads(hf_name)
        if h is None:
            return rows
        return rows.reshape(h, 2, rows.shape[0] // h // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)

    def from_gguf_rows(self, hf_name: str, rows: Tensor) -> Tensor:
        """The inverse of ``to_gguf_rows``."""
        h = self._heads(hf_name)
        if h is None:
            return rows
        return rows.reshape(h, rows.shape[0] // h // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)

    def stored(self, hf_name: str, values: Tensor) -> Tensor:
        """A base tensor of the Hugging Face checkpoint as llama.cpp stores it (rows, norm offset)."""
        values = self.to_gguf_rows(hf_name, values)
        if self.layout.norm_offset and hf_name.endswith("norm.weight"):
            values = values.to(torch.float32) + self.layout.norm_offset
        return values
