"""Streamed generation: prompt reuse, detokenization, EOS and stop strings, stats.

:func:`stream_generate` runs one prompt through a one-request
:class:`~qnext_mlx.engine.batch.BatchEngine`, the generation path every surface shares
(prompt reuse, plain or MTP speculative decoding, detokenization, stop strings), and
yields :class:`GenerationResponse` pieces; :func:`generate` collects the text.
:func:`stream_batch` and :func:`batch_generate` run several prompts decoded together.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from ..model.cache import ModelCache
from .batch import BatchEngine, GenerationRequest, RequestHandle, SamplingParams, TokenEvent
from .primitives import DEFAULT_PREFILL_STEP_SIZE, StopCheck, generation_stream, mlx_lm_generate
from .sampling import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_P,
    DEFAULT_TEMP,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    LogitsProcessor,
    Sampler,
)
from .text import encode_prompt

__all__ = [
    "GenerationResponse",
    "batch_generate",
    "generate",
    "peak_memory_gb",
    "responses",
    "stream_batch",
    "stream_generate",
]


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
        seed: the request's random key (reproducible sampling); MLX's global generator
            is seeded with it too, for a custom ``sampler``.
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
    if seed is not None:
        mx.random.seed(seed)  # a custom sampler draws from MLX's global generator
    ids = encode_prompt(tokenizer, prompt)
    cache = prompt_cache if prompt_cache is not None else model.make_cache(kv_bits=kv_bits, kv_group_size=kv_group_size)
    custom_processors = logits_processors is not None
    sampling = SamplingParams(
        temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
        presence_penalty=0.0 if custom_processors else presence_penalty,
        repetition_penalty=None if custom_processors else repetition_penalty, seed=seed,
    )  # fmt: skip
    engine = BatchEngine(model, tokenizer, max_batch=1, kv_bits=cache.kv_bits, kv_group_size=cache.kv_group_size,
                         prefill_step_size=prefill_step_size)  # fmt: skip
    handle = engine.submit(GenerationRequest(
        ids, max_tokens=max_tokens, sampling=sampling, stop=list(stop_strings or []), checkpoints=checkpoint_at,
        prompt_cache=cache, sampler=sampler, logits_processors=logits_processors, mtp=mtp,
        num_draft_tokens=num_draft_tokens, progress=progress, prefill_step_size=prefill_step_size,
    ))  # fmt: skip
    yield from responses(handle, len(ids), should_stop)


def responses(handle: RequestHandle, prompt_tokens: int, should_stop: Optional[StopCheck] = None,
              ) -> Iterator[GenerationResponse]:  # fmt: skip
    """A one-choice request's events as :class:`GenerationResponse` pieces (running counts
    and speeds, the final stats on the last); closed early or interrupted, the request is
    aborted and its ``prompt_cache`` keeps what was processed."""
    engine = handle.engine
    n = 0
    tic = time.perf_counter()
    first = None
    token = None  # the last token (a cancelled reply's last response repeats it)
    with mlx_lm_generate.wired_limit(engine.model, [generation_stream]):
        try:
            while True:
                event = handle.get(should_stop=should_stop)
                if event is None:
                    return
                if event.token is not None:
                    n += 1
                    first = first or time.perf_counter()
                    token = event.token
                stats = event.stats or engine.progress(handle)
                elapsed = time.perf_counter() - (first or tic)
                yield GenerationResponse(
                    text=event.text, token=token, logprobs=event.logprobs, from_draft=event.from_draft,
                    prompt_tokens=prompt_tokens, prompt_tps=stats.prompt_tps,
                    generation_tokens=n, generation_tps=n / elapsed if elapsed > 0 else 0.0,
                    peak_memory=peak_memory_gb(), finish_reason=event.finish_reason,
                    cached_tokens=stats.cached_tokens, draft_tokens=stats.num_draft_tokens,
                    acceptance_rate=stats.acceptance_rate, mean_accepted_length=stats.mean_accepted_length,
                )  # fmt: skip
                if event.finish_reason is not None:
                    return
        finally:
            engine.abort(handle)


def generate(model, tokenizer, prompt, **kwargs) -> str:
    """The whole text :func:`stream_generate` produces (same arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


def stream_batch(
    model,
    tokenizer,
    prompts: Sequence[Union[str, Sequence[int]]],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float = DEFAULT_TEMP,
    top_p: float = DEFAULT_TOP_P,
    top_k: int = DEFAULT_TOP_K,
    min_p: float = DEFAULT_MIN_P,
    presence_penalty: float = 0.0,
    repetition_penalty: Optional[float] = None,
    seeds: Optional[Sequence[Optional[int]]] = None,
    stop_strings: Optional[Sequence[str]] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    max_batch: int = 16,
) -> Iterator[Tuple[int, TokenEvent]]:
    """Generate for several prompts at once, decoding them together in one batch.

    Yields ``(prompt index, TokenEvent)`` as tokens come (a prompt's last event has its
    ``finish_reason`` and stats). ``seeds``: one per prompt (None: unseeded); a seeded
    prompt gives the same text whatever else is in the batch. Other arguments as in
    :func:`stream_generate`, for every prompt.
    """
    engine = BatchEngine(model, tokenizer, max_batch=max_batch, max_waiting=max(len(prompts), 1), kv_bits=kv_bits,
                         kv_group_size=kv_group_size, prefill_step_size=prefill_step_size)  # fmt: skip
    seeds = list(seeds) if seeds is not None else [None] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    handles = []
    for prompt, seed in zip(prompts, seeds):
        sampling = SamplingParams(
            temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, presence_penalty=presence_penalty,
            repetition_penalty=repetition_penalty, seed=seed,
        )  # fmt: skip
        handles.append(engine.submit(GenerationRequest(
            encode_prompt(tokenizer, prompt), max_tokens=max_tokens, sampling=sampling, stop=list(stop_strings or []),
        )))  # fmt: skip
    with mlx_lm_generate.wired_limit(model, [generation_stream]):
        try:
            while any(h.unfinished for h in handles):
                engine.step()
                for i, h in enumerate(handles):
                    while not h.events.empty():
                        event = h.get()
                        if event is not None:
                            yield i, event
        finally:
            for h in handles:
                engine.abort(h)


def batch_generate(model, tokenizer, prompts: Sequence[Union[str, Sequence[int]]], **kwargs) -> List[str]:
    """The texts :func:`stream_batch` produces for ``prompts`` (same arguments), in prompt order."""
    texts = [[] for _ in prompts]
    for i, event in stream_batch(model, tokenizer, prompts, **kwargs):
        texts[i].append(event.text)
    return ["".join(t) for t in texts]
