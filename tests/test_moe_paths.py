"""The CPU prefill paths against the kernels they replace.

- ``kernels.moe.grouped_switch_glu`` (tokens grouped by expert, plain GEMMs)
  against mlx-lm's ``SwitchGLU`` (gather_mm / gather_qmm), float and quantized,
  with experts that receive no token;
- ``SparseMoeBlock`` taking the grouped path for prefill and SwitchGLU for decode;
- ``kernels.linear`` (dequantize + row-major GEMM) against ``nn.Linear`` /
  ``nn.QuantizedLinear``, tiled and not, and the module swap the loader applies;
- ``kernels.attention`` (causal query blocks) against ``mx.fast.scaled_dot_product_attention``.

Run under ``QNEXT_CPU_LANES=1`` and ``=2`` alike (the default is one lane per core).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU

from qnext_mlx.kernels import lanes as klanes
from qnext_mlx.kernels import linear as klinear
from qnext_mlx.kernels import moe as kmoe
from qnext_mlx.model import Model
from qnext_mlx.model.config import ModelConfig
from qnext_mlx.model.qwen3_next import SparseMoeBlock

H, I, E, K = 128, 64, 8, 2


def _switch(seed: int, bits=None, group_size=64, dtype=mx.float32) -> SwitchGLU:
    mx.random.seed(seed)
    sw = SwitchGLU(H, I, E)
    sw.set_dtype(dtype)
    if bits is not None:
        nn.quantize(sw, group_size=group_size, bits=bits)
    mx.eval(sw.parameters())
    return sw


def _routes(n_tokens: int, seed: int, empty=(3, 5)) -> mx.array:
    """``[n_tokens, K]`` distinct expert ids per token, never using the ``empty`` experts."""
    rng = np.random.default_rng(seed)
    allowed = [e for e in range(E) if e not in empty]
    return mx.array(np.stack([rng.choice(allowed, K, replace=False) for _ in range(n_tokens)]).astype(np.uint32))


def _assert_close(a: mx.array, b: mx.array, rtol: float, atol: float):
    np.testing.assert_allclose(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "bits,group_size,dtype,tol",
    [
        (None, 64, mx.float32, 1e-5),
        (4, 64, mx.float32, 1e-5),
        (8, 32, mx.float32, 1e-5),
        (4, 64, mx.bfloat16, 3e-2),
    ],
)
def test_grouped_matches_switch_glu(bits, group_size, dtype, tol):
    sw = _switch(0, bits, group_size, dtype)
    x = mx.random.normal((2, 40, H), key=mx.random.key(1)).astype(dtype)
    inds = _routes(80, seed=2).reshape(2, 40, K)
    want = sw(x, inds)  # sorted gather path (>= 64 rows)
    got = kmoe.grouped_switch_glu(sw, x, inds)
    assert got.shape == want.shape == (2, 40, K, H)
    assert got.dtype == want.dtype
    _assert_close(got, want, rtol=tol, atol=tol)


def test_grouped_uneven_and_single_expert():
    sw = _switch(3, bits=4)
    x = mx.random.normal((33, H), key=mx.random.key(4))
    # Every token on experts 0 and 7 only (6 experts empty); a mix without 4
    # experts; and a skewed one where experts 2 and 6 get fewer rows than
    # MIN_DENSE_EXPERT_ROWS (quantized kernel) and the others more (dense GEMMs).
    skewed = [[0, 1]] * 28 + [[2, 0], [2, 1], [2, 5], [6, 0], [0, 5]]
    assert 3 < kmoe.MIN_DENSE_EXPERT_ROWS
    for inds in (
        mx.array([[7, 0]] * 33, dtype=mx.uint32),
        _routes(33, seed=5, empty=(1, 2, 4, 6)),
        mx.array(skewed, dtype=mx.uint32),
    ):
        _assert_close(kmoe.grouped_switch_glu(sw, x, inds), sw(x, inds), 1e-5, 1e-5)


def _block(bits=None) -> SparseMoeBlock:
    cfg = ModelConfig.from_dict(
        dict(
            vocab_size=64,
            hidden_size=H,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            num_experts=E,
            num_experts_per_tok=K,
            moe_intermediate_size=I,
            shared_expert_intermediate_size=128,
        )
    )
    mx.random.seed(7)
    block = SparseMoeBlock(cfg)
    # A sharper router than the default init so that routing differs per token.
    block.gate.weight = block.gate.weight * 8
    if bits is not None:
        nn.quantize(block, group_size=64, bits=bits, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    mx.eval(block.parameters())
    return block


@pytest.mark.parametrize("bits", [None, 4])
def test_moe_block_prefill_uses_grouped_path_and_matches(monkeypatch, bits):
    block = _block(bits)
    x = mx.random.normal((1, 80, H), key=mx.random.key(8))
    assert kmoe.use_grouped_experts(80 * K, E)
    calls = []
    real = kmoe.grouped_switch_glu

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    import qnext_mlx.model.qwen3_next as q3

    monkeypatch.setattr(q3, "grouped_switch_glu", spy)
    got = block(x)
    assert calls, "prefill-sized input did not take the grouped path"
    monkeypatch.setattr(kmoe, "MIN_GROUPED_ROWS", 10**9)  # force SwitchGLU
    want = block(x)
    assert len(calls) == 1
    _assert_close(got, want, 1e-5, 1e-5)


def test_moe_block_decode_keeps_switch_glu(monkeypatch):
    import qnext_mlx.model.qwen3_next as q3

    def fail(*a, **kw):
        raise AssertionError("decode must not take the grouped path")

    monkeypatch.setattr(q3, "grouped_switch_glu", fail)
    block = _block(4)
    y = block(mx.random.normal((1, 1, H), key=mx.random.key(9)))
    assert y.shape == (1, 1, H)


# ------------------------------------------------------------------ linears
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (4, 32)])
def test_dense_matmul_matches_quantized_matmul(monkeypatch, bits, group_size):
    w = mx.random.normal((200, 256), key=mx.random.key(10)) * 0.05
    q, s, b = mx.quantize(w, group_size, bits)
    x = mx.random.normal((3, 37, 256), key=mx.random.key(11))
    want = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=group_size, bits=bits)
    _assert_close(klinear.dense_matmul(x, q, s, b, group_size, bits), want, 1e-5, 1e-5)
    # Tiled over output features (200 = 3 tiles of 64 + 8), from a transposed (strided) input.
    monkeypatch.setattr(klinear, "_TILE_ELEMENTS", 64 * 256)
    xt = mx.random.normal((256, 37), key=mx.random.key(12)).T
    want = mx.quantized_matmul(xt, q, s, b, transpose=True, group_size=group_size, bits=bits)
    _assert_close(klinear.dense_matmul(xt, q, s, b, group_size, bits), want, 1e-5, 1e-5)


def test_fast_linear_layers_match_mlx(monkeypatch):
    mx.random.seed(13)
    lin = nn.Linear(96, 80, bias=True)
    qlin = nn.QuantizedLinear.from_linear(nn.Linear(128, 72, bias=True), group_size=64, bits=4)
    mx.eval(lin.parameters(), qlin.parameters())
    for layer, fast_cls in ((lin, klinear.FastLinear), (qlin, klinear.FastQuantizedLinear)):
        d_in = layer.weight.shape[1] if fast_cls is klinear.FastLinear else 128
        for rows in (1, 5, 64):  # decode (base path) and prefill (dense path)
            x = mx.random.normal((1, rows, d_in), key=mx.random.key(rows))
            want = layer(x)
            layer.__class__ = fast_cls
            got = layer(x)
            layer.__class__ = fast_cls.__bases__[0]
            assert got.shape == want.shape
            _assert_close(got, want, 1e-5, 1e-5)
    assert klinear.use_dense_path(64) and not klinear.use_dense_path(1)


def test_use_fast_linears_on_model_keeps_logits():
    cfg = ModelConfig.from_dict(
        dict(
            vocab_size=96,
            hidden_size=64,
            num_hidden_layers=2,
            full_attention_interval=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        )
    )
    mx.random.seed(14)
    model = Model(cfg)
    nn.quantize(
        model, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized") and "conv" not in p
    )
    mx.eval(model.parameters())
    ids = mx.random.randint(0, 96, (1, 40), key=mx.random.key(15))
    want = model(ids)
    n = klinear.use_fast_linears(model)
    assert n > 0
    assert all(type(m) is not nn.QuantizedLinear for _, m in model.named_modules())
    _assert_close(model(ids), want, 1e-4, 1e-4)


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize("L,S,block", [(96, 96, 32), (80, 200, 64), (70, 70, 512)])
def test_causal_attention_matches_fast_sdpa(L, S, block):
    from qnext_mlx.kernels.attention import causal_attention

    q = mx.random.normal((2, 8, L, 32), key=mx.random.key(20))
    k = mx.random.normal((2, 2, S, 32), key=mx.random.key(21))
    v = mx.random.normal((2, 2, S, 32), key=mx.random.key(22))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=32**-0.5, mask="causal")
    got = causal_attention(q, k, v, 32**-0.5, block=block)
    _assert_close(got, want, 1e-5, 1e-5)


def test_attention_dispatch(monkeypatch):
    from qnext_mlx.kernels import attention as katt

    used = []
    real = katt.causal_attention
    monkeypatch.setattr(katt, "causal_attention", lambda *a, **kw: used.append(1) or real(*a, **kw))
    q = mx.random.normal((1, 4, katt.MIN_ROWS, 16), key=mx.random.key(23))
    kv = mx.random.normal((1, 2, katt.MIN_ROWS, 16), key=mx.random.key(24))
    katt.attention(q, kv, kv, cache=None, scale=0.25, mask="causal")
    assert used == [1]
    katt.attention(q[:, :, :1], kv, kv, cache=None, scale=0.25, mask=None)  # decode
    katt.attention(q, kv, kv, cache=None, scale=0.25, mask=mx.ones((katt.MIN_ROWS, katt.MIN_ROWS), dtype=mx.bool_))
    assert used == [1]


# -------------------------------------------------------------- CPU lanes
@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_lanes_give_the_same_results(monkeypatch, lanes):
    monkeypatch.setattr(klanes, "_cpu_lanes", lanes)
    assert klanes.cpu_lanes() == lanes
    # Decode: the quantized product split over output features, SwitchGLU over slots.
    w = mx.random.normal((klinear.MIN_SPLIT_OUTPUTS + 64, 128), key=mx.random.key(30)) * 0.05
    q, s, b = mx.quantize(w, 64, 4)
    x = mx.random.normal((1, 1, 128), key=mx.random.key(31))
    want = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=4)
    _assert_close(klinear.split_quantized_matmul(x, q, s, b, 64, 4), want, 1e-6, 1e-6)
    sw = _switch(32, bits=4)
    inds = _routes(1, seed=33).reshape(1, 1, K)
    xe = mx.random.normal((1, 1, H), key=mx.random.key(34))
    _assert_close(kmoe.switch_glu_lanes(sw, xe, inds), sw(xe, inds), 1e-6, 1e-6)
    # Prefill: dense tiles and grouped experts spread over the lanes.
    xp = mx.random.normal((40, 128), key=mx.random.key(35))
    want = mx.quantized_matmul(xp, q, s, b, transpose=True, group_size=64, bits=4)
    _assert_close(klinear.dense_matmul(xp, q, s, b), want, 1e-5, 1e-5)
    xg = mx.random.normal((60, H), key=mx.random.key(36))
    inds = _routes(60, seed=37)
    _assert_close(kmoe.grouped_switch_glu(sw, xg, inds), sw(xg, inds), 1e-5, 1e-5)


def test_16_bit_decode_products_run_in_float32_on_the_cpu():
    """On the CPU, a quantized product of bfloat16 activations runs in float32 (MLX's fast
    case there) and comes back in bfloat16: exactly the float32 kernel's result, rounded."""
    w = mx.random.normal((klinear.MIN_SPLIT_OUTPUTS + 64, 128), key=mx.random.key(40)) * 0.05
    q, s, b = mx.quantize(w.astype(mx.bfloat16), 64, 4)
    x = mx.random.normal((1, 3, 128), key=mx.random.key(41)).astype(mx.bfloat16)
    assert klinear.cpu_compute_dtype(x) == mx.float32 and klinear.cpu_compute_dtype(x.astype(mx.float32)) == mx.float32
    got = klinear.split_quantized_matmul(x, q, s, b, 64, 4)
    want = mx.quantized_matmul(x.astype(mx.float32), q, s, b, transpose=True, group_size=64, bits=4)
    assert got.dtype == mx.bfloat16 and mx.array_equal(got, want.astype(mx.bfloat16)).item()
    exact = x.astype(mx.float32) @ mx.dequantize(q, s, b, 64, 4).astype(mx.float32).T
    in_bf16 = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=4)
    assert float(mx.abs(got.astype(mx.float32) - exact).max()) <= float(
        mx.abs(in_bf16.astype(mx.float32) - exact).max()
    )
