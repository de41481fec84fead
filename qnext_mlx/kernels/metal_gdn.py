"""Metal kernels for the Gated DeltaNet (decode step and chunked prefill), self-verified
against the MLX reference through :mod:`qnext_mlx.kernels.registry`.

On a Mac the first call with a new configuration (dtype, head sizes, conv
width, head ratio) runs the kernel on a small random input and compares it
with the reference; on a mismatch that configuration uses the reference path
from then on. Off Metal (and in tests without a ``kernel_factory``) the
reference runs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from . import registry
from .gated_delta import compute_decay_beta, gated_delta, gated_delta_recurrent, normalize_qk
from .registry import MAX_DECODE_T, KernelFactory

__all__ = [
    "gated_delta_decode",
    "gated_delta_decode_reference",
    "gated_delta_prefill",
    "gdn_decode_call",
    "gdn_decode_supported",
    "gdn_prefill_call",
    "gdn_prefill_supported",
    "run_gdn_decode_kernel",
    "run_gdn_prefill_kernel",
]

# ---------------------------------------------------------------------------
# Gated DeltaNet decode
# ---------------------------------------------------------------------------

GDN_DECODE_INPUTS = ["x", "conv_w", "conv_state", "a", "b", "A_log", "dt_bias", "state_in", "T"]
GDN_DECODE_OUTPUTS = ["y", "conv_state_out", "state_out", "states"]


def gated_delta_decode_reference(
    mixed_qkv: mx.array,
    conv_weight: mx.array,
    conv_state: Optional[mx.array],
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: Optional[mx.array],
    *,
    num_k_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    return_all_states: bool = False,
):
    """The Gated DeltaNet token mixing in MLX ops: the path off Metal, the fallback, and the
    reference the kernels are verified against; any ``T``.

    Same arguments and results as :func:`gated_delta_decode`.
    """
    B, T, CD = mixed_qkv.shape
    Hv = a.shape[-1]
    K = conv_weight.shape[1]
    Hk, Dk, Dv = num_k_heads, head_k_dim, head_v_dim
    if conv_state is None:
        conv_state = mx.zeros((B, K - 1, CD), dtype=mixed_qkv.dtype)
    conv_in = mx.concatenate([conv_state.astype(mixed_qkv.dtype), mixed_qkv], axis=1)
    new_conv_state = conv_in[:, -(K - 1) :, :]
    conv_out = nn.silu(mx.conv1d(conv_in, conv_weight, groups=CD))
    q, k, v = mx.split(conv_out, [Hk * Dk, 2 * Hk * Dk], axis=-1)
    q, k = normalize_qk(q.reshape(B, T, Hk, Dk), k.reshape(B, T, Hk, Dk))
    g, beta = compute_decay_beta(a, b, A_log, dt_bias)
    v = v.reshape(B, T, Hv, Dv)
    if return_all_states:
        out = gated_delta_recurrent(q, k, v, g, beta, state, return_all_states=True)
    else:  # the dispatcher takes the chunked form for prefill-length runs
        out = gated_delta(q, k, v, g, beta, state)
    y = out[0].astype(mixed_qkv.dtype)
    if return_all_states:
        return y, new_conv_state, out[1], out[2]
    return y, new_conv_state, out[1]


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def gdn_decode_call(
    mixed_qkv: mx.array,
    conv_weight: mx.array,
    conv_state: mx.array,
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: mx.array,
    *,
    num_k_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    return_all_states: bool = False,
) -> Dict[str, Any]:
    """The call description of the decode kernel: keyword arguments for the kernel object
    (``inputs``, ``template``, ``grid``, ``threadgroup``, ``output_shapes``, ``output_dtypes``).

    Shapes as in :func:`gated_delta_decode`; ``conv_state`` and ``state`` must be given.
    """
    B, T, CD = mixed_qkv.shape
    Hv = a.shape[-1]
    K = conv_weight.shape[1]
    Hk, Dk, Dv = num_k_heads, head_k_dim, head_v_dim
    in_t = mixed_qkv.dtype
    # The model keeps the conv output in the promoted dtype of input and weight;
    # the kernel rounds to it before the norms to match.
    conv_t = (mx.zeros((), in_t) + mx.zeros((), conv_weight.dtype)).dtype  # type promotion only, never evaluated
    rps = 4 if Dv % 4 == 0 else (2 if Dv % 2 == 0 else 1)
    nsg = next(n for n in (8, 4, 2, 1) if (Dv // rps) % n == 0)
    inputs = [
        mixed_qkv,
        conv_weight,
        conv_state.astype(in_t),
        a.astype(in_t),
        b.astype(in_t),
        A_log.astype(mx.float32),
        dt_bias.astype(mx.float32),
        state.astype(mx.float32),
        T,
    ]
    template = [
        ("InT", in_t),
        ("CT", conv_t),
        ("Dk", Dk),
        ("Dv", Dv),
        ("Hk", Hk),
        ("Hv", Hv),
        ("K", K),
        ("TMax", _next_pow2(T)),
        ("RPS", rps),
        ("NSG", nsg),
        ("SaveStates", bool(return_all_states)),
    ]
    states_shape = (B, T, Hv, Dv, Dk) if return_all_states else (1,)
    return dict(
        inputs=inputs,
        template=template,
        grid=(32, Dv // rps, B * Hv),
        threadgroup=(32, nsg, 1),
        output_shapes=[(B, T, Hv, Dv), (B, K - 1, CD), (B, Hv, Dv, Dk), states_shape],
        output_dtypes=[in_t, in_t, mx.float32, mx.float32],
    )


def gdn_decode_supported(
    mixed_qkv: mx.array, a: mx.array, *, num_k_heads: int, head_k_dim: int, head_v_dim: int
) -> bool:
    """Whether the decode kernel handles these shapes (otherwise use the reference)."""
    B, T, CD = mixed_qkv.shape
    Hv = a.shape[-1]
    return (
        1 <= T <= MAX_DECODE_T
        and head_k_dim % 32 == 0
        and head_k_dim <= 256
        and Hv % num_k_heads == 0
        and CD == 2 * num_k_heads * head_k_dim + Hv * head_v_dim
        and mixed_qkv.dtype in (mx.float32, mx.float16, mx.bfloat16)
    )


def run_gdn_decode_kernel(factory: KernelFactory, *args, return_all_states: bool = False, **kw):
    """Run the decode kernel through ``factory`` (no verification, no fallback)."""
    call = gdn_decode_call(*args, return_all_states=return_all_states, **kw)
    kernel = registry.kernel_object(
        factory, "gdn_decode.metal", "qnext_gdn_decode", GDN_DECODE_INPUTS, GDN_DECODE_OUTPUTS
    )
    y, conv_state, state, states = kernel(**call)
    if return_all_states:
        return y, conv_state, state, states
    return y, conv_state, state


def gated_delta_decode(
    mixed_qkv: mx.array,
    conv_weight: mx.array,
    conv_state: Optional[mx.array],
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: Optional[mx.array],
    *,
    num_k_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    return_all_states: bool = False,
    kernel_factory: Optional[KernelFactory] = None,
):
    """Gated DeltaNet token mixing: conv, SiLU, norms, gates and the delta rule.

    Runs of up to ``MAX_DECODE_T`` tokens use the fused Metal kernel where it is
    available and verified; everything else (and every other backend) takes
    :func:`gated_delta_decode_reference`, whose delta rule is chunked for long runs.

    Args:
        mixed_qkv: ``[B, T, CD]`` the projected q|k|v before the conv, channels
            ``[q (Hk*Dk) | k (Hk*Dk) | v (Hv*Dv)]`` (``CD = 2*Hk*Dk + Hv*Dv``).
        conv_weight: ``[CD, K, 1]`` depthwise conv weight (MLX Conv1d layout).
        conv_state: ``[B, K-1, CD]`` the previous K-1 conv inputs, or None for zeros.
        a, b: ``[B, T, Hv]`` decay and beta projections.
        A_log, dt_bias: ``[Hv]``.
        state: ``[B, Hv, Dv, Dk]`` float32 recurrent state, or None for zeros.
        num_k_heads, head_k_dim, head_v_dim: ``Hk``, ``Dk``, ``Dv``.
        return_all_states: also return the state after every token
            ``[B, T, Hv, Dv, Dk]`` (speculative decoding rolls back to one).
        kernel_factory: ``mx.fast.metal_kernel``-compatible factory; default:
            Metal when available (verified on first use), else the reference.
    Returns:
        ``(y, new_conv_state, new_state)`` (+ ``states``): ``y`` ``[B, T, Hv, Dv]``
        in ``mixed_qkv.dtype`` (the recurrence output before the gated norm),
        ``new_conv_state`` ``[B, K-1, CD]`` in ``mixed_qkv.dtype``, ``new_state``
        ``[B, Hv, Dv, Dk]`` float32.
    """
    kw = dict(num_k_heads=num_k_heads, head_k_dim=head_k_dim, head_v_dim=head_v_dim)
    B, T, CD = mixed_qkv.shape
    Hv = a.shape[-1]
    K = conv_weight.shape[1]
    factory = kernel_factory
    verify = False
    if factory is None and registry.metal_available():
        factory, verify = mx.fast.metal_kernel, True
    if factory is None or not gdn_decode_supported(mixed_qkv, a, **kw):
        return gated_delta_decode_reference(
            mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, state, return_all_states=return_all_states, **kw
        )
    if verify:
        config = (str(mixed_qkv.dtype), str(conv_weight.dtype), head_k_dim, head_v_dim, K, Hv // num_k_heads)
        if not registry.is_verified("gdn_decode", config, factory):
            return gated_delta_decode_reference(
                mixed_qkv,
                conv_weight,
                conv_state,
                a,
                b,
                A_log,
                dt_bias,
                state,
                return_all_states=return_all_states,
                **kw,
            )
    if conv_state is None:
        conv_state = mx.zeros((B, K - 1, CD), dtype=mixed_qkv.dtype)
    if state is None:
        state = mx.zeros((B, Hv, head_v_dim, head_k_dim), dtype=mx.float32)
    return run_gdn_decode_kernel(
        factory,
        mixed_qkv,
        conv_weight,
        conv_state,
        a,
        b,
        A_log,
        dt_bias,
        state,
        return_all_states=return_all_states,
        **kw,
    )


# ---------------------------------------------------------------------------
# Chunked prefill (simdgroup matrices)
# ---------------------------------------------------------------------------

GDN_PREFILL_INPUTS = ["q", "k", "v", "g", "beta", "state_in", "T"]
GDN_PREFILL_OUTPUTS = ["y", "state_out"]


def gdn_prefill_call(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> Dict[str, Any]:
    """Call description of the chunked prefill kernel (shapes as in :func:`gated_delta_prefill`)."""
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[2], v.shape[3]
    nsg = next(n for n in (4, 2, 1) if Dv % (8 * n) == 0)
    return dict(
        inputs=[q, k, v, g.astype(mx.float32), beta.astype(mx.float32), state.astype(mx.float32), T],
        template=[("InT", v.dtype), ("Dk", Dk), ("Dv", Dv), ("Hk", Hk), ("Hv", Hv), ("NSG", nsg)],
        grid=(32, nsg, B * Hv * (Dv // (8 * nsg))),
        threadgroup=(32, nsg, 1),
        output_shapes=[(B, T, Hv, Dv), (B, Hv, Dv, Dk)],
        output_dtypes=[v.dtype, mx.float32],
    )


def gdn_prefill_supported(q: mx.array, k: mx.array, v: mx.array) -> bool:
    """Whether the prefill kernel handles these shapes."""
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[2], v.shape[3]
    return (
        T >= 1
        and Dk % 8 == 0
        and Dk <= 256
        and Dv % 8 == 0
        and Hv % Hk == 0
        and v.dtype in (mx.float32, mx.float16, mx.bfloat16)
    )


def run_gdn_prefill_kernel(factory: KernelFactory, q, k, v, g, beta, state):
    """Run the prefill kernel through ``factory`` (no verification, no fallback)."""
    kernel = registry.kernel_object(
        factory, "gdn_prefill.metal", "qnext_gdn_prefill", GDN_PREFILL_INPUTS, GDN_PREFILL_OUTPUTS
    )
    y, new_state = kernel(**gdn_prefill_call(q, k, v, g, beta, state))
    return y, new_state


def gated_delta_prefill(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: Optional[mx.array] = None,
    *,
    kernel_factory: Optional[KernelFactory] = None,
) -> Tuple[mx.array, mx.array]:
    """The gated delta rule over a whole prompt, chunk-parallel on the GPU.

    Same arguments as :func:`qnext_mlx.kernels.gated_delta_recurrent`: ``q``,
    ``k`` ``[B, T, Hk, Dk]`` (normalised, ``q`` scaled), ``v`` ``[B, T, Hv, Dv]``,
    ``g``, ``beta`` ``[B, T, Hv]``, ``state`` ``[B, Hv, Dv, Dk]`` or None.
    Returns ``(y, state)``: ``y`` ``[B, T, Hv, Dv]`` in ``v.dtype`` (the
    reference returns float32) and the final state ``[B, Hv, Dv, Dk]`` float32.
    Without Metal (and no ``kernel_factory``) or for unsupported shapes it runs
    the reference.
    """
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[2], v.shape[3]
    factory = kernel_factory
    verify = False
    if factory is None and registry.metal_available():
        factory, verify = mx.fast.metal_kernel, True
    use = factory is not None and gdn_prefill_supported(q, k, v)
    if use and verify:
        use = registry.is_verified("gdn_prefill", (str(v.dtype), Dk, Dv, Hv // Hk), factory)
    if not use:
        y, new_state = gated_delta_recurrent(q, k, v, g, beta, state)
        return y.astype(v.dtype), new_state
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    return run_gdn_prefill_kernel(factory, q, k, v, g, beta, state)


# ---------------------------------------------------------------------------
# Verification on small random problems (first use, and the doctor)
# ---------------------------------------------------------------------------


def _decode_inputs(
    dtype: Any, w_dtype: Any, Dk: int, Dv: int, K: int, ratio: int, T: int = 3, seed: int = 0
) -> Tuple[List[mx.array], Dict[str, int]]:
    """A small random decode problem (B=1, Hk=1, Hv=ratio) with the given per-head sizes."""
    Hk, Hv = 1, ratio
    CD = 2 * Hk * Dk + Hv * Dv
    keys = mx.random.split(mx.random.key(seed), 8)
    args = [
        mx.random.normal((1, T, CD), key=keys[0]).astype(dtype),
        (0.5 * mx.random.normal((CD, K, 1), key=keys[1])).astype(w_dtype),
        mx.random.normal((1, K - 1, CD), key=keys[2]).astype(dtype),
        mx.random.normal((1, T, Hv), key=keys[3]).astype(dtype),
        mx.random.normal((1, T, Hv), key=keys[4]).astype(dtype),
        mx.random.uniform(-1.0, 1.0, (Hv,), key=keys[5]),
        mx.random.uniform(0.0, 2.0, (Hv,), key=keys[6]),
        0.1 * mx.random.normal((1, Hv, Dv, Dk), key=keys[7]),
    ]
    return args, dict(num_k_heads=Hk, head_k_dim=Dk, head_v_dim=Dv)


def _prefill_inputs(dtype: Any, Dk: int, Dv: int, ratio: int, T: int = 37, seed: int = 0) -> List[mx.array]:
    """A small random prefill problem (B=1, Hk=1, Hv=ratio; T=37: two full chunks and a partial one)."""
    Hv = ratio
    keys = mx.random.split(mx.random.key(seed), 6)
    q, k = normalize_qk(mx.random.normal((1, T, 1, Dk), key=keys[0]), mx.random.normal((1, T, 1, Dk), key=keys[1]))
    return [
        q,
        k,
        mx.random.normal((1, T, Hv, Dv), key=keys[2]).astype(dtype),
        mx.random.uniform(0.7, 1.0, (1, T, Hv), key=keys[3]),
        mx.random.uniform(0.0, 1.0, (1, T, Hv), key=keys[4]),
        0.1 * mx.random.normal((1, Hv, Dv, Dk), key=keys[5]),
    ]


def _verify_gdn_decode(factory: registry.KernelFactory, config: Optional[Tuple]) -> Tuple[bool, float, str]:
    """Verifier of ``gdn_decode``: ``config`` ``(dtype, weight dtype, Dk, Dv, K, Hv/Hk)``; the
    per-token states are checked too."""
    dt, wdt, Dk, Dv, K, ratio = config or registry.default_config("gdn_decode")
    dtype = registry.dtype_from_name(dt)
    try:
        args, kw = _decode_inputs(dtype, registry.dtype_from_name(wdt), Dk, Dv, K, ratio)
        got = run_gdn_decode_kernel(factory, *args, return_all_states=True, **kw)
        ref = gated_delta_decode_reference(*args, return_all_states=True, **kw)
        mx.eval(got)
    except Exception as e:  # a compile or launch failure on the device
        return False, float("inf"), f"kernel failed to run: {type(e).__name__}: {e}"
    # 16-bit inputs: the conv output is rounded to 16 bits in both paths, but
    # not always to the same neighbour (and y is a 16-bit value), so allow a
    # few 16-bit ulps.
    return registry.compare_outputs(
        ["y", "conv_state", "state", "states"], got, ref, 1e-4 if dtype == mx.float32 else 3e-2
    )


def _verify_gdn_prefill(factory: registry.KernelFactory, config: Optional[Tuple]) -> Tuple[bool, float, str]:
    """Verifier of ``gdn_prefill``: ``config`` ``(dtype, Dk, Dv, Hv/Hk)``."""
    dt, Dk, Dv, ratio = config or registry.default_config("gdn_prefill")
    dtype = registry.dtype_from_name(dt)
    try:
        args = _prefill_inputs(dtype, Dk, Dv, ratio)
        got = run_gdn_prefill_kernel(factory, *args)
        ref = gated_delta_recurrent(*args)
        mx.eval(got)
    except Exception as e:  # a compile or launch failure on the device
        return False, float("inf"), f"kernel failed to run: {type(e).__name__}: {e}"
    return registry.compare_outputs(["y", "state"], got, ref, 1e-4 if dtype == mx.float32 else 3e-2)


registry.register_kernel("gdn_decode", _verify_gdn_decode, (str(mx.float32), str(mx.float32), 128, 128, 4, 2))
registry.register_kernel("gdn_prefill", _verify_gdn_prefill, (str(mx.float32), 128, 128, 2))
