"""Constrained decoding in the engine: the llguidance grammar as a per-sequence mask.

On the demo model (float32) and a random tiny checkpoint: constrained replies follow
their JSON schema; the mask equals a fresh matcher's whatever history changes the
constraint is walked through (speculative rollback); MTP speculation under a grammar gives
the very tokens plain decoding gives; a constrained request in a mixed batch gets its solo
output; the reasoning of a thinking prompt stays free until ``</think>``. Plus the OpenAI
sampling extras the engine now takes: frequency penalty, logit bias, per-token logprobs.
"""

from __future__ import annotations

import json
import random

import jsonschema
import llguidance
import llguidance.numpy as llg_numpy
import mlx.core as mx
import numpy as np
import pytest

import qnext_mlx
from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR
from qnext_mlx.engine import speculative
from qnext_mlx.engine.batch import BatchEngine, GenerationRequest, SamplingParams, token_logprobs
from qnext_mlx.engine.constraint import SYNC_WINDOW, Grammar, grammar_tokenizer, json_grammar
from qnext_mlx.engine.sampling import make_logits_processors

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 1, "maximum": 99},
        "inner": {
            "type": "object",
            "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 5}},
            "required": ["k"],
            "additionalProperties": False,
        },
        "xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    },
    "required": ["color", "ok", "n", "inner", "xs"],
    "additionalProperties": False,
}
PROMPT = "<|im_start|>user\nDescribe a thing as JSON.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=["demo", "tiny"])
def loaded(request, chat_model_dir):
    if request.param == "demo":
        if not (DEMO_MODEL_DIR / "model.safetensors").exists():
            pytest.skip("no demo model")
        return qnext_mlx.load(DEMO_MODEL_DIR, dtype=mx.float32)
    return qnext_mlx.load(chat_model_dir)


def schema_grammar(tokenizer, model, schema=SCHEMA, start_after=None) -> Grammar:
    gtok = grammar_tokenizer(tokenizer, model.config.vocab_size)
    return Grammar(gtok, f"start: answer\n{json_grammar(schema, 'answer')}\n", start_after=start_after)


def run(engine, request):
    handle = engine.submit(request)
    events = list(handle)
    tokens = {}
    for e in events:
        if e.token is not None:
            tokens.setdefault(e.index, []).append(e.token)
    return tokens, events


def text_of(tokenizer, tokens):
    return tokenizer.decode([t for t in tokens if t not in tokenizer.eos_token_ids])


def test_sampled_replies_follow_the_schema(loaded):
    model, tokenizer = loaded
    engine = BatchEngine(model, tokenizer)
    grammar = schema_grammar(tokenizer, model)
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    for seed in range(6):
        req = GenerationRequest(prompt, max_tokens=120, sampling=SamplingParams(temp=0.9, seed=seed), grammar=grammar)
        tokens, events = run(engine, req)
        assert events[-1].finish_reason == "stop"  # the grammar ended, then EOS
        jsonschema.validate(json.loads(text_of(tokenizer, tokens[0])), SCHEMA)


def test_the_mask_follows_any_history_change(loaded):
    """Consume, roll back (as speculative verification does), consume again: the mask is
    always the one a fresh matcher fed the same tokens computes."""
    model, tokenizer = loaded
    grammar = schema_grammar(tokenizer, model)
    doc = json.dumps({"color": "green", "ok": False, "n": 42, "inner": {"k": 3}, "xs": [1, 2]})
    ids = tokenizer.encode(doc, add_special_tokens=False)
    prompt = [1, 2, 3]
    constraint = grammar.constraint(len(prompt))
    rng = random.Random(0)
    length = 0
    vocab = model.config.vocab_size
    for _ in range(40):
        length = max(0, min(len(ids), length + rng.choice([-3, -1, 1, 2, 4])))
        constraint.sync(mx.array(prompt + ids[:length]))
        fresh = llguidance.LLMatcher(grammar.tokenizer.ll, llguidance.LLMatcher.grammar_from_lark(grammar.lark))
        assert fresh.consume_tokens(ids[:length])
        mask = llg_numpy.allocate_token_bitmask(1, vocab)
        llg_numpy.fill_next_token_bitmask(fresh, mask, 0)
        want = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab].astype(bool)
        assert (np.array(constraint.allowed()[0]) == want).all(), length
    assert SYNC_WINDOW > speculative.MAX_DRAFT_TOKENS


def test_mtp_under_a_grammar_gives_the_plain_tokens(loaded):
    model, tokenizer = loaded
    if not speculative.mtp_available(model):
        pytest.skip("no MTP head")
    grammar = schema_grammar(tokenizer, model)
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    outs = {}
    for mtp in (False, True):
        engine = BatchEngine(model, tokenizer)
        req = GenerationRequest(prompt, max_tokens=80, sampling=SamplingParams(temp=0.0), grammar=grammar, mtp=mtp,
                                num_draft_tokens=3)  # fmt: skip
        tokens, events = run(engine, req)
        outs[mtp] = tokens[0]
        if mtp:
            assert events[-1].stats.num_draft_tokens == 3  # it did speculate
    assert outs[True] == outs[False]
    jsonschema.validate(json.loads(text_of(tokenizer, outs[False])), SCHEMA)


def test_a_constrained_request_in_a_mixed_batch_gets_its_solo_output(loaded):
    model, tokenizer = loaded
    grammar = schema_grammar(tokenizer, model)
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    greedy = SamplingParams(temp=0.0)

    def constrained():
        return GenerationRequest(prompt, max_tokens=60, sampling=greedy, grammar=grammar, mtp=False)

    solo, _ = run(BatchEngine(model, tokenizer), constrained())
    engine = BatchEngine(model, tokenizer)
    others = [engine.submit(GenerationRequest(tokenizer.encode(t), max_tokens=30, sampling=greedy, mtp=False))
              for t in ("In the beginning", "And the LORD spake unto Moses, saying")]  # fmt: skip
    for _ in range(3):
        engine.step()
    mine = engine.submit(constrained())
    got = [e.token for e in mine if e.token is not None]
    for h in others:
        list(h)
    assert got == solo[0]


def test_reasoning_stays_free_until_think_ends(loaded):
    """With ``start_after``: tokens the grammar forbids pass before ``</think>``; after it
    the grammar rules."""
    model, tokenizer = loaded
    think_end = tokenizer.encode("</think>", add_special_tokens=False)
    assert len(think_end) == 1
    grammar = schema_grammar(tokenizer, model, start_after=think_end[0])
    free = tokenizer.encode("not json at all", add_special_tokens=False)
    c = grammar.constraint(0)
    logits = mx.zeros((1, model.config.vocab_size))
    assert (c(mx.array(free), logits) == 0).all()  # inactive: nothing masked
    masked = c(mx.array(free + think_end), logits)
    allowed = np.isfinite(np.array(masked[0]))
    assert 0 < allowed.sum() < 10 and tokenizer.decode([int(np.argmax(allowed))]).startswith("{")
    # rolling back past </think> frees it again
    assert (c(mx.array(free[:2]), logits) == 0).all()


def test_a_schema_that_does_not_compile_is_one_clear_error(loaded):
    model, tokenizer = loaded
    from qnext_mlx.engine.constraint import GrammarError

    with pytest.raises(GrammarError, match="cannot be compiled"):
        schema_grammar(tokenizer, model, schema={"type": "object", "properties": {"a": {"type": "nonsense"}}})


# ----------------------------------------------------------- sampling extras
def test_frequency_penalty_counts_each_generated_occurrence():
    logits = mx.zeros((1, 8))
    tokens = mx.array([5, 5, 1, 2, 2, 2, 6])  # prompt: 5 5 1; generated: 2 2 2 6
    (proc,) = make_logits_processors(3, frequency_penalty=0.5)
    out = np.array(proc(tokens, logits)[0])
    assert out.tolist() == [0, 0, -1.5, 0, 0, 0, -0.5, 0]


def test_logit_bias_adds_to_the_named_tokens():
    (proc,) = make_logits_processors(0, logit_bias={3: 5.0, 0: -100.0}, vocab_size=6)
    out = np.array(proc(mx.array([1]), mx.ones((1, 6)))[0])
    assert out.tolist() == [-99, 1, 1, 6, 1, 1]


def test_logit_bias_steers_the_engine(loaded):
    model, tokenizer = loaded
    target = tokenizer.encode(" Moses", add_special_tokens=False)[0]
    engine = BatchEngine(model, tokenizer)
    req = GenerationRequest(tokenizer.encode("In the beginning"), max_tokens=4,
                            sampling=SamplingParams(temp=0.0, logit_bias={target: 100.0}))  # fmt: skip
    tokens, _ = run(engine, req)
    assert tokens[0] == [target] * 4
    with pytest.raises(ValueError, match="logit_bias"):
        engine.submit(GenerationRequest([1, 2], sampling=SamplingParams(logit_bias={10**7: 1.0})))


def test_token_logprobs_are_the_distribution_values_sorted():
    lp = mx.log(mx.softmax(mx.array([[0.1, 3.0, -1.0, 2.0, float("-inf")]]), axis=-1))
    chosen, top = token_logprobs(lp, 3, 4)
    values = np.array(lp[0])
    assert chosen == pytest.approx(float(values[3]))
    assert [t for t, _ in top] == [1, 3, 0, 2]  # best first; the -inf token is no alternative
    assert [v for _, v in top] == pytest.approx([float(values[i]) for i in (1, 3, 0, 2)])


def test_engine_reports_logprobs_of_the_distribution_it_drew_from(loaded):
    model, tokenizer = loaded
    engine = BatchEngine(model, tokenizer)
    req = GenerationRequest(tokenizer.encode("And God said"), max_tokens=5, sampling=SamplingParams(temp=0.0),
                            logprobs=3, mtp=False)  # fmt: skip
    _, events = run(engine, req)
    for e in events:
        if e.token is None:
            continue
        values = np.array(e.logprobs).reshape(-1)
        assert e.token_logprob == pytest.approx(float(values[e.token]), abs=1e-6)
        assert e.top_logprobs[0][0] == e.token  # greedy: the best one
        assert [v for _, v in e.top_logprobs] == sorted((v for _, v in e.top_logprobs), reverse=True)
