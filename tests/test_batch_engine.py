"""The batch engine against the one-sequence decode loop: token for token, logits, states.

The reference is :func:`qnext_mlx.engine.decode.generate_tokens` on a fresh one-row cache
(the decode loop every earlier test checks against transformers). Requests join a running
batch at different steps, with different prompt lengths; one is cancelled mid-way, one
ends on a stop string, and the KV cache may be quantized: each request's tokens must equal
its solo run, its log-probabilities stay within 1e-4 of it, and the DeltaNet states it
leaves behind equal the solo run's.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import ArraysCache

import qnext_mlx
from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR
from qnext_mlx.engine import speculative
from qnext_mlx.engine.batch import BatchEngine, GenerationRequest, SamplingParams
from qnext_mlx.engine.decode import generate_tokens

GREEDY = SamplingParams(temp=0.0)
TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the LORD spake unto Moses, saying, Speak unto the children of Israel, and say unto them",
    "Blessed",
    "Then said Jesus unto his disciples, If any man will come after me, let him deny himself",
]


@pytest.fixture(scope="module", params=["demo", "tiny"])
def loaded(request, chat_model_dir):
    if request.param == "demo":
        if not (DEMO_MODEL_DIR / "model.safetensors").exists():
            pytest.skip("no demo model")
        return qnext_mlx.load(DEMO_MODEL_DIR, dtype=mx.float32)
    return qnext_mlx.load(chat_model_dir)


STEP = 16  # prefill chunk of both the engine and the reference: the same chunk boundaries


def solo(model, prompt, n, kv_bits=None, processors=None):
    """The one-sequence loop's greedy tokens, log-probabilities and final cache."""
    cache = model.make_cache(kv_bits=kv_bits, kv_group_size=32)
    out = list(generate_tokens(model, cache, prompt, max_tokens=n, prefill_step_size=STEP,
                               logits_processors=processors))  # fmt: skip
    return [t for t, _ in out], [lp for _, lp in out], cache


def no_eos(tokenizer):
    """A logits processor that keeps a reply from ending on its own."""
    eos = mx.array(sorted(tokenizer.eos_token_ids))
    return lambda tokens, logits: logits.at[:, eos].add(-1e9)


def linear_states(cache):
    return [(np.array(c[0]), np.array(c[1])) for c in cache if isinstance(c, ArraysCache)]


def assert_same_states(a, b):
    for (ca, sa), (cb, sb) in zip(linear_states(a), linear_states(b)):
        assert np.array_equal(ca, cb) and np.array_equal(sa, sb)


