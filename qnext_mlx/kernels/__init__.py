"""Compute kernels: backend-neutral MLX references and the fast paths checked against them."""

from .gated_delta import (
    compute_decay_beta,
    gated_delta,
    gated_delta_recurrent,
    l2_normalize,
    normalize_qk,
)
from .gated_delta_chunked import gated_delta_chunked

__all__ = [
    "compute_decay_beta",
    "gated_delta",
    "gated_delta_chunked",
    "gated_delta_recurrent",
    "l2_normalize",
    "normalize_qk",
]
