"""``python -m qnext_mlx.server``: the OpenAI-compatible HTTP server.

    python -m qnext_mlx.server [--model PATH_OR_REPO] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints and how the server is put together: :mod:`qnext_mlx.serve.http`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from .cli import (
    MODEL_HELP,
    ParallelRun,
    Parser,
    add_kv_arguments,
    add_parallel_arguments,
    add_rope_arguments,
    add_sampling_arguments,
    ranged,
    run_cli,
)
from .engine.batch import DEFAULT_MAX_BATCH
from .engine.sampling import DEFAULT_MAX_TOKENS
from .serve.chat_session import DEFAULT_PREFIX_CACHE_BYTES, ChatEngine, SamplingSettings, load_chat_engine
from .serve.http import (
    DEFAULT_HOST,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_PORT,
    is_loopback,
    make_server,
)

API_KEY_ENV = "QNEXT_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m qnext_mlx.server",
        description="OpenAI-compatible server for Qwen3-Next in MLX (chat, completions, tool calls).",
    )
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 opens it "
        f"to your network: set --api-key then)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer KEY' on every request but /health (default: ${API_KEY_ENV}; "
        "unset: no authentication)",
    )
    p.add_argument(
        "--max-stored-responses",
        type=ranged(int, 0),
        default=256,
        help="/v1/responses kept for previous_response_id (least recently used dropped; default 256)",
    )
    p.add_argument(
        "--port",
        type=ranged(int, 0, 65535),
        default=DEFAULT_PORT,
        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    p.add_argument("--model-id", help="the model name clients see (default: the folder or repo name)")
    p.add_argument(
        "--max-queue",
        type=ranged(int, 1),
        default=DEFAULT_MAX_QUEUE,
        help=f"requests that may wait for the model; more are answered 503 (default {DEFAULT_MAX_QUEUE})",
    )
    p.add_argument(
        "--max-batch",
        type=ranged(int, 1, 256),
        default=DEFAULT_MAX_BATCH,
        help=f"requests decoded together in one batch (default {DEFAULT_MAX_BATCH})",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=ranged(float, 0),
        default=DEFAULT_PREFIX_CACHE_BYTES / 2**20,
        help="memory for the states kept for prefix reuse across requests and turns, in MiB "
        f"(default {DEFAULT_PREFIX_CACHE_BYTES // 2**20}; 0 turns reuse off)",
    )
    p.add_argument(
        "--max-request-mb",
        type=ranged(float, 0, lo_open=True),
        default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
        help="largest request body in MiB (default 8)",
    )
    add_kv_arguments(p, group_size=False)
    p.add_argument(
        "--max-tokens",
        type=ranged(int, 1),
        default=DEFAULT_MAX_TOKENS,
        help=f"default reply length limit (default {DEFAULT_MAX_TOKENS})",
    )
    add_sampling_arguments(p, prefix="requests' default ")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    # --max-context N: the longest prompt + reply, and YaRN when N exceeds the native window
    add_rope_arguments(p)
    add_parallel_arguments(p)
    return p


def _run(args) -> int:
    with ParallelRun(args.parallel) as run:
        return _serve(args, run)


def _serve(args, run: ParallelRun) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    names = {}

    def load_engine() -> ChatEngine:
        engine, names["model"] = load_chat_engine(
            args.model,
            quiet=not run.leader,
            max_batch=args.max_batch,
            max_waiting=args.max_queue,
            prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
            kv_bits=args.kv_bits,
            max_context=args.max_context,
            rope_args=args,
            parallel=args.parallel,
            group=run.group,
        )
        return engine

    if not run.leader:  # the other ranks of a parallel run: no HTTP, the engine in step with rank 0's
        load_engine().engine.follow()
        return 0

    defaults = SamplingSettings(
        temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, max_tokens=args.max_tokens
    )
    print("loading the model ...", file=sys.stderr, flush=True)
    server = make_server(
        load_engine,
        args.model_id or "",
        args.host,
        args.port,
        max_queue=args.max_queue,
        max_request_bytes=int(args.max_request_mb * 2**20),
        defaults=defaults,
        api_key=args.api_key,
        max_stored_responses=args.max_stored_responses,
    )
    model_id = server.app.model_id = args.model_id or names["model"]
    host, port = server.server_address[:2]
    if not is_loopback(args.host) and not args.api_key:
        print(
            f"warning: listening on {args.host}, reachable from other machines, without an API key: "
            f"anyone who can reach it can use it (set --api-key or ${API_KEY_ENV})",
            file=sys.stderr,
        )
    print(f"serving {model_id} at http://{host}:{port}/v1 (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()  # uvicorn stops on Ctrl-C, then raises it again here
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.app.close()
    print("stopped", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status (2 for user errors)."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
