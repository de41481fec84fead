"""The OpenAI wire format for the HTTP server (:mod:`qnext_mlx.serve.http`): request validation and response bodies.

No HTTP and no model here, so every rule can be tested on its own:

* :func:`parse_chat_request` / :func:`parse_completion_request` check a decoded JSON
  body field by field (types, ranges, unknown fields, unsupported options) and
  raise :class:`ApiError` (status 400, OpenAI's error shape, ``param`` naming the
  field) for the first problem;
* :func:`chat_chunk`, :func:`chat_completion`, :func:`completion_chunk`,
  :func:`completion`, :func:`usage` build the response objects.

OpenAI fields that change nothing here (``user``, ``metadata``, ``store``,
``parallel_tool_calls``, ...) are accepted; options this server does not implement
(``n`` > 1, ``logprobs``, ``logit_bias``, JSON mode, ...) are refused with a
message rather than silently ignored. Extensions, as in vLLM: ``top_k``,
``min_p``, ``repetition_penalty``, ``chat_template_kwargs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

from .chat_session import ReplyStats, SamplingSettings
from .reply import ToolCall

MAX_STOP_STRINGS = 16


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---------------------------------------------------------------- checkers
def _type_name(v: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
        type(None): "null",
    }.get(type(v), type(v).__name__)


def _number(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False) -> Callable:
    def check(v, name):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _bad(name, f"'{name}' must be a number, got {_type_name(v)}")
        if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and v > hi:
            lo_s = f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else ""
            hi_s = f"<= {hi:g}" if hi is not None else ""
            raise _bad(name, f"'{name}' must be {' and '.join(s for s in (lo_s, hi_s) if s)}, got {v}")
        return float(v)

    return check


def _integer(lo: Optional[int] = None, hi: Optional[int] = None) -> Callable:
    def check(v, name):
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise _bad(name, f"'{name}' must be an integer, got {_type_name(v)}")
        if lo is not None and v < lo or hi is not None and v > hi:
            bounds = " and ".join(
                s for s in (f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "") if s
            )
            raise _bad(name, f"'{name}' must be {bounds}, got {v}")
        return v

    return check


def _boolean(v, name):
    if not isinstance(v, bool):
        raise _bad(name, f"'{name}' must be a boolean, got {_type_name(v)}")
    return v


def _string(v, name):
    if not isinstance(v, str):
        raise _bad(name, f"'{name}' must be a string, got {_type_name(v)}")
    return v


def _object(v, name):
    if not isinstance(v, dict):
        raise _bad(name, f"'{name}' must be an object, got {_type_name(v)}")
    return v


def _any(v, name):
    return v


def _only(allowed: tuple, what: str) -> Callable:
    """A field accepted only at its default values (an option this server does not implement)."""

    def check(v, name):
        if v not in allowed:
            raise _bad(name, f"'{name}' is not supported by this server ({what})", code="unsupported_parameter")
        return v

    return check


def _stop(v, name):
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _bad(name, f"'{name}' must be a string or an array of strings")
    if len(v) > MAX_STOP_STRINGS:
        raise _bad(name, f"'{name}' may hold at most {MAX_STOP_STRINGS} strings, got {len(v)}")
    return [s for s in v if s]


def _stream_options(v, name):
    _object(v, name)
    for k in v:
        if k not in ("include_usage", "continuous_usage_stats"):
            raise _bad(f"{name}.{k}", f"unknown field '{name}.{k}'", code="unknown_parameter")
    if "include_usage" in v and not isinstance(v["include_usage"], bool):
        raise _bad(f"{name}.include_usage", f"'{name}.include_usage' must be a boolean")
    return v


def _response_format(v, name):
    _object(v, name)
    if v.get("type") != "text":
        raise _bad(
            name,
            f"'{name}' type {v.get('type')!r} is not supported by this server (only 'text')",
            code="unsupported_parameter",
        )
    return v


def _logit_bias(v, name):
    if v is None or v == {}:
        return None
    raise _bad(name, f"'{name}' is not supported by this server", code="unsupported_parameter")


def _top_k(v, name):
    v = _integer(-1)(v, name)
    return 0 if v == -1 else v  # -1 means off, as in vLLM


def _seed(v, name):
    return _integer(0, 2**64 - 1)(v, name)


def _template_kwargs(v, name):
    _object(v, name)
    return v


# The sampling fields both endpoints share: name -> checker.
_SAMPLING = {
    "temperature": _number(0, 2),
    "top_p": _number(0, 1, lo_open=True),
    "top_k": _top_k,
    "min_p": _number(0, 1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _only((0, 0.0, None), "use presence_penalty or repetition_penalty"),
    "repetition_penalty": _number(0, lo_open=True),
    "seed": _seed,
    "stop": _stop,
    "max_tokens": _integer(1),
    "n": _only((1, None), "one choice per request"),
    "logit_bias": _logit_bias,
    "user": _string,
    "stream": _boolean,
    "stream_options": _stream_options,
    "model": _string,
}

_CHAT = dict(
    _SAMPLING,
    **{
        "messages": _any,
        "max_completion_tokens": _integer(1),
        "tools": _any,
        "tool_choice": _any,
        "parallel_tool_calls": _boolean,
        "response_format": _response_format,
        "logprobs": _only((False, None), "no log probabilities"),
        "top_logprobs": _only((0, None), "no log probabilities"),
        "metadata": _object,
        "store": _boolean,
        "service_tier": _string,
        "reasoning_effort": _string,
        "chat_template_kwargs": _template_kwargs,
    },
)

_COMPLETION = dict(
    _SAMPLING,
    **{
        "prompt": _any,
        "echo": _only((False, None), "echo"),
        "suffix": _only((None, ""), "suffix"),
        "best_of": _only((1, None), "one choice per request"),
        "logprobs": _only((0, None), "no log probabilities"),
    },
)


def _check_fields(body: Any, spec: Dict[str, Callable]) -> Dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    out = {}
    for name, value in body.items():
        if name not in spec:
            raise _bad(name, f"unknown field '{name}'", code="unknown_parameter")
        if value is None and name not in ("logit_bias",):
            continue  # null means "the default", as OpenAI treats it
        out[name] = spec[name](value, name)
    if "stream_options" in out and not out.get("stream"):
        raise _bad("stream_options", "'stream_options' is only allowed with 'stream': true")
    return out


def _settings(f: Dict[str, Any], defaults: SamplingSettings, max_tokens: Optional[int]) -> SamplingSettings:
    s = SamplingSettings(
        temp=f.get("temperature", defaults.temp),
        top_p=f.get("top_p", defaults.top_p),
        top_k=f.get("top_k", defaults.top_k),
        min_p=f.get("min_p", defaults.min_p),
        presence_penalty=f.get("presence_penalty", defaults.presence_penalty),
        repetition_penalty=f.get("repetition_penalty", defaults.repetition_penalty),
        max_tokens=max_tokens if max_tokens is not None else defaults.max_tokens,
        seed=f.get("seed", defaults.seed),
        stop=f.get("stop", list(defaults.stop)),
    )
    try:
        s.validate()
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return s


# ---------------------------------------------------------------- messages
_ROLES = ("system", "developer", "user", "assistant", "tool")


def _content(v, where: str, nullable: bool) -> Optional[str]:
    if v is None:
        if nullable:
            return None
        raise _bad(where, f"'{where}' must be a string or an array of text parts")
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        parts = []
        for j, part in enumerate(v):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad(f"{where}[{j}]", f"'{where}[{j}]' must be an object with a 'type'")
            if part["type"] != "text":
                raise _bad(
                    f"{where}[{j}]",
                    f"content type {part['type']!r} is not supported by this text-only model",
                    code="unsupported_content",
                )
            if not isinstance(part.get("text"), str):
                raise _bad(f"{where}[{j}].text", f"'{where}[{j}].text' must be a string")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(where, f"'{where}' must be a string or an array of text parts, got {_type_name(v)}")


def _tool_calls(v, where: str) -> List[dict]:
    if not isinstance(v, list):
        raise _bad(where, f"'{where}' must be an array")
    out = []
    for j, tc in enumerate(v):
        w = f"{where}[{j}]"
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(w, f"'{w}' must be an object with 'function': {{'name', 'arguments'}}")
        args = fn.get("arguments", "{}")
        if not isinstance(args, (str, dict)):
            raise _bad(f"{w}.function.arguments", f"'{w}.function.arguments' must be a JSON string")
        out.append({"id": tc.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def parse_messages(messages: Any) -> List[dict]:
    """Check OpenAI chat messages and return them with text content (parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty array")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"'{where}' must be an object, got {_type_name(m)}")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"{where}.role", f"'{where}.role' must be one of {', '.join(_ROLES)}, got {role!r}")
        # Other keys in a message are ignored: agent frameworks keep their own
        # bookkeeping there (Qwen-Agent sends "extra"); the request's fields are checked strictly.
        msg = {"role": role, "content": _content(m.get("content"), f"{where}.content", nullable=role == "assistant")}
        if role == "assistant":
            if m.get("tool_calls"):
                msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if reasoning is not None:
                msg["reasoning_content"] = _string(reasoning, f"{where}.reasoning_content")
        if role == "tool" and m.get("tool_call_id") is not None:
            msg["tool_call_id"] = _string(m["tool_call_id"], f"{where}.tool_call_id")
        if m.get("name") is not None:
            msg["name"] = _string(m["name"], f"{where}.name")
        out.append(msg)
    return out


def parse_tools(tools: Any) -> List[dict]:
    """Check OpenAI function tools: ``[{"type": "function", "function": {"name", "description", "parameters"}}]``."""
    if not isinstance(tools, list):
        raise _bad("tools", "'tools' must be an array")
    out = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if (
            not isinstance(t, dict)
            or t.get("type", "function") != "function"
            or not isinstance(t.get("function"), dict)
        ):
            raise _bad(where, f"'{where}' must be {{'type': 'function', 'function': {{...}}}}")
        fn = t["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"{where}.function.name", f"'{where}.function.name' must be a non-empty string")
        for k in ("description",):
            if k in fn and fn[k] is not None and not isinstance(fn[k], str):
                raise _bad(f"{where}.function.{k}", f"'{where}.function.{k}' must be a string")
        # A JSON schema object; Qwen-Agent's own tools may also give a list of parameters.
        if "parameters" in fn and fn["parameters"] is not None and not isinstance(fn["parameters"], (dict, list)):
            raise _bad(f"{where}.function.parameters", f"'{where}.function.parameters' must be a JSON schema object")
        out.append({"type": "function", "function": fn})
    return out


# ---------------------------------------------------------------- requests
@dataclass
class ChatRequest:
    messages: List[dict]
    settings: SamplingSettings
    tools: List[dict] = field(default_factory=list)
    parse_tools: bool = False
    stream: bool = False
    include_usage: bool = False
    template_kwargs: Dict[str, Any] = field(default_factory=dict)
    model: Optional[str] = None


@dataclass
class CompletionRequest:
    prompt: Union[str, List[int]]
    settings: SamplingSettings
    stream: bool = False
    include_usage: bool = False
    model: Optional[str] = None


def parse_chat_request(body: Any, defaults: Optional[SamplingSettings] = None) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body; raises :class:`ApiError` (400)."""
    f = _check_fields(body, _CHAT)
    if "messages" not in f:
        raise _bad("messages", "'messages' is required")
    messages = parse_messages(f["messages"])
    tools = parse_tools(f["tools"]) if "tools" in f else []
    choice = f.get("tool_choice", "auto")
    if choice not in ("auto", "none"):
        if choice == "required" or isinstance(choice, dict):
            raise _bad(
                "tool_choice",
                "'tool_choice' can be 'auto' or 'none' on this server (the model decides when to call a tool)",
                code="unsupported_parameter",
            )
        raise _bad("tool_choice", "'tool_choice' must be 'auto' or 'none'")
    if "max_tokens" in f and "max_completion_tokens" in f and f["max_tokens"] != f["max_completion_tokens"]:
        raise _bad("max_tokens", "give 'max_tokens' or 'max_completion_tokens', not both")
    max_tokens = f.get("max_completion_tokens", f.get("max_tokens"))
    return ChatRequest(
        messages=messages,
        settings=_settings(f, defaults or SamplingSettings(), max_tokens),
        tools=tools,
        parse_tools=bool(tools) and choice == "auto",
        stream=f.get("stream", False),
        include_usage=bool(f.get("stream_options", {}).get("include_usage")),
        template_kwargs=f.get("chat_template_kwargs", {}),
        model=f.get("model"),
    )


DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def parse_completion_request(body: Any, defaults: Optional[SamplingSettings] = None) -> CompletionRequest:
    """Validate a ``/v1/completions`` body; raises :class:`ApiError` (400)."""
    f = _check_fields(body, _COMPLETION)
    prompt = f.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    ok = (
        isinstance(prompt, str)
        and prompt
        or (isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt))
    )
    if not ok:
        raise _bad("prompt", "'prompt' must be a non-empty string or array of token ids (one prompt per request)")
    return CompletionRequest(
        prompt=prompt,
        settings=_settings(f, defaults or SamplingSettings(), f.get("max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)),
        stream=f.get("stream", False),
        include_usage=bool(f.get("stream_options", {}).get("include_usage")),
        model=f.get("model"),
    )


# --------------------------------------------------------------- responses
def usage(stats: ReplyStats) -> dict:
    """OpenAI usage, with the prompt tokens reused from the cache as ``cached_tokens``."""
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generation_tokens,
        "total_tokens": stats.prompt_tokens + stats.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def openai_finish_reason(reason: str) -> str:
    # "cancelled" only happens when the client is gone; report it as a stop.
    return "stop" if reason == "cancelled" else reason


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish_reason: Optional[str] = None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def tool_call_deltas(index: int, call: ToolCall) -> List[dict]:
    """A tool call as two streamed deltas, as OpenAI sends them: id and name first
    (empty arguments), then the arguments (clients concatenate them)."""
    head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
    return [{"tool_calls": [head]}, {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]


def usage_chunk(rid: str, created: int, model: str, obj: str, stats: ReplyStats) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(stats)}


def chat_completion(
    rid: str, created: int, model: str, content: str, reasoning: str, tool_calls: List[ToolCall], stats: ReplyStats
) -> dict:
    message: Dict[str, Any] = {"role": "assistant", "content": content if content or not tool_calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = [c.to_openai() for c in tool_calls]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": openai_finish_reason(stats.finish_reason),
            }
        ],
        "usage": usage(stats),
    }


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: Optional[str] = None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def completion(rid: str, created: int, model: str, text: str, stats: ReplyStats) -> dict:
    body = completion_chunk(rid, created, model, text, openai_finish_reason(stats.finish_reason))
    body["usage"] = usage(stats)
    return body
