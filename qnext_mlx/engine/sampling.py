"""Sampling settings and what turns logits into the distribution tokens are drawn from.

Defaults follow the Qwen3-Next model card (temperature 0.7, top_p 0.8, top_k 20,
min_p 0). Sampling itself is mlx-lm's (``make_sampler``, its penalty
processors); :func:`sampling_distribution` spells out the distribution its
sampler draws from, for speculative decoding's acceptance rule.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_frequency_penalty,
    make_presence_penalty,
    make_repetition_penalty,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_MIN_P",
    "DEFAULT_TEMP",
    "DEFAULT_TOP_K",
    "DEFAULT_TOP_P",
    "LogitsProcessor",
    "Sampler",
    "check_logit_bias",
    "check_sampling",
    "filter_logprobs",
    "make_logits_processors",
    "sampling_distribution",
]

DEFAULT_MAX_TOKENS = 16384  # the model card: adequate for most queries
DEFAULT_TEMP = 0.7
DEFAULT_TOP_P = 0.8
DEFAULT_TOP_K = 20
DEFAULT_MIN_P = 0.0

# logprobs [..., vocab] -> tokens [...]
Sampler = Callable[[mx.array], mx.array]
# (tokens so far [N] (prompt + generated), logits [1, vocab]) -> logits [1, vocab]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def check_sampling(
    temp: float,
    top_p: float,
    top_k: int,
    min_p: float,
    presence_penalty: float = 0.0,
    repetition_penalty: Optional[float] = None,
    frequency_penalty: float = 0.0,
) -> None:
    """Raise ValueError (one line) for out-of-range sampling parameters."""
    if not temp >= 0:
        raise ValueError(f"temperature must be >= 0, got {temp}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if not -2 <= presence_penalty <= 2:
        raise ValueError(f"presence_penalty must be in [-2, 2], got {presence_penalty}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if not -2 <= frequency_penalty <= 2:
        raise ValueError(f"frequency_penalty must be in [-2, 2], got {frequency_penalty}")


def check_logit_bias(logit_bias: Optional[Dict[int, float]], vocab_size: int) -> None:
    """Raise ValueError (one line) for a bias on a token outside the vocabulary or
    outside OpenAI's range [-100, 100]."""
    for token, bias in (logit_bias or {}).items():
        if not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab_size}), got {token}")
        if not -100 <= bias <= 100:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")


def make_logits_processors(
    prompt_len: int,
    presence_penalty: float = 0.0,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    presence_context_size: int = DEFAULT_MAX_TOKENS,
    frequency_penalty: float = 0.0,
    logit_bias: Optional[Dict[int, float]] = None,
    vocab_size: Optional[int] = None,
) -> List[LogitsProcessor]:
    """mlx-lm's penalty processors, fed the right tokens, and a logit bias.

    The presence and frequency penalties (OpenAI semantics, as the model card means
    them) count the generated tokens only; the repetition penalty looks at the last
    ``repetition_context_size`` tokens of prompt + generation, as in mlx-lm.
    ``logit_bias`` (token id -> value added to its logit, OpenAI's) needs ``vocab_size``.
    """
    processors: List[LogitsProcessor] = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    if presence_penalty:
        presence = make_presence_penalty(presence_penalty, presence_context_size)
        processors.append(lambda tokens, logits: presence(tokens[prompt_len:], logits))
    if frequency_penalty:
        frequency = make_frequency_penalty(frequency_penalty, presence_context_size)
        processors.append(lambda tokens, logits: frequency(tokens[prompt_len:], logits))
    if logit_bias:
        bias = [0.0] * vocab_size
        for token, value in logit_bias.items():
            bias[token] = float(value)
        bias_row = mx.array(bias, dtype=mx.float32)
        processors.append(lambda tokens, logits: logits + bias_row.astype(logits.dtype))
    return processors


def filter_logprobs(logprobs: mx.array, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> mx.array:
    """The filters of mlx-lm's ``make_sampler``, in its order (top-p, min-p, top-k),
    with its own functions: removed tokens get ``-inf``. ``logprobs``: ``[N, vocab]``."""
    if 0 < top_p < 1.0:
        logprobs = apply_top_p(logprobs, top_p)
    if min_p != 0.0:
        logprobs = apply_min_p(logprobs, min_p, 1)
    if top_k > 0:
        logprobs = apply_top_k(logprobs, top_k)
    return logprobs


def sampling_distribution(
    logprobs: mx.array, temp: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> mx.array:
    """The distribution mlx-lm's ``make_sampler(temp, top_p, min_p, top_k=top_k)`` samples from.

    mlx-lm filters the log-probabilities (:func:`filter_logprobs`) and then draws
    ``categorical(logprobs * (1 / temp))``, i.e. from ``softmax(filtered / temp)``.

    Args:
        logprobs: ``[N, vocab]`` normalised log-probabilities (after logits processors).
        temp: > 0 (greedy has no distribution to speak of).
    Returns:
        ``[N, vocab]`` float32 probabilities.
    """
    if not temp > 0:
        raise ValueError(f"sampling_distribution needs temp > 0, got {temp}")
    x = filter_logprobs(logprobs, top_p, top_k, min_p)
    return mx.softmax((x * (1.0 / temp)).astype(mx.float32), axis=-1)
