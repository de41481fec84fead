"""Routed experts for prefill on MLX's CPU backend: tokens grouped by expert, plain GEMMs.

mlx-lm's ``SwitchGLU`` runs the routed experts through ``mx.gather_qmm`` /
``mx.gather_mm`` (about 2.2 GFLOP/s on MLX's CPU backend with float32 inputs,
0.1-0.3 with bfloat16 ones). For prefill-sized inputs this module instead
sorts the ``(token, slot)`` rows by expert, reads the per-expert counts on the
host (one small evaluation) and, expert by expert, dequantizes that expert's
three matrices and runs row-major GEMMs on its contiguous block of rows
(about 6 GFLOP/s; see :mod:`qnext_mlx.kernels.linear` for the measurements).

The work is laid out transposed, features x rows, so that every GEMM has the
dequantized weight (``[out, in]``, exactly as ``mx.dequantize`` returns it) as
its left operand and a row-major activation block as its right one: no weight
is ever copied or transposed. Per expert ``e`` with its rows' inputs
``X_e^T`` ``[H, n_e]``::

    h_e^T = silu(W_gate[e] @ X_e^T) * (W_up[e] @ X_e^T)      # [I, n_e]
    y_e^T = W_down[e] @ h_e^T                                # [H, n_e]

Dequantizing an expert costs about 13 ms (1.5M weights at ~4.5 ns each in this
loop) and saves about 1.9 ms per row, so a quantized expert with fewer than
``MIN_DENSE_EXPERT_ROWS`` rows runs ``mx.quantized_matmul`` on its rows instead
(the kernel gather_qmm uses, minus the gather). Same maths as ``SwitchGLU``
either way (float summation order aside). Decode-sized inputs keep
``SwitchGLU`` (:func:`use_grouped_experts`): one fused op, no host read.
"""

from __future__ import annotations

from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu

from .lanes import cpu_lanes, lane_contexts
from .linear import dequantized

__all__ = [
    "MIN_DENSE_EXPERT_ROWS",
    "MIN_GROUPED_ROWS",
    "MIN_ROWS_PER_EXPERT",
    "expert_weights",
    "grouped_switch_glu",
    "switch_glu_lanes",
    "use_grouped_experts",
]

# Rows (tokens x experts per token) from which grouping beats SwitchGLU, in
# total and on average per expert: below them the host read, the per-expert
# ops and the dequantizations cost more than they save (measured crossovers:
# about 6 rows per expert with 64 experts, 3 with 512).
MIN_GROUPED_ROWS = 128
MIN_ROWS_PER_EXPERT = 6
# Rows from which a quantized expert is dequantized for plain GEMMs (measured
# crossover 7-8 rows at Qwen3-Next's expert shape, 2048 x 512).
MIN_DENSE_EXPERT_ROWS = 8


def use_grouped_experts(num_rows: int, num_experts: int) -> bool:
    """True where :func:`grouped_switch_glu` beats the gathered kernels
    (``num_rows``: tokens x experts per token)."""
    return (
        mx.default_device() == mx.cpu and num_rows >= MIN_GROUPED_ROWS and num_rows >= MIN_ROWS_PER_EXPERT * num_experts
    )


def expert_weights(proj: nn.Module, e: int) -> mx.array:
    """Expert ``e``'s float weight ``[out, in]`` from a ``SwitchLinear`` or
    ``QuantizedSwitchLinear`` (dequantized in the scales' dtype)."""
    if "scales" in proj:
        biases = proj.get("biases")
        return dequantized(
            proj["weight"][e],
            proj["scales"][e],
            None if biases is None else biases[e],
            proj.group_size,
            proj.bits,
            proj.mode,
        )
    return proj["weight"][e]


