"""MTP speculative decoding: greedy output identical to plain decoding, exact rollback,
the sampled distribution equal to plain sampling, and the wiring (stream_generate, CLI).

Random tiny checkpoints have MTP heads whose drafts are almost never right, so the
rollback paths are also driven by an *oracle* drafter: the real MTP head runs (its
KV cache is kept as in real use) but its logits are replaced by the plain greedy
continuation, wrong at chosen positions, which gives every accepted length.
"""

from __future__ import annotations

import importlib
import io
import math
from contextlib import redirect_stderr, redirect_stdout

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import ArraysCache
from mlx_lm.sample_utils import make_sampler

import qnext_mlx
from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR
from qnext_mlx.engine import mtp_trial, speculative
from qnext_mlx.engine.decode import generate_tokens
from qnext_mlx.engine.primitives import prefill
from qnext_mlx.engine.sampling import make_logits_processors, sampling_distribution
from qnext_mlx.engine.speculative import MTPDecoding, accept_drafts, rollback, verify_forward
from qnext_mlx.engine.stream import stream_generate
from qnext_mlx.engine.text import format_prompt
from qnext_mlx.kernels import candidates

# qnext_mlx.generate is the Python API's function (as in mlx-lm); the command's module is reached by name.
gen_cli = importlib.import_module("qnext_mlx.generate")

torch = pytest.importorskip("torch")

DEMO = DEMO_MODEL_DIR


# ----------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tiny(hf_checkpoint):
    """A random tiny model with an MTP head (3 DeltaNet layers + 1 attention layer)."""
    folder, _, _ = hf_checkpoint("spec", seed=5, mtp=True)
    return qnext_mlx.load_model(folder)


@pytest.fixture(scope="module")
def tiny_vocab(hf_checkpoint):
    """The same architecture with a 12-token vocabulary (for the sampling statistics)."""
    folder, _, _ = hf_checkpoint("spec_v12", seed=4, mtp=True, vocab_size=12)
    return qnext_mlx.load_model(folder)


_PLAIN = {}


def plain_reference(model, prompt, n, **kw):
    """Plain greedy tokens and cache, computed once per (model, prompt, n, settings)."""
    key = (id(model), tuple(prompt), n, tuple(sorted(kw.items())))
    if key not in _PLAIN:
        _PLAIN[key] = plain_tokens(model, prompt, n, **kw)
    return _PLAIN[key]


def plain_tokens(model, prompt, n, cache=None, **kw):
    cache = cache if cache is not None else model.make_cache()
    return [t for t, _ in generate_tokens(model, cache, prompt, max_tokens=n, **kw)], cache


def mtp_tokens(model, prompt, n, k, cache=None, **kw):
    cache = cache if cache is not None else model.make_cache()
    dec = MTPDecoding(num_draft_tokens=k)
    out = [t for t, _ in generate_tokens(model, cache, prompt, max_tokens=n, mtp=dec, **kw)]
    return out, cache, dec.stats


def assert_same_cache(a, b):
    """The main layer caches hold the same arrays, bit for bit, and the same tokens."""
    assert a.offset == b.offset
    assert a.tokens == b.tokens
    for x, y in zip(a, b):
        if isinstance(x, ArraysCache):
            for u, v in zip(x.cache, y.cache):
                assert u.dtype == v.dtype and u.shape == v.shape
                assert mx.array_equal(u, v).item()
        else:
            assert x.offset == y.offset
            assert mx.array_equal(x.keys[..., : x.offset, :], y.keys[..., : y.offset, :]).item()
            assert mx.array_equal(x.values[..., : x.offset, :], y.values[..., : y.offset, :]).item()


