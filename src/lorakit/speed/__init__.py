"""Speed: the fast paths of an adapted model, whoever calls it.

    families     which models each fast path covers (asked of lorakit.architectures)
    forward      make_fast / remove_fast / own_forward: the model's own forward, fast in training calls
    fused_head   a decoder's loss with the head and cross-entropy fused (logit scale and soft-cap included)
    first_token  an encoder classifier's last layer computing the one row its head reads
    attention    the registration point for lorakit attention in transformers; lorakit_sdpa for CPU training
    norms        RMSNorm layers through kernels.rms_norm in training calls (the classes a probe shows it reproduces)
    dropout      FastDropout, nn.Dropout with kernels.dropout's faster mask

Kernels (pure tensor functions) live in ``lorakit.kernels``; this package applies them to models.
"""

from lorakit.speed.forward import fast_path, make_fast, own_forward, remove_fast

__all__ = ["fast_path", "make_fast", "own_forward", "remove_fast"]
