"""Structured outputs: what a request requires of its reply, as a grammar for the engine.

* ``response_format`` ``json_schema`` / ``json_object``: one JSON document of the schema;
* ``tool_choice`` ``"required"`` or a named function: Qwen3 tool calls,
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, whose arguments match
  the tool's parameter schema; several calls, one per line, unless ``parallel_tool_calls``
  is false.

JSON is written as Qwen writes it (``", "`` and ``": "`` separators, no other whitespace).
For a prompt that leaves ``<think>`` open (Thinking models) the reasoning stays free: the
grammar starts after ``</think>`` and allows the two newlines Qwen writes there. The grammar
itself is enforced token by token in the batch engine
(:class:`~qnext_mlx.engine.constraint.GrammarConstraint`).
"""

from __future__ import annotations

import json
from typing import Optional

from ..engine.constraint import Grammar, GrammarError, GrammarTokenizer, json_grammar
from .chat_session import ChatEngine
from .protocol import Structured, bad_request
from .reply import TOOL_CLOSE, TOOL_OPEN

__all__ = ["build_grammar", "grammar_text"]


def grammar_text(tokenizer: GrammarTokenizer, structured: Structured, after_think: bool) -> str:
    """The Lark grammar (llguidance's dialect) of ``structured``."""
    lead = '"\\n"? "\\n"? ' if after_think else ""
    if structured.kind in ("json_schema", "json_object"):
        return f"start: {lead}answer\n{json_grammar(structured.schema or {'type': 'object'}, 'answer')}\n"
    rules = []
    names = []
    for i, (name, parameters) in enumerate(structured.tools.items()):
        call = {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        rules.append(json_grammar(call, f"call_{i}"))
        names.append(f"call_{i}")
    one = f'{tokenizer.literal(TOOL_OPEN)} "\\n" ({" | ".join(names)}) "\\n" {tokenizer.literal(TOOL_CLOSE)}'
    calls = 'tool_call ("\\n" tool_call)*' if structured.parallel else "tool_call"
    return "\n".join([f"start: {lead}{calls}", f"tool_call: {one}"] + rules) + "\n"


def build_grammar(engine: ChatEngine, structured: Optional[Structured], opens_think: bool) -> Optional[Grammar]:
    """The compiled grammar of a request (None: free text); raises a 400 ``ApiError``
    for a schema the grammar engine cannot compile."""
    if structured is None:
        return None
    tokenizer = engine.grammar_tokenizer()
    after = engine.think_end_id if opens_think else None
    text = grammar_text(tokenizer, structured, after is not None)
    try:
        return Grammar(tokenizer, text, start_after=after)
    except GrammarError as e:
        param = "tools" if structured.kind == "tools" else "response_format"
        schema = json.dumps(structured.schema)[:200] if structured.schema else ""
        raise bad_request(param, f"{e}{f' (schema {schema})' if schema else ''}", code="invalid_schema") from None