class OracleDrafts:
    """Model proxy whose MTP drafts are the given continuation, except at positions
    where ``wrong(pos)`` is true (there it proposes another token)."""

    def __init__(self, model, sequence, wrong):
        self._model, self.sequence, self.wrong = model, list(sequence), wrong

    def mtp_forward(self, hidden, next_ids, cache=None, return_hidden=False):
        start = cache[0].offset
        logits, h = self._model.mtp_forward(hidden, next_ids, cache=cache, return_hidden=True)
        V = logits.shape[-1]
        rows = []
        for r in range(logits.shape[1]):
            pos = start + r  # the pair (h_pos, t_pos+1) predicts t_pos+2
            t = self.sequence[pos + 2] if pos + 2 < len(self.sequence) else 0
            rows.append((t + 1) % V if self.wrong(pos) else t)
        hot = mx.arange(V)[None, None, :] == mx.array(rows)[None, :, None]
        fake = mx.where(hot, 30.0, 0.0).astype(logits.dtype) + 0 * logits
        return (fake, h) if return_hidden else fake

    def __call__(self, *a, **kw):
        return self._model(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._model, name)


def wrong_every(pattern):
    """``wrong(pos)``: a fixed pseudo-random pattern (about one draft in ``pattern`` wrong)."""
    return lambda pos: (pos * 7919 + 13) % pattern == 0


def prompt_of(model, n, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, n).tolist()


# ------------------------------------------------------------------- greedy
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_identical_to_plain_with_mtp_head(tiny, k):
    """The real (random) MTP head; a 50-token prompt prefilled in chunks of 16."""
    prompt = prompt_of(tiny, 50)
    ref, ref_cache = plain_reference(tiny, prompt, 300, prefill_step_size=16)
    out, cache, stats = mtp_tokens(tiny, prompt, 300, k, prefill_step_size=16)
    assert out == ref
    assert stats.steps > 0 and stats.drafted <= stats.steps * k
    assert_same_cache(cache, ref_cache)
    # the MTP cache holds one pair per position whose next token is known
    assert cache.mtp[0].offset == cache.offset - 1


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_identical_with_partial_acceptance(tiny, k):
    """Oracle drafts, wrong about one time in three: every accepted length occurs."""
    prompt = prompt_of(tiny, 40, seed=1)
    ref, ref_cache = plain_reference(tiny, prompt, 300, prefill_step_size=16)
    oracle = OracleDrafts(tiny, prompt + ref, wrong_every(3))
    out, cache, stats = mtp_tokens(oracle, prompt, 300, k, prefill_step_size=16)
    assert out == ref
    assert 0.3 < stats.acceptance_rate < 1.0
    assert stats.mean_accepted_length > 1.3
    assert_same_cache(cache, ref_cache)
    assert cache.mtp[0].offset == cache.offset - 1


def test_greedy_all_drafts_right_and_all_wrong(tiny):
    prompt = prompt_of(tiny, 20, seed=2)
    ref, ref_cache = plain_tokens(tiny, prompt, 60)
    for wrong, rate in ((lambda pos: False, 1.0), (lambda pos: True, 0.0)):
        out, cache, stats = mtp_tokens(OracleDrafts(tiny, prompt + ref, wrong), prompt, 60, 3)
        assert out == ref
        assert stats.acceptance_rate == rate
        assert_same_cache(cache, ref_cache)


def test_greedy_with_quantized_kv_cache(tiny):
    prompt = prompt_of(tiny, 30, seed=12)
    ref, ref_cache = plain_tokens(tiny, prompt, 80, cache=tiny.make_cache(kv_bits=8, kv_group_size=32))
    oracle = OracleDrafts(tiny, prompt + ref, wrong_every(3))
    out, cache, stats = mtp_tokens(oracle, prompt, 80, 3, cache=tiny.make_cache(kv_bits=8, kv_group_size=32))
    assert out == ref and stats.accepted > 0
    assert cache.offset == ref_cache.offset and cache.tokens == ref_cache.tokens
    for x, y in zip(cache, ref_cache):
        if isinstance(x, ArraysCache):
            assert all(mx.array_equal(u, v).item() for u, v in zip(x.cache, y.cache))
        else:
            for u, v in zip(x.keys + x.values, y.keys + y.values):
                assert mx.array_equal(u[..., : x.offset, :], v[..., : y.offset, :]).item()


