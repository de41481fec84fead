"""The timed trial that decides whether MTP drafts are on by default on a GPU backend.

Registered as the op ``mtp_default`` of :mod:`qnext_mlx.kernels.candidates` (so the
decision is cached on disk with the kernel decisions and listed by the doctor) with
two candidates, both the real decode loop (:func:`qnext_mlx.engine.decode.generate_tokens`):

- ``off``: plain greedy decoding;
- ``mtp``: greedy decoding with ``DEFAULT_NUM_DRAFT_TOKENS`` MTP drafts per step.

Each generates :data:`TRIAL_TOKENS` tokens after the same :data:`TRIAL_PROMPT_TOKENS`-token
prompt from a fresh cache, once to warm up (first-use costs: kernel compilation and
selection, the MTP path's own graphs) and then :data:`TRIAL_RUNS` timed times; the
faster is kept. Greedy output is the same token for token on both paths, so the
trial measures speed only (the candidates are not compared). The decision is keyed
by the model's shape (type, widths, layers, experts, vocabulary, weight dtype and
quantisation) and the machine. :func:`qnext_mlx.engine.speculative.mtp_default`
consults it where :data:`~qnext_mlx.engine.speculative.MTP_BY_DEFAULT` leaves the
GPU to measurement.
"""

from __future__ import annotations

from typing import Any, Tuple

import mlx.core as mx

from ..kernels import candidates
from .decode import generate_tokens
from .speculative import DEFAULT_NUM_DRAFT_TOKENS, MTP_TRIAL_OP, MTPDecoding

__all__ = ["MTP_TRIAL", "TRIAL_PROMPT_TOKENS", "TRIAL_RUNS", "TRIAL_TOKENS", "trial_prompt"]

TRIAL_PROMPT_TOKENS = 32
TRIAL_TOKENS = 24
TRIAL_RUNS = 2


def trial_prompt(model) -> list:
    """The trial's prompt: :data:`TRIAL_PROMPT_TOKENS` fixed token ids spread over the vocabulary."""
    vocab = model.config.vocab_size
    return [(17 + 7919 * i) % vocab for i in range(TRIAL_PROMPT_TOKENS)]


def _generate(model, mtp) -> mx.array:
    """``[TRIAL_TOKENS]`` greedy tokens after :func:`trial_prompt` from a fresh cache."""
    steps = generate_tokens(model, model.make_cache(), trial_prompt(model), max_tokens=TRIAL_TOKENS, mtp=mtp)
    return mx.array([t for t, _ in steps])


def _config(model) -> Tuple[Tuple[str, Any], ...]:
    cfg = model.config
    emb = model.model.embed_tokens
    bits = getattr(emb, "bits", None)
    return (
        ("model", cfg.model_type),
        ("hidden", cfg.hidden_size),
        ("layers", cfg.num_hidden_layers),
        ("experts", cfg.num_experts),
        ("vocab", cfg.vocab_size),
        ("weights", f"{bits}-bit" if bits else str(emb.weight.dtype).rsplit(".", 1)[-1]),
        ("K", DEFAULT_NUM_DRAFT_TOKENS),
    )


MTP_TRIAL = candidates.register(
    candidates.Op(
        name=MTP_TRIAL_OP,
        summary=f"MTP drafts on by default? plain vs K={DEFAULT_NUM_DRAFT_TOKENS} greedy decoding, timed (GPU only)",
        backend=candidates.GPU,
        candidates=(
            candidates.Candidate(
                "mtp",
                f"MTP drafts, K={DEFAULT_NUM_DRAFT_TOKENS}",
                lambda f, model: _generate(model, MTPDecoding(DEFAULT_NUM_DRAFT_TOKENS)),
            ),
            candidates.Candidate(
                "off", "plain decoding, one token per forward pass", lambda f, model: _generate(model, None)
            ),
        ),
        reference="off",
        config=_config,
        verify=None,
        timing=(1, TRIAL_RUNS),
        overridable=False,
    )
)
