"""Compute kernels: per op, the backend-neutral MLX reference and the fast paths checked against it.

| module | holds |
| --- | --- |
| ``gated_delta`` | the gated delta rule's reference (token by token) and the dispatcher |
| ``gated_delta_chunked`` | the chunked (WY/UT) delta rule for prefill |
| ``linear`` | prefill-sized linear layers as row-major GEMMs on the CPU |
| ``moe`` | routed experts grouped by expert on the CPU |
| ``attention`` | blocked causal prefill attention on the CPU |
| ``lanes`` | the CPU lanes (one MLX stream per core) the CPU paths spread work over |
| ``registry`` | Metal kernel sources and objects, first-use verification, status |
| ``metal_gdn`` | the Gated DeltaNet Metal kernels (decode step, chunked prefill) |
| ``metal_moe`` | the gather-MoE Metal decode kernel |
"""

# Importing the Metal wrappers registers their kernels with registry.kernel_status
# (the doctor's list) whichever module is imported first.
from . import metal_gdn, metal_moe  # noqa: E402,F401  (imported for their registration)
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