def switch_glu_lanes(switch_mlp: nn.Module, x: mx.array, inds: mx.array) -> mx.array:
    """``switch_mlp(x, inds)`` (decode: the gathered kernels) with the ``k``
    expert slots split over the CPU lanes; ``[..., k, H]`` as SwitchGLU returns."""
    k = inds.shape[-1]
    lanes = min(cpu_lanes(), k)
    if lanes <= 1:
        return switch_mlp(x, inds)
    bounds = [k * i // lanes for i in range(lanes + 1)]
    parts = []
    for ctx, a, b in zip(lane_contexts(lanes), bounds[:-1], bounds[1:]):
        with ctx:
            parts.append(switch_mlp(x, inds[..., a:b]))
    return mx.concatenate(parts, axis=-2)


def _qmm(proj: nn.Module, x: mx.array, e: int) -> mx.array:
    """``x @ W[e].T`` for a ``QuantizedSwitchLinear``: ``[n, in] -> [n, out]``."""
    biases = proj.get("biases")
    return mx.quantized_matmul(
        x,
        proj["weight"][e],
        proj["scales"][e],
        None if biases is None else biases[e],
        transpose=True,
        group_size=proj.group_size,
        bits=proj.bits,
        mode=proj.mode,
    )


def _sort_by_expert(inds: mx.array, num_experts: int) -> Tuple[mx.array, mx.array, List[int]]:
    """Sort the flattened ``(token, slot)`` rows by expert.

    Returns ``(order, inv_order, counts)``: ``order`` [M] row ids sorted by
    expert, its inverse permutation, and the per-expert row counts on the host.
    """
    flat = inds.reshape(-1)
    order = mx.argsort(flat)
    inv_order = mx.argsort(order)
    counts = (flat[:, None] == mx.arange(num_experts, dtype=flat.dtype)).sum(axis=0)
    # The one host read of this path: slicing per expert needs the counts.
    return order, inv_order, counts.tolist()


def grouped_switch_glu(switch_mlp: nn.Module, x: mx.array, inds: mx.array) -> mx.array:
    """What ``switch_mlp(x, inds)`` computes, with tokens grouped by expert.

    Args:
        switch_mlp: mlx-lm ``SwitchGLU`` (``gate_proj``/``up_proj``/``down_proj``
            being ``SwitchLinear`` or ``QuantizedSwitchLinear`` without biases)
            with the SwiGLU activation.
        x: ``[..., H]`` inputs.
        inds: ``[..., k]`` expert ids per token (int).
    Returns:
        ``[..., k, H]``: expert ``inds[..., j]``'s output for each token and slot.
    """
    gate_p, up_p, down_p = switch_mlp.gate_proj, switch_mlp.up_proj, switch_mlp.down_proj
    for p in (gate_p, up_p, down_p):
        if "bias" in p:
            raise ValueError("grouped_switch_glu: expert biases are not supported")
    H = x.shape[-1]
    k = inds.shape[-1]
    lead = inds.shape[:-1]
    num_experts = gate_p["weight"].shape[0]
    order, inv_order, counts = _sort_by_expert(inds, num_experts)

    # The inputs of the sorted rows, transposed: [H, M]. Row r of the flattened
    # (token, slot) list reads token r // k.
    xt = mx.contiguous(x.reshape(-1, H).T)
    xs_t = mx.take(xt, order // k, axis=1)

    quantized = "scales" in gate_p
    if quantized and any(0 < n < MIN_DENSE_EXPERT_ROWS for n in counts):
        xs = mx.take(x.reshape(-1, H), order // k, axis=0)  # [M, H], the sorted rows
    # Experts go to the CPU lanes (streams) with the fewest rows so far.
    contexts = lane_contexts(cpu_lanes())
    load = [0] * len(contexts)
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        lane = load.index(min(load))
        load[lane] += n
        with contexts[lane]:
            if quantized and n < MIN_DENSE_EXPERT_ROWS:
                xe = xs[start : start + n]
                g = _qmm(gate_p, xe, e)  # [n, I]
                y = _qmm(down_p, swiglu(g, _qmm(up_p, xe, e)), e)  # [n, H]
                outs.append(y.T)
            else:
                # An explicit copy: MLX hands a column slice to the BLAS with its
                # leading dimension, and the strided reads halve the GEMM's speed.
                xe = mx.contiguous(xs_t[:, start : start + n])
                g = expert_weights(gate_p, e) @ xe  # [I, n]
                u = expert_weights(up_p, e) @ xe
                w_down = expert_weights(down_p, e)
                outs.append(w_down @ swiglu(g, u).astype(w_down.dtype))  # [H, n]
        start += n
    ys_t = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)  # [H, M], sorted rows
    y_t = mx.take(ys_t, inv_order, axis=1)  # [H, M], original (token, slot) order
    return y_t.T.reshape(*lead, k, H)
