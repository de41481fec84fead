"""The decode loop: tokens one at a time, or with MTP drafts (:mod:`.speculative`).

:func:`generate_tokens` prefills what the cache does not hold yet (keeping
reusable checkpoints), then yields ``(token, logprobs)`` pairs; decoding is
pipelined one step ahead, so the device works while the caller detokenizes.
With ``mtp=`` the speculative loop takes over under the same contract.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..model.cache import ModelCache
from . import speculative
from .primitives import (
    DEFAULT_PREFILL_STEP_SIZE,
    StopCheck,
    decode_step,
    forward,
    generation_stream,
    prefill,
)
from .sampling import DEFAULT_MAX_TOKENS, LogitsProcessor, Sampler

__all__ = ["generate_tokens"]


def generate_tokens(
    model,
    cache: ModelCache,
    prompt: Sequence[int],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    progress: Optional[bool] = None,
    checkpoint_at: Sequence[int] = (),
    mtp: Optional[speculative.MTPDecoding] = None,
    should_stop: Optional[StopCheck] = None,
) -> Iterator[Tuple[int, mx.array]]:
    """Yield ``(token, logprobs [vocab])`` for up to ``max_tokens`` new tokens.

    The cache must already hold a prefix of ``prompt`` (``cache.offset`` tokens,
    e.g. after :meth:`ModelCache.reuse`, or none). The rest is prefilled, keeping a
    checkpoint just before the last prompt token (so the same prompt, or a longer
    one, can be reused later) and at the positions in ``checkpoint_at`` (e.g. the
    end of a shared system prompt); then decoding starts. Every token yielded has
    been fed to the model as well (decode is pipelined one step ahead), so when
    the loop ends the cache holds prompt + all yielded tokens.

    ``should_stop()`` is checked between prefill chunks (:func:`prefill`): when it
    returns True there, the loop ends without yielding anything and the cache holds
    the part of the prompt processed so far (a prefix of ``prompt``, reusable).
    Between generated tokens the caller decides (it just stops iterating).

    This is the one decode loop. ``mtp``: a :class:`~qnext_mlx.engine.speculative.MTPDecoding`
    (drafts per step, sampling settings; ``sampler`` must then be None) decodes with
    MTP drafts instead, same contract (:func:`~qnext_mlx.engine.speculative.speculative_generate_tokens`).
    """
    if mtp is not None:
        if sampler is not None:
            raise ValueError("MTP decoding samples from its settings (mtp.temp, ...), not from a sampler function")
        yield from speculative.speculative_generate_tokens(
            model,
            cache,
            prompt,
            decoding=mtp,
            max_tokens=max_tokens,
            logits_processors=logits_processors,
            prefill_step_size=prefill_step_size,
            progress=progress,
            checkpoint_at=checkpoint_at,
            should_stop=should_stop,
        )
        return
    prompt = list(prompt)
    if cache.offset >= len(prompt):
        raise ValueError(f"the cache already holds {cache.offset} tokens of a {len(prompt)}-token prompt")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    stream = generation_stream
    history = mx.array(prompt, dtype=mx.int32) if logits_processors else None

    def step(ids: mx.array, generated: bool = True) -> Tuple[mx.array, mx.array]:
        nonlocal history
        with mx.stream(stream):
            logits = decode_step(model, cache, ids)
            if logits_processors:
                if generated:  # the prompt is in the history already
                    history = mx.concatenate([history, ids])
                for processor in logits_processors:
                    logits = processor(history, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            return sampler(logprobs), logprobs.squeeze(0)

    with mx.stream(stream):
        for stop in sorted(set(checkpoint_at)) + [len(prompt) - 1]:
            if cache.offset < stop <= len(prompt) - 1:
                if not prefill(
                    model, cache, prompt[cache.offset : stop], prefill_step_size, progress, should_stop=should_stop
                ):
                    return
                cache.keep_checkpoint()
    y, logprobs = step(mx.array(prompt[-1:], dtype=mx.int32), generated=False)
    mx.async_eval(y, logprobs)
    n = 0
    while True:
        # Queue the next step before handing out this token: the device works while
        # the caller detokenizes. The yielded token is thereby in the cache too.
        if n + 1 < max_tokens:
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y, next_logprobs)
        else:  # the last token: feed it so the cache holds every yielded token
            with mx.stream(stream):
                forward(model, cache, y[None])
                mx.async_eval([c.state for c in cache])
        yield y.item(), logprobs
        n += 1
        if n == max_tokens:
            return
        if n % 256 == 0:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs
