"""Expressive power of LoRA (Zeng & Lee, ICLR 2024): exact adapter constructions and their errors.

    from lorakit import expressive as ex
    c = ex.linear_adapters(frozen=[W1, W2], target=Wbar, rank=4)   # c.adapters = [(B_l, A_l)], layer 1 first
    ex.linear_error(frozen, target, rank)                           # (sigma_{RL+1}(E), Frobenius form)
    ex.min_rank(frozen, target, tol=0.0)                            # smallest uniform rank reaching tol
    adapted = ex.fnn_adapters(frozen=fnn, target=target, rank=8, input_bound=5.0)   # an FNN; exact at R >= ceil(D/M)
    ex.fnn_error_bound(fnn, target, rank, input_cov)                # below the threshold
    adapted_tfn = ex.tfn_adapters(frozen=tfn, target=other_tfn, rank=8)   # same depth; exact at R >= ceil(D/2)
    advice = ex.advise(ex.spectra(base, ex.weight_deltas(base, tuned, names)), budget=300_000)  # rank_pattern
"""

from lorakit.expressive.fnn import FNN, AdaptedFNN, fnn_adapters, fnn_error_bound, partition_groups
from lorakit.expressive.advice import RankAdvice, advise, full_finetune_deltas, spectra, tuned_deltas, weight_deltas
from lorakit.expressive.tfn import TFN, AdaptedTFN, tfn_adapters
from lorakit.expressive.linear import (LinearConstruction, SingularMatrixError, error_matrix, linear_adapters,
                                       linear_error, min_rank)

__all__ = ["RankAdvice", "advise", "full_finetune_deltas", "spectra", "tuned_deltas", "weight_deltas", "TFN", "AdaptedTFN", "tfn_adapters", "FNN", "AdaptedFNN", "fnn_adapters", "fnn_error_bound", "partition_groups", "LinearConstruction", "SingularMatrixError", "error_matrix", "linear_adapters", "linear_error", "min_rank"]
