"""The whole model on a faked Mac: the Metal shim as ``mx.fast.metal_kernel``, Metal
reported available, mlx-lm's kernels built through the shim (tests/metal_helpers.py).

The bundled demo model (3 DeltaNet layers with Hk=2, Hv=4, Dk=32, Dv=64; 4 MoE
layers of 8 experts, top-2; an MTP head), and a random checkpoint with as many value
as key heads (Hk=Hv=2, Dk=Dv=32), in float32 with their experts quantized to 4 bits,
run prefill (chunks longer than 16 tokens: ``gdn_prefill``; the last
short chunk and decode: ``gdn_decode``), plain decoding and MTP speculative
decoding with rollback through the real dispatch (qnext_mlx.kernels.candidates),
with a timer under which our kernels are the fastest, so every op picks them. The
result must equal the reference path (the same model without Metal): greedy tokens
identical, log-probabilities within 1e-4, and our kernels must actually have run.
"""

from __future__ import annotations

import collections

import mlx.core as mx
import mlx.nn as nn
import pytest
from metal_helpers import fake_mac, ms, prefer

import qnext_mlx
from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR
from qnext_mlx.engine.decode import generate_tokens
from qnext_mlx.engine.speculative import MTPDecoding
from qnext_mlx.kernels import candidates

pytestmark = pytest.mark.skipif(not ms.have_compiler(), reason=f"{ms.CXX} not found (scripts/install-test-deps.sh)")

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep."
)
NEW_TOKENS = 12


def _quantize_experts(model):
    def experts(path, m):  # what the MoE kernel reads: every expert linear, 4-bit (the gate 8-bit)
        if path.endswith("shared_expert_gate"):
            return {"bits": 8, "group_size": 32}
        return ("switch_mlp" in path or "shared_expert" in path) and hasattr(m, "to_quantized")

    nn.quantize(model, group_size=32, bits=4, class_predicate=experts)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module", params=["demo, Hv/Hk = 2", "random, Hv/Hk = 1"])
def model_and_prompt(request, hf_checkpoint):
    if request.param.startswith("demo"):
        model, tokenizer = qnext_mlx.load(DEMO_MODEL_DIR, dtype=mx.float32)
        return _quantize_experts(model), tokenizer.encode(TEXT), True
    # A random checkpoint whose DeltaNet has as many value as key heads (Dk = Dv = 32).
    folder, _, _ = hf_checkpoint(
        "metal_ratio1",
        seed=4,
        mtp=True,
        vocab_size=256,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
    )
    model = qnext_mlx.load_model(folder, dtype=mx.float32)
    return _quantize_experts(model), [(7 + 31 * i) % 256 for i in range(40)], False


def _generate(model, prompt, mtp=None):
    tokens, logprobs = [], []
    for t, lp in generate_tokens(
        model, model.make_cache(), prompt, max_tokens=NEW_TOKENS, prefill_step_size=24, mtp=mtp
    ):
        tokens.append(t)
        logprobs.append(lp)
    return tokens, mx.stack(logprobs)


def _counting(calls):
    def factory(**k):
        kernel = ms.metal_kernel(**k)

        def call(**c):
            calls[k["name"]] += 1
            return kernel(**c)

        return call

    return factory


def test_prefill_decode_and_mtp_through_the_real_dispatch(model_and_prompt):
    model, prompt, trained = model_and_prompt
    assert len(prompt) > 24 + 1  # a prefill chunk of 24 tokens, then a short one
    ref_logits = model(mx.array([prompt]))
    ref_tokens, ref_lp = _generate(model, prompt)
    mtp = MTPDecoding(num_draft_tokens=2)
    ref_spec_tokens, _ = _generate(model, prompt, mtp)
    assert ref_spec_tokens == ref_tokens  # greedy MTP is plain greedy on the reference path
    assert not candidates.decisions()

    calls = collections.Counter()
    spec = MTPDecoding(num_draft_tokens=2)
    with fake_mac(_counting(calls), timer=prefer("qnext")):
        logits = model(mx.array([prompt]))  # one pass over the prompt, no cache: gdn_prefill
        tokens, lp = _generate(model, prompt)
        spec_tokens, spec_lp = _generate(model, prompt, spec)
        decisions = candidates.decisions()

    assert mx.abs(logits - ref_logits).max().item() < 1e-4
    assert tokens == ref_tokens and spec_tokens == ref_tokens
    assert mx.abs(lp - ref_lp).max().item() < 1e-4
    assert mx.abs(spec_lp - ref_lp).max().item() < 1e-4
    # Rollback happened: some drafts were rejected (the trained demo model accepts some
    # too) and the output is still exact.
    assert spec.stats.accepted < spec.stats.drafted and (spec.stats.accepted > 0 or not trained)
    # Every op chose our kernel, and it ran: the chunked prefill kernel, the fused
    # decode kernel (with per-token states for verification) and the MoE kernel.
    by_op = collections.defaultdict(set)
    for d in decisions:
        by_op[d.op].add(d.choice)
        assert d.choice == "qnext", (d.op, d.config, d.trials)
    assert set(by_op) == {"gdn_prefill", "gdn_decode", "moe_decode"}
    assert any("states=True" in d.config for d in decisions if d.op == "gdn_decode")
    assert calls["qnext_gdn_prefill"] >= 3 and calls["qnext_gdn_decode"] >= NEW_TOKENS * 3
    assert calls["qnext_moe_decode"] >= 2 * NEW_TOKENS * 4  # two launches per MoE layer and step