def test_greedy_with_logits_processors(tiny):
    """Penalties see the drafts as history, as plain decoding sees the tokens."""
    prompt = prompt_of(tiny, 30, seed=3)

    def processors():
        return make_logits_processors(len(prompt), presence_penalty=1.5, repetition_penalty=1.3)

    ref, _ = plain_tokens(tiny, prompt, 120, logits_processors=processors())
    oracle = OracleDrafts(tiny, prompt + ref, wrong_every(4))
    out, _, stats = mtp_tokens(oracle, prompt, 120, 3, logits_processors=processors())
    assert out == ref
    assert stats.accepted > 0


def test_logprobs_equal_plain(tiny):
    prompt = prompt_of(tiny, 12, seed=4)
    plain = list(generate_tokens(tiny, tiny.make_cache(), prompt, max_tokens=40))
    ref = [t for t, _ in plain]
    spec = list(
        generate_tokens(
            OracleDrafts(tiny, prompt + ref, wrong_every(3)),
            tiny.make_cache(),
            prompt,
            max_tokens=40,
            mtp=MTPDecoding(num_draft_tokens=2),
        )
    )
    for (t, lp), (u, lq) in zip(plain, spec):
        assert t == u and mx.array_equal(lp, lq).item()


# ----------------------------------------------------------------- rollback
@pytest.mark.parametrize("keep", [1, 2, 3, 4, 5])
def test_rollback_equals_plain_run(tiny, keep):
    """A verify pass over 5 tokens rolled back to ``keep`` tokens holds exactly the
    arrays of a plain run that fed those tokens one at a time (and in one chunk)."""
    prompt = prompt_of(tiny, 33, seed=5)
    ids = prompt_of(tiny, 5, seed=6)

    def prefilled():
        c = tiny.make_cache()
        prefill(tiny, c, prompt, step_size=16)
        return c

    cache = prefilled()
    base = cache.offset
    _, _, captured = verify_forward(tiny, cache, mx.array([ids]))
    assert len(captured) == 3  # the DeltaNet layers
    rollback(cache, captured, base, keep)
    one_by_one = prefilled()
    for t in ids[:keep]:
        tiny(mx.array([[t]]), cache=one_by_one)
    assert_same_cache(cache, one_by_one)
    chunk = prefilled()
    tiny(mx.array([ids[:keep]]), cache=chunk)
    assert_same_cache(cache, chunk)
    # and the cache goes on exactly like the plain one
    nxt = mx.array([prompt_of(tiny, 3, seed=7)])
    assert mx.array_equal(tiny(nxt, cache=cache), tiny(nxt, cache=one_by_one)).item()


def test_closing_mid_step_leaves_exactly_the_yielded_tokens(tiny):
    """A consumer that stops after any token (EOS, stop string) leaves the cache
    holding prompt + yielded tokens, equal to a plain run."""
    prompt = prompt_of(tiny, 20, seed=8)
    ref, _ = plain_tokens(tiny, prompt, 40)
    oracle = OracleDrafts(tiny, prompt + ref, lambda pos: False)  # every step accepts all 4 drafts
    for stop_after in (1, 2, 3, 4, 5, 6, 7):
        cache = tiny.make_cache()
        gen_ = generate_tokens(oracle, cache, prompt, max_tokens=40, mtp=MTPDecoding(num_draft_tokens=4))
        got = [next(gen_) for _ in range(stop_after)]
        gen_.close()
        assert [t for t, _ in got] == ref[:stop_after]
        plain = tiny.make_cache()
        prefill(tiny, plain, prompt[:-1])  # as generate_tokens does: one chunk, then token by token
        prefill(tiny, plain, prompt[-1:] + ref[:stop_after], step_size=1)
        assert_same_cache(cache, plain)
        assert cache.mtp[0].offset == cache.offset - 1


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 7])
def test_max_tokens_inside_a_step(tiny, max_tokens):
    prompt = prompt_of(tiny, 15, seed=9)
    ref, ref_cache = plain_tokens(tiny, prompt, max_tokens)
    oracle = OracleDrafts(tiny, prompt + ref + [0] * 8, lambda pos: False)
    out, cache, _ = mtp_tokens(oracle, prompt, max_tokens, 4)
    assert out == ref
    assert_same_cache(cache, ref_cache)


