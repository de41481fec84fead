"""Terminal chat.

    python -m qnext_mlx.chat [--model PATH_OR_REPO] [--system TEXT] [sampling options]

Replies stream as they are generated; the model's thinking (``<think>`` spans) is
shown dimmed; after each reply a line gives tokens/s, the prompt tokens reused
from the cache, and the context used. The conversation stays in the prompt
cache, so a follow-up only prefills the new message.

Commands: ``/reset``, ``/save FILE``, ``/load FILE``, ``/system TEXT``, ``/help``,
``/quit`` (or Ctrl-D). Ctrl-C stops a reply (what was written is kept).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Callable, Optional, Sequence, TextIO

from .chat_session import (
    ChatEngine,
    ChatError,
    ChatSession,
    ReplyStats,
    SamplingSettings,
    end_mlx_thread,
    load_chat_engine,
)
from .errors import QnextError, run_cli
from .generate import (
    DEFAULT_MAX_TOKENS,
    _Parser,
    _ranged,
    add_sampling_arguments,
)
from .rope import add_rope_arguments

DIM, RESET = "\x1b[2m", "\x1b[0m"
HELP = """commands:
  /reset          start a new conversation (the system message stays)
  /save FILE      save the conversation (JSON) and its prompt cache
  /load FILE      load a conversation saved with /save
  /system TEXT    set the system message ("/system" alone shows it, "/system -" clears it)
  /help           this list
  /quit           leave (or Ctrl-D); Ctrl-C stops a reply"""


def format_stats(stats: ReplyStats) -> str:
    """The line shown after a reply."""
    parts = [f"{stats.generation_tokens} tokens, {stats.generation_tps:.1f} tok/s",
             f"prompt {stats.prompt_tokens} tokens ({stats.cached_tokens} cached), {stats.prompt_tps:.0f} tok/s",
             f"context {stats.context_tokens}/{stats.max_context}"]
    if stats.finish_reason == "length":
        parts.append("stopped at the token limit")
    elif stats.finish_reason == "cancelled":
        parts.append("stopped")
    return "[" + " | ".join(parts) + "]"


class _CtrlC:
    """While generating, Ctrl-C sets a flag instead of raising: the reply stops after
    the current token, or during a long prompt's prefill after the current chunk
    (:meth:`ChatEngine.generate <qnext_mlx.chat_session.ChatEngine.generate>` checks
    the flag between both). A second Ctrl-C raises KeyboardInterrupt as usual."""

    def __init__(self):
        self.flag = threading.Event()
        self._old = None

    def __enter__(self):
        self.flag.clear()
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag.is_set():
            raise KeyboardInterrupt
        self.flag.set()

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


class ChatREPL:
    """The read-reply loop over a :class:`ChatSession` (``input_fn`` and ``out`` make it testable)."""

    def __init__(self, session: ChatSession, out: TextIO = sys.stdout, color: bool = False,
                 input_fn: Callable[[str], str] = input):
        self.session = session
        self.out = out
        self.color = color
        self.input = input_fn

    def dim(self, text: str) -> str:
        return f"{DIM}{text}{RESET}" if self.color else text

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run(self) -> int:
        while True:
            try:
                line = self.input(">>> ")
            except EOFError:
                self.say()
                return 0
            except KeyboardInterrupt:
                self.say("^C (Ctrl-D or /quit to leave)")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "quit":
                    return 0
                continue
            self.reply(line)

    # ---------------------------------------------------------- commands
    def command(self, line: str) -> Optional[str]:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if name in ("/quit", "/exit", "/bye"):
                return "quit"
            if name == "/help":
                self.say(HELP)
            elif name == "/reset":
                self.session.reset()
                self.say("new conversation")
            elif name == "/system":
                if not arg:
                    self.say(f"system message: {self.session.system!r}" if self.session.system
                             else "no system message")
                else:
                    self.session.system = None if arg == "-" else arg
                    self.say("system message cleared" if arg == "-" else "system message set")
            elif name in ("/save", "/load"):
                if not arg:
                    self.say(f"usage: {name} FILE")
                elif name == "/save":
                    self.session.save(arg, with_cache=True)
                    self.say(f"saved {len(self.session.messages)} messages to {arg}")
                else:
                    note = self.session.load(arg, with_cache=True)
                    if note:
                        self.say(self.dim(note))
                    self.say(f"loaded {len(self.session.messages)} messages from {arg}")
                    self.show_history()
            else:
                self.say(f"unknown command {name}; /help lists the commands")
        except QnextError as e:
            self.say(f"error: {e}")
        return None

    def show_history(self) -> None:
        if self.session.system:
            self.say(self.dim(f"[system] {self.session.system}"))
        for m in self.session.messages:
            who = ">>> " if m["role"] == "user" else ""
            self.say(f"{who}{m.get('content') or ''}")

    # ------------------------------------------------------------- reply
    def reply(self, text: str) -> None:
        thinking = False
        try:
            with _CtrlC() as ctrl_c:
                for item in self.session.send(text, cancel=ctrl_c.flag.is_set):
                    if isinstance(item, ReplyStats):
                        if thinking:
                            self.out.write(self.end_thinking())
                        self.out.write("\n" + self.dim(format_stats(item)) + "\n")
                    elif item.kind == "reasoning":
                        if not thinking:
                            self.out.write(self.begin_thinking())
                            thinking = True
                        self.out.write(item.text)
                    elif item.kind == "content":
                        if thinking:
                            self.out.write(self.end_thinking())
                            thinking = False
                        self.out.write(item.text)
                    self.out.flush()
        except ChatError as e:
            self.say(f"error: {e}")
        except KeyboardInterrupt:  # a second Ctrl-C: the reply is abandoned at once
            self.say(self.dim("\n[interrupted]"))

    def begin_thinking(self) -> str:
        return DIM if self.color else "[thinking]\n"

    def end_thinking(self) -> str:
        return RESET + "\n\n" if self.color else "\n[/thinking]\n"


# ---------------------------------------------------------------------- CLI
def add_model_options(p: argparse.ArgumentParser) -> None:
    """Model and sampling options shared by the chat and the desktop app."""
    p.add_argument("--model", help="model folder or Hugging Face repo id (default: the bundled demo model)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-tokens", type=_ranged(int, 1), default=DEFAULT_MAX_TOKENS,
                   help=f"most tokens per reply (default {DEFAULT_MAX_TOKENS})")
    add_sampling_arguments(p)
    p.add_argument("--presence-penalty", type=_ranged(float, -2, 2), default=0.0,
                   help="penalty for tokens already generated, 0..2 against repetition (default 0)")
    p.add_argument("--seed", type=_ranged(int, 0, 2**64 - 1), default=None, help="random seed")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help="quantize the attention KV cache")
    # --max-context N: the conversation limit, and YaRN when N exceeds the native window
    add_rope_arguments(p)


def settings_from_args(args) -> SamplingSettings:
    return SamplingSettings(temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            presence_penalty=args.presence_penalty, max_tokens=args.max_tokens, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m qnext_mlx.chat", description="Chat with Qwen3-Next in the terminal.")
    add_model_options(p)
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="dim the thinking and stats (auto: when the output is a terminal)")
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
    name = "model"
    if engine is None:
        print("loading the model ...", file=sys.stderr, flush=True)
        engine, name = load_chat_engine(args.model, cache_size=1, kv_bits=args.kv_bits,
                                        max_context=args.max_context, rope_args=args)
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
    return ChatREPL(session, sys.stdout, color).run()


if __name__ == "__main__":
    sys.exit(main())
