"""Compute kernels: per op, the backend-neutral MLX reference and the fast paths checked against it.

| module | holds |
| --- | --- |
| ``gated_delta`` | the gated delta rule's reference (token by token) and the dispatcher |
| ``gated_delta_chunked`` | the chunked (WY/UT) delta rule for prefill |
| ``linear`` | prefill-sized linear layers as row-major GEMMs on the CPU |
| ``moe`` | routed experts grouped by expert on the CPU |
| ``attention`` | blocked causal prefill attention on the CPU |
| ``lanes`` | the CPU lanes (one MLX stream per core) the CPU paths spread work over |
| ``registry`` | Metal kernel sources and objects, the Metal check, output comparison |
| ``candidates`` | ops with ordered candidates: verified and timed on first use, the fastest kept, cached on disk |
| ``metal_gdn`` | the Gated DeltaNet mixer ops (decode, prefill) and their candidates, our Metal kernels |
| ``metal_moe`` | the gather-MoE decode op and its candidates, our Metal kernel |
"""

# Importing the Metal wrappers registers their ops with candidates.status (the
# doctor's list) whichever module is imported first.
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
