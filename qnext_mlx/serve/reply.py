"""The reply parser: streamed reply text -> reasoning, answer text and Qwen3 tool calls.

Qwen3-Next writes its reasoning in ``<think>...</think>`` (thinking models'
templates open ``<think>`` in the prompt, so the reply only closes it) and tool
calls as ``<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import List, Optional

from ..engine.text import stop_holdback

__all__ = [
    "Delta",
    "ReplyParser",
    "THINK_CLOSE",
    "THINK_OPEN",
    "TOOL_CLOSE",
    "TOOL_OPEN",
    "ToolCall",
    "parse_tool_call",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    """One function call of the reply: ``arguments`` is a JSON text, as OpenAI sends it."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Delta:
    """A piece of the reply: ``kind`` is "reasoning", "content" or "tool_call";
    ``choice``: which of the request's choices it belongs to."""

    kind: str
    text: str = ""
    tool_call: Optional[ToolCall] = None
    choice: int = 0


def parse_tool_call(raw: str) -> Optional[ToolCall]:
    """The call in a ``<tool_call>`` span (``{"name": ..., "arguments": {...}}``), or None
    when it is not such a JSON object."""
    try:
        obj = json.loads(raw.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            json.loads(args)
        except ValueError:
            return None
        return ToolCall(obj["name"], args)
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ReplyParser:
    """Splits streamed reply text into reasoning, answer text and tool calls.

    ``feed(text)`` takes pieces that may split a tag anywhere (a possible partial
    tag is held back until the next piece decides) and returns :class:`Delta`
    objects; ``finish()`` returns what is left. ``in_think=True`` starts inside a
    ``<think>`` span (the prompt opened it). With ``parse_tools``, a ``<tool_call>``
    span holding a valid call becomes a ``tool_call`` delta; an invalid or
    unfinished one is passed on as text, so nothing the model wrote is lost.
    Whitespace around the tags (the template's newlines) is dropped.
    """

    def __init__(self, in_think: bool = False, parse_tools: bool = False, raw: bool = False):
        self.mode = "think" if in_think else "content"
        self.parse_tools = parse_tools
        self.raw = raw
        self.tool_calls: List[ToolCall] = []
        self._buf = ""
        self._strip = in_think  # drop leading whitespace of the next span

    def _tags(self) -> List[str]:
        if self.mode == "think":
            return [THINK_CLOSE]
        if self.mode == "tool":
            return [TOOL_CLOSE]
        return [THINK_OPEN] + ([TOOL_OPEN] if self.parse_tools else [])

    def _emit(self, kind: str, text: str, out: List[Delta]) -> None:
        if self._strip:
            text = text.lstrip()
            if not text:
                return
            self._strip = False
        if text:
            if out and out[-1].kind == kind and kind != "tool_call":
                out[-1].text += text
            else:
                out.append(Delta(kind, text))

    def feed(self, text: str) -> List[Delta]:
        if self.raw:
            return [Delta("content", text)] if text else []
        self._buf += text
        out: List[Delta] = []
        while True:
            tags = self._tags()
            hits = [(i, t) for t in tags for i in [self._buf.find(t)] if i >= 0]
            if not hits:
                hold = stop_holdback(self._buf, tags)
                ready = self._buf[: len(self._buf) - hold]
                if self.mode == "tool":
                    break  # the call is kept whole until its closing tag
                # Trailing whitespace may precede a closing </think> or a <tool_call>
                # (the template's newlines): hold it until more text decides.
                ready = ready.rstrip()
                self._buf = self._buf[len(ready) :]
                self._emit("reasoning" if self.mode == "think" else "content", ready, out)
                break
            i, tag = min(hits)
            before, self._buf = self._buf[:i], self._buf[i + len(tag) :]
            if self.mode == "think":
                self._emit("reasoning", before.rstrip(), out)
                self.mode, self._strip = "content", True
            elif self.mode == "tool":
                call = parse_tool_call(before)
                if call is None:
                    self._emit("content", TOOL_OPEN + before + TOOL_CLOSE, out)
                else:
                    self.tool_calls.append(call)
                    out.append(Delta("tool_call", tool_call=call))
                self.mode, self._strip = "content", True
            elif tag == THINK_OPEN:
                self._emit("content", before, out)
                self.mode, self._strip = "think", True
            else:  # TOOL_OPEN
                self._emit("content", before.rstrip(), out)
                self.mode = "tool"
        return out

    def finish(self) -> List[Delta]:
        """The rest: held-back text; an unfinished think span as reasoning; an
        unfinished tool call as text."""
        out: List[Delta] = []
        text, self._buf = self._buf, ""
        if self.mode == "think":
            self._emit("reasoning", text.rstrip(), out)
        elif self.mode == "tool":
            self._strip = False
            self._emit("content", TOOL_OPEN + text, out)
        else:
            self._emit("content", text, out)
        self.mode = "content"
        return out