def run_schedule(model, tokenizer, specs, kv_bits=None, max_batch=16):
    """Step an engine by hand: spec ``i`` (a dict with ``prompt``, ``max_tokens`` and
    optionally ``join`` (step), ``stop``, ``cancel_after`` (tokens)) is submitted at its
    step. Returns per spec its events and its final cache."""
    # Chunks of STEP tokens whatever runs beside (a huge prefill share): the prefill
    # rounds exactly as the reference's, so the states can be compared bit for bit.
    engine = BatchEngine(model, tokenizer, max_batch=max_batch, kv_bits=kv_bits, kv_group_size=32,
                         prefill_step_size=STEP, prefill_share=1e9)  # fmt: skip
    handles, events, caches = {}, {i: [] for i in range(len(specs))}, {}
    step = 0
    while len(handles) < len(specs) or any(h.unfinished for h in handles.values()):
        for i, spec in enumerate(specs):
            if i not in handles and spec.get("join", 0) == step:
                caches[i] = model.make_cache(kv_bits=kv_bits, kv_group_size=32)
                handles[i] = engine.submit(GenerationRequest(
                    spec["prompt"], max_tokens=spec["max_tokens"], sampling=GREEDY, stop=spec.get("stop", ()),
                    prompt_cache=caches[i], mtp=False,
                ))  # fmt: skip
        engine.step()
        step += 1
        for i, h in handles.items():
            while not h.events.empty():
                events[i].append(h.get())
            tokens = [e for e in events[i] if e.token is not None]
            if "cancel_after" in specs[i] and len(tokens) >= specs[i]["cancel_after"]:
                h.cancel()
        assert step < 2000, "the engine did not finish"
    return events, caches


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_a_mixed_batch_gives_each_request_its_solo_output(loaded, kv_bits):
    model, tokenizer = loaded
    prompts = [tokenizer.encode(t) for t in TEXTS]
    n = 24
    refs = [solo(model, p, n, kv_bits) for p in prompts]
    # The stop string: a piece of request 3's own solo text, so it is hit mid-way.
    ref3_text = tokenizer.decode(refs[3][0])
    stop = ref3_text[len(ref3_text) // 2 : len(ref3_text) // 2 + 3]
    specs = [
        dict(prompt=prompts[0], max_tokens=n),
        dict(prompt=prompts[1], max_tokens=n, join=3),
        dict(prompt=prompts[2], max_tokens=n, join=5, cancel_after=7),
        dict(prompt=prompts[3], max_tokens=n, join=9, stop=[stop]),
    ]
    events, caches = run_schedule(model, tokenizer, specs, kv_bits)
    for i in range(4):
        got = [e for e in events[i] if e.token is not None]
        ref_tokens, ref_logprobs, ref_cache = refs[i]
        tokens = [e.token for e in got]
        assert tokens == ref_tokens[: len(tokens)], i
        for e, lp in zip(got, ref_logprobs):
            assert float(mx.abs(e.logprobs - lp).max()) <= 1e-4
        last = events[i][-1]
        if i == 2:
            assert last.finish_reason == "cancelled" and len(tokens) == 7
        elif i == 3:
            assert last.finish_reason == "stop" and len(tokens) < n
            text = "".join(e.text for e in events[i])
            assert stop not in text and stop in tokenizer.decode(tokens)
        else:  # to max_tokens, or to an end-of-text token the solo run produced too
            eos = [j for j, t in enumerate(ref_tokens) if t in tokenizer.eos_token_ids]
            expected = ref_tokens[: eos[0] + 1] if eos else ref_tokens
            assert tokens == expected and last.finish_reason == ("stop" if eos else "length")
        # The state it leaves behind is the solo run's over the same tokens (the last one fed).
        assert caches[i].tokens == prompts[i] + tokens
        assert_same_states(caches[i], solo(model, prompts[i], len(tokens), kv_bits)[2])


def test_seeded_sampling_is_the_same_whatever_shares_the_batch(loaded):
    model, tokenizer = loaded
    prompts = [tokenizer.encode(t) for t in TEXTS]
    seeded = SamplingParams(temp=0.9, top_p=0.95, seed=1234)

    def run(others):
        engine = BatchEngine(model, tokenizer)
        handles = [engine.submit(GenerationRequest(prompts[1], max_tokens=20, sampling=seeded))]
        for j, p in enumerate((prompts[:1] + prompts[2:])[:others]):
            handles.append(
                engine.submit(GenerationRequest(p, max_tokens=20, sampling=SamplingParams(temp=1.0, seed=j)))
            )
        return [e.token for e in handles[0] if e.token is not None]

    alone = run(0)
    assert len(alone) > 5  # a reply long enough to tell draws apart
    assert run(3) == alone and run(1) == alone
    other_seed = BatchEngine(model, tokenizer).submit(
        GenerationRequest(prompts[1], max_tokens=20, sampling=SamplingParams(temp=0.9, top_p=0.95, seed=99))
    )
    assert [e.token for e in other_seed if e.token is not None] != alone


def test_n_choices_share_one_prefill(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode(TEXTS[1])
    engine = BatchEngine(model, tokenizer, prefill_step_size=16)
    calls = []
    real = engine.model

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, ids, cache=None, **kw):
            if ids.shape[1] > 1:
                calls.append(ids.shape[1])
            return real(ids, cache=cache, **kw)

    engine.model = Counting()
    handle = engine.submit(GenerationRequest(prompt, max_tokens=12, sampling=SamplingParams(temp=1.0, seed=5), n=3,
                                             logits_processors=[no_eos(tokenizer)]))  # fmt: skip
    by_choice = {0: [], 1: [], 2: []}
    for e in handle:
        if e.token is not None:
            by_choice[e.index].append(e.token)
    assert all(len(t) == 12 for t in by_choice.values())
    assert len({tuple(t) for t in by_choice.values()}) > 1  # independent draws
    assert sum(calls) == len(prompt) - 1  # the prompt was prefilled once


def test_a_long_prompt_never_stalls_running_streams_for_more_than_a_chunk(loaded):
    """While a long prompt is admitted in chunks, every step still gives each running
    stream a token, and each chunk is within the budget."""
    model, tokenizer = loaded
    engine = BatchEngine(model, tokenizer, prefill_step_size=512)
    running = [  # they must not end on their own meanwhile
        engine.submit(GenerationRequest(tokenizer.encode(t), max_tokens=300, sampling=GREEDY, mtp=False,
                                        logits_processors=[no_eos(tokenizer)]))
        for t in TEXTS[:2]
    ]  # fmt: skip
    for _ in range(4):
        engine.step()
    long_prompt = tokenizer.encode(" ".join(TEXTS) * 12)
    assert len(long_prompt) > 400
    chunks = []
    real = engine.model

    class Chunks:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, ids, cache=None, **kw):
            if ids.shape[1] > 1:
                chunks.append(ids.shape[1])
            return real(ids, cache=cache, **kw)

    engine.model = Chunks()
    late = engine.submit(GenerationRequest(long_prompt, max_tokens=4, sampling=GREEDY, mtp=False))
    steps = 0
    while not late.events.qsize() and steps < 500:
        before = [h.events.qsize() for h in running]
        engine.step()
        steps += 1
        assert [h.events.qsize() for h in running] == [b + 1 for b in before]  # one token each, every step
    assert len(chunks) > 3 and max(chunks) < 512  # admitted in many chunks, each far below a full prefill
    assert sum(chunks) == len(long_prompt) - 1


