"""Text around the token stream: prompts in, stop strings and think spans out.

* :func:`encode_prompt`, :func:`format_prompt` (the chat template) and
  :func:`static_prefix_len` (where a reusable system-prompt checkpoint goes);
* :func:`stop_holdback`: how much streamed text to hold back because it may be
  the start of a stop string (or of a tag);
* :class:`ThinkFilter`: removes ``<think>...</think>`` spans from streamed text.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from ..errors import QnextError

__all__ = [
    "ThinkFilter",
    "encode_prompt",
    "format_prompt",
    "prompt_opens_think",
    "static_prefix_len",
    "stop_holdback",
]


def encode_prompt(tokenizer, prompt: Union[str, Sequence[int], mx.array]) -> List[int]:
    """Token ids ``[L]`` of a text (with the BOS token unless the text starts with it) or of ids."""
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        add_special = bos is None or not prompt.startswith(bos)
        return list(tokenizer.encode(prompt, add_special_tokens=add_special))
    if isinstance(prompt, mx.array):
        return prompt.reshape(-1).tolist()
    return [int(t) for t in prompt]


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could begin a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def format_prompt(tokenizer, prompt: str, system: Optional[str] = None, chat_template: bool = True) -> str:
    """The text to feed the model: ``prompt`` in the tokenizer's chat template (ChatML
    for Qwen: ``<|im_start|>user ... <|im_end|>``, then the assistant turn), or as is."""
    if not chat_template:
        return prompt if system is None else f"{system}\n\n{prompt}"
    if getattr(tokenizer, "chat_template", None) is None:
        raise QnextError("this tokenizer has no chat template; pass --no-chat-template to send the prompt as is")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def static_prefix_len(tokenizer, prompt: str, system: Optional[str]) -> int:
    """Tokens of the chat-formatted prompt that do not depend on ``prompt`` (the system
    message and the user turn's header): a checkpoint there lets later prompts with the
    same system message skip it. 0 without a system message."""
    if not system:
        return 0
    other = "y" if prompt.startswith("x") else "x"
    a, b = (tokenizer.encode(format_prompt(tokenizer, p, system), add_special_tokens=False) for p in (prompt, other))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class ThinkFilter:
    """Streaming splitter of ``<think>...</think>`` spans in text pieces.

    Pieces may split a tag anywhere; a possible partial tag is held back until
    the next piece decides. ``inside=True`` starts within a think span (thinking
    models' templates open ``<think>`` in the prompt, so the reply only closes it).
    :meth:`feed` returns the visible text (think spans removed; whitespace right
    after ``</think>`` dropped too); :meth:`feed_parts` returns both kinds, as
    ``("reasoning" | "content", text)`` pairs, with the reasoning's surrounding
    whitespace dropped, so an empty think block gives no part at all.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, inside: bool = False):
        self.inside = inside
        self._buf = ""
        self._strip = False  # drop whitespace just after a closing tag
        self._strip_reasoning = inside  # drop whitespace at the start of a think span

    def feed_parts(self, text: str) -> List[Tuple[str, str]]:
        """``[(kind, text)]`` that can be shown now (kind ``"reasoning"`` or ``"content"``)."""
        self._buf += text
        out: List[Tuple[str, str]] = []
        while True:
            tag = self.CLOSE if self.inside else self.OPEN
            i = self._buf.find(tag)
            if i < 0:
                hold = stop_holdback(self._buf, [tag])
                ready = self._buf[: len(self._buf) - hold]
                if self.inside:  # trailing whitespace may end the span: hold it until text follows
                    ready = ready.rstrip()
                self._buf = self._buf[len(ready) :]
                self._add(out, ready)
                break
            before = self._buf[:i]
            self._add(out, before.rstrip() if self.inside else before)
            if self.inside:
                self._strip = True
            else:
                self._strip_reasoning = True
            self._buf = self._buf[i + len(tag) :]
            self.inside = not self.inside
        return out

    def feed(self, text: str) -> str:
        """Filtered text that can be shown now."""
        return "".join(t for kind, t in self.feed_parts(text) if kind == "content")

    def _add(self, out: List[Tuple[str, str]], text: str) -> None:
        if self.inside:
            if self._strip_reasoning:
                text = text.lstrip()
                self._strip_reasoning = not text
            kind = "reasoning"
        else:
            text = self._visible(text)
            kind = "content"
        if text:
            out.append((kind, text))

    def _visible(self, text: str) -> str:
        if self._strip:
            stripped = text.lstrip()
            if stripped:
                self._strip = False
            return stripped
        return text

    def flush_parts(self) -> List[Tuple[str, str]]:
        """Whatever is still held back, as :meth:`feed_parts` pairs (an unfinished
        tag outside a think span is content; inside, the rest of the reasoning)."""
        text, self._buf = self._buf, ""
        out: List[Tuple[str, str]] = []
        self._add(out, text.rstrip() if self.inside else text)
        return out

    def flush(self) -> str:
        """Whatever is still held back (an unfinished tag outside a think span)."""
        return "".join(t for kind, t in self.flush_parts() if kind == "content")


def prompt_opens_think(prompt_text: str) -> bool:
    """True when the formatted prompt leaves a ``<think>`` span open (thinking templates)."""
    return prompt_text.rfind(ThinkFilter.OPEN) > prompt_text.rfind(ThinkFilter.CLOSE)
