"""Long prompts: chunked prefill equals one-shot prefill, quantized KV over many chunks, and (slow)
memory against context length."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import qnext_mlx
from qnext_mlx.engine.primitives import forward, prefill

# hybrid with a dense MLP everywhere: the MoE router would turn tiny KV errors into expert flips
DENSE = dict(num_experts=0, num_hidden_layers=4, head_dim=64, vocab_size=160, max_position_embeddings=65536)


@pytest.fixture(scope="module")
def dense(hf_checkpoint):
    path, _, _ = hf_checkpoint("long_dense", seed=4, **DENSE)
    return qnext_mlx.load_model(path)


def _ids(n, seed=0):
    return np.random.default_rng(seed).integers(0, 160, size=n).tolist()


def _last_logits(model, ids, step, kv_bits=None):
    cache = model.make_cache(kv_bits=kv_bits)
    prefill(model, cache, ids[:-1], step_size=step, progress=False)
    logits = forward(model, cache, mx.array([ids[-1:]]))
    return np.array(logits[0, -1], dtype=np.float64), cache


def test_chunked_long_prefill_equals_one_shot(dense):
    ids = _ids(700, seed=1)
    one_shot, _ = _last_logits(dense, ids, step=4096)
    chunked, cache = _last_logits(dense, ids, step=48)  # 15 chunks, the last one ragged
    assert cache.offset == 700
    assert np.max(np.abs(chunked - one_shot)) <= 1e-4


@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.1)])
def test_quantized_kv_over_many_chunks(dense, bits, bound):
    """Stated tolerance: relative L2 error of the next-token logits after a 700-token prompt in
    15 chunks is at most 1% with 8-bit KV and 10% with 4-bit KV."""
    ids = _ids(700, seed=2)
    ref, _ = _last_logits(dense, ids, step=48)
    quant, cache = _last_logits(dense, ids, step=48, kv_bits=bits)
    rel = np.linalg.norm(quant - ref) / np.linalg.norm(ref)
    assert rel <= bound, rel
    assert np.argmax(quant) == np.argmax(ref)


def _kv_and_state_bytes(cache):
    kv = sum(c.nbytes for c in cache if hasattr(c, "offset"))
    state = sum(c.nbytes for c in cache if not hasattr(c, "offset"))
    return kv, state


@pytest.mark.slow
def test_memory_against_context_length(dense, record_property):
    """Tens of thousands of tokens: KV grows linearly with the context, DeltaNet state stays flat,
    and the prefill's working memory is bounded by the chunk, not the prompt."""
    step = 1024
    rows = []
    cache = dense.make_cache()
    ids = _ids(32768, seed=3)
    done = 0
    for target in (4096, 8192, 16384, 32768):
        mx.reset_peak_memory()
        prefill(dense, cache, ids[done:target], step_size=step, progress=False)
        done = target
        kv, state = _kv_and_state_bytes(cache)
        rows.append((target, kv, state, mx.get_peak_memory()))
    record_property("memory_rows", rows)
    print("\ncontext  kv_bytes  state_bytes  peak_bytes")
    for r in rows:
        print(*r)
    # state: identical at every length
    assert len({r[2] for r in rows}) == 1
    # KV: allocated in steps, so proportional within one allocation step of 256 tokens per layer
    per_token = rows[-1][1] / rows[-1][0]
    for ctx, kv, _, _ in rows:
        assert abs(kv - per_token * ctx) <= per_token * 256 * 2
    # beyond the KV (held twice for a moment while mlx-lm's KVCache grows its buffer), the
    # working memory is the chunk's and does not grow with the prompt (measured: ~6 MB flat)
    extra = [peak - 2 * kv for _, kv, _, peak in rows]
    assert max(extra) - min(extra) <= 4 * 2**20, extra