def test_mtp_alone_speculates_and_joins_the_batch_when_others_arrive(loaded):
    model, tokenizer = loaded
    if not model.has_mtp:
        pytest.skip("no MTP head")
    prompts = [tokenizer.encode(t) for t in TEXTS[:2]]
    keep_going = [no_eos(tokenizer)]
    refs = [solo(model, p, 40, processors=keep_going)[0] for p in prompts]
    engine = BatchEngine(model, tokenizer)
    first = engine.submit(GenerationRequest(prompts[0], max_tokens=40, sampling=GREEDY, mtp=True,
                                            logits_processors=keep_going))  # fmt: skip
    for _ in range(8):
        engine.step()
    assert engine.num_running == 1 and engine.solo_sequences == 1  # speculating alone
    second = engine.submit(GenerationRequest(prompts[1], max_tokens=10, sampling=GREEDY, mtp=False,
                                             logits_processors=keep_going))  # fmt: skip
    events = {0: [], 1: []}
    while first.unfinished or second.unfinished:
        engine.step()
        for i, h in enumerate((first, second)):
            while not h.events.empty():
                events[i].append(h.get())
        if second.unfinished and events[1]:
            assert engine.solo_sequences == 0  # both decode in the batch
    for i, ref in enumerate(refs):
        tokens = [e.token for e in events[i] if e.token is not None]
        assert tokens == ref[: len(tokens)] and len(tokens) == (40 if i == 0 else 10)
    stats = events[0][-1].stats
    assert stats.num_draft_tokens == speculative.DEFAULT_NUM_DRAFT_TOKENS and stats.acceptance_rate is not None
