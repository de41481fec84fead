"""Compute kernels: backend-neutral MLX references and the fast paths checked against them."""

from importlib import import_module

from .gated_delta import (
    compute_decay_beta,
    gated_delta,
    gated_delta_recurrent,
    l2_normalize,
    normalize_qk,
)
from .gated_delta_chunked import gated_delta_chunked

# Importing metal_moe registers the "moe_decode" kernel with metal.kernel_status
# (the doctor's list) whichever module is imported first.
import_module(".metal_moe", __name__)

__all__ = [
    "compute_decay_beta",
    "gated_delta",
    "gated_delta_chunked",
    "gated_delta_recurrent",
    "l2_normalize",
    "normalize_qk",
]
