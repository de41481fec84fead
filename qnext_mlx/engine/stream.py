"""Streamed generation: prompt reuse, detokenization, EOS and stop strings, stats.

:func:`stream_generate` is what every surface generates through (the CLI, and the
chat engine behind the server, the terminal chat and the app): it reuses what the
prompt cache holds, runs :func:`~qnext_mlx.engine.decode.generate_tokens` (plain
or MTP speculative decoding) and yields :class:`GenerationResponse` pieces;
:func:`generate` collects the text.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from ..model.cache import ModelCache
from . import speculative
from .decode import generate_tokens
from .primitives import DEFAULT_PREFILL_STEP_SIZE, StopCheck, generation_stream, mlx_lm_generate
from .sampling import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_P,
    DEFAULT_TEMP,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    LogitsProcessor,
    Sampler,
    check_sampling,
    make_logits_processors,
)
from .text import encode_prompt, stop_holdback

__all__ = ["GenerationResponse", "generate", "mtp_decoding", "peak_memory_gb", "stream_generate"]


@dataclass
class GenerationResponse(mlx_lm_generate.GenerationResponse):
    """One step of :func:`stream_generate` (mlx-lm's response, so mlx-lm's server code accepts it).

    Fields: ``text`` (new text piece, may be empty), ``token``, ``logprobs`` ``[vocab]``,
    ``from_draft``, ``prompt_tokens``, ``prompt_tps`` (prompt tokens processed per second),
    ``generation_tokens``, ``generation_tps``, ``peak_memory`` (GB), ``finish_reason``
    (None, "stop" or "length"), and ``cached_tokens``: prompt tokens reused from the cache.
    With MTP speculative decoding: ``draft_tokens`` (drafts per step, 0 without MTP),
    ``acceptance_rate`` (accepted / proposed drafts so far) and ``mean_accepted_length``
    (tokens per verify pass, accepted drafts + 1); ``from_draft`` marks accepted drafts.
    """

    cached_tokens: int = 0
    draft_tokens: int = 0
    acceptance_rate: Optional[float] = None
    mean_accepted_length: Optional[float] = None


def peak_memory_gb() -> float:
    """Peak memory in GB: MLX's counter on a GPU; on the CPU backend (where MLX does
    not count the memory-mapped weights) the process's max RSS when that is larger."""
    peak = mx.get_peak_memory()
    if peak and mx.default_device() != mx.cpu:
        return peak / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return max(peak, rss) / 1e9


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float = DEFAULT_TEMP,
    top_p: float = DEFAULT_TOP_P,
    top_k: int = DEFAULT_TOP_K,
    min_p: float = DEFAULT_MIN_P,
    presence_penalty: float = 0.0,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    prompt_cache: Optional[ModelCache] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    stop_strings: Optional[Sequence[str]] = None,
    progress: Optional[bool] = None,
    checkpoint_at: Sequence[int] = (),
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    mtp: Optional[bool] = None,
    num_draft_tokens: Optional[int] = None,
    should_stop: Optional[StopCheck] = None,
) -> Iterator[GenerationResponse]:
    """Generate text for ``prompt``, yielding :class:`GenerationResponse` pieces as they decode.

    Args:
        prompt: text (used as is: apply the chat template first, see
            :func:`format_prompt`) or token ids.
        temp, top_p, top_k, min_p: sampling (model-card defaults); ``temp=0`` is greedy.
        presence_penalty: subtracted from the logits of tokens already generated.
        repetition_penalty: mlx-lm's multiplicative penalty over the last 20 tokens.
        seed: seeds MLX's random generator first (reproducible sampling).
        prompt_cache: a :class:`ModelCache` to use and update; the part of the prompt
            it already holds is not processed again (see :meth:`ModelCache.reuse`).
            Without one, a fresh cache with ``kv_bits`` / ``kv_group_size`` is made.
        prefill_step_size: prompt chunk size.
        stop_strings: stop when the text contains one (it is not emitted).
        progress: prefill progress bar (None: only for long prompts).
        checkpoint_at: prompt positions where the cache keeps a reusable checkpoint
            (besides the one before the last prompt token), e.g. :func:`static_prefix_len`.
        sampler, logits_processors: replace the ones built from the arguments above.
        mtp: speculative decoding with the model's MTP head (same output; greedy:
            token for token, sampling: in distribution). None: on when the model has
            an MTP head, no ``sampler`` is given and MTP is faster on this backend
            (:func:`qnext_mlx.engine.speculative.mtp_default`).
        num_draft_tokens: MTP drafts per step, 1..4 (default
            :data:`qnext_mlx.engine.speculative.DEFAULT_NUM_DRAFT_TOKENS`).
        should_stop: called between prefill chunks and after every generated token
            (when the consumer asks for the next response); True ends the generation
            with ``finish_reason`` "cancelled". Stopped during the prefill, the one
            response has no text, ``token`` None and ``generation_tokens`` 0, and
            ``prompt_cache`` holds the prompt prefix processed so far (a later call
            with the same prompt goes on from there).

    Generation stops at the tokenizer's EOS tokens (not emitted), a stop string,
    ``max_tokens`` or ``should_stop``; the last response has ``finish_reason``
    "stop", "length" or "cancelled" and the final stats.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    check_sampling(temp, top_p, top_k, min_p, presence_penalty, repetition_penalty)
    decoding = mtp_decoding(model, mtp, num_draft_tokens, sampler, temp, top_p, top_k, min_p)
    if seed is not None:
        mx.random.seed(seed)
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    cache = prompt_cache if prompt_cache is not None else model.make_cache(kv_bits=kv_bits, kv_group_size=kv_group_size)
    if sampler is None:
        sampler = make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    if logits_processors is None:
        logits_processors = make_logits_processors(
            len(ids), presence_penalty, repetition_penalty, presence_context_size=max_tokens
        )
    stops = [s for s in (stop_strings or []) if s]
    eos = set(tokenizer.eos_token_ids)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()

    tic = time.perf_counter()
    cached = cache.reuse(ids)
    tokens = generate_tokens(
        model,
        cache,
        ids,
        max_tokens=max_tokens,
        logits_processors=logits_processors,
        prefill_step_size=prefill_step_size,
        progress=progress,
        checkpoint_at=checkpoint_at,
        sampler=None if decoding else sampler,
        mtp=decoding,
        should_stop=should_stop,
    )
    pending = ""  # text held back because it may be the start of a stop string
    prompt_tps = 0.0
    n = 0
    token, logprobs = None, None

    def response(text: str, finish: Optional[str]) -> GenerationResponse:
        elapsed = time.perf_counter() - tic
        stats = decoding.stats if decoding else None
        return GenerationResponse(
            text=text,
            token=token,
            logprobs=logprobs,
            from_draft=bool(stats and stats.from_draft),
            prompt_tokens=len(ids),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=n / elapsed if elapsed > 0 else 0.0,
            peak_memory=peak_memory_gb(),
            finish_reason=finish,
            cached_tokens=cached,
            draft_tokens=decoding.num_draft_tokens if decoding else 0,
            acceptance_rate=stats.acceptance_rate if stats else None,
            mean_accepted_length=stats.mean_accepted_length if stats else None,
        )

    with mlx_lm_generate.wired_limit(model, [generation_stream]):
        try:
            for token, logprobs in tokens:
                if n == 0:
                    prompt_time = time.perf_counter() - tic
                    prompt_tps = (len(ids) - cached) / prompt_time if prompt_time > 0 else 0.0
                    tic = time.perf_counter()
                n += 1
                if token in eos:
                    detokenizer.finalize()
                    yield response(pending + detokenizer.last_segment, "stop")
                    return
                detokenizer.add_token(token)
                if n == max_tokens:
                    detokenizer.finalize()
                text = pending + detokenizer.last_segment
                if stops:
                    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
                    if hits:
                        yield response(text[: min(hits)], "stop")
                        return
                    hold = 0 if n == max_tokens else stop_holdback(text, stops)
                    text, pending = text[: len(text) - hold], text[len(text) - hold :]
                if n == max_tokens:
                    yield response(text, "length")
                    return
                yield response(text, None)
                if should_stop is not None and should_stop():
                    detokenizer.finalize()  # text held back (stop-string prefix, partial character) goes out
                    yield response(pending + detokenizer.last_segment, "cancelled")
                    return
            # generate_tokens yields at least one token unless should_stop fired during
            # the prefill: the reply is cancelled before its first token.
            elapsed = time.perf_counter() - tic
            prompt_tps = (cache.offset - cached) / elapsed if elapsed > 0 else 0.0
            yield response("", "cancelled")
        finally:
            tokens.close()


def mtp_decoding(
    model,
    mtp: Optional[bool],
    num_draft_tokens: Optional[int],
    sampler,
    temp: float,
    top_p: float,
    top_k: int,
    min_p: float,
):
    """The :class:`~qnext_mlx.engine.speculative.MTPDecoding` for :func:`stream_generate`, or None
    (plain decoding): ``mtp`` None means :func:`~qnext_mlx.engine.speculative.mtp_default`."""
    if num_draft_tokens is not None and not 1 <= num_draft_tokens <= speculative.MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens must be in 1..{speculative.MAX_DRAFT_TOKENS}, got {num_draft_tokens}")
    if mtp is None:
        mtp = sampler is None and speculative.mtp_default(model)
    if not mtp:
        return None
    if not speculative.mtp_available(model):
        raise ValueError("this model has no MTP head (no mtp.* tensors; converted without it?); decode without MTP")
    if sampler is not None:
        raise ValueError("MTP decoding needs the sampling settings (temp, top_p, ...), not a sampler function")
    return speculative.MTPDecoding(
        num_draft_tokens=num_draft_tokens or speculative.DEFAULT_NUM_DRAFT_TOKENS,
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
    )


def generate(model, tokenizer, prompt, **kwargs) -> str:
    """The whole text :func:`stream_generate` produces (same arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
