"""The Responses API (``POST /v1/responses``): requests, stored conversations and events.

* :class:`ResponsesRequest`: the request body (pydantic, strict, as the chat endpoint's);
  :func:`parse_responses_request` turns it into chat messages for the chat template:
  ``instructions`` as the system message, the conversation of ``previous_response_id``
  (from the :class:`ResponseStore`), then the ``input`` items (messages,
  ``function_call`` items as assistant tool calls, ``function_call_output`` items as
  tool results).
* :class:`ResponseBuilder`: reply items (:class:`~qnext_mlx.serve.reply.Delta`,
  :class:`~qnext_mlx.serve.chat_session.ReplyStats`) in, the response object and its
  stream events out (``response.created``, ``response.output_item.added``,
  ``response.output_text.delta``, ``response.function_call_arguments.delta``, ...,
  ``response.completed``), each with its ``sequence_number``.
* :class:`ResponseStore`: the last ``max_entries`` stored responses (least recently used
  go first), each with the conversation that continues from it. Their model state needs
  no copy here: the prefix cache keeps the states at every message boundary, so a
  continuation prefills only the new input.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag
from typing_extensions import Annotated

from .chat_session import ReplyStats, SamplingSettings
from .protocol import (
    ApiError,
    Content,
    ContentPart,
    FunctionDef,
    JsonSchemaFormat,
    LenientModel,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    SamplingCore,
    StrictModel,
    Structured,
    TokenCount,
    Tool,
    bad_request,
    content_text,
    sampling_settings,
    structured_output,
    validate,
)
from .reply import Delta

__all__ = [
    "ResponseBuilder",
    "ResponseStore",
    "ResponsesCall",
    "ResponsesRequest",
    "parse_responses_request",
]


# ----------------------------------------------------------------- request
class InputMessage(LenientModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class FunctionCallInput(LenientModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: Optional[str] = None


class FunctionCallOutputInput(LenientModel):
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, List[ContentPart]]


class ReasoningInput(LenientModel):
    """A reasoning item given back (its text rejoins the next assistant turn)."""

    type: Literal["reasoning"]
    content: Optional[List[Dict[str, Any]]] = None
    summary: Optional[List[Dict[str, Any]]] = None


def _item_kind(v: Any) -> Optional[str]:
    kind = v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", None)
    return f"<{kind}>"


InputItem = Annotated[
    Union[
        Annotated[InputMessage, Tag("<message>")],
        Annotated[FunctionCallInput, Tag("<function_call>")],
        Annotated[FunctionCallOutputInput, Tag("<function_call_output>")],
        Annotated[ReasoningInput, Tag("<reasoning>")],
    ],
    Discriminator(
        _item_kind,
        custom_error_type="invalid_item",
        custom_error_message="an input item is a message, function_call, function_call_output or reasoning item",
    ),
]


class FunctionTool(LenientModel):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1)]
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[bool] = None

    def to_chat_tool(self) -> Tool:
        return Tool(function=FunctionDef(name=self.name, description=self.description, parameters=self.parameters))


class ResponsesNamedTool(StrictModel):
    type: Literal["function"]
    name: str


class TextFormat(LenientModel):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    schema_: Optional[Dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None


class TextOptions(LenientModel):
    format: Optional[TextFormat] = None


class ReasoningOptions(LenientModel):
    effort: Optional[str] = None
    summary: Optional[str] = None


class ResponsesRequest(SamplingCore):
    """``POST /v1/responses``."""

    input: Union[str, List[InputItem]]
    instructions: Optional[str] = None
    tools: Optional[List[FunctionTool]] = None
    tool_choice: Optional[Union[Literal["auto", "none", "required"], ResponsesNamedTool]] = None
    parallel_tool_calls: Optional[bool] = None
    previous_response_id: Optional[str] = None
    max_output_tokens: Optional[TokenCount] = None
    text: Optional[TextOptions] = None
    reasoning: Optional[ReasoningOptions] = None
    metadata: Optional[Dict[str, Any]] = None
    store: Optional[bool] = None
    truncation: Optional[Literal["disabled", "auto"]] = None
    include: Optional[List[str]] = None
    background: Optional[bool] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    top_logprobs: Optional[int] = None

    def model_post_init(self, __context) -> None:
        if self.background:
            raise bad_request("background", "'background' responses are not supported by this server",
                              "unsupported_parameter")  # fmt: skip
        if self.top_logprobs:
            raise bad_request("top_logprobs", "log probabilities are not supported on /v1/responses "
                              "(use /v1/chat/completions)", "unsupported_parameter")  # fmt: skip


@dataclass
class ResponsesCall:
    """A validated Responses request, as the server runs it."""

    request: ResponsesRequest
    messages: List[dict]  # the chat, system instructions first
    history: List[dict]  # what a continuation starts from (no instructions)
    tools: List[dict]
    parse_tools: bool
    settings: SamplingSettings
    structured: Optional[Structured]
    parallel_tool_calls: bool


class ResponseStore:
    """Stored responses by id (least recently used dropped beyond ``max_entries``):
    the response object and the conversation a continuation starts from."""

    def __init__(self, max_entries: int = 256):
        self.max_entries = max_entries
        self._items: "OrderedDict[str, tuple]" = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response: dict, conversation: List[dict]) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._items[response["id"]] = (response, conversation)
            self._items.move_to_end(response["id"])
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> Optional[tuple]:
        """``(response, conversation)`` or None."""
        with self._lock:
            found = self._items.get(response_id)
            if found is not None:
                self._items.move_to_end(response_id)
            return found

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._items)


def _input_messages(items: List[Any]) -> List[dict]:
    """Input items as chat messages (function calls join the assistant turn before them)."""
    out: List[dict] = []
    reasoning: Optional[str] = None
    for item in items:
        if isinstance(item, ReasoningInput):
            parts = (item.content or []) + (item.summary or [])
            reasoning = "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict)) or None
        elif isinstance(item, InputMessage):
            msg = {"role": item.role, "content": content_text(item.content)}
            if item.role == "assistant" and reasoning is not None:
                msg["reasoning_content"], reasoning = reasoning, None
            out.append(msg)
        elif isinstance(item, FunctionCallInput):
            function = {"name": item.name, "arguments": item.arguments}
            call = {"id": item.call_id, "type": "function", "function": function}
            if out and out[-1]["role"] == "assistant" and (out[-1].get("tool_calls") or not out[-1]["content"]):
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                msg = {"role": "assistant", "content": "", "tool_calls": [call]}
                if reasoning is not None:
                    msg["reasoning_content"], reasoning = reasoning, None
                out.append(msg)
        else:
            output = item.output if isinstance(item.output, str) else content_text(item.output)
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    return out


def parse_responses_request(body: Any, store: ResponseStore, defaults: Optional[SamplingSettings] = None
                            ) -> ResponsesCall:  # fmt: skip
    """Validate a ``/v1/responses`` body and build its chat; raises :class:`ApiError`."""
    r: ResponsesRequest = validate(ResponsesRequest, body)
    history: List[dict] = []
    if r.previous_response_id is not None:
        found = store.get(r.previous_response_id)
        if found is None:
            raise ApiError(404, f"no stored response with id '{r.previous_response_id}' (it may have been dropped: "
                           f"the store keeps the last {store.max_entries})", param="previous_response_id",
                           code="previous_response_not_found")  # fmt: skip
        history = list(found[1])
    if isinstance(r.input, str):
        history.append({"role": "user", "content": r.input})
    else:
        history.extend(_input_messages(r.input))
    if not history:
        raise bad_request("input", "'input' holds no message")
    messages = ([{"role": "system", "content": r.instructions}] if r.instructions else []) + history
    tools = [t.to_chat_tool() for t in r.tools or []]
    choice = r.tool_choice if r.tool_choice is not None else "auto"
    if isinstance(choice, ResponsesNamedTool):
        choice = NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
    fmt = r.text.format if r.text is not None else None
    response_format = None
    if fmt is not None:
        schema = JsonSchemaFormat(name=fmt.name or "response", schema=fmt.schema_, strict=fmt.strict)
        response_format = ResponseFormat(type=fmt.type, json_schema=schema if fmt.type == "json_schema" else None)
    parallel = r.parallel_tool_calls if r.parallel_tool_calls is not None else True
    try:
        structured = structured_output(response_format, tools, choice, parallel)
    except ApiError as e:
        if e.param == "response_format.json_schema":
            e.param, e.message = "text.format", "'text.format' json_schema needs 'schema'"
        raise
    return ResponsesCall(
        request=r, messages=messages, history=history, tools=[t.to_template() for t in tools],
        parse_tools=bool(tools) and choice != "none",
        settings=sampling_settings(r, defaults or SamplingSettings(), r.max_output_tokens),
        structured=structured, parallel_tool_calls=parallel,
    )  # fmt: skip


# ------------------------------------------------------------------ output
def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class _Item:
    kind: str  # "reasoning", "message" or "function_call"
    obj: dict
    index: int
    text: List[str] = field(default_factory=list)


class ResponseBuilder:
    """Builds one response from reply items; :meth:`feed` / :meth:`finish` return the
    stream events they cause (``event`` dicts with their ``type``)."""

    def __init__(self, call: ResponsesCall, model: str, count_tokens: Callable[[str], int]):
        self.call = call
        self.model = model
        self.count_tokens = count_tokens
        self.id = _new_id("resp")
        self.created_at = int(time.time())
        self.items: List[_Item] = []
        self.open: Optional[_Item] = None
        self.sequence = 0
        self.stats: Optional[ReplyStats] = None

    # ........................................................ objects
    def response(self, status: str = "completed") -> dict:
        r = self.call.request
        fmt = r.text.format.model_dump(by_alias=True, exclude_none=True) if r.text and r.text.format else None
        tool_choice = r.tool_choice if r.tool_choice is not None else "auto"
        body: Dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": None, "incomplete_details": None, "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens, "model": self.model,
            "output": [it.obj for it in self.items], "parallel_tool_calls": self.call.parallel_tool_calls,
            "previous_response_id": r.previous_response_id,
            "reasoning": {"effort": r.reasoning.effort if r.reasoning else None, "summary": None},
            "store": r.store is not False, "temperature": self.call.settings.temp, "top_p": self.call.settings.top_p,
            "text": {"format": fmt or {"type": "text"}},
            "tool_choice": tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(),
            "tools": [t.model_dump(exclude_none=True) for t in r.tools or []],
            "truncation": r.truncation or "disabled", "metadata": r.metadata or {}, "usage": None,
        }  # fmt: skip
        if status == "incomplete":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        if self.stats is not None:
            s = self.stats
            reasoning = "".join("".join(it.text) for it in self.items if it.kind == "reasoning")
            # the reasoning text tokenized again, with its closing tag
            reasoning_tokens = min(s.generation_tokens, self.count_tokens(reasoning) + 1) if reasoning else 0
            body["usage"] = {
                "input_tokens": s.prompt_tokens, "input_tokens_details": {"cached_tokens": s.cached_tokens},
                "output_tokens": s.generation_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "total_tokens": s.prompt_tokens + s.generation_tokens,
            }  # fmt: skip
        return body

    def conversation(self) -> List[dict]:
        """The chat a continuation starts from: the history and this reply."""
        reply: Dict[str, Any] = {"role": "assistant", "content": ""}
        for it in self.items:
            if it.kind == "reasoning":
                reply["reasoning_content"] = "".join(it.text)
            elif it.kind == "message":
                reply["content"] += "".join(it.text)
            else:
                call = {"id": it.obj["call_id"], "type": "function",
                        "function": {"name": it.obj["name"], "arguments": it.obj["arguments"]}}  # fmt: skip
                reply.setdefault("tool_calls", []).append(call)
        return self.call.history + [reply]

    # ......................................................... events
    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def start(self) -> List[dict]:
        return [
            self._event("response.created", response=self.response("in_progress")),
            self._event("response.in_progress", response=self.response("in_progress")),
        ]

    def _open(self, kind: str) -> List[dict]:
        events = self._close()
        if kind == "reasoning":
            obj = {"id": _new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
        else:
            obj = {"id": _new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                   "content": []}  # fmt: skip
        self.open = _Item(kind, obj, len(self.items))
        self.items.append(self.open)
        events.append(self._event("response.output_item.added", output_index=self.open.index, item=dict(obj)))
        if kind == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(self._event("response.content_part.added", item_id=obj["id"], output_index=self.open.index,
                                      content_index=0, part=part))  # fmt: skip
        return events

    def _close(self) -> List[dict]:
        it, self.open = self.open, None
        if it is None:
            return []
        text = "".join(it.text)
        where = {"item_id": it.obj["id"], "output_index": it.index, "content_index": 0}
        events = []
        if it.kind == "reasoning":
            it.obj["content"] = [{"type": "reasoning_text", "text": text}]
            events.append(self._event("response.reasoning_text.done", text=text, **where))
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            it.obj["content"] = [part]
            events.append(self._event("response.output_text.done", text=text, logprobs=[], **where))
            events.append(self._event("response.content_part.done", part=part, **where))
        it.obj["status"] = "completed"
        events.append(self._event("response.output_item.done", output_index=it.index, item=it.obj))
        return events

    def feed(self, item) -> List[dict]:
        """Events for one reply item (a :class:`Delta`; :class:`ReplyStats` goes to :meth:`finish`)."""
        if not isinstance(item, Delta):
            return []
        if item.kind == "tool_call":
            if not self.call.parallel_tool_calls and any(it.kind == "function_call" for it in self.items):
                return []  # parallel_tool_calls false: the first call only
            events = self._close()
            call = item.tool_call
            obj = {"id": _new_id("fc"), "type": "function_call", "call_id": call.id, "name": call.name,
                   "arguments": "", "status": "in_progress"}  # fmt: skip
            it = _Item("function_call", obj, len(self.items))
            self.items.append(it)
            where = {"item_id": obj["id"], "output_index": it.index}
            events.append(self._event("response.output_item.added", output_index=it.index, item=dict(obj)))
            events.append(self._event("response.function_call_arguments.delta", delta=call.arguments, **where))
            obj["arguments"], obj["status"] = call.arguments, "completed"
            events.append(self._event("response.function_call_arguments.done", arguments=call.arguments,
                                      name=call.name, **where))  # fmt: skip
            events.append(self._event("response.output_item.done", output_index=it.index, item=obj))
            return events
        if not item.text:
            return []
        kind = "reasoning" if item.kind == "reasoning" else "message"
        events = self._open(kind) if self.open is None or self.open.kind != kind else []
        self.open.text.append(item.text)
        delta_kind = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        events.append(self._event(delta_kind, item_id=self.open.obj["id"], output_index=self.open.index,
                                  content_index=0, delta=item.text, **extra))  # fmt: skip
        return events

    def finish(self, stats: ReplyStats) -> List[dict]:
        """The closing events; the final response is :meth:`response` (``status``: :attr:`status`)."""
        self.stats = stats
        events = self._close()
        if not any(it.kind in ("message", "function_call") for it in self.items):
            events += self._open("message") + self._close()  # always an (empty) answer message
        kind = "response.incomplete" if self.status == "incomplete" else "response.completed"
        events.append(self._event(kind, response=self.response(self.status)))
        return events

    @property
    def status(self) -> str:
        return "incomplete" if self.stats is not None and self.stats.finish_reason == "length" else "completed"
