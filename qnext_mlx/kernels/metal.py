"""Metal kernels for the Gated DeltaNet, self-verified against the MLX reference,
and the machinery every Metal kernel wrapper shares (kernel objects, verification,
status; :mod:`qnext_mlx.kernels.metal_moe` builds on it).

The kernel bodies live in ``qnext_mlx/kernels/metal_src/*.metal`` (shipped as
package data): text above a ``// @body`` line is the ``header`` and text below
it the ``source`` handed to ``mx.fast.metal_kernel``. Every wrapper here builds
one *call description* (inputs, template, grid, threadgroup, output shapes and
dtypes) and hands it to a kernel *factory*: ``mx.fast.metal_kernel`` on a Mac,
or the CPU emulator ``metal/shim/metal_shim.py:metal_kernel`` in tests, so the
identical body runs with the identical template and grid in both places.

On a Mac the first call with a new configuration (dtype, head sizes, conv
width, head ratio) first runs the kernel on a small random input and compares
it with the reference; on a mismatch it logs a warning and that configuration
uses the reference path from then on. :func:`kernel_status` reports what
happened (for ``python -m qnext_mlx.doctor``) for every kernel registered with
:func:`register_kernel`; a wrapper that also keeps its kernel only when it is
faster records that decision with :func:`decide_once`.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from .gated_delta import compute_decay_beta, gated_delta, gated_delta_recurrent, normalize_qk

__all__ = [
    "MAX_DECODE_T",
    "KernelCheck",
    "compare_outputs",
    "decide_once",
    "gated_delta_decode",
    "gated_delta_decode_reference",
    "gated_delta_prefill",
    "kernel_status",
    "load_kernel_source",
    "register_kernel",
    "verify_kernel",
]

logger = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().with_name("metal_src")

# Longest token run the decode kernel takes (threadgroup arrays are sized by a
# power of two >= T); longer runs belong to the chunked prefill.
MAX_DECODE_T = 16

KernelFactory = Callable[..., Any]


@lru_cache(maxsize=None)
def load_kernel_source(file_name: str) -> Tuple[str, str]:
    """``(header, body)`` of ``qnext_mlx/kernels/metal_src/<file_name>``, split at the ``// @body`` line."""
    text = (KERNEL_DIR / file_name).read_text()
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip() == "// @body":
            return "".join(lines[:i]), "".join(lines[i + 1:])
    return "", text


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
    new_conv_state = conv_in[:, -(K - 1):, :]
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
        ("InT", in_t), ("CT", conv_t),
        ("Dk", Dk), ("Dv", Dv), ("Hk", Hk), ("Hv", Hv), ("K", K),
        ("TMax", _next_pow2(T)), ("RPS", rps), ("NSG", nsg), ("SaveStates", bool(return_all_states)),
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


def gdn_decode_supported(mixed_qkv: mx.array, a: mx.array, *, num_k_heads: int, head_k_dim: int,
                         head_v_dim: int) -> bool:
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


_KERNELS: Dict[Tuple[int, str], Any] = {}


def _kernel(factory: KernelFactory, file_name: str, name: str, inputs: Sequence[str],
            outputs: Sequence[str]) -> Any:
    key = (id(factory), name)
    if key not in _KERNELS:
        header, body = load_kernel_source(file_name)
        _KERNELS[key] = factory(name=name, input_names=list(inputs), output_names=list(outputs),
                                source=body, header=header)
    return _KERNELS[key]


