"""OpenAI-compatible HTTP server (its command line is :mod:`qnext_mlx.server`).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(streaming as server-sent events, with a final usage chunk when
``stream_options.include_usage`` is set), ``GET /health``, ``GET /metrics`` (Prometheus,
:mod:`qnext_mlx.serve.metrics`).

How it is put together:

* Request threads (standard library ``ThreadingHTTPServer``) read and validate the
  request (:mod:`qnext_mlx.serve.protocol`), format and tokenize the prompt
  (:class:`~qnext_mlx.serve.chat_session.ChatEngine`), and submit it to the batch
  engine; when too many requests already wait it is answered 503 at once.
* One worker thread owns the model (MLX evaluation is not thread-safe) and runs the
  batch engine's step loop (:class:`~qnext_mlx.engine.batch.BatchEngine`): every
  running reply decodes in one batch, new prompts are prefilled in chunks between
  decode steps, and each reply's pieces go to its own queue.
* The request thread streams those pieces to its client. A client that goes away
  (a failed write, or a closed socket noticed while waiting) cancels its reply only;
  the engine checks between prefill chunks and between decode steps, so a long
  prompt's prefill stops too (a request still waiting is dropped).
* Prefix reuse: the engine's prefix cache keeps states at the message boundaries
  of every prompt and the end of every reply, for all requests; a follow-up turn of a
  conversation only prefills what the template changed or added;
  ``usage.prompt_tokens_details.cached_tokens`` says how many prompt tokens were reused.
* Qwen3 tool calls: ``tools`` go into the chat template; ``<tool_call>{...}</tool_call>``
  spans of the reply become OpenAI ``tool_calls`` (streamed as deltas), and
  ``role: tool`` messages go back into the template. ``<think>`` spans come back as
  ``reasoning_content``.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, List, Optional, Sequence, Union

from ..engine.batch import EngineBusyError, EngineObserver, SequenceStats
from ..errors import QnextError
from .chat_session import (
    ChatEngine,
    ChatError,
    ChatReply,
    Delta,
    PreparedPrompt,
    PromptTooLongError,
    ReplyStats,
    SamplingSettings,
    end_mlx_thread,
)
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .protocol import (
    ApiError,
    chat_chunk,
    chat_completion,
    completion,
    completion_chunk,
    openai_finish_reason,
    parse_chat_request,
    parse_completion_request,
    tool_call_deltas,
    usage_chunk,
)

log = logging.getLogger("qnext_mlx.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
KEEPALIVE_SECONDS = 10.0  # SSE comment while a streamed request waits (queue, prefill)
_POLL_SECONDS = 0.25
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout)


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

    MLX arrays are bound to the thread that built them (a lazily loaded weight
    cannot be evaluated on another thread), so the model is loaded here too:
    ``load_engine()`` runs on this thread and returns the :class:`ChatEngine`.
    Request threads submit to the engine and read their replies' events; the engine
    decodes all running replies in one batch.
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

    def submit(self, prompt: PreparedPrompt, settings: SamplingSettings) -> Job:
        """Start a reply; raises :class:`ApiError` 503 when the queue is full."""
        try:
            job = Job(self.engine.start(prompt, settings))
        except EngineBusyError:
            raise ApiError(
                503,
                f"the server is busy ({self.max_queue} requests waiting); retry later",
                type="server_error",
                code="server_busy",
            ) from None
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
                batch.threaded = True  # request threads wait for events from here on
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
    waits for it and re-raises its error here.
    """

    def __init__(
        self,
        load_engine: Callable[[], ChatEngine],
        model_id: str,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        defaults: Optional[SamplingSettings] = None,
    ):
        self.model_id = model_id
        self.max_request_bytes = max_request_bytes
        self.defaults = defaults or SamplingSettings()
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


class QnextHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Connections that may wait to be accepted (socketserver's default of 5 refuses a
    # burst of clients; found by the soak test).
    request_queue_size = 256

    def __init__(self, address, app: Optional[ServerApp]):
        self.app = app
        super().__init__(address, Handler)

    def handle_error(self, request, client_address) -> None:
        """A client that resets its connection is not a server error (no traceback)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, _CLIENT_GONE + (ConnectionError,)):
            log.debug("connection from %s closed: %s", client_address, exc)
            return
        log.exception("error while handling a request from %s", client_address)


class Handler(BaseHTTPRequestHandler):
    """One HTTP connection (HTTP/1.1 keep-alive for JSON answers; streams close the connection)."""

    server: QnextHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds a client may stall while sending its request or reading ours
    server_version = "qnext-mlx"

    @property
    def app(self) -> ServerApp:
        return self.server.app

    def log_message(self, format: str, *args) -> None:  # route http.server's lines to logging
        log.info("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------ answers
    def _send_json(self, status: int, body: dict, extra_headers: Sequence = ()) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra_headers:
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: ApiError) -> None:
        headers = [("Retry-After", "1")] if err.status == 503 else []
        try:
            self._send_json(err.status, err.body(), headers)
        except _CLIENT_GONE:
            pass

    def _start_stream(self) -> None:
        self.close_connection = True  # the end of the stream is the end of the connection
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

    def _send_event(self, obj: Union[dict, str]) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        self.wfile.write(f"data: {data}\n\n".encode())

    def _peer_closed(self) -> bool:
        """True when the client has closed its side (EOF waiting on the socket)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # ----------------------------------------------------------- routing
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": [self._model_card()]})
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/") :]
            if name == self.app.model_id:
                self._send_json(200, self._model_card())
            else:
                self._send_error(
                    ApiError(
                        404,
                        f"the model '{name}' does not exist; this server has '{self.app.model_id}'",
                        param="model",
                        code="model_not_found",
                    )
                )
        elif path == "/metrics":
            self._send_bytes(200, self.app.worker.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/health":
            w = self.app.worker
            self._send_json(
                200,
                {
                    "status": "ok",
                    "model": self.app.model_id,
                    "queued": w.waiting,
                    "running": w.engine.engine.num_running,
                    "busy": w.busy,
                    "completed": w.completed,
                },
            )
        else:
            self._send_error(ApiError(404, f"no such endpoint: GET {path}", code="not_found"))

    def _model_card(self) -> dict:
        return {
            "id": self.app.model_id,
            "object": "model",
            "created": self.app.created,
            "owned_by": "qnext-mlx",
            "max_model_len": self.app.engine.max_context,
        }

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {
            "/v1/chat/completions": self._chat,
            "/chat/completions": self._chat,
            "/v1/completions": self._completion,
            "/completions": self._completion,
        }
        try:
            route = routes.get(path)
            if route is None:
                self.close_connection = True  # the body is not read
                raise ApiError(404, f"no such endpoint: POST {path}", code="not_found")
            route(self._read_json())
        except ApiError as e:
            self._send_error(e)
        except _CLIENT_GONE:
            self.close_connection = True
        except Exception:
            log.exception("request failed")
            self.close_connection = True
            self._send_error(ApiError(500, "internal server error (see the server log)", type="server_error"))

    def _method_not_allowed(self) -> None:
        self.close_connection = True
        self._send_error(ApiError(405, f"method {self.command} is not allowed here", code="method_not_allowed"))

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def _read_json(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "send the request with a Content-Length (chunked bodies are not accepted)")
        length = self.headers.get("Content-Length")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except (TypeError, ValueError):
            self.close_connection = True
            raise ApiError(411 if length is None else 400, "a valid Content-Length header is required") from None
        if n > self.app.max_request_bytes:
            self.close_connection = True  # the body stays unread
            raise ApiError(
                413,
                f"the request body has {n} bytes; the limit is {self.app.max_request_bytes} "
                f"(server option --max-request-mb)",
                code="request_too_large",
            )
        raw = self.rfile.read(n)
        if len(raw) < n:
            self.close_connection = True
            raise ApiError(400, "the request body ended early")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    # ---------------------------------------------------------- handlers
    def _prepare(self, fn, *args) -> PreparedPrompt:
        try:
            return fn(*args)
        except PromptTooLongError as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        except ChatError as e:
            raise ApiError(400, str(e)) from None

    def _submit(self, prompt: PreparedPrompt, settings: SamplingSettings) -> Job:
        try:
            return self.app.worker.submit(prompt, settings)
        except ValueError as e:  # settings the engine refused
            raise ApiError(400, str(e)) from None

    def _events(self, job: Job, stream: bool):
        """The job's items as they come; notices a client that leaves meanwhile."""
        last_write = time.monotonic()
        while True:
            item = job.reply.next(timeout=_POLL_SECONDS)
            if item is None:
                if self._peer_closed():
                    job.cancel()
                    raise ConnectionAbortedError("client closed the connection")
                if stream and time.monotonic() - last_write > KEEPALIVE_SECONDS:
                    self.wfile.write(b": keepalive\n\n")
                    last_write = time.monotonic()
                continue
            if item is ChatReply.END:
                return
            last_write = time.monotonic()
            yield item

    def _run(self, job: Job, stream: bool, on_item) -> Optional[ReplyStats]:
        """Feed the job's items to ``on_item``; cancel the job if the client goes away."""
        stats = None
        try:
            for item in self._events(job, stream):
                if isinstance(item, ReplyStats):
                    stats = item
                on_item(item)
        except _CLIENT_GONE:
            job.cancel()
            self.close_connection = True
            log.info("client went away; generation stopped")
            return None
        except ValueError as e:  # settings the engine refused
            raise ApiError(400, str(e)) from None
        finally:
            if stats is None:
                job.cancel()
        log.info(
            "prompt %d tokens (%d cached, %.1f tok/s), generated %d tokens (%.1f tok/s), %s",
            stats.prompt_tokens,
            stats.cached_tokens,
            stats.prompt_tps,
            stats.generation_tokens,
            stats.generation_tps,
            stats.finish_reason,
        )
        return stats

    def _stream_error(self, e: Exception) -> None:
        err = (
            e
            if isinstance(e, ApiError)
            else ApiError(500, "generation failed (see the server log)", type="server_error")
        )
        try:
            self._send_event(err.body())
            self._send_event("[DONE]")
        except _CLIENT_GONE:
            pass

    def _chat(self, body: Any) -> None:
        req = parse_chat_request(body, self.app.defaults)
        prompt = self._prepare(
            self.app.engine.prepare, req.messages, req.tools or None, req.template_kwargs, req.parse_tools
        )
        job = self._submit(prompt, req.settings)
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.app.model_id
        if not req.stream:
            parts = {"content": [], "reasoning": []}
            calls = []

            def collect(item):
                if isinstance(item, Delta):
                    if item.kind == "tool_call":
                        calls.append(item.tool_call)
                    else:
                        parts[item.kind].append(item.text)

            stats = self._run(job, False, collect)
            if stats is not None:
                self._send_json(
                    200,
                    chat_completion(
                        rid, created, model, "".join(parts["content"]), "".join(parts["reasoning"]), calls, stats
                    ),
                )
            return

        self._start_stream()
        self._send_event(chat_chunk(rid, created, model, {"role": "assistant", "content": ""}))
        n_calls = 0

        def send(item):
            nonlocal n_calls
            if isinstance(item, ReplyStats):
                self._send_event(chat_chunk(rid, created, model, {}, openai_finish_reason(item.finish_reason)))
                if req.include_usage:
                    self._send_event(usage_chunk(rid, created, model, "chat.completion.chunk", item))
                self._send_event("[DONE]")
            elif item.kind == "tool_call":
                for delta in tool_call_deltas(n_calls, item.tool_call):
                    self._send_event(chat_chunk(rid, created, model, delta))
                n_calls += 1
            else:
                key = "reasoning_content" if item.kind == "reasoning" else "content"
                self._send_event(chat_chunk(rid, created, model, {key: item.text}))

        try:
            self._run(job, True, send)
        except Exception as e:  # after the 200 header: report it in the stream
            self._stream_error(e)

    def _completion(self, body: Any) -> None:
        req = parse_completion_request(body, self.app.defaults)
        prompt = self._prepare(self.app.engine.prepare_text, req.prompt)
        job = self._submit(prompt, req.settings)
        rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.app.model_id
        # Plain completion: the text as generated, think and tool tags included (raw prompt).
        if not req.stream:
            text: List[str] = []

            def collect(item):
                if isinstance(item, Delta):
                    text.append(item.text)

            stats = self._run(job, False, collect)
            if stats is not None:
                self._send_json(200, completion(rid, created, model, "".join(text), stats))
            return

        self._start_stream()

        def send(item):
            if isinstance(item, ReplyStats):
                self._send_event(completion_chunk(rid, created, model, "", openai_finish_reason(item.finish_reason)))
                if req.include_usage:
                    self._send_event(usage_chunk(rid, created, model, "text_completion", item))
                self._send_event("[DONE]")
            elif item.text:
                self._send_event(completion_chunk(rid, created, model, item.text))

        try:
            self._run(job, True, send)
        except Exception as e:
            self._stream_error(e)


# ------------------------------------------------------------------ running
def make_server(
    load_engine: Callable[[], ChatEngine],
    model_id: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    **app_kwargs,
) -> QnextHTTPServer:
    """A listening server (not yet serving: call ``serve_forever()``); ``port=0`` picks a free port.

    ``load_engine()`` builds the :class:`ChatEngine` (loads the model); it runs on the
    worker thread, which owns the model from then on.
    """
    try:  # listen first: a busy port fails before a long model load
        server = QnextHTTPServer((host, port), None)
    except OSError as e:
        raise QnextError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        server.app = ServerApp(load_engine, model_id, **app_kwargs)
    except BaseException:
        server.server_close()
        raise
    return server


def start_in_thread(
    load_engine: Callable[[], ChatEngine], model_id: str, host: str = DEFAULT_HOST, port: int = 0, **app_kwargs
) -> QnextHTTPServer:
    """Start a server on a background thread (for tests and embedding); stop it with
    :func:`stop_server`. Its address is ``server.server_address``."""
    server = make_server(load_engine, model_id, host, port, **app_kwargs)
    threading.Thread(target=server.serve_forever, name="qnext-mlx-http", daemon=True).start()
    return server


def stop_server(server: QnextHTTPServer) -> None:
    server.shutdown()
    server.server_close()
    server.app.close()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.1``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
