"""nn.Dropout with ``kernels.dropout.fast_dropout``'s mask (3-5x faster on CPU; p rounded to a multiple of 1/65536)."""

from __future__ import annotations

from torch import Tensor, nn

from lorakit.kernels.dropout import fast_dropout


class FastDropout(nn.Dropout):
    """nn.Dropout with ``fast_dropout``'s mask; drop-in (same ``p``, same state_dict)."""

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)
