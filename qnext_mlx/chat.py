"""``python -m qnext_mlx.chat``: chat with the model in the terminal.

    python -m qnext_mlx.chat [--model PATH_OR_REPO] [--system TEXT] [sampling options]

Commands: ``/reset``, ``/save FILE``, ``/load FILE``, ``/system TEXT``, ``/help``,
``/quit`` (or Ctrl-D). Ctrl-C stops a reply. The chat itself: :mod:`qnext_mlx.ui.terminal`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .cli import ParallelRun, Parser, add_chat_options, add_parallel_arguments, run_cli, settings_from_args
from .serve.chat_session import ChatEngine, ChatSession, end_mlx_thread, load_chat_engine
from .ui.terminal import ChatREPL


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m qnext_mlx.chat", description="Chat with Qwen3-Next in the terminal.")
    add_chat_options(p)
    p.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="dim the thinking and stats (auto: when the output is a terminal)",
    )
    add_parallel_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None, engine: Optional[ChatEngine] = None) -> int:
    """CLI entry point (``engine``: use this loaded model instead of ``--model``);
    returns the exit status (2 for user errors)."""
    args = build_parser().parse_args(argv)
    try:
        return run_cli(lambda: _run(args, engine))
    finally:
        end_mlx_thread()  # MLX wants its streams closed before the interpreter exits


def _run(args, engine: Optional[ChatEngine]) -> int:
    with ParallelRun(args.parallel if engine is None else None) as run:
        return _chat(args, engine, run)


def _chat(args, engine: Optional[ChatEngine], run: ParallelRun) -> int:
    name = "model"
    if engine is None:
        if run.leader:
            print("loading the model ...", file=sys.stderr, flush=True)
        engine, name = load_chat_engine(args.model, quiet=not run.leader, kv_bits=args.kv_bits,
                                        max_context=args.max_context, rope_args=args, parallel=args.parallel,
                                        group=run.group)  # fmt: skip
        if not run.leader:  # the other ranks: the engine in step with rank 0's, which reads the terminal
            engine.engine.follow()
            return 0
    elif args.max_context:
        engine.max_context = args.max_context
    session = ChatSession(engine, system=args.system, settings=settings_from_args(args))
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:
            pass
    print(f"chatting with {name}: /help for commands, Ctrl-D to leave", flush=True)
    try:
        return ChatREPL(session, sys.stdout, color).run()
    finally:
        engine.engine.stop_followers()


if __name__ == "__main__":
    sys.exit(main())
