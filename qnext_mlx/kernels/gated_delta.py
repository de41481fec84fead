"""Gated delta rule: the backend-neutral MLX reference.

Conventions shared by every implementation of the rule in this package (the
reference here, the chunked prefill and the Metal/CUDA kernels):

- ``q``, ``k``: ``[B, T, Hk, Dk]``, already L2-normalised, ``q`` already scaled
  by ``Dk ** -0.5`` (see :func:`normalize_qk`).
- ``v``: ``[B, T, Hv, Dv]`` with ``Hv`` a multiple of ``Hk``; value head ``h``
  reads key head ``h // (Hv // Hk)`` (transformers' ``repeat_interleave``).
- ``g``: ``[B, T, Hv]`` decay in (0, 1]; ``beta``: ``[B, T, Hv]`` in (0, 1).
- ``state``: ``[B, Hv, Dv, Dk]`` float32 (mlx-lm's layout, so its caches and
  kernels interoperate).

The rule, per value head: ``S_t = g_t S_{t-1} + k_t beta_t (v_t - g_t S_{t-1} k_t)^T``
(written with S as ``[Dv, Dk]``) and ``o_t = S_t q_t``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .gated_delta_chunked import gated_delta_chunked


def compute_decay_beta(a: mx.array, b: mx.array, A_log: mx.array, dt_bias: mx.array) -> Tuple[mx.array, mx.array]:
    """Decay ``g = exp(-exp(A_log) * softplus(a + dt_bias))`` and ``beta = sigmoid(b)``.

    Args:
        a, b: ``[B, T, Hv]`` raw projections.
        A_log, dt_bias: ``[Hv]`` per-head parameters.
    Returns:
        ``(g, beta)``, both ``[B, T, Hv]`` float32.
    """
    a = a.astype(mx.float32)
    g = mx.exp(-mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias.astype(mx.float32)))
    return g, mx.sigmoid(b.astype(mx.float32))


def l2_normalize(x: mx.array, eps: float = 1e-6) -> mx.array:
    """``x / sqrt(sum(x^2) + eps)`` over the last axis, as transformers' ``l2norm``."""
    x32 = x.astype(mx.float32)
    return x32 * mx.rsqrt((x32 * x32).sum(axis=-1, keepdims=True) + eps)


def normalize_qk(q: mx.array, k: mx.array, eps: float = 1e-6) -> Tuple[mx.array, mx.array]:
    """L2-normalise ``q`` and ``k`` (``[B, T, Hk, Dk]``) and scale ``q`` by ``Dk**-0.5``.

    Returns float32 arrays: the recurrence accumulates in float32 whatever the
    model dtype, as the reference implementations do.
    """
    scale = q.shape[-1] ** -0.5
    return l2_normalize(q, eps) * scale, l2_normalize(k, eps)


def gated_delta_recurrent(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: Optional[mx.array] = None,
    return_all_states: bool = False,
):
    """Token-by-token gated delta rule (the reference every fast path is checked against).

    Args:
        q, k: ``[B, T, Hk, Dk]``; v: ``[B, T, Hv, Dv]``; g, beta: ``[B, T, Hv]``.
        state: ``[B, Hv, Dv, Dk]`` initial state or None for zeros.
        return_all_states: also return the state after every token,
            ``[B, T, Hv, Dv, Dk]`` (speculative decoding rolls back to one of them).
    Returns:
        ``(y, state)`` with ``y`` ``[B, T, Hv, Dv]`` float32 and the final state
        ``[B, Hv, Dv, Dk]`` float32; plus the per-token states when asked.
    """
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[2], v.shape[3]
    rep = Hv // Hk
    if rep > 1:
        q = mx.repeat(q, rep, axis=2)
        k = mx.repeat(k, rep, axis=2)
    q = q.astype(mx.float32)
    k = k.astype(mx.float32)
    v = v.astype(mx.float32)
    g = g.astype(mx.float32)
    beta = beta.astype(mx.float32)
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    else:
        state = state.astype(mx.float32)
    ys, states = [], []
    for t in range(T):
        state = state * g[:, t, :, None, None]
        kv_mem = (state * k[:, t, :, None, :]).sum(axis=-1)  # [B, Hv, Dv]
        delta = (v[:, t] - kv_mem) * beta[:, t, :, None]
        state = state + delta[..., None] * k[:, t, :, None, :]
        ys.append((state * q[:, t, :, None, :]).sum(axis=-1))
        if return_all_states:
            states.append(state)
    y = mx.stack(ys, axis=1)
    if return_all_states:
        return y, state, mx.stack(states, axis=1)
    return y, state


def gated_delta(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """The gated delta rule through the fastest implementation available for these shapes.

    Same arguments and results as :func:`gated_delta_recurrent`. Sequences of
    ``T >= 16`` tokens (prefill) go through the chunked WY/UT form
    (:func:`~qnext_mlx.kernels.gated_delta_chunked.gated_delta_chunked`, chunks
    of 16 tokens on the CPU backend, 64 elsewhere); shorter ones (decode,
    speculative verification) through the token-by-token recurrence. Measured
    on the CPU backend at the model's shapes (Hk=16, Hv=32, Dk=Dv=128) the
    chunked path is about on par at T=8 and ahead from T=16 on.
    """
    if q.shape[1] >= 16:
        chunk = 16 if mx.default_device() == mx.cpu else 64
        return gated_delta_chunked(q, k, v, g, beta, state, chunk_size=chunk)
    return gated_delta_recurrent(q, k, v, g, beta, state)
