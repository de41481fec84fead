"""The batch engine: one model thread running a step loop over every active request.

Each :meth:`BatchEngine.step`:

1. takes new requests (queued from any thread by :meth:`BatchEngine.submit`);
2. queues one ``[B, 1]`` decode pass over every running sequence: each row feeds its
   last sampled token, and each row's next token is sampled with the row's own
   settings, logits processors and random key. The pass is evaluated asynchronously
   (pipelined, as mlx-lm's decode loop is), so the device works while the host does
   step 3;
3. hands out the tokens the previous pass sampled: detokenization, EOS, stop strings,
   ``max_tokens``, cancellation, per sequence; finished and cancelled sequences leave
   the batch at once;
4. prefills waiting prompts in chunks within a token budget: all of ``prefill_step_size``
   when nothing is decoding, else a chunk sized from the measured times so that it
   costs about ``prefill_share`` decode steps, so a long prompt never stalls the running
   streams for more than one short chunk. A prompt is prefilled alone in a one-row
   :class:`~qnext_mlx.model.ModelCache` (reusing a snapshot of the :class:`PrefixCache`),
   snapshotted at the boundaries the request names; its last token then joins the
   batch (:class:`~qnext_mlx.engine.batch_cache.BatchCache`) as the row's first token to
   feed, so the first generated token comes out of the batched decode pass like every
   other one.

A sequence with MTP decoding on runs alone through today's speculative path
(:func:`~qnext_mlx.engine.speculative.speculative_generate_tokens`) while nothing else is
running or waiting; when another request arrives it joins the batch (the speculative
loop is closed leaving its last token unfed) and decodes plainly there, and when it is the
only one left it goes back to speculation. Seeded sampled requests never speculate, so
their text does not depend on what shares the batch.

The engine is used either from one thread that also consumes the results (iterating a
:class:`RequestHandle` drives :meth:`BatchEngine.step`: the Python API, the terminal chat,
the app) or with :meth:`BatchEngine.run` on an engine thread while other threads submit
and consume (the server). Either way one thread owns the model: MLX evaluation is not
thread-safe.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer
from tqdm import tqdm

from ..errors import QnextError
from ..model.cache import ModelCache
from . import speculative
from .batch_cache import BatchCache
from .constraint import Grammar, grammar_tokenizer
from .distributed import broadcast_object
from .prefix_cache import PrefixCache
from .primitives import (
    DEFAULT_PREFILL_STEP_SIZE,
    PROGRESS_MIN_TOKENS,
    eval_cache,
    forward,
    generation_stream,
    mlx_lm_generate,
)
from .sampling import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_P,
    DEFAULT_TEMP,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    LogitsProcessor,
    Sampler,
    check_logit_bias,
    check_sampling,
    filter_logprobs,
    make_logits_processors,
)
from .text import stop_holdback

__all__ = [
    "MAX_TOP_LOGPROBS",
    "BatchEngine",
    "EngineBusyError",
    "EngineObserver",
    "FinishReason",
    "GenerationRequest",
    "RequestHandle",
    "SamplingParams",
    "SequenceStats",
    "TokenEvent",
    "token_logprobs",
]

FinishReason = str  # "stop", "length" or "cancelled"
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_WAITING = 64
# Most alternatives a token's log-probability comes with (OpenAI's top_logprobs limit).
MAX_TOP_LOGPROBS = 20
# Smallest prefill chunk while sequences decode (below it the per-chunk overhead dominates).
MIN_PREFILL_CHUNK = 16


class EngineBusyError(QnextError):
    """Too many requests are waiting; retry later (the server answers 503)."""


@dataclass
class SamplingParams:
    """How one request's tokens are drawn (model-card defaults; ``temp == 0`` is greedy).

    ``seed``: the request's own random key, so that its text does not depend on what
    else shares the batch (None: drawn from MLX's global generator). Penalties and
    ``logit_bias`` (token id -> value added to its logit) follow OpenAI's meaning.
    """

    temp: float = DEFAULT_TEMP
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    presence_penalty: float = 0.0
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    frequency_penalty: float = 0.0
    logit_bias: Optional[Dict[int, float]] = None

    def validate(self) -> None:
        """Raise ValueError (one line) for an out-of-range value."""
        check_sampling(self.temp, self.top_p, self.top_k, self.min_p, self.presence_penalty, self.repetition_penalty,
                       self.frequency_penalty)  # fmt: skip
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")


@dataclass
class GenerationRequest:
    """One generation: prompt token ids and what to do with them.

    Attributes:
        prompt: ``[L]`` token ids (L >= 1).
        max_tokens: most tokens per choice.
        sampling: :class:`SamplingParams`.
        stop: stop strings (the text stops before the first one; it is not emitted).
        n: number of choices: one prefill, the cache forked into ``n`` sequences.
        checkpoints: prompt positions at which the prefill state is kept for reuse
            (message boundaries of a chat prompt); the last prompt token's position and
            the end of the reply always are.
        prompt_cache: a :class:`ModelCache` to start from and to leave holding prompt +
            reply (the Python API's ``prompt_cache``); None: the engine's prefix cache.
        sampler: a custom ``sampler(logprobs [1, vocab]) -> token [1]`` (mlx-lm's form;
            it draws from MLX's global generator).
        logits_processors: extra ``processor(tokens [N], logits [1, vocab])`` run after
            the penalties.
        mtp: speculative decoding with the MTP head while the sequence runs alone
            (None: :func:`~qnext_mlx.engine.speculative.mtp_default`).
        num_draft_tokens: MTP drafts per step.
        progress: a prefill progress bar on stderr (None: for prompts over
            ``PROGRESS_MIN_TOKENS`` tokens).
        prefill_step_size: the largest prefill chunk (None: the engine's).
        grammar: a :class:`~qnext_mlx.engine.constraint.Grammar` every choice must follow
            (structured outputs; applied after the other logits processors).
        logprobs: report each token's log-probability and this many top alternatives
            (None: none; 0: the chosen token's only).
        exact_text: the text exactly as the tokens decode (a plain completion: a first
            token " Moses" gives " Moses"); False: the tokenizer's streaming detokenizer,
            which drops a reply's leading space, as mlx-lm's does.
    """

    prompt: Sequence[int]
    max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    n: int = 1
    checkpoints: Sequence[int] = ()
    prompt_cache: Optional[ModelCache] = None
    sampler: Optional[Sampler] = None
    logits_processors: Optional[List[LogitsProcessor]] = None
    mtp: Optional[bool] = None
    num_draft_tokens: Optional[int] = None
    progress: Optional[bool] = False
    prefill_step_size: Optional[int] = None
    grammar: Optional[Grammar] = None
    logprobs: Optional[int] = None
    exact_text: bool = False


@dataclass
class SequenceStats:
    """The end of one choice: lengths, speed, and MTP counters when it speculated."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    time_to_first_token: float = 0.0
    context_tokens: int = 0
    num_draft_tokens: int = 0
    acceptance_rate: Optional[float] = None
    mean_accepted_length: Optional[float] = None


@dataclass
class TokenEvent:
    """One generated token of choice ``index`` (or, with ``token`` None, the end of a
    choice that produced no further token: cancelled, or the last held-back text).

    ``text``: the new text (may be empty: a partial character or a possible stop
    string is held back); ``logprobs``: ``[vocab]`` normalised log-probabilities the
    token was drawn from (after the logits processors: penalties, bias, grammar; before
    temperature and top-p/top-k/min-p), lazy; ``finish_reason`` and ``stats`` are set on
    the choice's last event. When the request asked for ``logprobs``: ``token_logprob``
    (the token's value in ``logprobs``) and ``top_logprobs`` (the best ``(token, logprob)``
    pairs, best first), computed on the engine's thread.
    """

    index: int
    token: Optional[int]
    text: str
    logprobs: Optional[mx.array] = None
    from_draft: bool = False
    finish_reason: Optional[FinishReason] = None
    stats: Optional[SequenceStats] = None
    token_logprob: Optional[float] = None
    top_logprobs: Optional[List[Tuple[int, float]]] = None


class EngineObserver:
    """Hooks for metrics (all no-ops here; :mod:`qnext_mlx.serve.metrics` counts them)."""

    def request_queued(self, prompt_tokens: int) -> None: ...

    def prefix_reused(self, tokens: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def finished(self, stats: SequenceStats, reason: FinishReason) -> None: ...

    def step(self, running: int, waiting: int) -> None: ...


# ------------------------------------------------------------------ handles
class RequestHandle:
    """A submitted request: iterate it for its :class:`TokenEvent` s (all choices, in
    the order they are produced); :meth:`cancel` ends it at the next step.

    Iterating drives the engine (:meth:`BatchEngine.step`) when no engine thread runs
    it; with one (:meth:`BatchEngine.run`), it waits for the engine's events.
    """

    def __init__(self, engine: "BatchEngine", request: GenerationRequest, rid: int):
        self.engine = engine
        self.request = request
        self.id = rid
        self.events: "queue.SimpleQueue" = queue.SimpleQueue()
        self._cancel = threading.Event()
        self.unfinished = request.n
        self.submitted = time.perf_counter()
        self._stop_check: Optional[Callable[[], bool]] = None
        # Called (on the engine's thread) after each event: an asyncio consumer's wake-up.
        self.listener: Optional[Callable[[], None]] = None
        # Parallel runs (BatchEngine sync): a cancel takes effect at the next step's start
        # on every rank at once; the other ranks' copies of a request have no consumer.
        self._cancel_asked = threading.Event()
        self.deferred = engine.sync is not None
        self.discard = False

    def push(self, item) -> None:
        """Queue an event (or an error) for the consumer (the engine's side)."""
        if self.discard:
            return
        self.events.put(item)
        listener = self.listener
        if listener is not None:
            listener()

    def cancel(self) -> None:
        """Stop this request (its other choices too) at the engine's next step."""
        (self._cancel_asked if self.deferred else self._cancel).set()
        self.engine.wake()

    def cancel_asked(self) -> bool:
        """A deferred cancel (or the consumer's ``should_stop``) is waiting for the next step."""
        if self._cancel_asked.is_set():
            return True
        return self._stop_check is not None and self._stop_check()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait_cancelled(self, timeout: Optional[float] = None) -> bool:
        """Block until the request is cancelled (True) or ``timeout`` passes (False)."""
        return self._cancel.wait(timeout)

    def stop_requested(self) -> bool:
        """Cancelled, or the consumer's ``should_stop`` (see :meth:`get`) says so now
        (deferred: only what the last step's start made effective)."""
        if self.deferred:
            return self._cancel.is_set()
        if not self._cancel.is_set() and self._stop_check is not None and self._stop_check():
            self._cancel.set()
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self.unfinished == 0 and self.events.empty()

    def get(self, timeout: Optional[float] = None, should_stop: Optional[Callable[[], bool]] = None,
            ) -> Optional[TokenEvent]:  # fmt: skip
        """The next event (raising the engine's error if it failed this request), or None
        when none came within ``timeout`` (engine thread) or the request is done.

        Without an engine thread this steps the engine until an event comes, calling
        ``should_stop()`` before each step (True cancels the request).
        """
        self._stop_check = should_stop
        while True:
            if self.unfinished == 0 and self.events.empty():
                return None
            if not self.engine.threaded:
                if self.events.empty():
                    self.stop_requested()
                    self.engine.step()
                    continue
                item = self.events.get_nowait()
            else:
                try:
                    item = self.events.get(timeout=timeout)
                except queue.Empty:
                    return None
            if isinstance(item, BaseException):
                self.unfinished = 0
                raise item
            if item.finish_reason is not None:
                self.unfinished -= 1
            return item

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            item = self.get(timeout=None)
            if item is None:
                return
            yield item


# ----------------------------------------------------------------- sequences
class _Sequence:
    """One choice of a request, from prefill to its last token (the engine's bookkeeping)."""

    def __init__(self, engine: "BatchEngine", handle: RequestHandle, index: int, cache: ModelCache,
                 key: Optional[mx.array]):  # fmt: skip
        req = handle.request
        self.handle, self.index, self.cache = handle, index, cache
        self.prompt = list(req.prompt)
        self.sampling = req.sampling
        self.greedy = req.sampling.temp == 0 and req.sampler is None
        self.sampler = req.sampler
        self.key = key
        s = req.sampling
        self.processors: List[LogitsProcessor] = make_logits_processors(
            len(self.prompt), s.presence_penalty, s.repetition_penalty, presence_context_size=req.max_tokens,
            frequency_penalty=s.frequency_penalty, logit_bias=s.logit_bias, vocab_size=engine.vocab_size,
        ) + list(req.logits_processors or [])  # fmt: skip
        # The grammar comes last: it masks what the other processors left.
        self.constraint = req.grammar.constraint(len(self.prompt)) if req.grammar is not None else None
        if self.constraint is not None:
            self.processors.append(self.constraint)
        self.top_logprobs = req.logprobs
        self.history: Optional[mx.array] = None  # prompt + generated, for the processors
        self.fed: List[int] = []  # tokens the model state holds
        self.done = 0  # prompt tokens prefilled (one-row cache)
        self.cached = 0
        self.generated: List[int] = []
        self.pending_seen = False  # the row's pending token is already emitted (or is the prompt's last)
        self.detokenizer = (NaiveStreamingDetokenizer(engine.tokenizer) if req.exact_text
                            else engine.tokenizer.detokenizer)  # fmt: skip
        self.text_held = ""
        self.stops = [s for s in req.stop if s]
        self.eos = engine.eos
        self.max_tokens = req.max_tokens
        self.t_start = handle.submitted
        self.t_prefill_end: Optional[float] = None
        self.t_first: Optional[float] = None
        self.t_last: Optional[float] = None
        self.mtp_runs: List[speculative.MTPDecoding] = []
        self.mtp = False
        self.choice_keys: List[mx.array] = []
        self.bar = None

    # .......................................................... sampling
    def draw(self, logprobs: mx.array) -> mx.array:
        """Token ``[1]`` from ``logprobs [1, vocab]`` with this sequence's settings and key."""
        if self.sampler is not None:
            return self.sampler(logprobs)
        if self.greedy:
            return mx.argmax(logprobs, axis=-1)
        s = self.sampling
        self.key, sub = mx.random.split(self.key)
        filtered = filter_logprobs(logprobs, s.top_p, s.top_k, s.min_p)
        return mx.random.categorical(filtered * (1.0 / s.temp), key=sub)

    # ........................................................... output
    def emit(self, token: int, logprobs: Optional[mx.array], from_draft: bool = False) -> Optional[FinishReason]:
        """Hand out one generated token; returns the finish reason when it ends the choice."""
        now = time.perf_counter()
        engine_observer = self.handle.engine.observer
        if self.t_first is None:
            self.t_first = now
            engine_observer.first_token(now - self.t_start)
        else:
            engine_observer.inter_token(now - self.t_last)
        self.t_last = now
        self.generated.append(token)
        n = len(self.generated)
        if token in self.eos:
            self.detokenizer.finalize()
            self.put(token, self.text_held + self.detokenizer.last_segment, logprobs, from_draft, "stop")
            return "stop"
        self.detokenizer.add_token(token)
        if n == self.max_tokens:
            self.detokenizer.finalize()
        text = self.text_held + self.detokenizer.last_segment
        if self.stops:
            hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.put(token, text[: min(hits)], logprobs, from_draft, "stop")
                return "stop"
            hold = 0 if n == self.max_tokens else stop_holdback(text, self.stops)
            text, self.text_held = text[: len(text) - hold], text[len(text) - hold :]
        else:
            self.text_held = ""
        if n == self.max_tokens:
            self.put(token, text, logprobs, from_draft, "length")
            return "length"
        self.put(token, text, logprobs, from_draft, None)
        return None

    def put(self, token, text, logprobs, from_draft, finish: Optional[FinishReason]) -> None:
        stats = self.stats(finish) if finish else None
        event = TokenEvent(self.index, token, text, logprobs, from_draft, finish, stats)
        if self.top_logprobs is not None and token is not None and logprobs is not None:
            event.token_logprob, event.top_logprobs = token_logprobs(logprobs, token, self.top_logprobs)
        self.handle.push(event)
        if finish:
            self.handle.engine.observer.finished(stats, finish)

    def cancel_event(self) -> None:
        """The end of a cancelled choice: what was held back goes out."""
        self.detokenizer.finalize()
        self.put(None, self.text_held + self.detokenizer.last_segment, None, False, "cancelled")

    def stats(self, finish: Optional[FinishReason]) -> SequenceStats:
        now = time.perf_counter()
        prefill_end = self.t_prefill_end or now
        first = self.t_first or now
        n = len(self.generated)
        # What the cache holds afterwards: a finished reply is fed whole; a cancelled one
        # holds what was processed.
        context = len(self.prompt) + n if n and finish != "cancelled" else max(len(self.fed), self.cache.offset)
        prompt_time = max(prefill_end - self.t_start, 1e-9)
        gen_time = now - first
        drafted = sum(d.stats.drafted for d in self.mtp_runs)
        accepted = sum(d.stats.accepted for d in self.mtp_runs)
        steps = sum(d.stats.steps for d in self.mtp_runs)
        return SequenceStats(
            prompt_tokens=len(self.prompt), cached_tokens=self.cached, generation_tokens=n,
            prompt_tps=(len(self.prompt) - self.cached) / prompt_time,
            generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
            time_to_first_token=first - self.t_start,
            context_tokens=context,
            num_draft_tokens=self.mtp_runs[-1].num_draft_tokens if self.mtp_runs else 0,
            acceptance_rate=accepted / drafted if drafted else (0.0 if self.mtp_runs else None),
            mean_accepted_length=(accepted + steps) / steps if steps else (0.0 if self.mtp_runs else None),
        )  # fmt: skip


# -------------------------------------------------------------------- engine
def wire_request(request: GenerationRequest) -> dict:
    """``request`` as plain data for the other ranks of a parallel run (the grammar as its
    Lark text); see :func:`unwire_request`."""
    fields = {k: getattr(request, k) for k in request.__dataclass_fields__}
    fields.update(prompt=list(request.prompt), prompt_cache=None, sampler=None, logits_processors=None)
    grammar = request.grammar
    fields["grammar"] = None if grammar is None else (grammar.lark, grammar.start_after)
    return fields


def unwire_request(fields: dict, tokenizer, vocab_size: int) -> GenerationRequest:
    """The :class:`GenerationRequest` :func:`wire_request` described (grammar compiled here)."""
    fields = dict(fields)
    if fields["grammar"] is not None:
        lark, start_after = fields["grammar"]
        fields["grammar"] = Grammar(grammar_tokenizer(tokenizer, vocab_size), lark, start_after)
    return GenerationRequest(**fields)


class BatchEngine:
    """Continuous batching over one model (see the module docstring).

    Args:
        model, tokenizer: as :func:`qnext_mlx.load` returns them.
        max_batch: most sequences decoding (and prefilling) at once.
        max_waiting: most requests waiting to start; more raise :class:`EngineBusyError`.
        prefix_cache: the shared snapshot pool (None: no reuse across requests, except
            through a request's own ``prompt_cache``).
        kv_bits, kv_group_size: quantized attention KV for new caches.
        prefill_step_size: the largest prefill chunk.
        prefill_share: while sequences decode, a prefill chunk costs about this many
            decode steps.
        observer: an :class:`EngineObserver` (metrics).
        group: an ``mx.distributed`` group the model is split over (tensor or pipeline
            parallel): every rank runs this engine; rank 0's takes the requests and, at
            the start of each step, sends the others what arrived, what was cancelled
            and the prefill budget, so that all ranks run the same forwards
            (:meth:`follow` on the other ranks).
    """

    def __init__(self, model, tokenizer, *, max_batch: int = DEFAULT_MAX_BATCH,
                 max_waiting: int = DEFAULT_MAX_WAITING, prefix_cache: Optional[PrefixCache] = None,
                 kv_bits: Optional[int] = None, kv_group_size: int = 64,
                 prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE, prefill_share: float = 1.0,
                 observer: Optional[EngineObserver] = None, group=None):  # fmt: skip
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be >= 1, got {prefill_step_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = model.config.vocab_size
        self.eos = set(tokenizer.eos_token_ids)
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefix_cache = prefix_cache
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.prefill_step_size = prefill_step_size
        self.prefill_share = prefill_share
        self.observer = observer or EngineObserver()
        self.sync = group if group is not None and group.size() > 1 else None
        self.leader = self.sync is None or self.sync.rank() == 0
        self._decode_budget: Optional[int] = None  # synced: the prefill chunk while decoding
        self._live: Dict[int, RequestHandle] = {}  # synced: requests by id, until they end
        self._stopping = False
        self.threaded = False
        self._ids = itertools.count()
        self._inbox: "queue.SimpleQueue[RequestHandle]" = queue.SimpleQueue()
        self._wake = threading.Event()
        self._waiting: Deque[RequestHandle] = deque()
        self._prefilling: List[_Sequence] = []
        self._running: List[_Sequence] = []
        self._batch = BatchCache()
        self._pending: Optional[mx.array] = None  # [B] tokens to feed next (lazy)
        self._pending_lp: Optional[mx.array] = None  # [B, vocab] what they were drawn from
        self._solo: Optional[_Solo] = None
        self._t_decode: Optional[float] = None  # seconds per decode step (running mean)
        # Seconds a prefill chunk takes, by size class (powers of two): a chunk's cost is far
        # from proportional to its tokens (16 tokens cost 4 one-token steps on a CPU).
        self._t_chunk: Dict[int, float] = {}
        self._queued_at = 0.0
        self._steps = 0
        # One model thread: the thread that first steps (or runs) the engine owns it.
        self._owner: Optional[threading.Thread] = None

    # ......................................................... interface
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request`` (from any thread); raises ValueError for bad settings and
        :class:`EngineBusyError` when ``max_waiting`` requests already wait."""
        prompt = list(request.prompt)
        if not prompt:
            raise ValueError("the prompt is empty")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if not 1 <= request.n <= 16:
            raise ValueError(f"n must be in 1..16, got {request.n}")
        request.sampling.validate()
        if request.num_draft_tokens is not None and not 1 <= request.num_draft_tokens <= speculative.MAX_DRAFT_TOKENS:
            raise ValueError(
                f"num_draft_tokens must be in 1..{speculative.MAX_DRAFT_TOKENS}, got {request.num_draft_tokens}"
            )
        if request.mtp and not speculative.mtp_available(self.model):
            raise ValueError("this model has no MTP head (no mtp.* tensors; converted without it?); decode without MTP")
        check_logit_bias(request.sampling.logit_bias, self.vocab_size)
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {request.logprobs}")
        if self.sync is not None and (request.prompt_cache is not None or request.sampler is not None
                                      or request.logits_processors):  # fmt: skip
            raise ValueError("a parallel run takes requests as data: no prompt_cache, sampler or logits_processors")
        if request.mtp and request.sampler is not None:
            raise ValueError("MTP decoding needs the sampling settings (temp, top_p, ...), not a sampler function")
        if self._inbox.qsize() + len(self._waiting) >= self.max_waiting:
            raise EngineBusyError(f"the server is busy ({self.max_waiting} requests waiting); retry later")
        handle = RequestHandle(self, request, next(self._ids))
        self.observer.request_queued(len(prompt))
        self._inbox.put(handle)
        self._wake.set()
        return handle

    def wake(self) -> None:
        """Wake an engine thread waiting for work (a new request, a cancellation)."""
        self._wake.set()

    @property
    def num_running(self) -> int:
        return len(self._running) + (1 if self._solo else 0)

    @property
    def solo_sequences(self) -> int:
        """1 while a sequence speculates alone (MTP), else 0."""
        return 1 if self._solo else 0

    @property
    def num_waiting(self) -> int:
        return self._inbox.qsize() + len(self._waiting) + len(self._prefilling)

    def has_work(self) -> bool:
        return bool(self._running or self._prefilling or self._waiting or self._solo or not self._inbox.empty())

    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set, sleeping while there is nothing to do (the engine
        thread of a server). A failing step fails the requests it was serving, not the loop.
        In a parallel run (rank 0) the other ranks are told to stop at the end."""
        self.threaded = True
        with mlx_lm_generate.wired_limit(self.model, [generation_stream]):
            while not stop.is_set():
                if not self.has_work():
                    self._wake.wait(0.25)
                    self._wake.clear()
                    continue
                try:
                    self.step()
                except Exception as e:  # a bug or a device error: report it, keep serving
                    if self.sync is not None:
                        raise  # the other ranks cannot know which requests failed: end the run
                    self._fail_all(e)
            self.stop_followers()

    def step(self) -> None:
        """One scheduling step (see the module docstring); call from the owner thread."""
        self._owner = self._owner or threading.current_thread()
        with mx.stream(generation_stream):
            if self.sync is None:
                self._take_inbox()
            elif not self._sync_step():
                return
            if self._solo is not None:
                self._solo_step()
                return
            cancelled = {i: "cancelled" for i, seq in enumerate(self._running) if seq.handle.stop_requested()}
            if cancelled:  # before the next pass: their states hold exactly what was handed out
                self._retire(cancelled)
            previous = (self._pending, self._pending_lp) if self._running else None
            if self._running:
                self._queue_decode()
            if previous is not None:
                self._emit(*previous)
            self._prefill()
            self._maybe_go_solo()
            self._steps += 1
            if self._steps % 256 == 0:
                mx.clear_cache()
            self.observer.step(self.num_running, self.num_waiting)

    def progress(self, handle: RequestHandle) -> SequenceStats:
        """The stats so far of ``handle``'s first choice (the final ones come with its last event)."""
        for seq in self._sequences():
            if seq.handle is handle and seq.index == 0:
                return seq.stats(None)
        return SequenceStats(prompt_tokens=len(handle.request.prompt))

    def abort(self, handle: RequestHandle) -> None:
        """End ``handle`` now, from the owner thread, without further events: what its
        sequences processed is kept (in its ``prompt_cache`` or the prefix cache). For a
        consumer that stops early or is interrupted; a no-op for a finished request."""
        handle.cancel()
        if handle in self._waiting:
            self._waiting.remove(handle)
        for seq in [s for s in self._prefilling if s.handle is handle]:
            self._prefilling.remove(seq)
            self._close_bar(seq)
            self._keep(seq)
        if self._solo is not None and self._solo.seq.handle is handle:
            self._end_solo(None)
        rows = {i: "cancelled" for i, s in enumerate(self._running) if s.handle is handle}
        if rows:
            self._retire(rows, announce=False)
        handle.unfinished = 0

    def _sequences(self) -> List[_Sequence]:
        return self._prefilling + self._running + ([self._solo.seq] if self._solo else [])

    # ........................................................ admission
    def _take_inbox(self) -> None:
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for handle in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(handle)
            stats = SequenceStats(prompt_tokens=len(handle.request.prompt))
            for i in range(handle.request.n):
                handle.push(TokenEvent(i, None, "", finish_reason="cancelled", stats=stats))

    def _arrivals(self) -> bool:
        if self.sync is not None:  # only what the step's start made known to every rank
            return bool(self._waiting)
        return not self._inbox.empty() or bool(self._waiting)

    # ......................................................... parallel
    def _sync_step(self) -> bool:
        """Rank 0: send this step's arrivals, cancellations and prefill budget; the others:
        apply rank 0's. Returns False when rank 0 said stop (followers) or stops."""
        if self.leader:
            new: List[RequestHandle] = []
            while True:
                try:
                    new.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            cancel = [rid for rid, h in self._live.items() if not h.cancelled and h.cancel_asked()]
            cancel += [h.id for h in new if h.cancel_asked()]
            for h in new:  # what a rank would pick by chance or by timing, rank 0 picks for all
                if h.request.sampling.seed is None:
                    h.request.sampling.seed = int.from_bytes(os.urandom(8), "little") >> 1
                if h.request.mtp is None:
                    h.request.mtp = speculative.mtp_default(self.model)
            message = {
                "new": [(h.id, wire_request(h.request)) for h in new],
                "cancel": cancel,
                "budget": self._budget_while_decoding(),
                "stop": self._stopping,
            }
            broadcast_object(message, self.sync)
        else:
            message = broadcast_object(None, self.sync)
            new = []
            for rid, request in message["new"]:
                handle = RequestHandle(self, unwire_request(request, self.tokenizer, self.vocab_size), rid)
                handle.discard = True
                new.append(handle)
        for handle in new:
            self._live[handle.id] = handle
            self._waiting.append(handle)
        for rid in message["cancel"]:
            handle = self._live.get(rid)
            if handle is not None:
                handle._cancel.set()
        self._decode_budget = message["budget"]
        for handle in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(handle)
            stats = SequenceStats(prompt_tokens=len(handle.request.prompt))
            for i in range(handle.request.n):
                handle.push(TokenEvent(i, None, "", finish_reason="cancelled", stats=stats))
        active = {h.id for h in self._waiting} | {seq.handle.id for seq in self._sequences()}
        self._live = {rid: h for rid, h in self._live.items() if rid in active}
        if message["stop"]:
            self._stopping = True
            return False
        return True

    def follow(self) -> None:
        """The other ranks' engine loop: step in step with rank 0 until it stops."""
        self._owner = threading.current_thread()
        with mlx_lm_generate.wired_limit(self.model, [generation_stream]):
            while not self._stopping:
                self.step()

    def stop_followers(self) -> None:
        """Rank 0, on its engine thread: tell the other ranks to leave :meth:`follow`."""
        if self.sync is not None and self.leader and not self._stopping:
            self._stopping = True
            self.step()

    def _new_cache(self) -> ModelCache:
        return self.model.make_cache(kv_bits=self.kv_bits, kv_group_size=self.kv_group_size)

    def _start(self, handle: RequestHandle) -> List[_Sequence]:
        """Set up a waiting request's prefill (reusing what a cache holds)."""
        req = handle.request
        prompt = list(req.prompt)
        if req.prompt_cache is not None:
            cache = req.prompt_cache
            cached = cache.reuse(prompt)
        else:
            cache = self._new_cache()
            snap = self.prefix_cache.lookup(prompt) if self.prefix_cache is not None else None
            cached = 0
            if snap is not None:
                cache.adopt(snap)
                cached = snap.offset
                self.observer.prefix_reused(cached)
        if req.sampling.seed is not None:
            key = mx.random.key(req.sampling.seed)
        else:
            key = mx.random.key(int(mx.random.randint(0, 2**31 - 1, ()).item()))
        keys = [key] if req.n == 1 else list(mx.random.split(key, req.n))
        seq = _Sequence(self, handle, 0, cache, keys[0])
        seq.cached = seq.done = cached
        seq.fed = prompt[:cached]
        mtp = req.mtp if req.mtp is not None else speculative.mtp_default(self.model)
        # Speculation changes which random draws a sampled reply takes: a seeded one keeps
        # plain decoding, so that its text is the same whatever shares the batch.
        reproducible = req.sampling.temp == 0 or req.sampling.seed is None
        seq.mtp = bool(mtp) and req.n == 1 and req.sampler is None and reproducible
        seq.choice_keys = keys
        show = req.progress if req.progress is not None else len(prompt) - cached > PROGRESS_MIN_TOKENS
        if show:
            seq.bar = tqdm(total=len(prompt), initial=cached, desc="Prefill", unit="tok", unit_scale=True,
                           file=sys.stderr, leave=False)  # fmt: skip
        return [seq]

    def _checkpoints(self, seq: _Sequence) -> List[int]:
        n = len(seq.prompt)
        marks = {p for p in seq.handle.request.checkpoints if 0 < p < n} | {n - 1}
        return sorted(p for p in marks if p > seq.done)

    def _keep(self, seq: _Sequence) -> None:
        """Keep the state of ``seq``'s one-row cache for reuse (prefix cache or its own cache)."""
        if seq.cache.offset == 0:
            return
        if seq.handle.request.prompt_cache is not None:
            seq.cache.keep_checkpoint()
        elif self.prefix_cache is not None:
            self.prefix_cache.insert(seq.cache.snapshot())

    # .......................................................... prefill
    def _budget(self) -> int:
        """Prefill tokens for this step: all of ``prefill_step_size`` with nothing decoding;
        else the largest power-of-two chunk whose measured (or, one size up from a measured
        one, doubled) cost fits in ``prefill_share`` decode steps; at least MIN_PREFILL_CHUNK."""
        if not self._running:
            return self.prefill_step_size
        if self.sync is not None:  # rank 0's choice at the step's start (timings differ by rank)
            return self._decode_budget or MIN_PREFILL_CHUNK
        return self._budget_while_decoding()

    def _budget_while_decoding(self) -> int:
        """The prefill chunk that fits in ``prefill_share`` decode steps (see :meth:`_budget`)."""
        if self._t_decode is None or not self._t_chunk:
            return MIN_PREFILL_CHUNK
        allowed = self.prefill_share * self._t_decode
        best = MIN_PREFILL_CHUNK
        size = MIN_PREFILL_CHUNK
        while size <= self.prefill_step_size:
            known = self._t_chunk.get(size)
            half = self._t_chunk.get(size // 2)
            cost = known if known is not None else (2 * half if half is not None else None)
            if cost is None or cost > allowed:
                break
            best = size
            size *= 2
        return min(best, self.prefill_step_size)

    def _prefill(self) -> None:
        while self._waiting and len(self._running) + len(self._prefilling) < self.max_batch:
            handle = self._waiting.popleft()
            try:
                self._prefilling.extend(self._start(handle))
            except Exception as e:  # a bad cache, ...: this request fails, the others go on
                handle.push(e)
        if not self._prefilling:
            return
        if self._running and self._pending is not None:
            mx.eval(self._pending)  # the decode step queued this step: time it apart
            now = time.perf_counter()
            spent = now - self._queued_at
            self._t_decode = spent if self._t_decode is None else 0.8 * self._t_decode + 0.2 * spent
        budget = self._budget()
        while budget > 0 and self._prefilling:
            seq = self._prefilling[0]
            if seq.handle.cancelled:
                self._prefilling.pop(0)
                self._close_bar(seq)
                self._keep(seq)
                seq.cancel_event()
                continue
            if seq.mtp and not self._running and len(self._prefilling) == 1 and not self._arrivals():
                self._prefilling.pop(0)
                self._go_solo(seq)
                return
            budget -= self._prefill_chunk(seq, budget)
            if seq.done == len(seq.prompt) - 1:
                self._prefilling.pop(0)
                self._close_bar(seq)
                self._join(seq)

    def _prefill_chunk(self, seq: _Sequence, budget: int) -> int:
        """Prefill up to ``budget`` tokens of ``seq``'s prompt (never its last one), ending
        the chunk at the next checkpoint; returns the tokens processed."""
        step = seq.handle.request.prefill_step_size or self.prefill_step_size
        end = min(seq.done + min(budget, step), len(seq.prompt) - 1)
        marks = [p for p in self._checkpoints(seq) if p < end]
        if marks:
            end = marks[0]
        if end <= seq.done:
            return 0
        chunk = mx.array([seq.prompt[seq.done : end]], dtype=mx.int32)
        tic = time.perf_counter()
        forward(self.model, seq.cache, chunk)
        eval_cache(seq.cache)
        spent = time.perf_counter() - tic
        n = end - seq.done
        if n >= MIN_PREFILL_CHUNK:
            size = 1 << (n.bit_length() - 1)  # its size class (a chunk cut short by a checkpoint counts below)
            old = self._t_chunk.get(size)
            self._t_chunk[size] = spent if old is None else 0.8 * old + 0.2 * spent
        seq.fed.extend(seq.prompt[seq.done : end])
        seq.done = end
        if seq.bar is not None:
            seq.bar.update(n)
        if end in self._checkpoints_all(seq):
            self._keep(seq)
        return n

    def _checkpoints_all(self, seq: _Sequence) -> set:
        n = len(seq.prompt)
        return {p for p in seq.handle.request.checkpoints if 0 < p < n} | {n - 1}

    @staticmethod
    def _close_bar(seq: _Sequence) -> None:
        if seq.bar is not None:
            seq.bar.close()
            seq.bar = None

    def _join(self, seq: _Sequence) -> None:
        """Move a prefilled sequence (and its forks, for ``n > 1``) into the batch: the
        prompt's last token is the row's first token to feed."""
        seq.t_prefill_end = time.perf_counter()
        seqs = [seq]
        for i in range(1, seq.handle.request.n):
            fork = _Sequence(self, seq.handle, i, seq.cache, seq.choice_keys[i])
            fork.cached, fork.done, fork.fed = seq.cached, seq.done, list(seq.fed)
            fork.t_prefill_end = seq.t_prefill_end
            seqs.append(fork)
        last = mx.array([seq.prompt[-1]], dtype=mx.int32)
        for s in seqs:
            s.history = mx.array(s.prompt, dtype=mx.int32) if s.processors else None
            s.pending_seen = True  # the prompt's last token: not a generated one
            self._add_row(s, last, None)

    def _add_row(self, seq: _Sequence, token: mx.array, logprobs: Optional[mx.array]) -> None:
        self._batch.add(seq.cache)
        self._running.append(seq)
        lp = logprobs if logprobs is not None else mx.zeros((1, self.vocab_size), dtype=mx.float32)
        if self._pending is None:
            self._pending, self._pending_lp = token, lp
        else:
            self._pending = mx.concatenate([self._pending, token])
            self._pending_lp = mx.concatenate([self._pending_lp, lp.astype(self._pending_lp.dtype)])

    # ........................................................... decode
    def _queue_decode(self) -> None:
        """Queue the ``[B, 1]`` pass feeding every row's pending token and sampling the next."""
        # From here to the pass's end is one decode step's cost: on a backend whose
        # async_eval runs the pass at once (the CPU), it is spent before async_eval returns.
        self._queued_at = time.perf_counter()
        tokens = self._pending
        rows = self._running
        self._batch.fed = [s.fed for s in rows]  # for models that look at the context (test doubles)
        snapshot = [_state_of(c) for c in self._batch]
        try:
            logits = self.model(tokens[:, None], cache=self._batch)[:, -1, :]
            if any(s.constraint is not None for s in rows):
                # The grammar masks need the tokens of the last pass on the host: let the
                # device run this pass meanwhile (the masks are computed during it).
                mx.async_eval(logits)
            if any(s.processors for s in rows):
                processed = []
                for i, s in enumerate(rows):
                    row = logits[i : i + 1]
                    if s.processors:
                        if not s.pending_seen:
                            s.history = mx.concatenate([s.history, tokens[i : i + 1]])
                        for processor in s.processors:
                            row = processor(s.history, row)
                    processed.append(row)
                logits = mx.concatenate(processed)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            if all(s.greedy for s in rows):
                new = mx.argmax(logprobs, axis=-1)
            else:
                new = mx.concatenate([s.draw(logprobs[i : i + 1]).reshape(1) for i, s in enumerate(rows)])
        except BaseException:
            for c, state in zip(self._batch, snapshot):
                c.state = state
            raise
        new = new.astype(mx.int32)
        mx.async_eval(new, logprobs)
        self._pending, self._pending_lp = new, logprobs

    def _emit(self, tokens: mx.array, logprobs: mx.array) -> None:
        """Hand out the tokens the previous pass sampled (now fed by the queued one)."""
        values = tokens.tolist()
        finished: Dict[int, FinishReason] = {}
        for i, (s, t) in enumerate(zip(self._running, values)):
            s.fed.append(t)
            if s.pending_seen:
                s.pending_seen = False
                continue
            reason = s.emit(t, logprobs[i])
            if reason:
                finished[i] = reason
        if finished:
            self._retire(finished)

    def _retire(self, finished: Dict[int, FinishReason], announce: bool = True) -> None:
        """Take finished rows out of the batch; keep their states for reuse; a cancelled
        row's end is announced (its event) unless ``announce`` is False."""
        for i, reason in finished.items():
            s = self._running[i]
            # The batch state of row i holds s.fed (a finished row's last token too: the
            # pass queued in this step fed it).
            s.cache = self._keep_row(s, i)
            if reason == "cancelled" and announce:
                s.cancel_event()
        keep = [i for i in range(len(self._running)) if i not in finished]
        self._batch.remove(keep)
        self._running = [self._running[i] for i in keep]
        if keep:
            idx = mx.array(keep, dtype=mx.int32)
            self._pending, self._pending_lp = self._pending[idx], self._pending_lp[idx]
        else:
            self._pending = self._pending_lp = None

    def _keep_row(self, s: _Sequence, i: int) -> ModelCache:
        """Row ``i``'s state as a one-row cache, kept where the request reuses it."""
        own = s.handle.request.prompt_cache
        target = own if own is not None and s.index == 0 else self._new_cache()
        if own is None and self.prefix_cache is None:
            return target
        self._batch.extract(i, target)
        target.set_state(list(target), s.fed)
        if own is None:
            self.prefix_cache.insert(target.snapshot())
        return target

    def _fail_all(self, error: Exception) -> None:
        """After a failed step: fail every request in flight and start from an empty batch."""
        handles = {s.handle for s in self._running + self._prefilling}
        if self._solo is not None:
            handles.add(self._solo.seq.handle)
        for h in handles:
            h.push(error)
        self._running, self._prefilling, self._solo = [], [], None
        self._batch = BatchCache()
        self._pending = self._pending_lp = None

    # ...................................................... solo (MTP)
    def _maybe_go_solo(self) -> None:
        """One MTP sequence left running and nothing else to do: speculate again."""
        if len(self._running) != 1 or self._prefilling or self._arrivals() or not self._running[0].mtp:
            return
        seq = self._running[0]
        token, logprobs = self._pending, self._pending_lp
        if seq.handle.cancelled:
            return  # the next step retires it
        if not seq.pending_seen:  # a sampled token not handed out yet: hand it out here
            reason = seq.emit(int(token.item()), logprobs[0])
            if reason:  # it ended the choice: the state (without that token) is kept as it is
                self._retire_unfed(seq)
                return
        seq.pending_seen = False
        # The cache holds everything but the last token, which the speculative loop feeds.
        self._batch.extract(0, seq.cache)
        seq.cache.set_state(list(seq.cache), seq.fed)
        self._batch = BatchCache()
        self._running = []
        self._pending = self._pending_lp = None
        self._go_solo(seq)

    def _retire_unfed(self, seq: _Sequence) -> None:
        """Retire the only row, whose last token was never fed."""
        self._batch.extract(0, seq.cache)
        seq.cache.set_state(list(seq.cache), seq.fed)
        self._keep(seq)
        self._batch = BatchCache()
        self._running = []
        self._pending = self._pending_lp = None

    def _go_solo(self, seq: _Sequence) -> None:
        """Run ``seq`` through the speculative loop (its cache holds all but the last of
        prompt + generated, or a prefix of the prompt)."""
        req = seq.handle.request
        decoding = speculative.MTPDecoding(
            num_draft_tokens=req.num_draft_tokens or speculative.DEFAULT_NUM_DRAFT_TOKENS,
            temp=req.sampling.temp, top_p=req.sampling.top_p, top_k=req.sampling.top_k, min_p=req.sampling.min_p,
        )  # fmt: skip
        seq.mtp_runs.append(decoding)
        prompt = seq.prompt + seq.generated
        left = seq.max_tokens - len(seq.generated)
        checkpoints = [p for p in self._checkpoints_all(seq) if p > seq.cache.offset and p < len(seq.prompt)]
        before = len(seq.cache.checkpoints)
        gen = speculative.speculative_generate_tokens(
            self.model, seq.cache, prompt, decoding=decoding, max_tokens=left, logits_processors=seq.processors,
            prefill_step_size=req.prefill_step_size or self.prefill_step_size, progress=False,
            checkpoint_at=checkpoints, should_stop=lambda: self._arrivals() or seq.handle.stop_requested(),
            keep_last_unfed=True,
        )  # fmt: skip
        self._solo = _Solo(seq, gen, before)

    def _solo_step(self) -> None:
        solo = self._solo
        seq = solo.seq
        if self._arrivals() or seq.handle.stop_requested():
            self._leave_solo(cancelled=seq.handle.cancelled)
            return
        try:
            token, lp = next(solo.gen)
        except StopIteration:  # stopped during its prefill: something arrived, or a cancel
            self._leave_solo(cancelled=seq.handle.cancelled)
            return
        if seq.t_prefill_end is None:
            seq.t_prefill_end = time.perf_counter()
            self._move_checkpoints(solo)
        decoding = seq.mtp_runs[-1]
        reason = seq.emit(token, lp, from_draft=decoding.stats.from_draft)
        if reason:
            self._end_solo(reason)

    def _move_checkpoints(self, solo: "_Solo") -> None:
        """The speculative prefill's checkpoints go to the prefix cache (pooled requests)."""
        seq = solo.seq
        if seq.handle.request.prompt_cache is None and self.prefix_cache is not None:
            for snap in seq.cache.checkpoints[solo.checkpoints_before :]:
                self.prefix_cache.insert(snap)
        solo.checkpoints_before = len(seq.cache.checkpoints)

    def _end_solo(self, reason: Optional[FinishReason]) -> None:
        """The solo sequence finished: its cache holds prompt + reply (the last token fed)."""
        solo, self._solo = self._solo, None
        seq = solo.seq
        solo.gen.close()  # leaves the last token unfed
        if seq.generated and seq.cache.offset < len(seq.prompt) + len(seq.generated):
            forward(self.model, seq.cache, mx.array([seq.generated[-1:]], dtype=mx.int32))
            eval_cache(seq.cache)
        seq.fed = seq.cache.tokens
        self._keep(seq)

    def _leave_solo(self, cancelled: bool) -> None:
        """Something else wants the model: the solo sequence joins the batch (or ends)."""
        solo, self._solo = self._solo, None
        seq = solo.seq
        solo.gen.close()  # the cache holds prompt + generated but the last token
        self._move_checkpoints(solo)
        seq.fed = seq.cache.tokens
        if cancelled:
            self._keep(seq)
            seq.cancel_event()
            return
        if not seq.generated:  # stopped during the prefill: go on with the engine's chunks
            seq.done = seq.cache.offset
            if seq.done >= len(seq.prompt) - 1:
                self._join(seq)
            else:
                self._prefilling.insert(0, seq)
            return
        seq.history = mx.array(seq.prompt + seq.generated, dtype=mx.int32) if seq.processors else None
        seq.pending_seen = True  # its last token was emitted already
        self._add_row(seq, mx.array(seq.generated[-1:], dtype=mx.int32), None)


def token_logprobs(logprobs: mx.array, token: int, top: int) -> Tuple[float, List[Tuple[int, float]]]:
    """``token``'s value in ``logprobs`` (``[vocab]`` or ``[1, vocab]``) and the ``top`` best
    ``(token, logprob)`` pairs, best first (ties: lower id first; tokens at ``-inf`` left out)."""
    lp = logprobs.reshape(-1).astype(mx.float32)
    chosen = lp[token]
    if top == 0:
        return chosen.item(), []
    best = mx.argpartition(-lp, top - 1)[:top]
    values = lp[best]
    mx.eval(chosen, best, values)
    # Forbidden tokens (-inf: a grammar, a bias) are no alternatives.
    pairs = sorted(((t, v) for t, v in zip(best.tolist(), values.tolist()) if v > -math.inf),
                   key=lambda p: (-p[1], p[0]))  # fmt: skip
    return chosen.item(), pairs


def _state_of(c) -> tuple:
    """A layer cache's state to put back if building a pass fails (lists copied: an
    ``ArraysCache`` assigns into its list)."""
    state = c.state
    return (list(state[0]),) + tuple(state[1:]) if isinstance(state[0], list) else state


@dataclass
class _Solo:
    seq: _Sequence
    gen: Iterator
    checkpoints_before: int
