"""Metal kernels executed on the CPU through the Metal-compatibility shim (metal/shim).

1. Shim self-tests with exact expectations: threadgroup memory + barriers,
   SIMD collectives, simdgroup matrices, 16-bit types, the MLX signature
   conventions, and the error paths (deadlock, divergent collectives).
2. mlx-lm's own gated-delta Metal kernels, unmodified, against its ops
   reference: checks that the shim reproduces MLX's generated signature.
3. Our fused decode kernel (metal/gdn_decode.metal) against
   the model's MLX maths and a float64 NumPy oracle, and the wrapper's dispatch
   (the first-use selection itself: tests/test_candidates.py).
4. The chunked prefill kernel (gdn_prefill.metal) against the recurrent reference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "metal" / "shim"))

import metal_shim as ms  # noqa: E402

pytestmark = pytest.mark.skipif(
    not ms.have_compiler(),
    reason=f"{ms.CXX} not found: the Metal shim compiles kernel bodies with clang (scripts/install-test-deps.sh)",
)

from metal_helpers import mlx_lm_kernels  # noqa: E402

from qnext_mlx.kernels import candidates  # noqa: E402
from qnext_mlx.kernels import metal_gdn as km  # noqa: E402
from qnext_mlx.kernels import registry as kreg  # noqa: E402

# ---------------------------------------------------------------------------
# 1. Shim self-tests
# ---------------------------------------------------------------------------

REVERSE = """
    uint i = thread_position_in_grid.x;
    uint l = thread_position_in_threadgroup.x;
    threadgroup float buf[64];
    buf[l] = x[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    y[i] = buf[threads_per_threadgroup.x - 1 - l];
"""


@pytest.mark.parametrize("order", [0, 1, 12345])
def test_barrier_and_threadgroup_memory(order):
    # 100 threads in groups of 64: the last group is partial (36 threads), as
    # with Metal's non-uniform dispatchThreads.
    x = np.arange(100, dtype=np.float32)
    y = ms.run_metal_body(REVERSE, {"x": x}, [("y", (100,), np.float32)], (100, 1, 1), (64, 1, 1), order=order)["y"]
    expect = np.concatenate([x[:64][::-1], x[64:][::-1]])
    np.testing.assert_array_equal(y, expect)


def test_missing_barrier_is_exposed_by_thread_order():
    # Reading another thread's threadgroup write without a barrier is a race;
    # the shim's start order decides who wins, so the two orders disagree.
    racy = REVERSE.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", "")
    x = np.arange(64, dtype=np.float32) + 1
    fwd = ms.run_metal_body(racy, {"x": x}, [("y", (64,), np.float32)], (64, 1, 1), (64, 1, 1), order=0)["y"]
    rev = ms.run_metal_body(racy, {"x": x}, [("y", (64,), np.float32)], (64, 1, 1), (64, 1, 1), order=1)["y"]
    assert not np.array_equal(fwd, rev)


SIMD_OPS = """
    uint i = thread_position_in_grid.x;
    float v = x[i];
    out[i * 8 + 0] = simd_sum(v);
    out[i * 8 + 1] = simd_shuffle_xor(v, 5);
    out[i * 8 + 2] = simd_max(v);
    out[i * 8 + 3] = simd_broadcast(v, 3);
    out[i * 8 + 4] = simd_shuffle_down(v, 1);
    out[i * 8 + 5] = simd_prefix_exclusive_sum(v);
    out[i * 8 + 6] = quad_sum(v);
    out[i * 8 + 7] = static_cast<float>(simd_sum(static_cast<int>(v)) + simdgroup_index_in_threadgroup * 1000);
"""


def test_simd_collectives_exact():
    n = 80  # two full simdgroups and a partial one of 16 lanes (threadgroup of 80)
    x = (np.arange(n, dtype=np.float32) * 7) % 31
    out = ms.run_metal_body(SIMD_OPS, {"x": x}, [("out", (n * 8,), np.float32)], (n, 1, 1), (n, 1, 1))["out"]
    out = out.reshape(n, 8)
    for s0 in range(0, n, 32):
        lanes = np.arange(s0, min(s0 + 32, n))
        vals = x[lanes]
        for j, i in enumerate(lanes):
            assert out[i, 0] == vals.sum()
            src = j ^ 5
            assert out[i, 1] == (vals[src] if src < len(lanes) else vals[j])
            assert out[i, 2] == vals.max()
            assert out[i, 3] == vals[3]
            assert out[i, 4] == (vals[j + 1] if j + 1 < len(lanes) else vals[j])
            assert out[i, 5] == vals[:j].sum()
            assert out[i, 6] == vals[(j // 4) * 4 : (j // 4) * 4 + 4].sum()
            assert out[i, 7] == vals.sum() + (s0 // 32) * 1000


def test_simd_sum_uses_the_xor_butterfly_order():
    # float addition is not associative: 1e8 + 1 - 1e8 depends on the tree.
    x = np.zeros(32, np.float32)
    x[0], x[1], x[2] = 1e8, 1.0, -1e8
    out = ms.run_metal_body(
        "out[thread_position_in_grid.x] = simd_sum(x[thread_position_in_grid.x]);",
        {"x": x},
        [("out", (32,), np.float32)],
        (32, 1, 1),
        (32, 1, 1),
    )["out"]
    v = x.copy()
    for m in (1, 2, 4, 8, 16):
        v = v + v[np.arange(32) ^ m]
    np.testing.assert_array_equal(out, v)


def test_signature_conventions_and_attributes():
    # _shape/_strides/_ndim parameters, a scalar input passed by reference,
    # int/bool/type template parameters and the attribute variables.
    src = """
        uint3 p = thread_position_in_grid;
        uint idx = (p.z * threads_per_grid.y + p.y) * threads_per_grid.x + p.x;
        if (idx == 0) {
            info[0] = a_ndim; info[1] = a_shape[0]; info[2] = a_shape[1];
            info[3] = static_cast<int>(a_strides[0]); info[4] = scale;
            info[5] = N + (Flag ? 100 : 0); info[6] = sizeof(OutT);
        }
        out[idx] = static_cast<OutT>(a[idx % 6] * scale);
        tg[idx * 3 + 0] = threads_per_threadgroup.x * 100 + threads_per_threadgroup.y;
        tg[idx * 3 + 1] = threadgroups_per_grid.x * 100 + threadgroups_per_grid.y;
        tg[idx * 3 + 2] = simdgroups_per_threadgroup;
    """
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    res = ms.run_metal_body(
        src,
        {"a": a, "scale": 3},
        [("out", (5 * 3,), "bfloat16"), ("info", (7,), np.int32), ("tg", (15 * 3,), np.int32)],
        grid=(5, 3, 1),
        threadgroup=(4, 2, 1),
        template=[("N", 7), ("Flag", True), ("OutT", "bfloat16")],
    )
    np.testing.assert_array_equal(res["info"], [2, 2, 3, 3, 3, 107, 2])
    np.testing.assert_array_equal(res["out"], (np.arange(15) % 6) * 3.0)
    tg = res["tg"].reshape(3, 5, 3)  # [y, x, field]
    # groups: x sizes 4 and 1, y sizes 2 and 1 (non-uniform edges)
    assert tg[0, 0, 0] == 402 and tg[0, 4, 0] == 102 and tg[2, 0, 0] == 401 and tg[2, 4, 0] == 101
    assert (tg[:, :, 1] == 202).all()
    assert tg[0, 0, 2] == 1


def test_half_and_bfloat_round_every_operation():
    src = """
        uint i = thread_position_in_grid.x;
        half h = half(x[i]);
        half one = 1;
        out[i * 3 + 0] = float(h + one);                  // half + half -> half
        out[i * 3 + 1] = float(bfloat(x[i]) * bfloat(3)); // bfloat * bfloat -> bfloat
        out[i * 3 + 2] = x[i] * 0.1;                      // unsuffixed literal is float
    """
    x = np.array([2048.0, 1.0 / 3.0, 300.7, -5.5], np.float32)
    out = ms.run_metal_body(src, {"x": x}, [("out", (12,), np.float32)], (4, 1, 1), (4, 1, 1))["out"].reshape(4, 3)
    np.testing.assert_array_equal(out[:, 0], (x.astype(np.float16) + np.float16(1)).astype(np.float32))
    bf = ms.bf16_bits_to_float(ms._float_to_bf16_bits(x))
    np.testing.assert_array_equal(out[:, 1], ms.bf16_bits_to_float(ms._float_to_bf16_bits(bf * 3)))
    np.testing.assert_array_equal(out[:, 2], x * np.float32(0.1))


def test_outputs_are_poisoned_or_initialised():
    src = "if (thread_position_in_grid.x == 0) { y[0] = 1.0f; }"
    y = ms.run_metal_body(src, {"x": np.zeros(1, np.float32)}, [("y", (4,), np.float32)], (4, 1, 1), (4, 1, 1))["y"]
    assert y[0] == 1 and np.isnan(y[1:]).all()
    y = ms.run_metal_body(
        src, {"x": np.zeros(1, np.float32)}, [("y", (4,), np.float32)], (4, 1, 1), (4, 1, 1), init_value=2.0
    )["y"]
    np.testing.assert_array_equal(y, [1, 2, 2, 2])


def test_deadlock_and_divergence_are_errors():
    deadlock = """
        uint l = thread_index_in_simdgroup;
        float v = 0;
        if (l < 16) { threadgroup_barrier(mem_flags::mem_threadgroup); } else { v = simd_sum(1.0f); }
        y[l] = v;
    """
    with pytest.raises(ms.ShimError, match="deadlock"):
        ms.run_metal_body(deadlock, {"x": np.zeros(1, np.float32)}, [("y", (32,), np.float32)], (32, 1, 1), (32, 1, 1))
    divergent = """
        uint l = thread_index_in_simdgroup;
        y[l] = l < 16 ? simd_sum(1.0f) : simd_max(1.0f);
    """
    with pytest.raises(ms.ShimError, match="divergent"):
        ms.run_metal_body(divergent, {"x": np.zeros(1, np.float32)}, [("y", (32,), np.float32)], (32, 1, 1), (32, 1, 1))
    with pytest.raises(ms.ShimError, match="compilation failed"):
        ms.run_metal_body(
            "y[0] = undefined_name;", {"x": np.zeros(1, np.float32)}, [("y", (1,), np.float32)], (1, 1, 1), (1, 1, 1)
        )


def test_early_return_lanes_leave_collectives():
    # Lanes that returned do not block later barriers/collectives of the others.
    src = """
        uint l = thread_index_in_simdgroup;
        if (l >= 20) { return; }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        y[l] = simd_sum(1.0f);
    """
    y = ms.run_metal_body(
        src, {"x": np.zeros(1, np.float32)}, [("y", (32,), np.float32)], (32, 1, 1), (32, 1, 1), init_value=-1.0
    )["y"]
    np.testing.assert_array_equal(y, [20.0] * 20 + [-1.0] * 12)


MMA = """
    // Per simdgroup: one 8-row block of A [16, 8] times B [8, 16] two ways.
    uint sg = simdgroup_index_in_threadgroup;
    threadgroup float tA[16 * 8];
    for (uint i = thread_index_in_threadgroup; i < 128; i += 64) { tA[i] = A[i]; }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 a, b, d, bt;
    simdgroup_load(a, tA, 8, ulong2(0, sg * 8));
    for (int j = 0; j < 2; ++j) {
        simdgroup_load(b, B, 16, ulong2(j * 8, 0));
        simdgroup_multiply_accumulate(d, a, b, simdgroup_float8x8(1.0f));  // + identity
        simdgroup_store(d, C, 16, ulong2(j * 8, sg * 8));
        simdgroup_load(bt, B, 16, ulong2(j * 8, 0), true);
        simdgroup_multiply(d, a, bt);
        simdgroup_store(d, D, 16, ulong2(j * 8, sg * 8), true);
    }
    simdgroup_float8x8 f = make_filled_simdgroup_matrix<float, 8, 8>(2.0f);
    if (sg == 0) { simdgroup_store(f, E, 8); }
"""


def test_simdgroup_matrix_ops_exact():
    rng = np.random.default_rng(0)
    A = rng.integers(-4, 5, (16, 8)).astype(np.float32)
    B = rng.integers(-4, 5, (8, 16)).astype(np.float32)
    r = ms.run_metal_body(
        MMA,
        {"A": A, "B": B},
        [("C", (16, 16), np.float32), ("D", (16, 16), np.float32), ("E", (8, 8), np.float32)],
        (32, 2, 1),
        (32, 2, 1),
    )
    np.testing.assert_array_equal(r["C"], A @ B + np.tile(np.eye(8, dtype=np.float32), (2, 2)))
    expect_d = np.zeros((16, 16), np.float32)
    for sg in range(2):
        for j in range(2):
            expect_d[sg * 8 : sg * 8 + 8, j * 8 : j * 8 + 8] = (A[sg * 8 : sg * 8 + 8] @ B[:, j * 8 : j * 8 + 8].T).T
    np.testing.assert_array_equal(r["D"], expect_d)
    assert (r["E"] == 2).all()


# ---------------------------------------------------------------------------
# 2. mlx-lm's gated delta kernels through the shim
# ---------------------------------------------------------------------------


def _mlx_lm_kernels():
    import mlx_lm.models.gated_delta as gd

    # The factories return None without Metal; metal_helpers pretends it is there and
    # hands them the shim's metal_kernel, so their exact sources are captured.
    return gd, mlx_lm_kernels()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_mlx_lm_gated_delta_kernels_match_their_reference(dtype):
    gd, kernels = _mlx_lm_kernels()
    B, T, Hk, Hv, Dk, Dv = 2, 3, 2, 4, 128, 16
    ks = mx.random.split(mx.random.key(0), 7)
    q = (0.1 * mx.random.normal((B, T, Hk, Dk), key=ks[0])).astype(dtype)
    k = (0.1 * mx.random.normal((B, T, Hk, Dk), key=ks[1])).astype(dtype)
    v = mx.random.normal((B, T, Hv, Dv), key=ks[2]).astype(dtype)
    g = mx.random.uniform(0.5, 1.0, (B, T, Hv), key=ks[3])
    gv = mx.random.uniform(0.5, 1.0, (B, T, Hv, Dk), key=ks[6])
    beta = mx.random.uniform(0, 1, (B, T, Hv), key=ks[4]).astype(dtype)
    state = 0.1 * mx.random.normal((B, Hv, Dv, Dk), key=ks[5])
    mask = mx.array([[True, False, True], [True, True, True]])
    tol = 2e-6 if dtype == mx.float32 else 2e-2
    with mock.patch.multiple(gd, **kernels):
        y1, s1 = gd.gated_delta_kernel_unpacked(q, k, v, g, beta, state)
        y2, s2 = gd.gated_delta_kernel(q, k, v, g, beta, state)  # packed: Dk == 128
        y3, s3 = gd.gated_delta_kernel_xtree(q, k, v, g, beta, state)
        ym, sm = gd.gated_delta_kernel(q, k, v, g, beta, state, mask)
        yv, sv = gd.gated_delta_kernel(q, k, v, gv, beta, state)
    ry, rs = gd.gated_delta_ops(q, k, v, g, beta, state)
    rym, rsm = gd.gated_delta_ops(q, k, v, g, beta, state, mask)
    ryv, rsv = gd.gated_delta_ops(q, k, v, gv, beta, state)
    # mlx-lm's masked kernel writes y = 0 at masked tokens where its ops
    # reference still computes y (both keep the state): compare unmasked y.
    m = mask[:, :, None, None]
    ym, rym = mx.where(m, ym, 0).astype(dtype), mx.where(m, rym, 0).astype(dtype)
    for y, s, ref_y, ref_s in ((y1, s1, ry, rs), (y2, s2, ry, rs), (ym, sm, rym, rsm), (yv, sv, ryv, rsv)):
        assert y.dtype == dtype
        assert mx.abs(y.astype(mx.float32) - ref_y.astype(mx.float32)).max().item() <= tol * 10
        assert mx.abs(s - ref_s).max().item() <= tol
    # mlx-lm pins the packed kernel bitwise to the explicit-tree one, and the
    # explicit tree to simd_sum's butterfly: both hold in the shim.
    assert mx.array_equal(y2, y3).item() and mx.array_equal(s2, s3).item()
    assert mx.array_equal(y1, y3).item() and mx.array_equal(s1, s3).item()


# ---------------------------------------------------------------------------
# 3. The fused decode kernel
# ---------------------------------------------------------------------------


def _decode_problem(B, T, Hk, Hv, Dk, Dv, dtype, seed=0, K=4, zero_state=False):
    CD = 2 * Hk * Dk + Hv * Dv
    ks = mx.random.split(mx.random.key(seed), 8)
    args = [
        mx.random.normal((B, T, CD), key=ks[0]).astype(dtype),
        (0.5 * mx.random.normal((CD, K, 1), key=ks[1])).astype(dtype),
        None if zero_state else mx.random.normal((B, K - 1, CD), key=ks[2]).astype(dtype),
        mx.random.normal((B, T, Hv), key=ks[3]).astype(dtype),
        mx.random.normal((B, T, Hv), key=ks[4]).astype(dtype),
        mx.random.uniform(-1.0, 1.0, (Hv,), key=ks[5]),
        mx.random.uniform(0.0, 2.0, (Hv,), key=ks[6]),
        None if zero_state else 0.2 * mx.random.normal((B, Hv, Dv, Dk), key=ks[7]),
    ]
    return args, dict(num_k_heads=Hk, head_k_dim=Dk, head_v_dim=Dv)


def _rel(x, ref):
    x = np.asarray(x.astype(mx.float32) if isinstance(x, mx.array) else x, np.float64)
    ref = np.asarray(ref.astype(mx.float32) if isinstance(ref, mx.array) else ref, np.float64)
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-6))


def _round16(x, dtype):
    x = np.asarray(x, np.float32)
    if dtype == mx.bfloat16:
        return ms.bf16_bits_to_float(ms._float_to_bf16_bits(x))
    if dtype == mx.float16:
        return x.astype(np.float16).astype(np.float32)
    return x


def _numpy_oracle(args, Hk, Dk, Dv, dtype):
    """float64 decode with the kernel's (and torch's) roundings of the conv and SiLU outputs."""
    f = lambda a: np.asarray(a.astype(mx.float32), np.float64)  # noqa: E731
    x, w, cs, a, b, A_log, dt_bias, state = [f(t) for t in args]
    B, T, CD = x.shape
    K = w.shape[1]
    Hv = a.shape[-1]
    conv_in = np.concatenate([cs, x], axis=1)
    conv = sum(w[None, None, :, j, 0] * conv_in[:, j : j + T] for j in range(K))
    conv = _round16(conv, dtype).astype(np.float64)
    act = _round16(conv / (1 + np.exp(-conv)), dtype).astype(np.float64)
    q = act[..., : Hk * Dk].reshape(B, T, Hk, Dk)
    k = act[..., Hk * Dk : 2 * Hk * Dk].reshape(B, T, Hk, Dk)
    v = act[..., 2 * Hk * Dk :].reshape(B, T, Hv, Dv)
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) * Dk**-0.5
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    rep = Hv // Hk
    q, k = np.repeat(q, rep, axis=2), np.repeat(k, rep, axis=2)
    g = np.exp(-np.exp(A_log) * np.logaddexp(a + dt_bias, 0))
    beta = 1 / (1 + np.exp(-b))
    ys, states = [], []
    for t in range(T):
        state = state * g[:, t, :, None, None]
        kv = (state * k[:, t, :, None, :]).sum(-1)
        state = state + ((v[:, t] - kv) * beta[:, t, :, None])[..., None] * k[:, t, :, None, :]
        ys.append((state * q[:, t, :, None, :]).sum(-1))
        states.append(state)
    return np.stack(ys, 1), conv_in[:, -(K - 1) :], state, np.stack(states, 1)


def _run_both(args, kw, save):
    got = km.run_gdn_decode_kernel(ms.metal_kernel, *_filled(args, kw), return_all_states=save, **kw)
    ref = km.gated_delta_decode_reference(*args, return_all_states=save, **kw)
    return got, ref


def _filled(args, kw):
    """The kernel path needs explicit zero states where the reference accepts None."""
    x, w, cs, a, b, A_log, dt_bias, state = args
    B, _, CD = x.shape
    Hv = a.shape[-1]
    if cs is None:
        cs = mx.zeros((B, w.shape[1] - 1, CD), x.dtype)
    if state is None:
        state = mx.zeros((B, Hv, kw["head_v_dim"], kw["head_k_dim"]), mx.float32)
    return [x, w, cs, a, b, A_log, dt_bias, state]


@pytest.mark.parametrize(
    "B,T,Hk,Hv,Dk,Dv",
    [
        (2, 1, 2, 2, 32, 32),  # head ratio 1, single token
        (2, 3, 2, 4, 32, 32),  # ratio 2, T not a power of two (threadgroup arrays sized 4)
        (1, 4, 1, 2, 64, 16),  # Dv < 32: 4 simdgroups per threadgroup
        (1, 2, 2, 4, 128, 128),  # the model's per-head sizes, 4 row blocks per head
    ],
)
def test_decode_kernel_float32_matches_model_maths(B, T, Hk, Hv, Dk, Dv):
    args, kw = _decode_problem(B, T, Hk, Hv, Dk, Dv, mx.float32)
    got, ref = _run_both(args, kw, save=True)
    assert [o.shape for o in got] == [r.shape for r in ref]
    for name, o, r in zip(["y", "conv_state", "state", "states"], got, ref):
        assert _rel(o, r) < 2e-6, name
    # conv state is a copy of inputs: exact
    assert mx.array_equal(got[1], ref[1]).item()
    # the last per-token state is the final state
    assert mx.array_equal(got[3][:, -1], got[2]).item()


def test_decode_kernel_real_layer_shapes():
    # One full layer of Qwen3-Next: Hk=16, Hv=32, Dk=Dv=128, B=1, T=2, bf16.
    args, kw = _decode_problem(1, 2, 16, 32, 128, 128, mx.bfloat16, seed=3)
    got, ref = _run_both(args, kw, save=False)
    oracle = _numpy_oracle(args, 16, 128, 128, mx.bfloat16)
    assert _rel(got[0], oracle[0]) < 8e-3  # y is bf16: within one bf16 rounding
    assert _rel(got[2], oracle[2]) < 1e-5
    assert mx.array_equal(got[1], ref[1]).item()
    assert _rel(got[0], ref[0]) < 3e-2 and _rel(got[2], ref[2]) < 3e-2


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_decode_kernel_16bit_inputs(dtype):
    args, kw = _decode_problem(2, 3, 2, 4, 32, 32, dtype, seed=1)
    got, ref = _run_both(args, kw, save=True)
    oracle = _numpy_oracle(args, 2, 32, 32, dtype)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == mx.float32
    # Against the float64 oracle with the same roundings: float32-level agreement
    # on the states, one 16-bit rounding on y.
    assert _rel(got[0], oracle[0]) < 8e-3
    assert _rel(got[2], oracle[2]) < 1e-5 and _rel(got[3], oracle[3]) < 1e-5
    # Against the model's MLX maths (whose 16-bit silu rounds sigmoid first): loose.
    for o, r in zip(got, ref):
        assert _rel(o, r) < 3e-2


def test_decode_kernel_zero_initial_states_and_order_independence():
    args, kw = _decode_problem(1, 2, 1, 2, 32, 32, mx.float32, seed=2, zero_state=True)
    ref = km.gated_delta_decode_reference(*args, **kw)
    for order in (0, 1, 99):
        factory = lambda **k: ms.metal_kernel(order=order, **k)  # noqa: E731
        got = km.gated_delta_decode(*args, kernel_factory=factory, **kw)
        for o, r in zip(got, ref):
            assert _rel(o, r) < 2e-6
        kreg.forget_kernel_objects()


def test_gated_delta_decode_dispatch():
    args, kw = _decode_problem(1, 2, 1, 2, 32, 32, mx.float32, seed=4)
    ref = km.gated_delta_decode_reference(*args, **kw)
    # Linux: no Metal -> the reference path, bit for bit; nothing decided.
    out = km.gated_delta_decode(*args, **kw)
    for o, r in zip(out, ref):
        assert mx.array_equal(o, r).item()
    st = candidates.status()
    assert not st["gdn_decode"]["available"] and not st["gdn_decode"]["decisions"]
    # With a factory: our candidate for the length, the decode kernel up to MAX_DECODE_T
    # tokens, beyond it the chunked prefill kernel (after the MLX conv and norms).
    built = []

    def recording(**k):
        built.append(k["name"])
        return ms.metal_kernel(**k)

    kreg.forget_kernel_objects()
    try:
        got = km.gated_delta_decode(*args, kernel_factory=recording, **kw)
        long_args, kw2 = _decode_problem(1, km.MAX_DECODE_T + 5, 1, 1, 32, 32, mx.float32)
        got_long = km.gated_delta_decode(*long_args, kernel_factory=recording, **kw2)
    finally:
        kreg.forget_kernel_objects()
    assert built == ["qnext_gdn_decode", "qnext_gdn_prefill"]
    for o, r in zip(got, ref):
        assert _rel(o, r) < 2e-6
    for o, r in zip(got_long, km.gated_delta_decode_reference(*long_args, **kw2)):
        assert _rel(o, r) < 2e-6


def test_kernel_sources_ship_with_the_package():
    header, body = kreg.load_kernel_source("gdn_decode.metal")
    assert "gdn_softplus" in header and "simd_sum" in body and "@body" not in body


# ---------------------------------------------------------------------------
# 4. The chunked prefill kernel (simdgroup matrices)
# ---------------------------------------------------------------------------


def _prefill_problem(B, T, Hk, Hv, Dk, Dv, dtype, g_low=0.7, seed=0):
    from qnext_mlx.kernels import normalize_qk

    ks = mx.random.split(mx.random.key(seed), 6)
    q, k = normalize_qk(mx.random.normal((B, T, Hk, Dk), key=ks[0]), mx.random.normal((B, T, Hk, Dk), key=ks[1]))
    return [
        q,
        k,
        mx.random.normal((B, T, Hv, Dv), key=ks[2]).astype(dtype),
        mx.random.uniform(g_low, 1.0, (B, T, Hv), key=ks[3]),
        mx.random.uniform(0.0, 1.0, (B, T, Hv), key=ks[4]),
        0.1 * mx.random.normal((B, Hv, Dv, Dk), key=ks[5]),
    ]


@pytest.mark.parametrize(
    "B,T,Hk,Hv,Dk,Dv,g_low",
    [
        (2, 1, 2, 4, 32, 32, 0.7),  # one token, head ratio 2
        (2, 16, 2, 2, 32, 32, 0.7),  # exactly one chunk, ratio 1
        (1, 33, 1, 1, 32, 8, 0.0),  # partial chunk, Dv = 8 (one simdgroup), decay down to 0
        (1, 37, 1, 2, 128, 128, 0.7),  # the model's head sizes, 4 column slices per head
    ],
)
def test_prefill_kernel_matches_recurrent_reference(B, T, Hk, Hv, Dk, Dv, g_low):
    from qnext_mlx.kernels import gated_delta_recurrent

    args = _prefill_problem(B, T, Hk, Hv, Dk, Dv, mx.float32, g_low)
    y, state = km.run_gdn_prefill_kernel(ms.metal_kernel, *args)
    ref_y, ref_state = gated_delta_recurrent(*args)
    assert y.shape == ref_y.shape and state.shape == ref_state.shape
    assert _rel(y, ref_y) < 2e-6 and _rel(state, ref_state) < 2e-6


def test_prefill_kernel_bf16_values():
    from qnext_mlx.kernels import gated_delta_recurrent

    args = _prefill_problem(1, 20, 1, 2, 64, 16, mx.bfloat16, seed=1)
    ref_y, ref_state = gated_delta_recurrent(*args)
    y, state = km.run_gdn_prefill_kernel(ms.metal_kernel, *args)
    assert y.dtype == mx.bfloat16 and state.dtype == mx.float32
    assert _rel(y, ref_y) < 8e-3 and _rel(state, ref_state) < 2e-6