def test_prompt_reuse_and_continuation(tiny):
    """A second prompt extending the first reply reuses the cache (its MTP part
    included) and still decodes exactly like plain decoding."""
    p1 = prompt_of(tiny, 25, seed=10)
    r1, c_plain = plain_tokens(tiny, p1, 20)
    p2 = p1 + r1 + prompt_of(tiny, 6, seed=11)
    assert c_plain.reuse(p2) == len(p1) + len(r1)
    r2, c_plain = plain_tokens(tiny, p2, 50, cache=c_plain)
    cache = tiny.make_cache()
    out1, cache, _ = mtp_tokens(tiny, p1, 20, 2, cache=cache)
    assert out1 == r1
    assert cache.reuse(p2) == len(p1) + len(r1)
    out2, cache, _ = mtp_tokens(OracleDrafts(tiny, p2 + r2, wrong_every(3)), p2, 50, 2, cache=cache)
    assert out2 == r2
    assert_same_cache(cache, c_plain)


def test_mtp_after_plain_decoding_fills_the_mtp_cache(tiny):
    """A cache filled without MTP (its MTP KV empty) continues with MTP: the missing
    pairs get stand-in hidden states, the output is unchanged."""
    p1 = prompt_of(tiny, 25, seed=15)
    out1, cache = plain_tokens(tiny, p1, 10)
    assert cache.mtp[0].offset == 0
    p2 = p1 + out1 + prompt_of(tiny, 5, seed=16)
    ref, _ = plain_tokens(tiny, p2, 30)
    assert cache.reuse(p2) == len(p1) + len(out1)
    out2, cache, _ = mtp_tokens(OracleDrafts(tiny, p2 + ref, wrong_every(3)), p2, 30, 2, cache=cache)
    assert out2 == ref
    assert cache.mtp[0].offset == cache.offset - 1


def test_saved_cache_continues_with_mtp(tiny, tmp_path):
    from qnext_mlx.model.cache import ModelCache

    p1 = prompt_of(tiny, 25, seed=13)
    out1, cache, _ = mtp_tokens(tiny, p1, 15, 2)
    cache.save(tmp_path / "c.safetensors")
    loaded = ModelCache.load(tmp_path / "c.safetensors", tiny)
    assert loaded.mtp[0].offset == cache.mtp[0].offset == cache.offset - 1
    p2 = p1 + out1 + prompt_of(tiny, 5, seed=14)
    ref, _ = plain_tokens(tiny, p2, 30)
    assert loaded.reuse(p2) == len(p1) + len(out1)
    out2, _, _ = mtp_tokens(OracleDrafts(tiny, p2 + ref, wrong_every(3)), p2, 30, 2, cache=loaded)
    assert out2 == ref


# ------------------------------------------------------------------ sampling
def chi_square_p(observed, expected):
    """p-value of Pearson's chi-square test; cells with expected count < 5 are pooled."""
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    assert observed[expected == 0].sum() == 0, "a token of probability 0 was drawn"
    order = np.argsort(expected)
    o, e, pooled = [], [], [0.0, 0.0]
    for i in order:
        if expected[i] == 0:
            continue
        if expected[i] < 5:
            pooled[0] += observed[i]
            pooled[1] += expected[i]
        else:
            o.append(observed[i])
            e.append(expected[i])
    if pooled[1] > 0:
        o.append(pooled[0])
        e.append(pooled[1])
    o, e = np.array(o), np.array(e)
    stat = ((o - e) ** 2 / e).sum()
    df = len(o) - 1
    return float(
        torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    )


SETTINGS = [
    dict(temp=1.0, top_p=1.0, top_k=0, min_p=0.0),
    dict(temp=0.7, top_p=0.8, top_k=5, min_p=0.0),
    dict(temp=1.3, top_p=0.95, top_k=0, min_p=0.05),
]


@pytest.mark.parametrize("s", SETTINGS)
def test_sampling_distribution_is_what_mlx_lm_samples(s):
    """sampling_distribution vs the token counts of mlx-lm's make_sampler (chi-square, p > 0.001)."""
    mx.random.seed(0)
    logprobs = mx.random.normal((1, 12)) * 2
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    sampler = make_sampler(temp=s["temp"], top_p=s["top_p"], min_p=s["min_p"], top_k=s["top_k"])
    n = 20000
    draws = np.array(sampler(mx.broadcast_to(logprobs, (n, 12))))
    p = np.array(sampling_distribution(logprobs, **s))[0]
    assert abs(p.sum() - 1) < 1e-5
    assert chi_square_p(np.bincount(draws, minlength=12), n * p) > 0.001


