"""The OpenAI wire format for the HTTP server (:mod:`qnext_mlx.serve.http`): pydantic
models of the requests and responses, and the checks that go beyond one field.

No HTTP and no model here, so every rule can be tested on its own:

* :func:`parse_chat_request` / :func:`parse_completion_request` validate a decoded JSON
  body against :class:`ChatCompletionRequest` / :class:`CompletionRequest` (strict types,
  ranges, unknown fields refused, unsupported options refused with a reason) and return
  what the server needs; the first problem becomes an :class:`ApiError` (status 400,
  OpenAI's error shape, ``param`` naming the field, e.g. ``messages[0].role``);
* :class:`ChatCompletion`, :class:`ChatCompletionChunk`, :class:`Completion`, ... are
  the response bodies; :func:`chat_logprobs` and :func:`completion_logprobs` build the
  ``logprobs`` objects.

OpenAI fields that change nothing here (``user``, ``metadata``, ``store``, ...) are
accepted; options this server does not implement (``echo``, ``suffix``, ``best_of`` > 1,
content that is not text, ...) are refused with a message rather than silently ignored.
Extensions, as in vLLM: ``top_k``, ``min_p``, ``repetition_penalty``, ``chat_template_kwargs``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import Annotated

from ..engine.batch import MAX_TOP_LOGPROBS
from .chat_session import ReplyStats, SamplingSettings, TokenLogprob
from .reply import ToolCall

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_CHOICES = 16  # n: one prefill, forked into at most this many sequences
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


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


def bad_request(param: Optional[str], message: str, code: Optional[str] = None) -> ApiError:
    """A 400 :class:`ApiError` about ``param``."""
    return ApiError(400, message, param=param, code=code)


# ------------------------------------------------------- validation errors
# Union members and function validators appear in pydantic's error locations; they are
# not fields of the request.
_NOT_A_FIELD = re.compile(r"[\[\]\-(),<>' ]|^(str|int|float|bool|list|dict|none|json-or-python)$")
# Our own error codes raised inside validators (PydanticCustomError types).
_OUR_CODES = {"unsupported_parameter", "unsupported_content", "unknown_parameter"}


def param_of(loc: Sequence[Union[str, int]]) -> Optional[str]:
    """A pydantic error location as OpenAI names it: ``('messages', 0, 'role')`` ->
    ``messages[0].role`` (union member tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _NOT_A_FIELD.search(part):
            out += f".{part}" if out else part
    return out or None


def _describe(err: dict, param: Optional[str]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    name = f"'{param}'" if param else "the request"
    simple = {
        "float_type": "must be a number", "int_type": "must be an integer", "bool_type": "must be a boolean",
        "string_type": "must be a string", "list_type": "must be an array", "dict_type": "must be an object",
        "model_type": "must be an object", "model_attributes_type": "must be an object",
        "finite_number": "must be a finite number", "int_from_float": "must be an integer",
    }  # fmt: skip
    if kind == "extra_forbidden":
        return f"unknown field '{param}'"
    if kind == "missing":
        return f"{name} is required"
    if kind in simple:
        return f"{name} {simple[kind]}, got {_type_name(value)}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"{name} must be {bounds[kind]} {limit}, got {value!r}"
    if kind in ("too_short", "too_long"):
        return f"{name}: {err['msg'][0].lower()}{err['msg'][1:]}"
    if kind == "literal_error":
        return f"{name} must be {ctx.get('expected', 'one of the allowed values')}, got {value!r}"
    if kind in _OUR_CODES:
        return err["msg"]
    if kind == "value_error":
        return f"{name}: {ctx.get('error', err['msg'])}"
    return f"{name}: {err['msg']}"


def api_error(e: ValidationError) -> ApiError:
    """The first problem of a pydantic :class:`ValidationError` as a 400 :class:`ApiError`."""
    # Of a union's errors, the telling one: ours first, then the deepest, type mismatches last.
    errors = e.errors(include_url=False)
    err = min(errors, key=lambda x: (x["type"] not in _OUR_CODES, -len(param_of(x["loc"]) or ""),
                                     x["type"].endswith("_type")))  # fmt: skip
    param = param_of(err["loc"])
    code = "unknown_parameter" if err["type"] == "extra_forbidden" else None
    if err["type"] in _OUR_CODES:
        code = err["type"]
    return bad_request(param, _describe(err, param), code)


def _type_name(v: Any) -> str:
    return {
        bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
        type(None): "null",
    }.get(type(v), type(v).__name__)  # fmt: skip


def unsupported(message: str) -> PydanticCustomError:
    """Raise inside a validator: an option this server does not implement."""
    return PydanticCustomError("unsupported_parameter", message)


# ----------------------------------------------------------- field types
class StrictModel(BaseModel):
    """Request objects: strict JSON types (no "1" for 1, no "yes" for true), unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class LenientModel(BaseModel):
    """Objects agent frameworks decorate with their own keys (ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)


Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
MinP = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
TokenCount = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]
TopK = Annotated[int, Field(ge=-1)]


class StreamOptions(StrictModel):
    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None


class ContentPart(LenientModel):
    """A content part; only text parts are accepted by this text-only model."""

    type: str
    text: Optional[str] = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type not in ("text", "input_text", "output_text"):
            raise PydanticCustomError(
                "unsupported_content", "content type '{kind}' is not supported by this text-only model",
                {"kind": self.type},
            )  # fmt: skip
        if self.text is None:
            raise ValueError("a text part needs 'text'")
        return self


Content = Union[str, List[ContentPart]]


def content_text(content: Optional[Content]) -> Optional[str]:
    """The text of a validated ``content`` (parts joined)."""
    if content is None or isinstance(content, str):
        return content
    return "".join(p.text or "" for p in content)


class FunctionCallIn(LenientModel):
    name: str
    arguments: Union[str, Dict[str, Any]] = "{}"


class ToolCallIn(LenientModel):
    id: Optional[str] = None
    type: Optional[Literal["function"]] = "function"
    function: FunctionCallIn


class ChatMessage(LenientModel):
    """One message of ``messages`` (keys other than these are ignored: Qwen-Agent sends ``extra``)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Content] = Field(default=None, validate_default=True)
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCallIn]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _content_needed(cls, v, info):
        if v is None and info.data.get("role") != "assistant":
            raise ValueError("content is required")
        return v

    def to_template(self) -> dict:
        """The message as the chat template takes it (text content)."""
        msg: Dict[str, Any] = {"role": self.role, "content": content_text(self.content)}
        if self.role == "assistant":
            if self.tool_calls:
                msg["tool_calls"] = [
                    {"id": tc.id, "type": "function", "function": {"name": tc.function.name,
                                                                   "arguments": tc.function.arguments}}
                    for tc in self.tool_calls
                ]  # fmt: skip
            reasoning = self.reasoning_content if self.reasoning_content is not None else self.reasoning
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
        if self.role == "tool" and self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            msg["name"] = self.name
        return msg


class FunctionDef(LenientModel):
    name: Annotated[str, Field(min_length=1)]
    description: Optional[str] = None
    # A JSON schema object; Qwen-Agent's own tools may also give a list of parameters.
    parameters: Optional[Union[Dict[str, Any], List[Any]]] = None
    strict: Optional[bool] = None


class Tool(LenientModel):
    type: Literal["function"] = "function"
    function: FunctionDef

    def to_template(self) -> dict:
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["auto", "none", "required"], NamedToolChoice]


class JsonSchemaFormat(LenientModel):
    name: str = "response"
    schema_: Optional[Dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class SamplingCore(StrictModel):
    """The sampling fields all three endpoints share (``top_k``, ``min_p`` and
    ``repetition_penalty`` are vLLM's extensions)."""

    model: Optional[str] = None
    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    top_k: Optional[TopK] = None
    min_p: Optional[MinP] = None
    presence_penalty: Optional[Penalty] = None
    frequency_penalty: Optional[Penalty] = None
    repetition_penalty: Optional[Positive] = None
    seed: Optional[Seed] = None
    user: Optional[str] = None
    stream: Optional[bool] = None


class SamplingFields(SamplingCore):
    """The fields chat and plain completions share."""

    stop: Optional[Union[str, Annotated[List[str], Field(max_length=MAX_STOP_STRINGS)]]] = None
    max_tokens: Optional[TokenCount] = None
    n: Optional[Annotated[int, Field(ge=1, le=MAX_CHOICES)]] = None
    logit_bias: Optional[Dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]]] = None
    stream_options: Optional[StreamOptions] = None


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: Annotated[List[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[TokenCount] = None
    tools: Optional[List[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]] = None
    metadata: Optional[Dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    reasoning_effort: Optional[str] = None
    modalities: Optional[List[Literal["text"]]] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: Any = None
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    logprobs: Optional[Annotated[int, Field(ge=0, le=5)]] = None

    @field_validator("echo", "suffix")
    @classmethod
    def _not_implemented(cls, v, info):
        if v:
            raise unsupported(f"'{info.field_name}' is not supported by this server")
        return v

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, v):
        if v not in (None, 1):
            raise unsupported("'best_of' is not supported by this server (use 'n' for several choices)")
        return v


# ------------------------------------------------------ what the server uses
@dataclass
class Structured:
    """What the reply must follow: ``kind`` "json_schema" (``schema``), "json_object", or
    "tools" (``tools`` by name: a forced tool call; ``parallel``: several calls allowed)."""

    kind: str
    schema: Optional[dict] = None
    tools: Dict[str, dict] = field(default_factory=dict)
    parallel: bool = True


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
    n: int = 1
    logprobs: Optional[int] = None  # None: off; k: the chosen token and k alternatives
    structured: Optional[Structured] = None
    parallel_tool_calls: bool = True


@dataclass
class PlainCompletionRequest:
    prompt: Union[str, List[int]]
    settings: SamplingSettings
    stream: bool = False
    include_usage: bool = False
    model: Optional[str] = None
    n: int = 1
    logprobs: Optional[int] = None


def validate(model: type, body: Any):
    """``body`` (decoded JSON) as ``model``; raises :class:`ApiError` (400)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise api_error(e) from None


def _stop_list(stop) -> List[str]:
    if stop is None:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


def _logit_bias(bias: Optional[Dict[str, float]]) -> Optional[Dict[int, float]]:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = float(value)
        except ValueError:
            raise bad_request("logit_bias", f"'logit_bias' keys must be token ids, got {key!r}") from None
    return out


def sampling_settings(r: SamplingCore, defaults: SamplingSettings, max_tokens: Optional[int]) -> SamplingSettings:
    """The request's sampling settings over the server's defaults."""
    stop, bias = getattr(r, "stop", None), getattr(r, "logit_bias", None)
    top_k = r.top_k if r.top_k is not None else defaults.top_k
    s = SamplingSettings(
        temp=r.temperature if r.temperature is not None else defaults.temp,
        top_p=r.top_p if r.top_p is not None else defaults.top_p,
        top_k=0 if top_k == -1 else top_k,  # -1 means off, as in vLLM
        min_p=r.min_p if r.min_p is not None else defaults.min_p,
        presence_penalty=r.presence_penalty if r.presence_penalty is not None else defaults.presence_penalty,
        repetition_penalty=r.repetition_penalty if r.repetition_penalty is not None else defaults.repetition_penalty,
        max_tokens=max_tokens if max_tokens is not None else defaults.max_tokens,
        seed=r.seed if r.seed is not None else defaults.seed,
        stop=_stop_list(stop) if stop is not None else list(defaults.stop),
        frequency_penalty=r.frequency_penalty if r.frequency_penalty is not None else defaults.frequency_penalty,
        logit_bias=_logit_bias(bias),
    )
    try:
        s.validate()
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return s


def structured_output(response_format: Optional[ResponseFormat], tools: List[Tool], tool_choice: Optional[ToolChoice],
                      parallel: bool) -> Optional[Structured]:  # fmt: skip
    """What ``response_format`` and ``tool_choice`` require of the reply (None: free text)."""
    forced_tools = tool_choice == "required" or isinstance(tool_choice, NamedToolChoice)
    if forced_tools:
        if not tools:
            raise bad_request("tool_choice", "'tool_choice' requires a tool call, but there are no 'tools'")
        by_name = {t.function.name: _parameters(t.function.parameters) for t in tools}
        if isinstance(tool_choice, NamedToolChoice):
            name = tool_choice.function.name
            if name not in by_name:
                raise bad_request("tool_choice", f"'tool_choice' names '{name}', which is not one of the 'tools'")
            by_name = {name: by_name[name]}
        if response_format is not None and response_format.type != "text":
            raise bad_request("response_format", "'response_format' and a forced 'tool_choice' exclude each other")
        return Structured("tools", tools=by_name, parallel=parallel)
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Structured("json_object", schema={"type": "object"})
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise bad_request("response_format.json_schema", "'response_format' json_schema needs 'json_schema.schema'")
    return Structured("json_schema", schema=response_format.json_schema.schema_)


def _parameters(parameters) -> dict:
    """A tool's arguments schema (Qwen-Agent's list form: any object)."""
    return parameters if isinstance(parameters, dict) else {"type": "object"}


def parse_chat_request(body: Any, defaults: Optional[SamplingSettings] = None) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body; raises :class:`ApiError` (400)."""
    r: ChatCompletionRequest = validate(ChatCompletionRequest, body)
    if r.stream_options is not None and not r.stream:
        raise bad_request("stream_options", "'stream_options' is only allowed with 'stream': true")
    if r.max_tokens is not None and r.max_completion_tokens is not None and r.max_tokens != r.max_completion_tokens:
        raise bad_request("max_tokens", "give 'max_tokens' or 'max_completion_tokens', not both")
    if r.top_logprobs and not r.logprobs:
        raise bad_request("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    tools = list(r.tools or [])
    choice = r.tool_choice if r.tool_choice is not None else "auto"
    parallel = r.parallel_tool_calls if r.parallel_tool_calls is not None else True
    structured = structured_output(r.response_format, tools, choice, parallel)
    max_tokens = r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens
    return ChatRequest(
        messages=[m.to_template() for m in r.messages],
        settings=sampling_settings(r, defaults or SamplingSettings(), max_tokens),
        tools=[t.to_template() for t in tools],
        parse_tools=bool(tools) and choice != "none",
        stream=bool(r.stream),
        include_usage=bool(r.stream_options and r.stream_options.include_usage),
        template_kwargs=dict(r.chat_template_kwargs or {}),
        model=r.model,
        n=r.n or 1,
        logprobs=(r.top_logprobs or 0) if r.logprobs else None,
        structured=structured,
        parallel_tool_calls=parallel,
    )


def parse_completion_request(body: Any, defaults: Optional[SamplingSettings] = None) -> PlainCompletionRequest:
    """Validate a ``/v1/completions`` body; raises :class:`ApiError` (400)."""
    r: CompletionRequest = validate(CompletionRequest, body)
    if r.stream_options is not None and not r.stream:
        raise bad_request("stream_options", "'stream_options' is only allowed with 'stream': true")
    prompt = r.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    ok = (isinstance(prompt, str) and prompt) or (
        isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    )
    if not ok:
        raise bad_request(
            "prompt", "'prompt' must be a non-empty string or array of token ids (one prompt per request)"
        )
    max_tokens = r.max_tokens if r.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
    return PlainCompletionRequest(
        prompt=prompt,
        settings=sampling_settings(r, defaults or SamplingSettings(), max_tokens),
        stream=bool(r.stream),
        include_usage=bool(r.stream_options and r.stream_options.include_usage),
        model=r.model,
        n=r.n or 1,
        logprobs=r.logprobs,
    )


# --------------------------------------------------------------- responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def usage(stats: Sequence[ReplyStats]) -> Usage:
    """OpenAI usage over a request's choices (the prompt counted once), with the prompt
    tokens reused from the cache as ``cached_tokens``."""
    first = stats[0]
    completion = sum(s.generation_tokens for s in stats)
    return Usage(
        prompt_tokens=first.prompt_tokens, completion_tokens=completion,
        total_tokens=first.prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=first.cached_tokens),
    )  # fmt: skip


def openai_finish_reason(reason: str) -> str:
    # "cancelled" only happens when the client is gone; report it as a stop.
    return "stop" if reason == "cancelled" else reason


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    reasoning_content: Optional[str] = None
    tool_calls: Optional[List[ToolCallOut]] = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: Optional[Dict[str, Any]] = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: List[ChatChoice]
    usage: Usage


class ChunkChoice(BaseModel):
    index: int
    delta: Dict[str, Any]
    logprobs: Optional[Dict[str, Any]] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: List[ChunkChoice]
    usage: Optional[Usage] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[Dict[str, Any]] = None
    finish_reason: Optional[str] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qnext-mlx"
    max_model_len: int
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


def chat_message(content: str, reasoning: str, tool_calls: List[ToolCall]) -> ChatMessageOut:
    """The assistant message of a finished choice."""
    return ChatMessageOut(
        content=content if content or not tool_calls else None,
        reasoning_content=reasoning or None,
        tool_calls=[ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
                    for c in tool_calls] or None,
    )  # fmt: skip


def tool_call_deltas(index: int, call: ToolCall) -> List[dict]:
    """A tool call as two streamed deltas, as OpenAI sends them: id and name first
    (empty arguments), then the arguments (clients concatenate them)."""
    head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
    return [{"tool_calls": [head]}, {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]


TokenText = Callable[[int], str]


def _token_entry(token_text: TokenText, token: int, logprob: float) -> dict:
    text = token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(items: Sequence[TokenLogprob], token_text: TokenText) -> Dict[str, Any]:
    """Chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}``."""
    content = []
    for it in items:
        entry = _token_entry(token_text, it.token, it.logprob)
        entry["top_logprobs"] = [_token_entry(token_text, t, lp) for t, lp in it.top]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(items: Sequence[TokenLogprob], token_text: TokenText, offset: int = 0) -> Dict[str, Any]:
    """Legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset."""
    tokens, values, tops, offsets = [], [], [], []
    for it in items:
        text = token_text(it.token)
        tokens.append(text)
        values.append(it.logprob)
        tops.append({token_text(t): lp for t, lp in it.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def model_card(model_id: str, created: int, context: int) -> ModelCard:
    return ModelCard(id=model_id, created=created, max_model_len=context, context_length=context)
