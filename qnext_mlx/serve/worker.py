"""The server's model side: one thread owns the model and runs the batch engine.

* :class:`Worker`: the model thread. MLX arrays are bound to the thread that built them
  (a lazily loaded weight cannot be evaluated on another thread) and MLX evaluation is
  not thread-safe, so the model is loaded here and the batch engine's step loop runs
  here; request handlers only submit replies and read their events.
* :class:`ServerApp`: the worker and the limits every request handler shares.
* :class:`ServerStats`: what the engine reports, for ``/health``, the tests and the
  Prometheus metrics (:mod:`qnext_mlx.serve.metrics`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

from ..engine.batch import EngineBusyError, EngineObserver, SequenceStats
from .chat_session import ChatEngine, ChatReply, PreparedPrompt, ReplyStats, SamplingSettings, end_mlx_thread
from .metrics import ServerMetrics
from .protocol import ApiError

__all__ = ["DEFAULT_MAX_QUEUE", "DEFAULT_MAX_REQUEST_BYTES", "Job", "ServerApp", "ServerStats", "Worker"]

DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20


@dataclass(eq=False)
class Job:
    """One request's reply in flight (a :class:`ChatReply` of the batch engine)."""

    reply: ChatReply

    def cancel(self) -> None:
        self.reply.cancel()

    @property
    def cancelled(self) -> bool:
        return self.reply.handle.cancelled


class ServerStats(EngineObserver):
    """What the engine reports, for ``/health`` and the tests: finished and cancelled
    replies, the last one's stats; chained to another observer (the metrics)."""

    def __init__(self, inner: Optional[EngineObserver] = None):
        self.inner = inner or EngineObserver()
        self.completed = 0
        self.cancelled = 0
        self.last_stats: Optional[ReplyStats] = None

    def request_queued(self, prompt_tokens: int) -> None:
        self.inner.request_queued(prompt_tokens)

    def prefix_reused(self, tokens: int) -> None:
        self.inner.prefix_reused(tokens)

    def first_token(self, seconds: float) -> None:
        self.inner.first_token(seconds)

    def inter_token(self, seconds: float) -> None:
        self.inner.inter_token(seconds)

    def step(self, running: int, waiting: int) -> None:
        self.inner.step(running, waiting)

    def finished(self, stats: SequenceStats, reason: str) -> None:
        self.last_stats = ReplyStats(
            finish_reason=reason, prompt_tokens=stats.prompt_tokens, cached_tokens=stats.cached_tokens,
            generation_tokens=stats.generation_tokens, prompt_tps=stats.prompt_tps,
            generation_tps=stats.generation_tps, context_tokens=stats.context_tokens,
            time_to_first_token=stats.time_to_first_token,
        )  # fmt: skip
        self.cancelled += reason == "cancelled"
        self.completed += 1
        self.inner.finished(stats, reason)


class Worker(threading.Thread):
    """The model thread: loads the model, then runs the batch engine's step loop.

    ``load_engine()`` runs on this thread and returns the :class:`ChatEngine`. Request
    handlers submit to the engine and read their replies' events; the engine decodes
    all running replies in one batch.
    """

    def __init__(self, load_engine: Callable[[], ChatEngine], max_queue: int = DEFAULT_MAX_QUEUE,
                 metrics: Optional[ServerMetrics] = None):  # fmt: skip
        super().__init__(name="qnext-mlx-worker", daemon=True)
        self._load_engine = load_engine
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self.engine: Optional[ChatEngine] = None
        self.load_error: Optional[BaseException] = None
        self.ready = threading.Event()
        self._stop_event = threading.Event()
        self.stats = ServerStats(self.metrics)
        self.in_flight: List[Job] = []
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        """Something is being prefilled, decoded or waits for it."""
        batch = self.engine.engine
        return bool(batch.num_running or batch.num_waiting)

    @property
    def waiting(self) -> int:
        return self.engine.engine.num_waiting

    @property
    def completed(self) -> int:
        return self.stats.completed

    @property
    def cancelled(self) -> int:
        return self.stats.cancelled

    @property
    def last_stats(self) -> Optional[ReplyStats]:
        return self.stats.last_stats

    def submit(self, prompt: PreparedPrompt, settings: SamplingSettings, **options) -> Job:
        """Start a reply (``options``: :meth:`ChatEngine.start`'s); raises :class:`ApiError`
        503 when the queue is full and 400 for settings the engine refuses."""
        try:
            job = Job(self.engine.start(prompt, settings, **options))
        except EngineBusyError:
            raise ApiError(
                503,
                f"the server is busy ({self.max_queue} requests waiting); retry later",
                type="server_error",
                code="server_busy",
            ) from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        with self._lock:
            self.in_flight = [j for j in self.in_flight if j.reply.handle.unfinished] + [job]
        return job

    def stop(self) -> None:
        """Stop the engine after its current step (running replies are cancelled)."""
        with self._lock:
            for job in self.in_flight:
                job.cancel()
        self._stop_event.set()
        if self.engine is not None:
            self.engine.engine.wake()

    def run(self) -> None:
        try:
            try:
                self.engine = self._load_engine()
                batch = self.engine.engine
                batch.max_waiting = self.max_queue
                batch.observer = self.stats
                batch.threaded = True  # request handlers wait for events from here on
            except BaseException as e:  # reported by ServerApp on the starting thread
                self.load_error = e
                return
            finally:
                self.ready.set()
            self.engine.engine.run(self._stop_event)
        finally:
            end_mlx_thread()


class ServerApp:
    """Model worker and limits shared by all request handlers.

    ``load_engine`` runs on the worker thread (see :class:`Worker`); the constructor
    waits for it and re-raises its error here. ``api_key``: requests must carry
    ``Authorization: Bearer <api_key>`` (None: no authentication).
    """

    def __init__(
        self,
        load_engine: Callable[[], ChatEngine],
        model_id: str,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        defaults: Optional[SamplingSettings] = None,
        api_key: Optional[str] = None,
        max_stored_responses: int = 256,
    ):
        self.model_id = model_id
        self.max_request_bytes = max_request_bytes
        self.defaults = defaults or SamplingSettings()
        self.api_key = api_key or None
        self.max_stored_responses = max_stored_responses
        self.created = int(time.time())
        self.worker = Worker(load_engine, max_queue)
        self.worker.start()
        self.worker.ready.wait()
        if self.worker.load_error is not None:
            self.worker.join()  # it ends its MLX streams first; exiting before that can abort
            raise self.worker.load_error
        self.engine: ChatEngine = self.worker.engine

    def close(self, join: bool = True) -> None:
        """Stop the worker after its current token or prefill chunk; ``join`` waits for it to end."""
        self.worker.stop()
        if join and self.worker.is_alive() and self.worker is not threading.current_thread():
            self.worker.join()
