"""Constrained decoding: a grammar (llguidance) that masks each sequence's next token.

Why llguidance: at Qwen3-Next's 151,936-token vocabulary its next-token mask costs a
median of 4.5 to 6.4 microseconds per token and compiles a JSON schema in 1 to 2 ms
(``scripts/bench_grammar.py``, ``scripts/results/bench-grammar.json``), against xgrammar's
8 to 16 microseconds and 18 to 23 ms, and it needs neither torch nor triton at run time.

* :class:`GrammarTokenizer`: the model's vocabulary as llguidance sees it (built once per
  tokenizer: about a second at the real vocabulary).
* :class:`Grammar`: one compiled grammar (a Lark grammar, ``%json`` schemas inside), for one
  request; :meth:`Grammar.constraint` gives each of its choices its own matcher.
* :class:`GrammarConstraint`: a logits processor (``processor(tokens [N], logits [1, vocab])``,
  mlx-lm's form) that sets every token the grammar forbids to ``-inf``. It follows the token
  history it is given (consuming new tokens, rolling back ones that are gone), so it works
  in the batch engine's decode step and in speculative decoding alike: MTP drafts are drawn
  from, and verified against, the masked distribution.

Thinking models: with ``start_after`` (the ``</think>`` token), the reasoning is free and
the grammar applies from the token after it, as vLLM does it.
"""

from __future__ import annotations

import json
import threading
from typing import Dict, List, Optional, Sequence

import llguidance
import llguidance.numpy as llg_numpy
import mlx.core as mx
import numpy as np

from ..errors import QnextError

__all__ = [
    "Grammar",
    "GrammarConstraint",
    "GrammarError",
    "GrammarTokenizer",
    "SYNC_WINDOW",
    "grammar_tokenizer",
    "json_grammar",
]

# How far back a token history may change between two calls (speculative rollback):
# more than any number of MTP drafts.
SYNC_WINDOW = 32
# JSON as Qwen writes it (``json.dumps``' separators), with no other whitespace: a model
# that is not sure cannot wander off into endless spaces and newlines.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(QnextError):
    """A grammar or JSON schema that cannot be compiled (the server answers 400)."""


class GrammarTokenizer:
    """The model's vocabulary for llguidance: token ids as the model numbers them
    (``vocab_size`` rows: padding rows are never allowed) and its end-of-sequence ids.

    ``ll``: an ``llguidance.LLTokenizer``; ``encode(text, add_special_tokens=False)`` gives
    token ids. :meth:`from_tokenizer` builds one from the model's tokenizer.
    """

    def __init__(self, ll, vocab_size: int, eos_ids: Sequence[int], encode):
        self.ll = ll
        self.vocab_size = vocab_size
        self.eos_ids = sorted(int(t) for t in eos_ids)
        self._encode = encode

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int) -> "GrammarTokenizer":
        """From an mlx-lm ``TokenizerWrapper`` (or a fast Hugging Face tokenizer)."""
        backend = tokenizer.backend_tokenizer  # the Rust tokenizer of a fast HF tokenizer
        eos = sorted(int(t) for t in tokenizer.eos_token_ids)
        ll = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)
        return cls(ll, vocab_size, eos, tokenizer.encode)

    def literal(self, text: str) -> str:
        """``text`` as a Lark expression: special tokens (``<tool_call>``, ...) as
        ``<[id]>``, other text quoted."""
        ids = self._encode(text, add_special_tokens=False)
        parts, plain = [], []
        for t in ids:
            if self.ll.is_special_token(t):
                if plain:
                    parts.append(json.dumps(self.ll.decode_str(plain)))
                    plain = []
                parts.append(f"<[{t}]>")
            else:
                plain.append(t)
        if plain:
            parts.append(json.dumps(self.ll.decode_str(plain)))
        return " ".join(parts) if parts else '""'


_tokenizers: Dict[int, GrammarTokenizer] = {}
_tokenizers_lock = threading.Lock()


def grammar_tokenizer(tokenizer, vocab_size: int) -> GrammarTokenizer:
    """The :class:`GrammarTokenizer` of ``tokenizer`` (built on first use, then shared)."""
    key = id(tokenizer)
    with _tokenizers_lock:
        found = _tokenizers.get(key)
        if found is None or found.vocab_size != vocab_size:
            found = _tokenizers[key] = GrammarTokenizer.from_tokenizer(tokenizer, vocab_size)
        return found


def json_grammar(schema: dict, name: str = "json") -> str:
    """A Lark rule ``name`` matching JSON documents of ``schema`` in :data:`JSON_STYLE`."""
    styled = dict(schema)
    styled["x-guidance"] = {**JSON_STYLE, **(schema.get("x-guidance") or {})}
    return f"{name}: %json {json.dumps(styled)}"


