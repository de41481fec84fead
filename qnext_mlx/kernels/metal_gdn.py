"""Gated DeltaNet on Metal: the token mixer (conv, SiLU, q/k norms, gates, delta rule) as two
ops with candidates, chosen on the user's machine by :mod:`qnext_mlx.kernels.candidates`.

``gdn_decode`` (1..``MAX_DECODE_T`` tokens: decode and speculative verification,
with per-token states when asked) and ``gdn_prefill`` (longer runs) each have:

- ``qnext``: decode, the fused kernel ``metal/gdn_decode.metal`` (the whole mixer
  step in one launch, per-token states included); prefill, the MLX conv and
  norms, then the chunked simdgroup-matrix kernel ``metal/gdn_prefill.metal``
  for the delta rule (initial state in; padded positions masked);
- ``mlx-lm``: what mlx-lm's Qwen3-Next runs, its ops around its kernel: the MLX
  conv, ``mlx_lm.models.gated_delta.normalize_qk`` (``rms_norm``), ``compute_g``
  and ``gated_delta_kernel`` (its recurrent Metal kernel, masked where a mask is
  given). It has no per-token states, so it cannot serve speculative verification;
- ``reference``: :func:`gated_delta_decode_reference`, MLX ops (token by token
  for short runs, the chunked WY form for prefill).

Every candidate computes the same function, with the same padding convention: a
``mask`` ``[B, T]`` (True: a real token) leaves the conv and recurrent states
untouched at padded positions (the mixer runs as if they were not there) and
gives ``y = 0`` there. Off Metal the reference runs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.models.gated_delta as mlx_lm_gd

from . import candidates, registry
from .gated_delta import compute_decay_beta, gated_delta, gated_delta_recurrent, normalize_qk
from .registry import MAX_DECODE_T, KernelFactory

__all__ = [
    "GDN_DECODE",
    "GDN_PREFILL",
    "conv_dtype",
    "conv_silu",
    "gated_delta_decode",
    "gated_delta_decode_reference",
    "gdn_decode_call",
    "gdn_decode_supported",
    "gdn_prefill_call",
    "gdn_prefill_supported",
    "mixer_problem",
    "run_gdn_decode_kernel",
    "run_gdn_prefill_kernel",
]

GDN_DECODE_INPUTS = ["x", "conv_w", "conv_state", "a", "b", "A_log", "dt_bias", "state_in", "T"]
GDN_DECODE_OUTPUTS = ["y", "conv_state_out", "state_out", "states"]


# ---------------------------------------------------------------------------
# The mixer in MLX ops (the reference, and the pieces the other candidates share)
# ---------------------------------------------------------------------------


def conv_silu(
    mixed_qkv: mx.array, conv_weight: mx.array, conv_state: Optional[mx.array], mask: Optional[mx.array] = None
) -> Tuple[mx.array, mx.array]:
    """Depthwise causal conv over ``[conv_state; mixed_qkv]`` and SiLU.

    Args:
        mixed_qkv: ``[B, T, CD]``; conv_weight: ``[CD, K, 1]``; conv_state:
            ``[B, K-1, CD]`` or None (zeros).
        mask: ``[B, T]`` bool, True at real tokens, or None. Padded positions are
            skipped: each real token's window holds the real tokens before it (and
            the conv state), the new conv state ends at the last real token, and the
            output is 0 at padded positions.
    Returns:
        ``(conv_out [B, T, CD]`` in the dtype of ``mixed_qkv`` promoted with the
        weight's, ``new_conv_state [B, K-1, CD]`` in ``mixed_qkv.dtype)``.
    """
    B, T, CD = mixed_qkv.shape
    K = conv_weight.shape[1]
    if conv_state is None:
        conv_state = mx.zeros((B, K - 1, CD), dtype=mixed_qkv.dtype)
    conv_state = conv_state.astype(mixed_qkv.dtype)
    if mask is None:
        conv_in = mx.concatenate([conv_state, mixed_qkv], axis=1)
        return nn.silu(mx.conv1d(conv_in, conv_weight, groups=CD)), conv_in[:, -(K - 1) :, :]
    # Move the real tokens to the front (in order), convolve, and put the outputs back.
    pos = mx.arange(T)
    n = mask.astype(mx.int32).sum(axis=1)  # [B] real tokens per sequence
    order = mx.argsort(mx.where(mask, pos, pos + T), axis=1)
    compact = mx.take_along_axis(mixed_qkv, order[..., None], axis=1)
    compact = mx.where((pos[None] < n[:, None])[..., None], compact, mx.zeros((), mixed_qkv.dtype))
    conv_in = mx.concatenate([conv_state, compact], axis=1)  # row K-1+r: the r-th real token
    out = nn.silu(mx.conv1d(conv_in, conv_weight, groups=CD))  # row r: the r-th real token's output
    rank = mx.maximum(mx.cumsum(mask.astype(mx.int32), axis=1) - 1, 0)
    out = mx.take_along_axis(out, rank[..., None], axis=1)
    out = mx.where(mask[..., None], out, mx.zeros((), out.dtype))
    new_state = mx.take_along_axis(conv_in, (n[:, None] + mx.arange(K - 1))[..., None], axis=1)
    return out, new_state


def _mixer_inputs(mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, mask, Hk, Dk, Dv):
    """q, k (normalised, float32), v, g, beta (float32; g = 1 and beta = 0 at padded
    positions, so the state passes them unchanged) and the new conv state."""
    B, T, _ = mixed_qkv.shape
    Hv = a.shape[-1]
    conv_out, new_conv_state = conv_silu(mixed_qkv, conv_weight, conv_state, mask)
    q, k, v = mx.split(conv_out, [Hk * Dk, 2 * Hk * Dk], axis=-1)
    q, k = normalize_qk(q.reshape(B, T, Hk, Dk), k.reshape(B, T, Hk, Dk))
    g, beta = compute_decay_beta(a, b, A_log, dt_bias)
    if mask is not None:
        g = mx.where(mask[..., None], g, 1.0)
        beta = mx.where(mask[..., None], beta, 0.0)
    return q, k, v.reshape(B, T, Hv, Dv), g, beta, new_conv_state


def _masked_y(y: mx.array, mask: Optional[mx.array]) -> mx.array:
    return y if mask is None else mx.where(mask[..., None, None], y, mx.zeros((), y.dtype))


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
    mask: Optional[mx.array] = None,
):
    """The Gated DeltaNet token mixing in MLX ops: the path off Metal, the reference
    candidate, and what the others are verified against; any ``T``.

    Same arguments and results as :func:`gated_delta_decode`.
    """
    q, k, v, g, beta, new_conv_state = _mixer_inputs(
        mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, mask, num_k_heads, head_k_dim, head_v_dim
    )
    if return_all_states:
        out = gated_delta_recurrent(q, k, v, g, beta, state, return_all_states=True)
    else:  # the dispatcher takes the chunked form for prefill-length runs
        out = gated_delta(q, k, v, g, beta, state)
    y = _masked_y(out[0], mask).astype(mixed_qkv.dtype)
    if return_all_states:
        return y, new_conv_state, out[1], out[2]
    return y, new_conv_state, out[1]


def conv_dtype(mixed_qkv: mx.array, conv_weight: mx.array) -> Any:
    """The dtype the model keeps the conv output in: the input's promoted with the weight's."""
    return mx.result_type(mixed_qkv.dtype, conv_weight.dtype)


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
    # The kernel rounds the conv output to the model's dtype for it before the norms.
    conv_t = conv_dtype(mixed_qkv, conv_weight)
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


# ---------------------------------------------------------------------------
# Chunked prefill (simdgroup matrices)
# ---------------------------------------------------------------------------

GDN_PREFILL_INPUTS = ["q", "k", "v", "g", "beta", "state_in", "T"]
GDN_PREFILL_OUTPUTS = ["y", "state_out"]


def gdn_prefill_call(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> Dict[str, Any]:
    """Call description of the chunked prefill kernel: ``q``, ``k`` ``[B, T, Hk, Dk]``
    (normalised, ``q`` scaled), ``v`` ``[B, T, Hv, Dv]``, ``g``, ``beta`` ``[B, T, Hv]``,
    ``state`` ``[B, Hv, Dv, Dk]`` (the conventions of :mod:`qnext_mlx.kernels.gated_delta`).
    Outputs ``y`` ``[B, T, Hv, Dv]`` in ``v.dtype`` and the final state float32."""
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


def gdn_prefill_supported(Hk: int, Hv: int, Dk: int, Dv: int, dtype: Any) -> bool:
    """Whether the prefill kernel handles these head counts and sizes and ``v``'s dtype."""
    return Dk % 8 == 0 and Dk <= 256 and Dv % 8 == 0 and Hv % Hk == 0 and dtype in (mx.float32, mx.float16, mx.bfloat16)


def run_gdn_prefill_kernel(factory: KernelFactory, q, k, v, g, beta, state):
    """Run the prefill kernel through ``factory`` (no verification, no fallback)."""
    kernel = registry.kernel_object(
        factory, "gdn_prefill.metal", "qnext_gdn_prefill", GDN_PREFILL_INPUTS, GDN_PREFILL_OUTPUTS
    )
    y, new_state = kernel(**gdn_prefill_call(q, k, v, g, beta, state))
    return y, new_state


# ---------------------------------------------------------------------------
# The candidates
# ---------------------------------------------------------------------------


def _reference(factory, *args, **kw):
    return gated_delta_decode_reference(*args, **kw)


def _zero_states(mixed_qkv, conv_weight, conv_state, a, state, Dk, Dv):
    B, _, CD = mixed_qkv.shape
    if conv_state is None:
        conv_state = mx.zeros((B, conv_weight.shape[1] - 1, CD), dtype=mixed_qkv.dtype)
    if state is None:
        state = mx.zeros((B, a.shape[-1], Dv, Dk), dtype=mx.float32)
    return conv_state, state


def _qnext_decode(factory, mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, state, **kw):
    kw.pop("mask", None)
    conv_state, state = _zero_states(mixed_qkv, conv_weight, conv_state, a, state, kw["head_k_dim"], kw["head_v_dim"])
    return run_gdn_decode_kernel(factory, mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, state, **kw)


def _qnext_decode_unsupported(mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, state, **kw) -> Optional[str]:
    if kw.get("mask") is not None:
        return "the fused decode kernel takes no padding mask"
    if not gdn_decode_supported(
        mixed_qkv, a, num_k_heads=kw["num_k_heads"], head_k_dim=kw["head_k_dim"], head_v_dim=kw["head_v_dim"]
    ):
        return f"shapes outside the kernel (1 <= T <= {MAX_DECODE_T}, Dk % 32 == 0, Dk <= 256, Hv % Hk == 0)"
    return None


def _qnext_prefill(factory, mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, state, **kw):
    mask = kw.get("mask")
    Hk, Dk, Dv = kw["num_k_heads"], kw["head_k_dim"], kw["head_v_dim"]
    q, k, v, g, beta, new_conv_state = _mixer_inputs(
        mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, mask, Hk, Dk, Dv
    )
    if state is None:
        state = mx.zeros((mixed_qkv.shape[0], a.shape[-1], Dv, Dk), dtype=mx.float32)
    y, new_state = run_gdn_prefill_kernel(factory, q, k, v, g, beta, state)
    return _masked_y(y, mask).astype(mixed_qkv.dtype), new_conv_state, new_state


def _qnext_prefill_unsupported(mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, state, **kw) -> Optional[str]:
    if kw.get("return_all_states"):
        return "the chunked prefill kernel keeps no per-token states"
    Dk, Dv, Hk, Hv = kw["head_k_dim"], kw["head_v_dim"], kw["num_k_heads"], a.shape[-1]
    if not gdn_prefill_supported(Hk, Hv, Dk, Dv, conv_dtype(mixed_qkv, conv_weight)):
        return "shapes outside the kernel (Dk % 8 == 0, Dk <= 256, Dv % 8 == 0, Hv % Hk == 0)"
    return None


def _mlx_lm(factory, mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, state, **kw):
    # mlx-lm builds its kernels at import with mx.fast.metal_kernel (factory is not used).
    mask = kw.get("mask")
    Hk, Dk, Dv = kw["num_k_heads"], kw["head_k_dim"], kw["head_v_dim"]
    B, T, _ = mixed_qkv.shape
    Hv = a.shape[-1]
    conv_out, new_conv_state = conv_silu(mixed_qkv, conv_weight, conv_state, mask)
    q, k, v = mx.split(conv_out, [Hk * Dk, 2 * Hk * Dk], axis=-1)
    q, k = mlx_lm_gd.normalize_qk(q.reshape(B, T, Hk, Dk), k.reshape(B, T, Hk, Dk), inv_scale=Dk**-0.5, eps=1e-6)
    beta = mx.sigmoid(b)
    g = mlx_lm_gd.compute_g(A_log, a, dt_bias)
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    y, new_state = mlx_lm_gd.gated_delta_kernel(q, k, v.reshape(B, T, Hv, Dv), g, beta, state, mask)
    return y.astype(mixed_qkv.dtype), new_conv_state, new_state


def _mlx_lm_unsupported(mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, state, **kw) -> Optional[str]:
    if kw.get("return_all_states"):
        return "mlx-lm's kernel returns only the final state: no per-token states for speculative verification"
    Dk = kw["head_k_dim"]
    if Dk < 32 or Dk % 32:
        return "mlx-lm's kernel needs Dk a multiple of 32 (mlx-lm runs its ops there)"
    if state is not None and state.dtype != mx.float32:
        return "a float32 state is the convention here"
    return None


def _verify(got, ref, *args, **kw) -> Tuple[bool, float, str]:
    names = ["y", "conv_state", "state", "states"][: len(ref)]
    # 16-bit inputs: the conv output is rounded to 16 bits in every candidate, but
    # not always to the same neighbour (and y is a 16-bit value): a few 16-bit ulps.
    tol = 1e-4 if args[0].dtype == mx.float32 else 3e-2
    return registry.compare_outputs(names, list(got), list(ref), tol)


def _bucket(T: int) -> int:
    return _next_pow2(max(T, MAX_DECODE_T + 1))


def _config(mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, state, *, prefill=False, **kw):
    B, T, _ = mixed_qkv.shape
    K, Hv = conv_weight.shape[1], a.shape[-1]
    shape = [("Tmax", _bucket(T))] if prefill else [("T", T)]
    return (
        ("dtype", str(mixed_qkv.dtype).rsplit(".", 1)[-1]),
        ("weights", str(conv_weight.dtype).rsplit(".", 1)[-1]),
        ("B", B),
        *shape,
        ("Hk", kw["num_k_heads"]),
        ("Hv", Hv),
        ("Dk", kw["head_k_dim"]),
        ("Dv", kw["head_v_dim"]),
        ("K", K),
        ("states", bool(kw.get("return_all_states"))),
        ("mask", kw.get("mask") is not None),
    )


def mixer_problem(
    B: int,
    T: int,
    Hk: int,
    Hv: int,
    Dk: int,
    Dv: int,
    dtype: Any = mx.bfloat16,
    K: int = 4,
    seed: int = 0,
    return_all_states: bool = False,
    lengths: Optional[List[int]] = None,
) -> Tuple[tuple, dict]:
    """``(args, kwargs)`` of a random mixer problem with these shapes (the doctor's samples,
    tests): random conv and recurrent states; ``lengths``: real tokens per sequence,
    left-padded (a mask is passed)."""
    CD = 2 * Hk * Dk + Hv * Dv
    ks = mx.random.split(mx.random.key(seed), 8)
    args = (
        mx.random.normal((B, T, CD), key=ks[0]).astype(dtype),
        (0.5 * mx.random.normal((CD, K, 1), key=ks[1])).astype(dtype),
        mx.random.normal((B, K - 1, CD), key=ks[2]).astype(dtype),
        mx.random.normal((B, T, Hv), key=ks[3]).astype(dtype),
        mx.random.normal((B, T, Hv), key=ks[4]).astype(dtype),
        mx.random.uniform(-1.0, 1.0, (Hv,), key=ks[5]),
        mx.random.uniform(0.0, 2.0, (Hv,), key=ks[6]),
        0.1 * mx.random.normal((B, Hv, Dv, Dk), key=ks[7]),
    )
    kw: Dict[str, Any] = dict(num_k_heads=Hk, head_k_dim=Dk, head_v_dim=Dv, return_all_states=return_all_states)
    if lengths is not None:
        kw["mask"] = mx.arange(T)[None] >= (T - mx.array(lengths))[:, None]
    return args, kw


# The model's DeltaNet layer: Hk=16, Hv=32, Dk=Dv=128, conv width 4, bfloat16.
_MODEL_SHAPES = dict(Hk=16, Hv=32, Dk=128, Dv=128)

_REFERENCE = candidates.Candidate(
    "reference", "MLX ops: conv, norms, gates, delta rule (token by token; chunked WY form from 16 tokens)", _reference
)
_MLX_LM = candidates.Candidate(
    "mlx-lm",
    "mlx-lm's ops around its kernel: MLX conv, rms_norm q/k, compute_g, gated_delta_kernel (recurrent, Metal)",
    _mlx_lm,
    _mlx_lm_unsupported,
)

GDN_DECODE = candidates.register(
    candidates.Op(
        name="gdn_decode",
        summary=f"DeltaNet mixer step for 1..{MAX_DECODE_T} tokens (decode, speculative verification with states)",
        backend=candidates.METAL,
        candidates=(
            candidates.Candidate(
                "qnext",
                "metal/gdn_decode.metal: conv, SiLU, norms, gates and delta rule fused, per-token states",
                _qnext_decode,
                _qnext_decode_unsupported,
            ),
            _MLX_LM,
            _REFERENCE,
        ),
        reference="reference",
        config=_config,
        verify=_verify,
        samples=lambda: [
            mixer_problem(1, 1, **_MODEL_SHAPES),
            mixer_problem(1, 3, **_MODEL_SHAPES, return_all_states=True),
        ],
    )
)

GDN_PREFILL = candidates.register(
    candidates.Op(
        name="gdn_prefill",
        summary=f"DeltaNet mixer over more than {MAX_DECODE_T} tokens (prefill; T bucketed by powers of two)",
        backend=candidates.METAL,
        candidates=(
            candidates.Candidate(
                "qnext",
                "MLX conv and norms, then metal/gdn_prefill.metal: chunked (C=16) delta rule on simdgroup matrices",
                _qnext_prefill,
                _qnext_prefill_unsupported,
            ),
            _MLX_LM,
            _REFERENCE,
        ),
        reference="reference",
        config=lambda *a, **kw: _config(*a, prefill=True, **kw),
        verify=_verify,
        timing=(1, 3),
        samples=lambda: [mixer_problem(1, 512, **_MODEL_SHAPES)],
    )
)


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
    mask: Optional[mx.array] = None,
    kernel_factory: Optional[KernelFactory] = None,
):
    """Gated DeltaNet token mixing: conv, SiLU, norms, gates and the delta rule.

    On Metal the candidate chosen for the shapes runs (``gdn_decode`` up to
    ``MAX_DECODE_T`` tokens, ``gdn_prefill`` beyond; see the module docstring and
    :mod:`qnext_mlx.kernels.candidates`); elsewhere :func:`gated_delta_decode_reference`.

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
        mask: ``[B, T]`` bool, True at real tokens (left-padded batches), or None:
            padded positions leave both states untouched and give ``y = 0``.
        kernel_factory: run our candidate (``qnext``) through this
            ``mx.fast.metal_kernel``-compatible factory, unchecked (tests; the
            reference where it does not apply); default: the choice above.
    Returns:
        ``(y, new_conv_state, new_state)`` (+ ``states``): ``y`` ``[B, T, Hv, Dv]``
        in ``mixed_qkv.dtype`` (the recurrence output before the gated norm),
        ``new_conv_state`` ``[B, K-1, CD]`` in ``mixed_qkv.dtype``, ``new_state``
        ``[B, Hv, Dv, Dk]`` float32.
    """
    args = (mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, state)
    kw = dict(num_k_heads=num_k_heads, head_k_dim=head_k_dim, head_v_dim=head_v_dim)
    kw["return_all_states"] = return_all_states
    if mask is not None:
        kw["mask"] = mask
    op = GDN_DECODE if mixed_qkv.shape[1] <= MAX_DECODE_T else GDN_PREFILL
    if kernel_factory is not None:
        ours = op.candidate("qnext")
        if ours.unsupported(*args, **kw) is None:
            return ours.run(kernel_factory, *args, **kw)
    elif op.backend.available():
        return candidates.run(op, *args, **kw)
    return gated_delta_decode_reference(*args, **kw)