def _dist(rng, shape, scale):
    x = rng.normal(size=shape) * scale
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return mx.array((e / e.sum(axis=-1, keepdims=True)).astype(np.float32))


PEAKY_P = [[0.5, 0.5, 0, 0, 0, 0], [0.2, 0.3, 0.5, 0, 0, 0], [0, 0, 0, 0.6, 0.4, 0], [0.1] * 5 + [0.5]]
PEAKY_Q = [[0.9, 0.05, 0.05, 0, 0, 0], [0, 0, 1.0, 0, 0, 0], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]]


@pytest.mark.parametrize("case", ["random", "peaky"])
def test_acceptance_rule_reproduces_the_target(case):
    """200,000 independent speculative steps (K=3, 6 tokens) with fixed p_0..p_3 and
    q_1..q_3: the token at position i of the steps that reach it must follow p_i
    (chi-square per position, Bonferroni, overall significance 0.001), and the first
    draft is accepted with probability sum(min(p_0, q_1)). Resampling a rejection from
    p instead of the residual fails this with p < 1e-5 (checked when written)."""
    rng = np.random.default_rng(0)
    if case == "random":
        p, q = _dist(rng, (4, 6), 1.5), _dist(rng, (3, 6), 1.5)
    else:
        p, q = mx.array(PEAKY_P, dtype=mx.float32), mx.array(PEAKY_Q, dtype=mx.float32)
    B, K = 200_000, 3
    mx.random.seed(11)
    drafts = mx.random.categorical(mx.log(mx.broadcast_to(q, (B, K, 6))))
    n, tokens = accept_drafts(mx.broadcast_to(p, (B, K + 1, 6)), mx.broadcast_to(q, (B, K, 6)), drafts, False)
    n, tokens, drafts = np.array(n), np.array(tokens), np.array(drafts)
    p64 = np.array(p, dtype=np.float64)
    pvalues = []
    for i in range(K + 1):
        reach = n >= i
        tok = np.where(n[reach] > i, drafts[reach][:, min(i, K - 1)], tokens[reach][:, i])
        pvalues.append(chi_square_p(np.bincount(tok, minlength=6), reach.sum() * p64[i]))
    assert min(pvalues) * len(pvalues) > 0.001, pvalues
    accept = np.minimum(p64[0], np.array(q, dtype=np.float64)[0]).sum()
    z = ((n >= 1).mean() - accept) / math.sqrt(accept * (1 - accept) / B)
    assert abs(z) < 3.9  # two-sided 1e-4


def test_speculative_sampling_matches_plain_distribution(tiny_vocab):
    """Every token of a 2000-token MTP generation (K=3, 12-token vocabulary) must be a
    draw from the plain sampling distribution given the tokens before it.

    The exact plain distributions p_t come from one independent full forward pass
    over the generated text (:func:`sampling_distribution`, itself checked against
    mlx-lm's sampler above). Under that hypothesis the randomised probability
    integral transforms ``u_t = P_t(X < x_t) + V_t p_t(x_t)`` are i.i.d. uniform
    (Rosenblatt), and the token counts have expectation ``sum_t p_t``: two Pearson
    chi-square tests (20 bins of u; the 12 token counts), each at 0.0005, overall
    significance 0.001 (Bonferroni), with a fixed seed. This checks the wiring (the
    right p, q and drafts reach the acceptance rule): accepting every draft fails it
    (107 tokens of probability 0; token counts chi-square 47 on 11 df). Subtler
    errors in the rule itself are left to the much larger batched test above.
    """
    model = tiny_vocab
    s = dict(temp=0.9, top_p=0.95, top_k=0, min_p=0.02)
    prompt = [1, 5, 7, 2, 9, 3]
    n = 2000
    mx.random.seed(7)
    dec = MTPDecoding(num_draft_tokens=3, **s)
    tokens = [t for t, _ in generate_tokens(model, model.make_cache(), prompt, max_tokens=n, mtp=dec)]
    # both outcomes of the acceptance test happen often
    assert 0.2 < dec.stats.acceptance_rate < 0.9
    logits = model(mx.array([prompt + tokens]))[0, len(prompt) - 1 : -1]
    p = np.array(sampling_distribution(logits - mx.logsumexp(logits, axis=-1, keepdims=True), **s), dtype=np.float64)
    x = np.array(tokens)
    p_x = p[np.arange(n), x]
    assert (p_x > 0).all(), "a token the sampler excludes was generated"
    u = np.cumsum(p, axis=1)[np.arange(n), x] - p_x + np.random.default_rng(7).random(n) * p_x
    pit = chi_square_p(np.histogram(u, bins=20, range=(0, 1))[0], np.full(20, n / 20))
    counts = chi_square_p(np.bincount(x, minlength=12), p.sum(axis=0))
    assert min(pit, counts) > 0.0005, (pit, counts)


