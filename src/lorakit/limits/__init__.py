"""Computational limits of LoRA (Hu et al., ICLR 2025), made usable.

The LoRA gradient of attention is computable in almost linear time in L exactly when the
logits beta q.k stay below about sqrt(log L). This package measures where a model stands
(``measure_norms``), keeps adapters below a spectral-norm cap (``LoraConfig(norm_cap=...)``,
``cap_norms``), computes the paper's explicit gradient (``gradient``) and runs polynomial
attention where the certified logit bound allows it (``use_attention``).
"""

from lorakit.limits import gradient
from lorakit.limits.attention import AttentionPolicy, decisions, use_attention
from lorakit.limits.bounds import logit_bound, output_error_bound, smallest_degree, taylor_relative_error
from lorakit.limits.norm_cap import adapter_spectral_norm, cap_adapter, cap_norms, install_norm_cap
from lorakit.limits.norms import NormReport, measure_norms, rescale_query_key

__all__ = [
    "AttentionPolicy", "NormReport", "adapter_spectral_norm", "cap_adapter", "cap_norms", "decisions", "gradient",
    "install_norm_cap", "logit_bound", "measure_norms", "output_error_bound", "rescale_query_key", "smallest_degree",
    "taylor_relative_error", "use_attention",
]
