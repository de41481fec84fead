"""ModelCache: token tracking, chunked prefill, snapshot/restore, save/load, prompt reuse, quantized KV."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import qnext_mlx
from qnext_mlx.engine.primitives import forward, prefill
from qnext_mlx.errors import CacheError
from qnext_mlx.model.cache import ModelCache

pytest.importorskip("torch")

# Stated tolerances of the quantized attention KV cache against full precision, on a
# dense tiny model (2 attention + 2 DeltaNet layers, head_dim 64, group size 64),
# logits of 32 decode steps after a 64-token prompt (measured worst case over 10
# prompts: 8-bit rel. L2 0.0033 / KL 1e-5, 4-bit rel. L2 0.060 / KL 0.0022).
KV_TOLERANCE = {8: dict(rel_l2=0.01, kl=1e-3), 4: dict(rel_l2=0.1, kl=1e-2)}

DENSE = dict(
    vocab_size=320, head_dim=64, mlp_only_layers=[0, 1, 2, 3], layer_types=["linear_attention", "full_attention"] * 2
)


@pytest.fixture(scope="module")
def hybrid(chat_model_dir):
    """3 DeltaNet layers + 1 attention layer, MoE, MTP head."""
    return qnext_mlx.load_model(chat_model_dir)


@pytest.fixture(scope="module")
def dense(hf_checkpoint):
    return qnext_mlx.load_model(hf_checkpoint("cache_dense", seed=5, **DENSE)[0])


def ids_of(n, seed=0, vocab=320):
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


def feed(model, cache, ids):
    """Logits ``[L, vocab]`` of feeding ``ids`` one token at a time."""
    out = [forward(model, cache, mx.array([[t]])) for t in ids]
    return np.array(mx.concatenate(out, axis=1))[0]


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_chunked_prefill_then_decode_equals_full_forward(hybrid):
    ids = ids_of(24, seed=1)
    full = np.array(hybrid(mx.array([ids])))[0]
    cache = hybrid.make_cache()
    prefill(hybrid, cache, ids[:17], step_size=5)  # chunks 5, 5, 5, 2
    assert cache.offset == 17 and cache.tokens == ids[:17]
    decoded = feed(hybrid, cache, ids[17:])
    assert max_abs(decoded, full[17:]) <= 1e-5
    assert cache.offset == 24 and cache.tokens == ids


def test_offset_and_tokens_tracked_for_deltanet_only_model(hf_checkpoint):
    path, _, _ = hf_checkpoint("cache_linear_only", seed=2, layer_types=["linear_attention"] * 4)
    model = qnext_mlx.load_model(path)
    cache = model.make_cache()
    ids = ids_of(9, seed=2, vocab=160)
    model(mx.array([ids[:6]]), cache=cache)
    model(mx.array([ids[6:]]), cache=cache)
    assert cache.offset == 9 and cache.tokens == ids
    assert not cache.is_trimmable()
    with pytest.raises(ValueError, match="cannot be trimmed"):
        cache.trim(1)


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_snapshot_restore_continues_bit_identically(hybrid, kv_bits):
    ids = ids_of(20, seed=3)
    cache = hybrid.make_cache(kv_bits=kv_bits, kv_group_size=32)
    prefill(hybrid, cache, ids[:12], step_size=4)
    snap = cache.snapshot()
    first = feed(hybrid, cache, ids[12:])
    assert cache.offset == 20
    cache.restore(snap)
    assert cache.offset == 12 and cache.tokens == ids[:12]
    again = feed(hybrid, cache, ids[12:])
    assert np.array_equal(first, again)


def _rewind_below_snapshot(model, ids):
    """Snapshot S2 at 12 tokens, rewind to S1 at 8 and write 5 other tokens over
    positions 8..12 of the KV buffer S2 shares, then restore S2: its continuation."""
    cache = model.make_cache()
    prefill(model, cache, ids[:8])
    s1 = cache.snapshot()
    feed(model, cache, ids[8:12])
    s2 = cache.snapshot()
    expected = feed(model, cache, ids[12:16])
    cache.restore(s1)
    feed(model, cache, ids[16:21])
    cache.restore(s2)
    assert cache.tokens == ids[:12]
    return expected, feed(model, cache, ids[12:16])


def test_snapshot_survives_rewind_below_it(hybrid, monkeypatch):
    ids = ids_of(21, seed=4)
    expected, got = _rewind_below_snapshot(hybrid, ids)
    assert np.array_equal(expected, got)
    # The hazard is real: without detaching the shared KV buffer the snapshot is corrupted.
    monkeypatch.setattr(ModelCache, "_protect_snapshots", lambda self: None)
    expected, got = _rewind_below_snapshot(hybrid, ids)
    assert not np.array_equal(expected, got)


@pytest.mark.parametrize("kv_bits", [None, 4])
def test_save_load_continues_bit_identically(hybrid, tmp_path, kv_bits):
    ids = ids_of(18, seed=5)
    cache = hybrid.make_cache(kv_bits=kv_bits, kv_group_size=32)
    prefill(hybrid, cache, ids[:11], step_size=4)
    # populate the MTP head's cache too: pairs (h_i, t_{i+1})
    _, hidden = hybrid(mx.array([ids[11:13]]), cache=cache, return_hidden=True)
    hybrid.mtp_forward(hidden[:, :1], mx.array([ids[12:13]]), cache=cache.mtp)
    path = tmp_path / "prompt.safetensors"
    cache.save(path)
    assert path.exists() and not list(tmp_path.glob(".*tmp*"))
    loaded = ModelCache.load(path, hybrid)
    assert loaded.offset == 13 and loaded.tokens == ids[:13] and loaded.kv_bits == kv_bits
    assert [c.offset for c in loaded.mtp] == [c.offset for c in cache.mtp] == [1]
    assert np.array_equal(feed(hybrid, cache, ids[13:]), feed(hybrid, loaded, ids[13:]))


def test_saved_checkpoints_are_reusable_after_load(hybrid, tmp_path):
    a, b, c = ids_of(10, seed=15), ids_of(4, seed=16), ids_of(5, seed=17)
    cache = hybrid.make_cache()
    prefill(hybrid, cache, a)
    cache.keep_checkpoint()
    feed(hybrid, cache, b)
    cache.save(tmp_path / "c.safetensors")
    loaded = ModelCache.load(tmp_path / "c.safetensors", hybrid)
    assert [s.offset for s in loaded.checkpoints] == [10] and loaded.tokens == a + b
    assert loaded.reuse(a + c) == cache.reuse(a + c) == 10
    assert np.array_equal(feed(hybrid, loaded, c), feed(hybrid, cache, c))


def test_load_refuses_other_models_and_bad_files(hybrid, hf_checkpoint, chat_model_dir, tmp_path):
    cache = hybrid.make_cache()
    prefill(hybrid, cache, ids_of(6))
    path = tmp_path / "c.safetensors"
    cache.save(path)
    other_config = qnext_mlx.load_model(
        hf_checkpoint("cache_linear_only", seed=2, layer_types=["linear_attention"] * 4)[0]
    )
    other_weights = qnext_mlx.load_model(hf_checkpoint("cache_other_weights", seed=9, mtp=True, vocab_size=320)[0])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    cases = [
        (path, other_config, "another architecture"),
        (path, other_weights, "other weights"),
        (tmp_path / "missing.safetensors", hybrid, "does not exist"),
        (garbage, hybrid, "not a readable safetensors"),
        (chat_model_dir / "model-mtp.safetensors", hybrid, "not a qnext-mlx prompt cache"),
    ]
    for file, model, message in cases:
        with pytest.raises(CacheError, match=message) as e:
            ModelCache.load(file, model)
        assert "\n" not in str(e.value)


def test_reuse_extends_restores_checkpoint_or_resets(hybrid):
    a, b, c = ids_of(10, seed=6), ids_of(5, seed=7), ids_of(6, seed=8)
    cache = hybrid.make_cache()
    assert cache.reuse(a + b) == 0
    prefill(hybrid, cache, a)
    cache.keep_checkpoint()
    feed(hybrid, cache, b)
    # 1. the prompt extends everything held: keep it all
    assert cache.reuse(a + b + c) == 15 and cache.offset == 15
    # 2. it diverges after a: restore the checkpoint at a (DeltaNet state cannot be trimmed)
    assert cache.reusable(a + c) == 10 and cache.offset == 15  # a dry run changes nothing
    assert cache.reuse(a + c) == 10 and cache.tokens == a
    assert max_abs(feed(hybrid, cache, c[:-1]), np.array(hybrid(mx.array([a + c[:-1]])))[0, 10:]) <= 1e-5
    # 3. exactly the held tokens: the last one must run again for its logits -> checkpoint
    assert cache.reuse(a + c[:-1]) == 10
    # 4. nothing in common: start again
    assert cache.reuse(c + a) == 0 and cache.offset == 0 and cache.tokens == []


def test_reuse_trims_attention_only_cache(hf_checkpoint):
    model = qnext_mlx.load_model(
        hf_checkpoint("cache_attn_only", seed=2, layer_types=["full_attention"] * 2, num_hidden_layers=2)[0]
    )
    a, b, c = ids_of(8, seed=9, vocab=160), ids_of(4, seed=10, vocab=160), ids_of(3, seed=11, vocab=160)
    cache = model.make_cache()
    prefill(model, cache, a + b)
    assert cache.is_trimmable()
    assert cache.reusable(a + c) == 8 and cache.offset == 12
    assert cache.reuse(a + c) == 8 and cache.offset == 8 and cache.tokens == a
    ref = np.array(model(mx.array([a + c])))[0, 8:]
    assert max_abs(feed(model, cache, c), ref) <= 1e-5


def test_trim_kv_and_trim(hybrid):
    cache = hybrid.make_cache()
    ids = ids_of(9, seed=12)
    prefill(hybrid, cache, ids)
    with pytest.raises(ValueError, match="cannot be trimmed"):
        cache.trim(2)
    assert cache.trim_kv(2) == 2
    assert cache.offset == 7 and cache.tokens == ids[:7] and cache[3].offset == 7


def test_quantized_kv_within_stated_tolerance(dense):
    ids = ids_of(96, seed=13)

    def run(kv_bits):
        cache = dense.make_cache(kv_bits=kv_bits)
        prefill(dense, cache, ids[:64], step_size=16)
        return feed(dense, cache, ids[64:]), cache.nbytes

    def kl(p, q):
        lp = p - np.log(np.exp(p).sum(-1, keepdims=True))
        lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
        return float((np.exp(lp) * (lp - lq)).sum(-1).max())

    ref, full_bytes = run(None)
    errors = {}
    for bits, tol in KV_TOLERANCE.items():
        q, q_bytes = run(bits)
        errors[bits] = float(np.linalg.norm(q - ref) / np.linalg.norm(ref))
        assert errors[bits] <= tol["rel_l2"], (bits, errors[bits])
        assert kl(ref, q) <= tol["kl"]
        assert q_bytes < full_bytes
    assert 0 < errors[8] < errors[4]


def test_nbytes_and_kv_settings(hybrid):
    cache = hybrid.make_cache(kv_bits=8, kv_group_size=32)
    empty = cache.nbytes
    prefill(hybrid, cache, ids_of(5))
    assert cache.nbytes > empty
    with pytest.raises(ValueError, match="kv_bits"):
        hybrid.make_cache(kv_bits=3)
    with pytest.raises(ValueError, match="does not divide"):
        hybrid.make_cache(kv_bits=4, kv_group_size=64)  # tiny head_dim is 32


def test_mlx_lm_helpers_accept_the_cache(hybrid):
    import importlib

    from mlx_lm.models.cache import can_trim_prompt_cache

    generate_step = importlib.import_module("mlx_lm.generate").generate_step
    cache = hybrid.make_cache()
    ids = ids_of(7, seed=14)
    tokens = [t for t, _ in generate_step(mx.array(ids), hybrid, prompt_cache=cache, max_tokens=3)]
    assert len(tokens) == 3 and cache.tokens[:7] == ids
    assert not can_trim_prompt_cache(cache)