def run_gdn_decode_kernel(factory: KernelFactory, *args, return_all_states: bool = False, **kw):
    """Run the decode kernel through ``factory`` (no verification, no fallback)."""
    call = gdn_decode_call(*args, return_all_states=return_all_states, **kw)
    kernel = _kernel(factory, "gdn_decode.metal", "qnext_gdn_decode", GDN_DECODE_INPUTS, GDN_DECODE_OUTPUTS)
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
    if factory is None and _metal_available():
        factory, verify = mx.fast.metal_kernel, True
    if factory is None or not gdn_decode_supported(mixed_qkv, a, **kw):
        return gated_delta_decode_reference(mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias,
                                            state, return_all_states=return_all_states, **kw)
    if verify:
        config = (str(mixed_qkv.dtype), str(conv_weight.dtype), head_k_dim, head_v_dim, K,
                  Hv // num_k_heads)
        if not _verified("gdn_decode", config, factory):
            return gated_delta_decode_reference(mixed_qkv, conv_weight, conv_state, a, b, A_log,
                                                dt_bias, state, return_all_states=return_all_states, **kw)
    if conv_state is None:
        conv_state = mx.zeros((B, K - 1, CD), dtype=mixed_qkv.dtype)
    if state is None:
        state = mx.zeros((B, Hv, head_v_dim, head_k_dim), dtype=mx.float32)
    return run_gdn_decode_kernel(factory, mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias,
                                 state, return_all_states=return_all_states, **kw)



# ---------------------------------------------------------------------------
# Chunked prefill (simdgroup matrices)
# ---------------------------------------------------------------------------

GDN_PREFILL_INPUTS = ["q", "k", "v", "g", "beta", "state_in", "T"]
GDN_PREFILL_OUTPUTS = ["y", "state_out"]


def gdn_prefill_call(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                     state: mx.array) -> Dict[str, Any]:
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
    return (T >= 1 and Dk % 8 == 0 and Dk <= 256 and Dv % 8 == 0 and Hv % Hk == 0
            and v.dtype in (mx.float32, mx.float16, mx.bfloat16))


def run_gdn_prefill_kernel(factory: KernelFactory, q, k, v, g, beta, state):
    """Run the prefill kernel through ``factory`` (no verification, no fallback)."""
    kernel = _kernel(factory, "gdn_prefill.metal", "qnext_gdn_prefill", GDN_PREFILL_INPUTS, GDN_PREFILL_OUTPUTS)
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
    if factory is None and _metal_available():
        factory, verify = mx.fast.metal_kernel, True
    use = factory is not None and gdn_prefill_supported(q, k, v)
    if use and verify:
        use = _verified("gdn_prefill", (str(v.dtype), Dk, Dv, Hv // Hk), factory)
    if not use:
        y, new_state = gated_delta_recurrent(q, k, v, g, beta, state)
        return y.astype(v.dtype), new_state
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    return run_gdn_prefill_kernel(factory, q, k, v, g, beta, state)

# ---------------------------------------------------------------------------
# Verification and status
# ---------------------------------------------------------------------------

class KernelCheck(NamedTuple):
    """What was decided for one kernel configuration (an entry of ``kernel_status``)."""

    ok: bool  # the kernel is used for this configuration
    max_error: float  # max relative error against the reference (inf: it failed to run)
    detail: str  # why, for the status line (errors, tolerance, timings)
    note: str = ""  # shown even when ok (e.g. the timings that chose the kernel)


Verifier = Callable[[KernelFactory, Optional[Tuple]], Tuple[bool, float, str]]

# kernel name -> {config: KernelCheck}
_VERIFIED: Dict[str, Dict[Tuple, KernelCheck]] = {}
# kernel name -> verifier(factory, config) -> (ok, max relative error, detail); filled by register_kernel
_VERIFIERS: Dict[str, Verifier] = {}
_KNOWN_KERNELS: List[str] = []
# Configuration verified when none is given (the doctor, verify_kernel without a config).
_DEFAULT_CONFIGS: Dict[str, Tuple] = {}


def register_kernel(name: str, verifier: Verifier, default_config: Tuple) -> None:
    """Make kernel ``name`` known to :func:`verify_kernel` and :func:`kernel_status`.

    ``verifier(factory, config)`` runs the kernel through ``factory`` on a small
    input for ``config`` (``None``: ``default_config``) and returns
    ``(ok, max relative error, detail)``; it must not raise for kernel failures.
    """
    _VERIFIERS[name] = verifier
    _DEFAULT_CONFIGS[name] = default_config
    if name not in _KNOWN_KERNELS:
        _KNOWN_KERNELS.append(name)


def _metal_available() -> bool:
    """Metal kernels can run: a Metal device and the GPU as default device (as mlx-lm checks)."""
    try:
        return bool(mx.metal.is_available()) and mx.default_device() == mx.gpu
    except Exception:  # mlx builds without the metal module
        return False


def _decode_inputs(dtype: Any, w_dtype: Any, Dk: int, Dv: int, K: int, ratio: int, T: int = 3,
                   seed: int = 0) -> Tuple[List[mx.array], Dict[str, int]]:
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


def _max_rel_err(x: mx.array, ref: mx.array) -> float:
    """max |x - ref| / max(max |ref|, 1e-6), in float32."""
    x = x.astype(mx.float32)
    ref = ref.astype(mx.float32)
    scale = max(mx.abs(ref).max().item(), 1e-6)
    return mx.abs(x - ref).max().item() / scale


def _prefill_inputs(dtype: Any, Dk: int, Dv: int, ratio: int, T: int = 37,
                    seed: int = 0) -> List[mx.array]:
    """A small random prefill problem (B=1, Hk=1, Hv=ratio; T=37: two full chunks and a partial one)."""
    Hv = ratio
    keys = mx.random.split(mx.random.key(seed), 6)
    q, k = normalize_qk(mx.random.normal((1, T, 1, Dk), key=keys[0]), mx.random.normal((1, T, 1, Dk), key=keys[1]))
    return [
        q, k,
        mx.random.normal((1, T, Hv, Dv), key=keys[2]).astype(dtype),
        mx.random.uniform(0.7, 1.0, (1, T, Hv), key=keys[3]),
        mx.random.uniform(0.0, 1.0, (1, T, Hv), key=keys[4]),
        0.1 * mx.random.normal((1, Hv, Dv, Dk), key=keys[5]),
    ]


def _dtype(name: str) -> Any:
    return getattr(mx, name.rsplit(".", 1)[-1])


def _verify_gdn_decode(factory: KernelFactory, config: Optional[Tuple]) -> Tuple[bool, float, str]:
    """Verifier of ``gdn_decode``: ``config`` ``(dtype, weight dtype, Dk, Dv, K, Hv/Hk)``; the
    per-token states are checked too."""
    dt, wdt, Dk, Dv, K, ratio = config or _DEFAULT_CONFIGS["gdn_decode"]
    dtype = _dtype(dt)
    try:
        args, kw = _decode_inputs(dtype, _dtype(wdt), Dk, Dv, K, ratio)
        got = run_gdn_decode_kernel(factory, *args, return_all_states=True, **kw)
        ref = gated_delta_decode_reference(*args, return_all_states=True, **kw)
        mx.eval(got)
    except Exception as e:  # a compile or launch failure on the device
        return False, float("inf"), f"kernel failed to run: {type(e).__name__}: {e}"
    # 16-bit inputs: the conv output is rounded to 16 bits in both paths, but
    # not always to the same neighbour (and y is a 16-bit value), so allow a
    # few 16-bit ulps.
    return compare_outputs(["y", "conv_state", "state", "states"], got, ref, 1e-4 if dtype == mx.float32 else 3e-2)


def _verify_gdn_prefill(factory: KernelFactory, config: Optional[Tuple]) -> Tuple[bool, float, str]:
    """Verifier of ``gdn_prefill``: ``config`` ``(dtype, Dk, Dv, Hv/Hk)``."""
    dt, Dk, Dv, ratio = config or _DEFAULT_CONFIGS["gdn_prefill"]
    dtype = _dtype(dt)
    try:
        args = _prefill_inputs(dtype, Dk, Dv, ratio)
        got = run_gdn_prefill_kernel(factory, *args)
        ref = gated_delta_recurrent(*args)
        mx.eval(got)
    except Exception as e:  # a compile or launch failure on the device
        return False, float("inf"), f"kernel failed to run: {type(e).__name__}: {e}"
    return compare_outputs(["y", "state"], got, ref, 1e-4 if dtype == mx.float32 else 3e-2)


def compare_outputs(names: Sequence[str], got: Sequence[mx.array], ref: Sequence[mx.array],
                    tol: float) -> Tuple[bool, float, str]:
    """``(ok, worst relative error, detail)`` of kernel outputs against the reference's
    (relative to each reference's max magnitude; NaN fails)."""
    errs = {n: _max_rel_err(g, r) for n, g, r in zip(names, got, ref)}
    worst = max(errs.values())
    ok = worst <= tol and all(e == e for e in errs.values())
    detail = ", ".join(f"{n} {e:.2e}" for n, e in errs.items()) + f" (tolerance {tol:.0e})"
    return ok, worst, detail


register_kernel("gdn_decode", _verify_gdn_decode, (str(mx.float32), str(mx.float32), 128, 128, 4, 2))
register_kernel("gdn_prefill", _verify_gdn_prefill, (str(mx.float32), 128, 128, 2))


def verify_kernel(name: str, factory: KernelFactory, config: Optional[Tuple] = None) -> Tuple[bool, float, str]:
    """Run kernel ``name`` through ``factory`` on a small input and compare with the reference.

    ``config``: for ``"gdn_decode"`` ``(dtype, weight dtype, Dk, Dv, K, Hv/Hk)``
    (default float32, float32, 128, 128, 4, 2; the per-token states are checked
    too); for ``"gdn_prefill"`` ``(dtype, Dk, Dv, Hv/Hk)`` (default float32,
    128, 128, 2); for ``"moe_decode"`` see :mod:`qnext_mlx.kernels.metal_moe`.
    Dtypes are written as ``str(mx.float32)``.
    Returns ``(ok, max relative error, detail)``.
    """
    if name not in _VERIFIERS:
        raise ValueError(f"unknown kernel {name!r}; known: {', '.join(_KNOWN_KERNELS)}")
    return _VERIFIERS[name](factory, config)


def decide_once(name: str, config: Tuple, decide: Callable[[], KernelCheck]) -> KernelCheck:
    """The decision recorded for kernel ``name`` and ``config``, made by ``decide()`` the first time."""
    results = _VERIFIED.setdefault(name, {})
    if config not in results:
        results[config] = decide()
    return results[config]


def _verified(name: str, config: Tuple, factory: KernelFactory) -> bool:
    def check() -> KernelCheck:
        ok, err, detail = verify_kernel(name, factory, config)
        if not ok:
            logger.warning("Metal kernel %s %s disagrees with the reference (%s); using the reference path",
                           name, config, detail)
        return KernelCheck(ok, err, detail)

    return decide_once(name, config, check).ok


def kernel_status(verify: bool = False) -> Dict[str, Dict[str, Any]]:
    """Per kernel: ``{"status": ..., "max_error": float | None, "detail": str}``.

    ``status``: ``"no-metal"`` (no Metal device, or the default device is the
    CPU: the reference path runs), ``"unverified"`` (not used yet), ``"ok"``
    (every configuration used so far matched the reference, and where a kernel
    is kept only when faster, was faster) or ``"fallback"`` (at least one did
    not; those use the reference path; ``detail`` says which and why).
    ``verify=True`` (for ``python -m qnext_mlx.doctor``) first verifies, on
    Metal, each kernel not used yet with its default configuration.
    """
    available = _metal_available()
    if verify and available:
        for name in _KNOWN_KERNELS:
            if not _VERIFIED.get(name):
                _verified(name, _DEFAULT_CONFIGS[name], mx.fast.metal_kernel)
    status = {}
    for name in _KNOWN_KERNELS:
        results = _VERIFIED.get(name, {})
        if not available and not results:
            status[name] = {"status": "no-metal", "max_error": None,
                            "detail": "Metal is not available (or the default device is the CPU)"}
        elif not results:
            status[name] = {"status": "unverified", "max_error": None, "detail": "not used yet"}
        else:
            bad = {c: r for c, r in results.items() if not r.ok}
            worst = max(r.max_error for r in results.values())
            if bad:
                detail = "; ".join(f"{c}: {r.detail}" for c, r in bad.items())
                status[name] = {"status": "fallback", "max_error": worst, "detail": detail}
            else:
                # Entries with a note (e.g. a timing that chose the kernel) show it;
                # the others are counted.
                notes = [r.note for r in results.values() if r.note]
                plain = len(results) - len(notes)
                detail = "; ".join(([f"{plain} configuration(s) verified"] if plain else []) + notes)
                status[name] = {"status": "ok", "max_error": worst, "detail": detail}
    return status
