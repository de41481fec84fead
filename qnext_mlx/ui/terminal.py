"""Terminal chat (its command line is :mod:`qnext_mlx.chat`).

Replies stream as they are generated; the model's thinking (``<think>`` spans) is
shown dimmed; after each reply a line gives tokens/s, the prompt tokens reused
from the cache, and the context used. The conversation stays in the prompt
cache, so a follow-up only prefills the new message.

Commands: ``/reset``, ``/save FILE``, ``/load FILE``, ``/system TEXT``, ``/help``,
``/quit`` (or Ctrl-D). Ctrl-C stops a reply (what was written is kept).
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable, Optional, TextIO

from ..errors import QnextError
from ..serve.chat_session import ChatError, ChatSession, ReplyStats

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
    parts = [
        f"{stats.generation_tokens} tokens, {stats.generation_tps:.1f} tok/s",
        f"prompt {stats.prompt_tokens} tokens ({stats.cached_tokens} cached), {stats.prompt_tps:.0f} tok/s",
        f"context {stats.context_tokens}/{stats.max_context}",
    ]
    if stats.finish_reason == "length":
        parts.append("stopped at the token limit")
    elif stats.finish_reason == "cancelled":
        parts.append("stopped")
    return "[" + " | ".join(parts) + "]"


class CtrlCFlag:
    """While generating, Ctrl-C sets a flag instead of raising: the reply stops after
    the current token, or during a long prompt's prefill after the current chunk
    (:meth:`ChatEngine.generate <qnext_mlx.serve.chat_session.ChatEngine.generate>` checks
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

    def __init__(
        self,
        session: ChatSession,
        out: TextIO = sys.stdout,
        color: bool = False,
        input_fn: Callable[[str], str] = input,
    ):
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
                    self.say(f"system message: {self.session.system!r}" if self.session.system else "no system message")
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
        show = ReasoningPrinter(self.out, self.color)
        try:
            with CtrlCFlag() as ctrl_c:
                for item in self.session.send(text, cancel=ctrl_c.flag.is_set):
                    if isinstance(item, ReplyStats):
                        show.close()
                        self.out.write("\n" + self.dim(format_stats(item)) + "\n")
                        self.out.flush()
                    elif item.kind in ("reasoning", "content"):
                        show.write([(item.kind, item.text)])
        except ChatError as e:
            self.say(f"error: {e}")
        except KeyboardInterrupt:  # a second Ctrl-C: the reply is abandoned at once
            self.say(self.dim("\n[interrupted]"))


class ReasoningPrinter:
    """Writes :meth:`ThinkFilter.feed_parts` pieces (or a reply's deltas as such pairs):
    the reasoning between the thinking markers (dimmed with colour, else ``[thinking]`` ... ``[/thinking]``),
    or not at all with ``hide``; an empty think block shows nothing."""

    def __init__(self, out, color: bool, hide: bool = False):
        self.out, self.color, self.hide = out, color, hide
        self.thinking = False

    def write(self, parts) -> None:
        for kind, text in parts:
            if kind == "reasoning":
                if self.hide:
                    continue
                if not self.thinking:
                    self.out.write(begin_thinking(self.color))
                    self.thinking = True
            else:
                self.close()
            self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        """End a reasoning section that is still open."""
        if self.thinking:
            self.out.write(end_thinking(self.color))
            self.thinking = False


def begin_thinking(color: bool) -> str:
    """What goes before shown reasoning: dim on (colour), or a ``[thinking]`` line."""
    return DIM if color else "[thinking]\n"


def end_thinking(color: bool) -> str:
    """What goes after shown reasoning, before the answer: dim off and a blank line, or ``[/thinking]``."""
    return RESET + "\n\n" if color else "\n[/thinking]\n"