class Grammar:
    """A compiled grammar: ``lark`` text (llguidance's Lark dialect, ``start`` its first rule).

    ``start_after``: a token id (``</think>``) before which the reply is free; the grammar
    constrains what follows it. Raises :class:`GrammarError` for a grammar or schema that
    does not compile.
    """

    def __init__(self, tokenizer: GrammarTokenizer, lark: str, start_after: Optional[int] = None):
        self.tokenizer = tokenizer
        self.lark = lark
        self.start_after = start_after
        try:
            self._matcher = llguidance.LLMatcher(tokenizer.ll, llguidance.LLMatcher.grammar_from_lark(lark),
                                                 log_level=0)  # fmt: skip
        except (ValueError, TypeError, RuntimeError) as e:
            raise GrammarError(f"the grammar cannot be compiled: {e}") from None
        if self._matcher.is_error():
            raise GrammarError(f"the grammar cannot be compiled: {self._matcher.get_error()}")

    def constraint(self, prompt_len: int) -> "GrammarConstraint":
        """A fresh matcher for one sequence whose prompt has ``prompt_len`` tokens."""
        return GrammarConstraint(self, self._matcher.deep_copy(), prompt_len)


class GrammarConstraint:
    """One sequence's grammar state, as a logits processor (see the module docstring).

    Called with the sequence's tokens so far (``[N]``: prompt then generated) and the next
    token's logits ``[1, vocab]``; returns the logits with forbidden tokens at ``-inf``.
    """

    def __init__(self, grammar: Grammar, matcher, prompt_len: int):
        self.grammar = grammar
        self.matcher = matcher
        self.prompt_len = prompt_len
        self.seen: List[int] = []  # generated tokens taken into account
        # Index in ``seen`` from which the matcher consumes (None: before start_after).
        self.active_from: Optional[int] = 0 if grammar.start_after is None else None
        # Index in ``seen`` of a token the grammar refused (not consumed; nor is what
        # follows it). Plain decoding never draws one; a speculative verify row past an
        # end-of-sequence draft does, and the rollback that follows clears it.
        self.refused_at: Optional[int] = None
        vocab = grammar.tokenizer.vocab_size
        self._bitmask = llg_numpy.allocate_token_bitmask(1, vocab)

    @property
    def active(self) -> bool:
        return self.active_from is not None and self.refused_at is None

    # ......................................................... history
    def sync(self, tokens: mx.array) -> None:
        """Bring the matcher to ``tokens`` (``[N]``, prompt + generated): consume what is
        new, roll back what changed (speculative verification) within :data:`SYNC_WINDOW`."""
        n = tokens.shape[0] - self.prompt_len
        k = len(self.seen)
        base = max(0, min(n, k) - SYNC_WINDOW)
        tail: Sequence[int] = tokens[self.prompt_len + base :].tolist() if n > base else []
        j = 0
        while j < len(tail) and base + j < k and self.seen[base + j] == tail[j]:
            j += 1
        if base + j < k:
            self._rollback_to(base + j)
        for t in tail[j:]:
            self._consume(int(t))

    def _consume(self, token: int) -> None:
        self.seen.append(token)
        if self.refused_at is not None:
            return
        if self.active_from is None:
            if token == self.grammar.start_after:
                self.active_from = len(self.seen)
            return
        # validate first: a refused token would leave the matcher in its error state
        if self.matcher.validate_tokens([token]) != 1:
            self.refused_at = len(self.seen) - 1
            return
        self.matcher.consume_token(token)

    def _consumed(self) -> int:
        if self.active_from is None:
            return 0
        end = self.refused_at if self.refused_at is not None else len(self.seen)
        return end - self.active_from

    def _rollback_to(self, length: int) -> None:
        before = self._consumed()
        del self.seen[length:]
        if self.refused_at is not None and self.refused_at >= length:
            self.refused_at = None
        if self.active_from is not None and length < self.active_from:
            self.active_from = None if self.grammar.start_after is not None else 0
            self.matcher.reset()
            return
        drop = before - self._consumed()
        if drop:
            self.matcher.rollback(drop)

    # ............................................................ mask
    def allowed(self) -> mx.array:
        """``[1, vocab]`` bool: the tokens the grammar allows next."""
        llg_numpy.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        # unpacked by numpy, selected by MLX: the cheapest pair measured at 151,936 tokens
        # (about 0.1 ms on an x86 core, against 0.14 ms unpacking in MLX ops and 0.2 ms+ for
        # numpy selects or lookups)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little", count=self.grammar.tokenizer.vocab_size)
        return mx.array(bits).astype(mx.bool_)[None]

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        self.sync(tokens)
        if not self.active:
            return logits
        return mx.where(self.allowed(), logits, mx.array(-float("inf"), dtype=logits.dtype))

    @property
    def finished(self) -> bool:
        """The grammar is complete (only end-of-sequence can follow)."""
        return self.active and self.matcher.is_stopped()
