"""OpenAI-compatible HTTP server on FastAPI and uvicorn (its command line is :mod:`qnext_mlx.server`).

Endpoints (each field, what it does and what it refuses: docs/chat.md):

| endpoint | what |
| --- | --- |
| ``POST /v1/chat/completions`` | chat, streamed or not; tools, structured outputs, logprobs, ``n`` |
| ``POST /v1/completions`` | plain completion of a raw prompt |
| ``POST /v1/responses`` | the Responses API; ``GET`` / ``DELETE /v1/responses/{id}`` for stored ones |
| ``GET /v1/models`` | the model, with its context length |
| ``GET /health`` | liveness and queue state (never needs the key) |
| ``GET /metrics`` | Prometheus metrics (:mod:`qnext_mlx.serve.metrics`) |

How it is put together:

* uvicorn runs the ASGI app on one event loop. Handlers validate the request
  (pydantic models, :mod:`qnext_mlx.serve.protocol`), render and tokenize the prompt on a
  worker thread of the loop's pool, and submit it to the batch engine; when too many
  requests already wait it is answered 503 at once.
* One worker thread owns the model (:mod:`qnext_mlx.serve.worker`) and runs the batch
  engine's step loop: every running reply decodes in one batch, new prompts are
  prefilled in chunks between decode steps, and each reply's events go to its own queue.
  The engine wakes the handler's coroutine after each event (``call_soon_threadsafe``).
* A client that goes away (Starlette notices the disconnect, for streams at once)
  cancels its reply only; the engine checks between prefill chunks and decode steps.
* Limits in front of everything (a small ASGI middleware): the API key when one is set
  (401 otherwise), a ``Content-Length`` is required (411) and bounded (413).

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, for every
status (404 and 405 from the router included).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import QnextError
from .chat_session import (
    ChatEngine,
    ChatError,
    ChatReply,
    Delta,
    PreparedPrompt,
    PromptTooLongError,
    ReplyStats,
    TokenLogprob,
)
from .metrics import CONTENT_TYPE_LATEST
from .protocol import (
    ApiError,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    Completion,
    CompletionChoice,
    ModelList,
    chat_logprobs,
    chat_message,
    completion_logprobs,
    model_card,
    openai_finish_reason,
    parse_chat_request,
    parse_completion_request,
    tool_call_deltas,
    usage,
)
from .responses import ResponseBuilder, ResponseStore, parse_responses_request
from .structured import build_grammar
from .worker import DEFAULT_MAX_QUEUE, DEFAULT_MAX_REQUEST_BYTES, Job, ServerApp

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_PORT",
    "QnextServer",
    "ServerApp",
    "create_app",
    "is_loopback",
    "make_server",
    "start_in_thread",
    "stop_server",
]

log = logging.getLogger("qnext_mlx.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
KEEPALIVE_SECONDS = 10.0  # SSE comment while a streamed request waits (queue, prefill)
_POLL_SECONDS = 0.25  # how often a non-streamed request checks that its client is still there
_KEEPALIVE = object()
_OPEN_PATHS = ("/health",)  # answered without the API key (load balancers, probes)


def _error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 503 else None
    if err.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _sse(obj: Union[dict, str], event: Optional[str] = None) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


def _dump(model) -> dict:
    return model.model_dump(mode="json")


# ------------------------------------------------------------ middleware
class Limits:
    """ASGI middleware in front of the app: the API key, and the request-body limits
    (``Content-Length`` required on POST, at most ``max_request_bytes``)."""

    def __init__(self, app, server: ServerApp):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"].rstrip("/") or "/"
        err = self._check(scope["method"], path, headers)
        if err is not None:
            response = _error_response(err)
            response.headers["Connection"] = "close"  # the body (if any) stays unread
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check(self, method: str, path: str, headers: Dict[str, str]) -> Optional[ApiError]:
        key = self.server.api_key
        if key is not None and path not in _OPEN_PATHS:
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                what = "no API key was given" if not given else "the API key is not valid"
                return ApiError(401, f"{what}: send 'Authorization: Bearer <key>' with the server's key "
                                "(--api-key or QNEXT_API_KEY)", code="invalid_api_key")  # fmt: skip
        if method != "POST":
            return None
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return ApiError(411, "send the request with a Content-Length (chunked bodies are not accepted)")
        length = headers.get("content-length")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except (TypeError, ValueError):
            return ApiError(411 if length is None else 400, "a valid Content-Length header is required")
        if n > self.server.max_request_bytes:
            return ApiError(413, f"the request body has {n} bytes; the limit is {self.server.max_request_bytes} "
                            "(server option --max-request-mb)", code="request_too_large")  # fmt: skip
        return None


# ------------------------------------------------------------------ replies
async def reply_items(job: Job, request: Request, stream: bool) -> AsyncIterator[Any]:
    """The job's reply items as they come (and :data:`_KEEPALIVE` marks while a stream
    waits long); cancels the reply when the consumer stops early or the client leaves."""
    reply = job.reply
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def notify() -> None:  # on the engine's thread
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop has closed (server shutting down)
            pass

    reply.handle.listener = notify
    last = time.monotonic()
    finished = False
    try:
        while True:
            wake.clear()  # before draining: an event pushed from here on sets it again
            while True:
                item = reply.next(timeout=0)
                if item is None:
                    break
                if item is ChatReply.END:
                    finished = True
                    return
                last = time.monotonic()
                yield item
            try:
                await asyncio.wait_for(wake.wait(), KEEPALIVE_SECONDS if stream else _POLL_SECONDS)
            except asyncio.TimeoutError:
                if stream and time.monotonic() - last >= KEEPALIVE_SECONDS:
                    last = time.monotonic()
                    yield _KEEPALIVE
                elif not stream and await request.is_disconnected():
                    log.info("client went away; generation stopped")
                    return
    finally:
        reply.handle.listener = None
        if not finished:
            job.cancel()


def _log_stats(stats: ReplyStats) -> None:
    log.info("prompt %d tokens (%d cached, %.1f tok/s), generated %d tokens (%.1f tok/s), %s",
             stats.prompt_tokens, stats.cached_tokens, stats.prompt_tps, stats.generation_tokens,
             stats.generation_tps, stats.finish_reason)  # fmt: skip


class _ReplyStream:
    """A streamed reply's items for an SSE endpoint: iterate for ``(kind, item, logprobs)``
    with ``kind`` "keepalive", "delta" (a :class:`Delta` with text or a tool call) or "finish"
    (a choice's :class:`ReplyStats`); a choice's token log-probabilities gathered since its
    last piece come with its next one, built by ``logprobs_of(items, choice)``."""

    def __init__(self, job: Job, request: Request, n: int, logprobs_of: Callable[[List[TokenLogprob], int], Any]):
        self.job, self.request = job, request
        self.logprobs_of = logprobs_of
        self.stats: List[Optional[ReplyStats]] = [None] * n
        self._pending: List[List[TokenLogprob]] = [[] for _ in range(n)]

    @property
    def complete(self) -> bool:
        """Every choice ended."""
        return all(s is not None for s in self.stats)

    def _take(self, choice: int):
        items, self._pending[choice] = self._pending[choice], []
        return self.logprobs_of(items, choice)

    async def __aiter__(self):
        async for item in reply_items(self.job, self.request, stream=True):
            if item is _KEEPALIVE:
                yield "keepalive", None, None
            elif isinstance(item, TokenLogprob):
                self._pending[item.choice].append(item)
            elif isinstance(item, ReplyStats):
                self.stats[item.choice] = item
                _log_stats(item)
                yield "finish", item, self._take(item.choice)
            elif item.kind == "tool_call":
                yield "delta", item, None
            elif item.text:
                yield "delta", item, self._take(item.choice)


class _Choice:
    """What one choice of a non-streamed reply collected."""

    def __init__(self):
        self.content: List[str] = []
        self.reasoning: List[str] = []
        self.calls: list = []
        self.logprobs: List[TokenLogprob] = []
        self.stats: Optional[ReplyStats] = None


async def _collect(job: Job, request: Request, n: int) -> Optional[List[_Choice]]:
    """All choices of a non-streamed reply; None when the client left."""
    choices = [_Choice() for _ in range(n)]
    async for item in reply_items(job, request, stream=False):
        if isinstance(item, ReplyStats):
            choices[item.choice].stats = item
            _log_stats(item)
        elif isinstance(item, TokenLogprob):
            choices[item.choice].logprobs.append(item)
        elif isinstance(item, Delta):
            c = choices[item.choice]
            if item.kind == "tool_call":
                c.calls.append(item.tool_call)
            else:
                (c.reasoning if item.kind == "reasoning" else c.content).append(item.text)
    if any(c.stats is None for c in choices):
        return None
    return choices


# -------------------------------------------------------------------- app
def create_app(server: ServerApp) -> FastAPI:
    """The ASGI app of ``server`` (its engine, limits, key and response store)."""
    app = FastAPI(title="qnext-mlx", docs_url=None, redoc_url=None, openapi_url=None)
    store = ResponseStore(server.max_stored_responses)
    app.state.responses = store

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        what = {404: f"no such endpoint: {request.method} {request.url.path}",
                405: f"method {request.method} is not allowed here"}.get(exc.status_code, str(exc.detail))  # fmt: skip
        return _error_response(ApiError(exc.status_code, what, code=code))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        log.error("request failed", exc_info=exc)
        return _error_response(ApiError(500, "internal server error (see the server log)", type="server_error"))

    engine: ChatEngine = server.engine

    def token_text(token: int) -> str:
        return engine.tokenizer.decode([token])

    async def read_json(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def prepare(fn: Callable[..., PreparedPrompt], *args) -> PreparedPrompt:
        try:
            return fn(*args)
        except PromptTooLongError as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        except ChatError as e:
            raise ApiError(400, str(e)) from None

    # ........................................................ metadata
    @app.get("/health")
    async def health():
        w = server.worker
        return {"status": "ok", "model": server.model_id, "queued": w.waiting, "running": w.engine.engine.num_running,
                "busy": w.busy, "completed": w.completed}  # fmt: skip

    @app.get("/metrics")
    async def metrics():
        return Response(server.worker.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def card():
        return model_card(server.model_id, server.created, engine.max_context)

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        return _dump(ModelList(data=[card()]))

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != server.model_id:
            raise ApiError(404, f"the model '{name}' does not exist; this server has '{server.model_id}'",
                           param="model", code="model_not_found")  # fmt: skip
        return _dump(card())

    # ............................................................ chat
    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat(request: Request):
        req = parse_chat_request(await read_json(request), server.defaults)

        def build():
            prompt = prepare(engine.prepare, req.messages, req.tools or None, req.template_kwargs, req.parse_tools)
            return prompt, build_grammar(engine, req.structured, prompt.opens_think)

        prompt, grammar = await run_in_threadpool(build)
        job = server.worker.submit(prompt, req.settings, n=req.n, logprobs=req.logprobs, grammar=grammar)
        rid, created, model_id = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), server.model_id
        if not req.stream:
            choices = await _collect(job, request, req.n)
            if choices is None:
                return Response(status_code=499)
            out = []
            for i, c in enumerate(choices):
                calls = c.calls if req.parallel_tool_calls else c.calls[:1]
                out.append(ChatChoice(
                    index=i, message=chat_message("".join(c.content), "".join(c.reasoning), calls),
                    logprobs=chat_logprobs(c.logprobs, token_text) if req.logprobs is not None else None,
                    finish_reason=openai_finish_reason(c.stats.finish_reason),
                ))  # fmt: skip
            body = ChatCompletion(id=rid, created=created, model=model_id, choices=out,
                                  usage=usage([c.stats for c in choices]))  # fmt: skip
            return JSONResponse(_dump(body))

        def chunk(index: int, delta: dict, finish: Optional[str] = None, logprobs=None) -> bytes:
            c = ChatCompletionChunk(id=rid, created=created, model=model_id,
                                    choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish,
                                                         logprobs=logprobs)])  # fmt: skip
            return _sse(_dump(c))

        async def events():
            calls = [0] * req.n
            for i in range(req.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            stream = _ReplyStream(job, request, req.n, lambda items, i: chat_logprobs(items, token_text)
                                  if req.logprobs is not None else None)  # fmt: skip
            try:
                async for kind, item, logprobs in stream:
                    if kind == "keepalive":
                        yield b": keepalive\n\n"
                    elif kind == "finish":
                        yield chunk(item.choice, {}, openai_finish_reason(item.finish_reason), logprobs)
                    elif item.kind == "tool_call":
                        if not req.parallel_tool_calls and calls[item.choice]:
                            continue
                        for delta in tool_call_deltas(calls[item.choice], item.tool_call):
                            yield chunk(item.choice, delta)
                        calls[item.choice] += 1
                    else:
                        key = "reasoning_content" if item.kind == "reasoning" else "content"
                        yield chunk(item.choice, {key: item.text}, None, logprobs)
                if req.include_usage and stream.complete:
                    u = ChatCompletionChunk(id=rid, created=created, model=model_id, choices=[],
                                            usage=usage(stream.stats))  # fmt: skip
                    yield _sse(_dump(u))
                yield _sse("[DONE]")
            except Exception as e:  # after the 200 header: report it in the stream
                yield _stream_error(e)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ...................................................... completions
    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request):
        req = parse_completion_request(await read_json(request), server.defaults)
        prompt = await run_in_threadpool(prepare, engine.prepare_text, req.prompt)
        job = server.worker.submit(prompt, req.settings, n=req.n, logprobs=req.logprobs)
        rid, created, model_id = f"cmpl-{uuid.uuid4().hex}", int(time.time()), server.model_id
        # Plain completion: the text as generated, think and tool tags included (raw prompt).
        if not req.stream:
            choices = await _collect(job, request, req.n)
            if choices is None:
                return Response(status_code=499)
            out = [
                CompletionChoice(
                    index=i, text="".join(c.content), finish_reason=openai_finish_reason(c.stats.finish_reason),
                    logprobs=completion_logprobs(c.logprobs, token_text) if req.logprobs is not None else None,
                )
                for i, c in enumerate(choices)
            ]  # fmt: skip
            body = Completion(id=rid, created=created, model=model_id, choices=out,
                              usage=usage([c.stats for c in choices]))  # fmt: skip
            return JSONResponse(_dump(body))

        def chunk(index: int, text: str, finish: Optional[str] = None, logprobs=None) -> bytes:
            c = Completion(
                id=rid,
                created=created,
                model=model_id,
                choices=[CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)],
            )
            return _sse(_dump(c))

        async def events():
            offsets = [0] * req.n

            def logprobs_of(items: List[TokenLogprob], i: int):
                if req.logprobs is None:
                    return None
                out = completion_logprobs(items, token_text, offsets[i])
                offsets[i] += sum(len(t) for t in out["tokens"])
                return out

            stream = _ReplyStream(job, request, req.n, logprobs_of)
            try:
                async for kind, item, logprobs in stream:
                    if kind == "keepalive":
                        yield b": keepalive\n\n"
                    elif kind == "finish":
                        yield chunk(item.choice, "", openai_finish_reason(item.finish_reason), logprobs)
                    else:
                        yield chunk(item.choice, item.text, None, logprobs)
                if req.include_usage and stream.complete:
                    u = Completion(id=rid, created=created, model=model_id, choices=[], usage=usage(stream.stats))
                    yield _sse(_dump(u))
                yield _sse("[DONE]")
            except Exception as e:
                yield _stream_error(e)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ......................................................... responses
    @app.post("/v1/responses")
    @app.post("/responses")
    async def responses(request: Request):
        call = parse_responses_request(await read_json(request), store, server.defaults)

        def build():
            prompt = prepare(engine.prepare, call.messages, call.tools or None, None, call.parse_tools)
            return prompt, build_grammar(engine, call.structured, prompt.opens_think)

        prompt, grammar = await run_in_threadpool(build)
        job = server.worker.submit(prompt, call.settings, grammar=grammar)

        def count_tokens(text: str) -> int:
            return len(engine.tokenizer.encode(text, add_special_tokens=False))

        builder = ResponseBuilder(call, server.model_id, count_tokens)

        def keep(response: dict) -> None:
            if call.request.store is not False:
                store.put(response, builder.conversation())

        if not call.request.stream:
            stats = None
            async for item in reply_items(job, request, stream=False):
                if isinstance(item, ReplyStats):
                    stats = item
                    _log_stats(item)
                else:
                    builder.feed(item)
            if stats is None:
                return Response(status_code=499)
            builder.finish(stats)
            response = builder.response(builder.status)
            keep(response)
            return JSONResponse(response)

        async def events():
            for e in builder.start():
                yield _sse(e, e["type"])
            try:
                async for item in reply_items(job, request, stream=True):
                    if item is _KEEPALIVE:
                        yield b": keepalive\n\n"
                        continue
                    if isinstance(item, ReplyStats):
                        _log_stats(item)
                        done = builder.finish(item)
                        keep(done[-1]["response"])
                    else:
                        done = builder.feed(item)
                    for e in done:
                        yield _sse(e, e["type"])
            except Exception as e:
                err = _as_api_error(e)
                yield _sse({"type": "error", "sequence_number": builder.sequence, "code": err.code,
                            "message": err.message, "param": err.param}, "error")  # fmt: skip

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        found = store.get(response_id)
        if found is None:
            raise ApiError(404, f"no stored response with id '{response_id}'", code="not_found")
        return found[0]

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        if not store.delete(response_id):
            raise ApiError(404, f"no stored response with id '{response_id}'", code="not_found")
        return {"id": response_id, "object": "response", "deleted": True}

    return Limits(app, server)


def _as_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    log.error("generation failed", exc_info=e)
    return ApiError(500, "generation failed (see the server log)", type="server_error")


def _stream_error(e: Exception) -> bytes:
    return _sse(_as_api_error(e).body()) + _sse("[DONE]")


# ------------------------------------------------------------------ running
class QnextServer:
    """A listening server: uvicorn on a socket bound before the model loads, the
    :class:`ServerApp` behind it. ``server_address`` is ``(host, port)``."""

    def __init__(self, sock: socket.socket, app: Optional[ServerApp] = None):
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        self.app: Optional[ServerApp] = app
        self._uvicorn: Optional[uvicorn.Server] = None
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (or Ctrl-C on the main thread: KeyboardInterrupt)."""
        config = uvicorn.Config(create_app(self.app), log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3, ws="none", backlog=256)  # fmt: skip
        self._uvicorn = uvicorn.Server(config)
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serving (running replies are cancelled first) and wait for it."""
        if self.app is not None:
            self.app.worker.stop()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            self._stopped.wait(30)

    def wait_started(self, timeout: float = 30.0) -> bool:
        """Block until uvicorn accepts connections (True) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._uvicorn is not None and self._uvicorn.started:
                return True
            if self._stopped.is_set():
                return False
            time.sleep(0.01)
        return False

    def server_close(self) -> None:
        try:
            self.socket.close()
        except OSError:
            pass


def make_server(
    load_engine: Callable[[], ChatEngine],
    model_id: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    **app_kwargs,
) -> QnextServer:
    """A listening server (not yet serving: call ``serve_forever()``); ``port=0`` picks a free port.

    ``load_engine()`` builds the :class:`ChatEngine` (loads the model); it runs on the
    worker thread, which owns the model from then on. ``app_kwargs`` go to :class:`ServerApp`.
    """
    try:  # listen first: a busy port fails before a long model load
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(256)
        sock.set_inheritable(True)
    except OSError as e:
        raise QnextError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server = QnextServer(sock)
    try:
        server.app = ServerApp(load_engine, model_id, **app_kwargs)
    except BaseException:
        server.server_close()
        raise
    return server


def start_in_thread(
    load_engine: Callable[[], ChatEngine], model_id: str, host: str = DEFAULT_HOST, port: int = 0, **app_kwargs
) -> QnextServer:
    """Start a server on a background thread (for tests and embedding); stop it with
    :func:`stop_server`. Its address is ``server.server_address``."""
    server = make_server(load_engine, model_id, host, port, **app_kwargs)
    thread = threading.Thread(target=server.serve_forever, name="qnext-mlx-http", daemon=True)
    thread.start()
    server.wait_started()
    return server


def stop_server(server: QnextServer) -> None:
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