# ------------------------------------------------------------------ wiring
@pytest.fixture(scope="module")
def chat(chat_model_dir):
    return qnext_mlx.load(chat_model_dir)


def test_default_rule(chat, hf_checkpoint):
    model, _ = chat
    assert speculative.MTP_BY_DEFAULT == {"gpu": None, "cpu": False}  # GPU: the timed trial decides
    assert speculative.mtp_default(model, mx.cpu) is False  # measured slower on the CPU backend
    # Asked about a GPU while MLX's default device is the CPU: off, and nothing is measured.
    assert speculative.mtp_default(model, mx.Device(mx.gpu)) is False
    assert not [d for d in candidates.decisions() if d.op == "mtp_default"]
    no_head = qnext_mlx.load_model(hf_checkpoint("spec_nomtp", seed=1, mtp=False, vocab_size=320)[0])
    assert speculative.mtp_default(no_head, mx.Device(mx.gpu)) is False


@pytest.mark.parametrize("faster", ["mtp", "off"])
def test_gpu_default_by_a_timed_trial_cached_on_disk(chat, tmp_path, monkeypatch, faster):
    model, _ = chat
    monkeypatch.setenv(candidates.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(candidates, "gpu_available", lambda: True)
    candidates.forget()
    calls = []

    def timer(fn, name):  # runs the candidate, reports it faster or slower
        mx.eval(fn())
        calls.append(name)
        return 1.0 if name == faster else 2.0

    try:
        with candidates.using_timer(timer):
            assert speculative.mtp_default(model, mx.Device(mx.gpu)) is (faster == "mtp")
            assert speculative.mtp_default(model, mx.Device(mx.gpu)) is (faster == "mtp")
        assert sorted(calls) == ["mtp", "off"]  # both paths ran (and were timed) once
        (d,) = [d for d in candidates.decisions() if d.op == "mtp_default"]
        assert d.choice == faster and "vocab=320" in d.config and "K=2" in d.config
        # A later process reads the decision from disk instead of measuring.
        candidates.forget()
        with candidates.using_timer(lambda fn, name: pytest.fail("measured again")):
            assert speculative.mtp_default(model, mx.Device(mx.gpu)) is (faster == "mtp")
        # The trial runs the real decode loop: plain and MTP greedy agree token for token.
        trial = mtp_trial.MTP_TRIAL
        assert mx.array_equal(trial.candidate("mtp").run(None, model), trial.candidate("off").run(None, model)).item()
    finally:
        candidates.forget()


def test_stream_generate_mtp_and_stats(chat, monkeypatch):
    model, tokenizer = chat
    prompt = format_prompt(tokenizer, "Why is the sky blue?")
    plain = list(stream_generate(model, tokenizer, prompt, max_tokens=40, temp=0, mtp=False))
    spec = list(stream_generate(model, tokenizer, prompt, max_tokens=40, temp=0, mtp=True, num_draft_tokens=3))
    assert [r.token for r in spec] == [r.token for r in plain]
    assert "".join(r.text for r in spec) == "".join(r.text for r in plain)
    assert plain[-1].draft_tokens == 0 and plain[-1].acceptance_rate is None
    assert spec[-1].draft_tokens == 3
    assert 0 <= spec[-1].acceptance_rate <= 1 and spec[-1].mean_accepted_length >= 1
    # mtp=None follows the backend rule
    monkeypatch.setitem(speculative.MTP_BY_DEFAULT, "cpu", True)
    monkeypatch.setitem(speculative.MTP_BY_DEFAULT, "gpu", True)
    auto = list(stream_generate(model, tokenizer, prompt, max_tokens=10, temp=0))
    assert auto[-1].draft_tokens == speculative.DEFAULT_NUM_DRAFT_TOKENS
    monkeypatch.setitem(speculative.MTP_BY_DEFAULT, "cpu", False)
    monkeypatch.setitem(speculative.MTP_BY_DEFAULT, "gpu", False)
    auto = list(stream_generate(model, tokenizer, prompt, max_tokens=10, temp=0))
    assert auto[-1].draft_tokens == 0


def test_stream_generate_mtp_errors(chat, tiny):
    model, tokenizer = chat
    with pytest.raises(ValueError, match="num_draft_tokens"):
        list(stream_generate(model, tokenizer, "hi", max_tokens=2, num_draft_tokens=5))
    with pytest.raises(ValueError, match="sampler"):
        list(stream_generate(model, tokenizer, "hi", max_tokens=2, mtp=True, sampler=lambda x: mx.argmax(x, -1)))
    # a custom sampler without an explicit mtp: plain decoding
    r = list(stream_generate(model, tokenizer, "hi", max_tokens=2, sampler=lambda x: mx.argmax(x, -1)))
    assert r[-1].draft_tokens == 0


def test_sampled_stream_is_reproducible_with_seed(chat):
    model, tokenizer = chat
    a = [r.token for r in stream_generate(model, tokenizer, "hello", max_tokens=30, seed=3, mtp=True)]
    b = [r.token for r in stream_generate(model, tokenizer, "hello", max_tokens=30, seed=3, mtp=True)]
    assert a == b


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = gen_cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_mtp_flags(chat_model_dir):
    base = ["--model", str(chat_model_dir), "--prompt", "Hello", "--max-tokens", "12", "--temp", "0"]
    code, text_plain, err = run_cli(base + ["--no-mtp"])
    assert code == 0 and "MTP" not in err
    code, text_mtp, err = run_cli(base + ["--mtp", "--num-draft-tokens", "3"])
    assert code == 0 and text_mtp == text_plain
    assert "MTP K=3:" in err and "accepted" in err and "tokens/step" in err
    with pytest.raises(SystemExit) as exit_info:
        run_cli(base + ["--num-draft-tokens", "7"])
    assert exit_info.value.code == 2


def test_cli_mtp_without_head_is_an_error(hf_checkpoint, tmp_path):
    from tokenizer_fixture import write_tokenizer

    folder, _, _ = hf_checkpoint("spec_nomtp", seed=1, mtp=False, vocab_size=320)
    if not (folder / "tokenizer.json").exists():
        write_tokenizer(folder, vocab_size=320)
    code, _, err = run_cli(["--model", str(folder), "--prompt", "Hi", "--max-tokens", "3", "--mtp"])
    assert code == 2 and "no MTP head" in err and "Traceback" not in err
    code, _, err = run_cli(["--model", str(folder), "--prompt", "Hi", "--max-tokens", "3", "--temp", "0"])
    assert code == 0  # the default falls back to plain decoding


# --------------------------------------------------------------- demo model
@pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="the demo model is not installed")
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_demo_model_greedy_identical(k):
    """300 tokens of the trained demo model (its drafts are mostly right), prompt in chunks of 8."""
    model, tokenizer = qnext_mlx.load(DEMO)
    assert model.has_mtp
    ids = tokenizer.encode(
        format_prompt(tokenizer, "Tell me a story about a robot who learns to paint."), add_special_tokens=False
    )
    ref, ref_cache = plain_tokens(model, ids, 300, prefill_step_size=8)
    out, cache, stats = mtp_tokens(model, ids, 300, k, prefill_step_size=8)
    assert out == ref
    assert_same_cache(cache, ref_cache)
    assert stats.acceptance_rate > 0.2
