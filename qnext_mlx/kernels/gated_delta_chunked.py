"""Chunked (parallel) gated delta rule in MLX ops: the prefill path.

Same conventions as :mod:`qnext_mlx.kernels.gated_delta` (``q``/``k``
``[B, T, Hk, Dk]`` normalised with ``q`` pre-scaled, ``v`` ``[B, T, Hv, Dv]``,
``g``/``beta`` ``[B, T, Hv]``, state ``[B, Hv, Dv, Dk]`` float32).

The sequence is cut into chunks of ``C`` tokens and the rule is rewritten in
the chunk-wise WY/UT form of flash-linear-attention (``fla/ops/gated_delta_rule``)
and transformers' ``torch_chunk_gated_delta_rule``. Inside a chunk, with
``gamma_i`` the cumulative log decay from the chunk start to token ``i``
(``Gamma_i = exp(gamma_i)``), ``S`` the state at the chunk start written as
``[Dk, Dv]`` and ``D_ij = exp(gamma_i - gamma_j)`` for ``i >= j`` (else 0)::

    A     = I + strict_lower(beta_i (k_i . k_j) D_ij)          # UT system, [C, C]
    v_new = A^{-1} (beta v - beta Gamma k S)                   # the delta-rule corrections
    o     = Gamma q S + ((q k^T) * D) v_new                    # output
    S'    = Gamma_C S + (k * Gamma_C / Gamma)^T v_new          # state at the chunk end

Everything that does not depend on ``S`` (Gram matrices, decay masks, the
inverse ``A^{-1}``, the decayed q/k) is computed for all chunks at once; only
the three state products per chunk (``[Gamma q; beta Gamma k] @ S``, the
``A^{-1}`` / attention products and the state update) run in the loop over
chunks.

Cost notes for MLX's CPU backend (reference BLAS, ~4-6 GFLOP/s, every op has a
launch overhead): per token and value head the loop does ``6 Dk Dv`` matmul
FLOPs (the same count as the token-by-token recurrence, but as matmuls in a
handful of launches per chunk) and the intra-chunk work adds about
``4 C Dv + 4 C Dk / rep``; the inverse of the unit lower-triangular ``A`` goes
through LAPACK (``mx.linalg.tri_inv``, a few ms for a whole prefill) on the CPU
backend and through a matmul-only doubling scheme elsewhere. The state is
carried as ``[Dk, Dv]`` inside the loop so every product is a plain
(non-transposed ``B``) GEMM, the fast case of the BLAS MLX links on Linux.
Small chunks win on the CPU (16 is what :func:`~qnext_mlx.kernels.gated_delta.gated_delta`
uses there): the loop FLOPs do not depend on ``C`` and the intra-chunk FLOPs
grow with it. MLX's CPU ops are single-threaded, so on the CPU the heads can
also be split into "lanes" running on separate CPU streams (threads, opt-in); see
``lanes`` in :func:`gated_delta_chunked`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import mlx.core as mx

from .lanes import default_lanes, lane_streams

__all__ = ["gated_delta_chunked"]

# Floor applied to g before taking its log: exp(-69) is zero for every practical
# purpose, and a finite log keeps the cumulative sums free of inf - inf.
_G_FLOOR = 1e-30

# Chunks processed per segment: bounds the memory of the batched intra-chunk
# tensors (O(segment * Hv * (Dk + Dv)) floats) for very long prefills.
_MAX_CHUNKS_PER_SEGMENT = 64

# Automatic lanes only when the state has at least this many elements (the
# model's layer: 32 * 128 * 128 = 2**19).
_MIN_STATE_FOR_LANES = 2**18


def _unit_lower_inverse(a: mx.array, method: str) -> mx.array:
    """Inverse of a batch of unit lower-triangular matrices ``[..., C, C]``.

    ``method``: ``"tri_inv"`` (LAPACK on the CPU stream) or ``"doubling"``
    (``(I + N)^{-1} = (I - N)(I + N^2)(I + N^4)...`` with ``N`` strictly lower
    and nilpotent: ``2 log2(C)`` batched matmuls, no CPU-only op).
    """
    C = a.shape[-1]
    if method == "tri_inv":
        # On the CPU device keep the current (possibly lane) stream; elsewhere
        # the LAPACK op has to run on the CPU.
        stream = None if mx.default_device() == mx.cpu else mx.cpu
        return mx.linalg.tri_inv(a, upper=False, stream=stream)
    if method != "doubling":
        raise ValueError(f"unknown triangular inverse method {method!r}")
    eye = mx.eye(C, dtype=a.dtype)
    p = eye - a  # -N
    x = eye + p  # I - N
    span = 2
    while span < C:
        p = p @ p  # N^span (even power: sign +)
        x = x + x @ p
        span *= 2
    return x


def _prepare(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    lg: mx.array,
    beta: mx.array,
    C: int,
    inverse: str,
) -> dict:
    """Everything of one segment that does not depend on the state (float32 inputs).

    ``q``, ``k``: ``[B, T, Hk, Dk]``; ``v``: ``[B, T, Hv, Dv]``; ``lg`` (log g)
    and ``beta``: ``[B, T, Hv]``. Returns chunk-major ``[NC, B, Hv, ...]`` tensors.
    """
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[2], v.shape[3]
    rep = Hv // Hk
    NC = -(-T // C)
    pad = NC * C - T
    if pad:
        # Padded steps have k = 0, beta = 0 and g = 1 (log g = 0): they leave the
        # state untouched, and their outputs are sliced off by the caller.
        q = mx.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0)])
        k = mx.pad(k, [(0, 0), (0, pad), (0, 0), (0, 0)])
        v = mx.pad(v, [(0, 0), (0, pad), (0, 0), (0, 0)])
        lg = mx.pad(lg, [(0, 0), (0, pad), (0, 0)])
        beta = mx.pad(beta, [(0, 0), (0, pad), (0, 0)])

    # Chunk-major layouts: [NC, B, Hk, C, D] for key-head tensors and
    # [NC, B, Hk, rep, C, ...] for value-head ones (value head h = hk * rep + r).
    qc = q.reshape(B, NC, C, Hk, Dk).transpose(1, 0, 3, 2, 4)
    kc = k.reshape(B, NC, C, Hk, Dk).transpose(1, 0, 3, 2, 4)
    vc = v.reshape(B, NC, C, Hk, rep, Dv).transpose(1, 0, 3, 4, 2, 5)
    lgc = lg.reshape(B, NC, C, Hk, rep).transpose(1, 0, 3, 4, 2)
    bc = beta.reshape(B, NC, C, Hk, rep).transpose(1, 0, 3, 4, 2)

    gam = mx.cumsum(lgc, axis=-1)  # [NC, B, Hk, rep, C]

    # Gram matrices once per key head: [q; k] @ k^T -> [NC, B, Hk, 2C, C].
    kT = mx.contiguous(kc.swapaxes(-1, -2))
    gram = mx.concatenate([qc, kc], axis=-2) @ kT
    g_qk = mx.expand_dims(gram[..., :C, :], 3)  # [NC, B, Hk, 1, C, C]
    g_kk = mx.expand_dims(gram[..., C:, :], 3)

    idx = mx.arange(C)
    causal = idx[:, None] >= idx[None, :]
    diag = idx[:, None] == idx[None, :]
    decay = mx.exp(mx.where(causal, gam[..., :, None] - gam[..., None, :], -mx.inf))
    attn = g_qk * decay  # (q k^T) * D, [NC, B, Hk, rep, C, C]
    ut = mx.where(diag, 1.0, (g_kk * bc[..., :, None]) * decay)  # I + strict_lower
    ut_inv = _unit_lower_inverse(ut, inverse)

    eg = mx.exp(gam)[..., None]  # Gamma_i
    kcr = mx.expand_dims(kc, 3)  # [NC, B, Hk, 1, C, Dk]
    # Rows [Gamma q; -beta Gamma k]: one GEMM against S gives both the
    # inter-chunk output and the (negated) state prediction of v.
    qk_dec = mx.concatenate([mx.expand_dims(qc, 3) * eg, kcr * (-(bc[..., None]) * eg)], axis=-2)
    v_beta = vc * bc[..., None]
    k_dec = kcr * mx.exp(gam[..., -1:] - gam)[..., None]  # k * Gamma_C / Gamma_i
    g_last = mx.exp(gam[..., -1])[..., None, None]  # [NC, B, Hk, rep, 1, 1]

    def per_v(x):
        return mx.broadcast_to(x, (NC, B, Hk, rep) + x.shape[-2:]).reshape(NC, B, Hv, x.shape[-2], x.shape[-1])

    return {
        "qk_dec": per_v(qk_dec),  # [NC, B, Hv, 2C, Dk]
        "v_beta": per_v(v_beta),  # [NC, B, Hv, C, Dv]
        "k_decT": per_v(k_dec).swapaxes(-1, -2),  # [NC, B, Hv, Dk, C] (transposed view)
        "attn": per_v(attn),  # [NC, B, Hv, C, C]
        "ut_inv": per_v(ut_inv),  # [NC, B, Hv, C, C]
        "g_last": per_v(g_last),  # [NC, B, Hv, 1, 1]
    }


def _step(plan: dict, n: int, s: mx.array, C: int) -> Tuple[mx.array, mx.array]:
    """Chunk ``n``: output ``[B, Hv, C, Dv]`` and the next state (``[B, Hv, Dk, Dv]``)."""
    x = plan["qk_dec"][n] @ s  # [B, Hv, 2C, Dv]: [Gamma q S; -beta Gamma k S]
    v_new = plan["ut_inv"][n] @ (plan["v_beta"][n] + x[..., C:, :])
    out = mx.addmm(x[..., :C, :], plan["attn"][n], v_new)
    s = mx.addmm(s * plan["g_last"][n], plan["k_decT"][n], v_new)
    return out, s


def _scan(q, k, v, lg, beta, s, C: int, inverse: str, lanes: int):
    """Run the rule over the whole sequence (float32 inputs, state ``[B, Hv, Dk, Dv]``).

    With ``lanes > 1`` the key heads (and their value heads) are split over
    CPU streams, one thread each; the lanes' states are tied together after
    every chunk (``mx.depends``) so MLX evaluates the lanes side by side.
    """
    B, T, Hk, _ = k.shape
    Hv, Dv = v.shape[2], v.shape[3]
    rep = Hv // Hk
    if lanes > 1:
        bounds = [Hk * i // lanes for i in range(lanes + 1)]
        heads = list(zip(bounds[:-1], bounds[1:]))
        contexts = [functools.partial(mx.stream, st) for st in lane_streams(lanes)]
        states = []
        for ctx, (h0, h1) in zip(contexts, heads):
            with ctx():
                states.append(s[:, h0 * rep : h1 * rep])
    else:
        heads = [(0, Hk)]
        contexts = [contextlib.nullcontext]
        states = [s]

    seg = _MAX_CHUNKS_PER_SEGMENT * C
    ys = []
    for t0 in range(0, T, seg):
        t1 = min(T, t0 + seg)
        plans = []
        for ctx, (h0, h1) in zip(contexts, heads):
            v0, v1 = h0 * rep, h1 * rep
            with ctx():
                plans.append(
                    _prepare(
                        q[:, t0:t1, h0:h1],
                        k[:, t0:t1, h0:h1],
                        v[:, t0:t1, v0:v1],
                        lg[:, t0:t1, v0:v1],
                        beta[:, t0:t1, v0:v1],
                        C,
                        inverse,
                    )  # fmt: skip
                )
        NC = plans[0]["g_last"].shape[0]
        outs = [[] for _ in contexts]
        for n in range(NC):
            for i, ctx in enumerate(contexts):
                with ctx():
                    o, states[i] = _step(plans[i], n, states[i], C)
                outs[i].append(o)
            if len(states) > 1:
                # Tie each lane's next step to every lane's current one (no data
                # moves). Without the tie MLX's width-limited BFS evaluation
                # order walks one lane's chain of chunks to the end before the
                # other's, and the lanes run one after the other.
                prev = list(states)
                for i, ctx in enumerate(contexts):
                    with ctx():
                        others = [x for j, x in enumerate(prev) if j != i]
                        states[i] = mx.depends(prev[i], others)
        lane_ys = []
        for ctx, lane_outs in zip(contexts, outs):
            with ctx():
                lane_ys.append(mx.stack(lane_outs, axis=0))  # [NC, B, H_lane, C, Dv]
        y = lane_ys[0] if len(lane_ys) == 1 else mx.concatenate(lane_ys, axis=2)
        y = y.transpose(1, 0, 3, 2, 4).reshape(B, NC * C, Hv, Dv)
        ys.append(y[:, : t1 - t0] if NC * C != t1 - t0 else y)
    y = ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=1)
    s = states[0] if len(states) == 1 else mx.concatenate(states, axis=1)
    return y, s


def gated_delta_chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: Optional[mx.array] = None,
    chunk_size: int = 64,
    *,
    inverse: Optional[str] = None,
    lanes: Optional[int] = 1,
) -> Tuple[mx.array, mx.array]:
    """Chunk-parallel gated delta rule (WY/UT form), for prefill.

    Computes exactly what :func:`~qnext_mlx.kernels.gated_delta.gated_delta_recurrent`
    computes, up to float32 rounding, for any length ``T`` (the last chunk is
    padded internally with steps that cannot change the state).

    Args:
        q, k: ``[B, T, Hk, Dk]``, L2-normalised, ``q`` scaled by ``Dk**-0.5``.
        v: ``[B, T, Hv, Dv]`` with ``Hv`` a multiple of ``Hk`` (value head
            ``h`` reads key head ``h // (Hv // Hk)``).
        g: ``[B, T, Hv]`` decay in (0, 1] (values below 1e-30 are treated as 1e-30).
        beta: ``[B, T, Hv]`` in (0, 1).
        state: ``[B, Hv, Dv, Dk]`` initial state, or None for zeros.
        chunk_size: tokens per chunk ``C``.
        inverse: how to invert the per-chunk unit-triangular system:
            ``"tri_inv"`` (LAPACK, CPU stream), ``"doubling"`` (matmuls only) or
            None to pick ``"tri_inv"`` when the default device is the CPU.
        lanes: on the CPU device, split the key heads (with their value heads)
            into this many groups run concurrently on separate CPU streams
            (MLX runs each CPU stream on its own thread; its CPU ops are
            otherwise single-threaded). None: one lane per available core, at
            most 8 and at most ``Hk``, for states of at least 2**18 elements
            (1 below). Capped at ``Hk``; ignored (1) off the CPU. Opt-in (the
            default is 1): the lanes run in lock-step, chunk by chunk, which
            pays off on idle cores but was measured slower than one lane on a
            machine whose cores were shared with other work.
    Returns:
        ``(y, final_state)``: ``y`` ``[B, T, Hv, Dv]`` float32 and the state
        after the last token ``[B, Hv, Dv, Dk]`` float32. All accumulation is
        float32 whatever the input dtype.
    """
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4:
        raise ValueError(f"bad q/k/v shapes {q.shape}, {k.shape}, {v.shape}")
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[2], v.shape[3]
    if v.shape[:2] != (B, T) or Hv % Hk != 0:
        raise ValueError(f"v {v.shape} does not match k {k.shape}")
    if g.shape != (B, T, Hv) or beta.shape != (B, T, Hv):
        raise ValueError(f"g {g.shape} / beta {beta.shape} must be {(B, T, Hv)}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    on_cpu = mx.default_device() == mx.cpu
    if inverse is None:
        inverse = "tri_inv" if on_cpu else "doubling"
    if lanes is None:
        # Small problems are not worth the per-chunk cross-lane bookkeeping.
        big = B * Hv * Dk * Dv >= _MIN_STATE_FOR_LANES
        lanes = default_lanes() if on_cpu and big else 1
    lanes = max(1, min(int(lanes), Hk)) if on_cpu else 1

    f32 = mx.float32
    if state is None:
        s = mx.zeros((B, Hv, Dk, Dv), dtype=f32)
    else:
        if state.shape != (B, Hv, Dv, Dk):
            raise ValueError(f"state {state.shape} must be {(B, Hv, Dv, Dk)}")
        s = state.astype(f32).swapaxes(-1, -2)  # carried as [Dk, Dv]
    if T == 0:
        return mx.zeros((B, 0, Hv, Dv), dtype=f32), mx.contiguous(s.swapaxes(-1, -2))

    q = q.astype(f32)
    k = k.astype(f32)
    v = v.astype(f32)
    lg = mx.log(mx.maximum(g.astype(f32), _G_FLOOR))
    beta = beta.astype(f32)

    C = min(chunk_size, T)
    y, s = _scan(q, k, v, lg, beta, s, C, inverse, lanes)
    return y, mx.contiguous(s.swapaxes(-1, -2))
