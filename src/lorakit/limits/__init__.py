"""Computational limits of LoRA (Hu et al., ICLR 2025), made usable.

The LoRA gradient of attention is computable in almost linear time in L exactly when the
logits beta q.k stay below about sqrt(log L). This package measures where a model stands
(``measure_norms``), keeps adapters below a spectral-norm cap (``LoraConfig(norm_cap=...)``),
computes the paper's explicit gradient (``gradient``) and runs the polynomial attention
when the certified logit bound allows it (``use_attention``).
"""

from lorakit.limits.bounds import logit_bound, output_error_bound, smallest_degree, taylor_relative_error

__all__ = ["logit_bound", "output_error_bound", "smallest_degree", "taylor_relative_error"]
