"""Routed experts for prefill on MLX's CPU backend: tokens grouped by expert, plain GEMMs.

mlx-lm's ``SwitchGLU`` runs the routed experts through ``mx.gather_qmm`` /
``mx.gather_mm`` (about 2.2 GFLOP/s on MLX's CPU backend with float32 inputs,
0.1-0.3 with bfloat16 ones). For prefill-sized inputs this module instead
sorts the ``(token, slot)`` pairs by expert, reads the per-expert counts on the
host (one small evaluation) and, expert by expert, dequantizes that expert's
three matrices and runs row-major GEMMs on its contiguous block of tokens
(about 6 GFLOP/s; see :mod:`qnext_mlx.kernels.linear` for the measurements).

The work is laid out transposed, features x tokens, so that every GEMM has the
dequantized weight (``[out, in]``, exactly as ``mx.dequantize`` returns it) as
its left operand and a row-major activation block as its right one: no weight
is ever copied or transposed. Per expert ``e`` with its tokens' inputs
``X_e^T`` ``[H, n_e]``::

    h_e^T = silu(W_gate[e] @ X_e^T) * (W_up[e] @ X_e^T)      # [I, n_e]
    y_e^T = W_down[e] @ h_e^T                                # [H, n_e]

The same maths as ``SwitchGLU`` (float summation order aside). Decode-sized
inputs keep ``SwitchGLU``: the dequantization of a whole expert only pays off
when it serves several tokens.
"""

from __future__ import annotations

from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu

from .linear import cpu_lanes, dequantized, lane_contexts

__all__ = ["MIN_ROWS_PER_EXPERT", "expert_weights", "grouped_switch_glu", "use_grouped_experts"]

# Average (token, slot) rows per expert from which grouping wins over
# gather_qmm: dequantizing an expert (3 matrices) costs about as much as
# 2-3 of its rows through the quantized kernel.
MIN_ROWS_PER_EXPERT = 4


def use_grouped_experts(num_rows: int, num_experts: int) -> bool:
    """True where :func:`grouped_switch_glu` beats the gathered kernels.

    ``num_rows``: tokens x experts per token.
    """
    return mx.default_device() == mx.cpu and num_rows >= MIN_ROWS_PER_EXPERT * num_experts


def expert_weights(proj: nn.Module, e: int) -> mx.array:
    """Expert ``e``'s float weight ``[out, in]`` from a ``SwitchLinear`` or
    ``QuantizedSwitchLinear`` (dequantized in the scales' dtype)."""
    if "scales" in proj:
        biases = proj.get("biases")
        return dequantized(proj["weight"][e], proj["scales"][e],
                           None if biases is None else biases[e],
                           proj.group_size, proj.bits, proj.mode)
    return proj["weight"][e]


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
