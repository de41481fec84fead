"""Conversation logic shared by the server, the terminal chat and the desktop app.

One implementation of everything the three chat surfaces have in common (the
reply parser, reasoning and tool calls, is :mod:`qnext_mlx.serve.reply`):

* :func:`render_prompt` / :meth:`ChatEngine.prepare`: messages (and tools) -> prompt
  text and token ids through the tokenizer's chat template (Qwen3's puts the tools
  in the system turn and renders ``role: tool`` results as ``<tool_response>``);
* :class:`ChatEngine`'s prefix cache (:class:`~qnext_mlx.engine.prefix_cache.PrefixCache`):
  snapshots at the message boundaries of every prompt and the end of every reply, one
  pool for all conversations, so a follow-up turn only prefills what is new;
* :class:`ChatEngine`: runs replies through the batch engine
  (:class:`~qnext_mlx.engine.batch.BatchEngine`, the one generation path), with
  cancellation between prefill chunks and between tokens;
* :class:`ChatSession`: one conversation (history, system message, sampling
  settings), saved to / loaded from JSON.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from ..atomic import atomic_path
from ..checkpoint.paths import REAL_MODEL_REPO, resolve_model_arg
from ..checkpoint.reader import load
from ..engine.batch import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_WAITING,
    BatchEngine,
    EngineObserver,
    GenerationRequest,
    RequestHandle,
    SamplingParams,
    TokenEvent,
)
from ..engine.constraint import Grammar, GrammarTokenizer, grammar_tokenizer
from ..engine.prefix_cache import PrefixCache
from ..engine.primitives import DEFAULT_PREFILL_STEP_SIZE, generation_stream
from ..engine.sampling import (
    DEFAULT_MAX_TOKENS,
)
from ..engine.stream import peak_memory_gb
from ..engine.text import prompt_opens_think
from ..errors import CacheError, QnextError
from ..kernels.lanes import forget_lane_streams
from ..model import ModelCache, ModelConfig
from ..model.rope import apply_rope_options, context_window
from .reply import Delta, ReplyParser

CONVERSATION_FORMAT = "qnext-mlx-conversation"


class ChatError(QnextError):
    """A conversation cannot be turned into a prompt (template failure, prompt too long, bad file)."""


class PromptTooLongError(ChatError):
    """The prompt does not fit the model's context."""


# ------------------------------------------------------------------ settings
@dataclass
class SamplingSettings(SamplingParams):
    """Sampling and length settings of one reply (model-card defaults): the engine's
    :class:`~qnext_mlx.engine.batch.SamplingParams` plus ``max_tokens`` and ``stop``."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: List[str] = field(default_factory=list)

    def validate(self) -> None:
        """Raise ValueError (one line) for an out-of-range value."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        super().validate()

    def to_dict(self) -> dict:
        return asdict(self)

    def sampling_params(self) -> SamplingParams:
        """The engine's view of these settings."""
        return SamplingParams(**{f.name: getattr(self, f.name) for f in fields(SamplingParams)})

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingSettings":
        """Settings from a dict (unknown keys are ignored: files from newer versions load)."""
        known = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in (data or {}).items() if k in known})
        out.validate()
        return out


# ------------------------------------------------------------------- prompts
@dataclass
class PreparedPrompt:
    """A prompt ready for generation.

    Attributes:
        text: the formatted prompt text.
        ids: its token ids ``[L]``.
        opens_think: the prompt leaves a ``<think>`` span open (thinking templates),
            so the reply starts with reasoning.
        parse_tools: turn ``<tool_call>`` spans of the reply into tool calls.
        checkpoint_at: prompt positions where the cache keeps a reusable state
            (the end of the system message / tool list).
        raw: pass the reply text on as is (plain completion: no think / tool parsing).
    """

    text: str
    ids: List[int]
    opens_think: bool = False
    parse_tools: bool = False
    checkpoint_at: List[int] = field(default_factory=list)
    raw: bool = False


def message_text(content) -> str:
    """The text of an OpenAI message ``content``: a string, None, or a list of
    ``{"type": "text", "text": ...}`` parts (joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def _template_messages(messages: Sequence[dict]) -> List[dict]:
    """Messages as the chat template expects them: text content; ``developer`` -> ``system``."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "developer":
            m["role"] = "system"
        if m.get("content") is not None or m.get("role") != "assistant":
            m["content"] = message_text(m.get("content"))
        else:
            m["content"] = ""
        if m.get("reasoning_content") is None:
            m.pop("reasoning_content", None)
        out.append(m)
    return out


def render_prompt(
    tokenizer,
    messages: Sequence[dict],
    tools: Optional[Sequence[dict]] = None,
    template_kwargs: Optional[dict] = None,
    add_generation_prompt: bool = True,
) -> str:
    """``messages`` (OpenAI chat format) and ``tools`` (OpenAI function specs) in the
    tokenizer's chat template, ending with the assistant turn's header."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatError("this model's tokenizer has no chat template; use /v1/completions with a raw prompt")
    try:
        return tokenizer.apply_chat_template(
            _template_messages(messages),
            tools=list(tools) if tools else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **(template_kwargs or {}),
        )
    except QnextError:
        raise
    except Exception as e:  # jinja2 errors, raise_exception() in templates
        raise ChatError(f"the chat template cannot render these messages: {e}") from None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ------------------------------------------------------------- reply stats
@dataclass
class ReplyStats:
    """The end of a reply: why it stopped and how fast it went.

    ``finish_reason``: "stop", "length", "tool_calls" or "cancelled";
    ``cached_tokens``: prompt tokens reused from the prompt cache (not prefilled);
    ``context_tokens``: tokens the cache holds afterwards (prompt + reply);
    ``choice``: which of the request's choices ended (``n > 1``).
    """

    finish_reason: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    context_tokens: int = 0
    max_context: int = 0
    time_to_first_token: float = 0.0
    choice: int = 0


@dataclass
class TokenLogprob:
    """One generated token's log-probability (requests that ask for ``logprobs``):
    ``top`` holds the best ``(token id, logprob)`` pairs, best first."""

    choice: int
    token: int
    logprob: float
    top: List[Tuple[int, float]] = field(default_factory=list)


# ------------------------------------------------------------------ engine
# The prefix cache's default budget: about 50 snapshots of the 80B's DeltaNet state.
DEFAULT_PREFIX_CACHE_BYTES = 4 << 30
DEMO_MODEL_ID = "qnext-mlx-demo"


def load_chat_engine(model_arg: Optional[str] = None, *, quiet: bool = False, rope_args=None, parallel=None,
                     group=None, **engine_kwargs):  # fmt: skip
    """Load ``--model`` (a folder or Hugging Face repo id; None: the bundled demo model)
    into a :class:`ChatEngine`; returns ``(engine, model_name)``.

    The model's arrays belong to the calling thread: call this on the thread that will
    generate. Raises :class:`QnextError` subclasses (one line) for a missing model or
    tokenizer. ``rope_args``: parsed long-context options (:func:`qnext_mlx.cli.add_rope_arguments`;
    ``--max-context N`` is then both the conversation limit and, past the native window,
    the YaRN factor). ``engine_kwargs`` go to :class:`ChatEngine` (``max_batch``, ``prefix_cache_bytes``,
    ``kv_bits``, ``max_context``, ...). ``parallel`` and ``group``: split the model over
    the group's ranks (``"tensor"`` or ``"pipeline"``, see :func:`qnext_mlx.load`); every
    rank then runs this engine in step (rank 0 serves, the others ``engine.engine.follow()``).
    """
    path, is_demo = resolve_model_arg(model_arg)
    if is_demo and not quiet:
        print(
            "note: running the bundled demo model (a tiny model for trying the tools offline). "
            f"For the real model pass --model {REAL_MODEL_REPO} or a local MLX conversion.",
            file=sys.stderr,
        )
    # a folder without tokenizer files: ModelNotFoundError
    model, tokenizer = load(path, parallel=parallel, group=group)
    if rope_args is not None:
        apply_rope_options(rope_args, model)  # before the engine: cache fingerprints include it
    name = DEMO_MODEL_ID if is_demo else (Path(path).name if Path(path).exists() else str(path))
    return ChatEngine(model, tokenizer, group=group if parallel else None, **engine_kwargs), name


class ChatEngine:
    """A loaded model and tokenizer behind a :class:`~qnext_mlx.engine.batch.BatchEngine`
    with a shared prefix cache: prompts in, reply deltas out.

    :meth:`prepare` only tokenizes and may run on any thread. Generation goes through
    the batch engine, whose model thread is either an engine thread running
    ``engine.run()`` (the server: then :meth:`start` / :meth:`generate` may be called
    from many threads at once) or the one thread that also consumes the replies (the
    terminal chat, the app's generation thread: iterating a reply drives the engine).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        kv_bits: Optional[int] = None,
        kv_group_size: int = 64,
        max_context: Optional[int] = None,
        prefill_step_size: Optional[int] = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_waiting: int = DEFAULT_MAX_WAITING,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        observer: Optional[EngineObserver] = None,
        group=None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache = PrefixCache(prefix_cache_bytes, group=group)
        self.engine = BatchEngine(
            model, tokenizer, max_batch=max_batch, max_waiting=max_waiting, prefix_cache=self.prefix_cache,
            kv_bits=kv_bits, kv_group_size=kv_group_size,
            prefill_step_size=prefill_step_size or DEFAULT_PREFILL_STEP_SIZE, observer=observer, group=group,
        )  # fmt: skip
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.parallel = self.engine.sync is not None  # split over the ranks of a group
        config = getattr(model, "config", None)
        # The RoPE setting's window: max_position_embeddings, or factor x original under YaRN.
        config_context = context_window(config) if isinstance(config, ModelConfig) else None
        self.max_context = max_context or config_context or 2**31 - 1
        self._im_start = _token_id(tokenizer, "<|im_start|>")
        self._assistant_header = list(tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False))

    # ........................................................... prompts
    def prepare(
        self,
        messages: Sequence[dict],
        tools: Optional[Sequence[dict]] = None,
        template_kwargs: Optional[dict] = None,
        parse_tools: Optional[bool] = None,
    ) -> PreparedPrompt:
        """Format and tokenize a chat; raises :class:`ChatError` when the template
        fails or the prompt does not fit the context."""
        text = render_prompt(self.tokenizer, messages, tools, template_kwargs)
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        self._check_length(ids)
        return PreparedPrompt(
            text=text,
            ids=ids,
            opens_think=prompt_opens_think(text),
            parse_tools=bool(tools) if parse_tools is None else parse_tools,
            checkpoint_at=self._boundaries(messages, tools, template_kwargs, ids),
        )

    def _boundaries(self, messages, tools, template_kwargs, ids: List[int]) -> List[int]:
        """Where a later prompt is likely to share this one's state: the end of the system
        message and tool list, the start of every message and the end of every assistant
        header (ChatML), so that the next turn reuses all the template left unchanged."""
        marks = set()
        n_system = 0
        while n_system < len(messages) and messages[n_system].get("role") in ("system", "developer"):
            n_system += 1
        if (n_system or tools) and n_system < len(messages):
            # The system message and tool list do not depend on the rest.
            probes = [
                self.tokenizer.encode(
                    render_prompt(self.tokenizer, list(messages[:n_system]) + [{"role": "user", "content": c}],
                                  tools, template_kwargs, add_generation_prompt=False),
                    add_special_tokens=False,
                )
                for c in ("x", "y")
            ]  # fmt: skip
            marks.add(min(_common_prefix(*probes), _common_prefix(probes[0], ids)))
        if self._im_start is not None:
            header = self._assistant_header
            for i, t in enumerate(ids):
                if t == self._im_start:
                    marks.add(i)
                    if ids[i : i + len(header)] == header:
                        marks.add(i + len(header))
        return sorted(p for p in marks if 0 < p < len(ids))

    def prepare_text(self, prompt: Union[str, Sequence[int]]) -> PreparedPrompt:
        """A raw prompt (text as is, or token ids) for plain completion."""
        if isinstance(prompt, str):
            bos = getattr(self.tokenizer, "bos_token", None)
            add_special = bos is None or not prompt.startswith(bos)
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=add_special))
            text = prompt
        else:
            vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
            ids = [int(t) for t in prompt]
            if vocab is not None and any(not 0 <= t < vocab for t in ids):
                raise ChatError(f"prompt token ids must be in [0, {vocab})")
            text = self.tokenizer.decode(ids)
        if not ids:
            raise ChatError("the prompt is empty")
        self._check_length(ids)
        return PreparedPrompt(text=text, ids=ids, raw=True)

    def _check_length(self, ids: Sequence[int]) -> None:
        if len(ids) >= self.max_context:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens; this model's context is {self.max_context} tokens "
                f"(the reply needs at least one more): shorten the conversation"
            )

    # ........................................................ generation
    def start(self, prompt: PreparedPrompt, settings: SamplingSettings, *, n: int = 1,
              logprobs: Optional[int] = None, grammar: Optional[Grammar] = None) -> "ChatReply":  # fmt: skip
        """Submit a reply to ``prompt`` (``n`` choices; ``logprobs``: report per-token
        log-probabilities with that many alternatives; ``grammar``: structured output);
        raises ValueError for bad settings and
        :class:`~qnext_mlx.engine.batch.EngineBusyError` when too many requests wait."""
        settings.validate()
        max_tokens = max(1, min(settings.max_tokens, self.max_context - len(prompt.ids)))
        request = GenerationRequest(
            prompt.ids, max_tokens=max_tokens, sampling=settings.sampling_params(), stop=list(settings.stop),
            checkpoints=prompt.checkpoint_at, n=n, logprobs=logprobs, grammar=grammar, exact_text=prompt.raw,
        )  # fmt: skip
        return ChatReply(self, prompt, self.engine.submit(request))

    def grammar_tokenizer(self) -> GrammarTokenizer:
        """The vocabulary for structured outputs (built on first use: about a second at
        the real vocabulary)."""
        return grammar_tokenizer(self.tokenizer, self.model.config.vocab_size)

    @property
    def think_end_id(self) -> Optional[int]:
        """The ``</think>`` token, or None when the vocabulary has none."""
        return _token_id(self.tokenizer, "</think>")

    def generate(
        self, prompt: PreparedPrompt, settings: SamplingSettings, cancel: Optional[Callable[[], bool]] = None
    ) -> Iterator[Union[Delta, ReplyStats]]:
        """Generate a reply to ``prompt``: yields :class:`Delta` pieces as they decode,
        then one :class:`ReplyStats`.

        ``cancel()`` is checked between prefill chunks and after every token; when it
        returns True the reply ends with finish_reason "cancelled". What was processed
        stays in the prefix cache (the prompt and the tokens generated, or, stopped
        during the prefill, the prompt prefix done so far), so a follow-up or a retry
        still reuses it. Raises ValueError for bad settings.
        """
        reply = self.start(prompt, settings)
        try:
            while True:
                item = reply.next(timeout=0.05, cancel=cancel)
                if item is ChatReply.END:
                    return
                if item is not None:
                    yield item
        finally:  # also when our consumer stops early: end the request now
            reply.close()

    # ......................................................... caches
    def latest_cache(self) -> Optional[ModelCache]:
        """The most recently used prefix-cache state as a one-row cache (to save), or None."""
        snap = self.prefix_cache.latest()
        if snap is None:
            return None
        cache = self.model.make_cache(kv_bits=self.kv_bits, kv_group_size=self.kv_group_size)
        cache.adopt(snap)
        return cache

    def add_cache(self, cache: ModelCache) -> None:
        """Offer a cache's state (and its checkpoints) to the prefix cache (a loaded file)."""
        for snap in list(cache.checkpoints) + [cache.snapshot()]:
            self.prefix_cache.insert(snap)


class ChatReply:
    """One reply in flight: :meth:`next` gives its :class:`Delta` pieces (and, when asked
    for, a :class:`TokenLogprob` before each token's text), then its :class:`ReplyStats`,
    then :attr:`END`; :meth:`cancel` stops it. With ``n > 1`` choices the items of all
    choices interleave, each carrying its ``choice``; :attr:`END` follows the last one."""

    END = object()

    def __init__(self, engine: ChatEngine, prompt: PreparedPrompt, handle: RequestHandle):
        self.engine, self.prompt, self.handle = engine, prompt, handle
        n = handle.request.n
        self.parsers = [
            ReplyParser(in_think=prompt.opens_think, parse_tools=prompt.parse_tools, raw=prompt.raw) for _ in range(n)
        ]
        self._queue: List[Union[Delta, ReplyStats, TokenLogprob]] = []
        self._ended = False

    @property
    def parser(self) -> ReplyParser:
        """The first choice's parser."""
        return self.parsers[0]

    def cancel(self) -> None:
        self.handle.cancel()

    def close(self) -> None:
        """Stop the reply if it is still running (on the engine's thread: at once)."""
        if not self.handle.unfinished:
            return
        if self.engine.engine.threaded:
            self.handle.cancel()
        else:
            self.engine.engine.abort(self.handle)
            # No work may still be running on this thread's stream when it (or the process) ends.
            mx.synchronize(generation_stream)

    def next(self, timeout: Optional[float] = None, cancel: Optional[Callable[[], bool]] = None):
        """The next piece, None when nothing came within ``timeout`` (engine thread), or
        :attr:`END`. ``cancel()`` True stops the reply (checked before every engine step
        without an engine thread, and on every call)."""
        while not self._queue:
            if self._ended:
                return ChatReply.END
            if cancel is not None and not self.handle.cancelled and cancel():
                self.handle.cancel()
            event = self.handle.get(timeout=timeout, should_stop=cancel)
            if event is None:
                if self.handle.unfinished:
                    return None  # timed out
                self._ended = True
                continue
            parser = self.parsers[event.index]
            if event.token_logprob is not None and event.token not in self.engine.engine.eos:
                self._queue.append(TokenLogprob(event.index, event.token, event.token_logprob, event.top_logprobs))
            self._queue.extend(self._tag(parser.feed(event.text), event.index))
            if event.finish_reason is not None:
                self._queue.extend(self._tag(parser.finish(), event.index))
                self._queue.append(self._stats(event))
                self._ended = self.handle.unfinished == 0
        return self._queue.pop(0)

    @staticmethod
    def _tag(deltas: List[Delta], choice: int) -> List[Delta]:
        for d in deltas:
            d.choice = choice
        return deltas

    def _stats(self, event: TokenEvent) -> ReplyStats:
        s = event.stats
        finish = event.finish_reason
        if finish == "stop" and self.parsers[event.index].tool_calls:
            finish = "tool_calls"
        return ReplyStats(
            finish_reason=finish, prompt_tokens=s.prompt_tokens, cached_tokens=s.cached_tokens,
            generation_tokens=s.generation_tokens, prompt_tps=s.prompt_tps, generation_tps=s.generation_tps,
            peak_memory=peak_memory_gb(), context_tokens=s.context_tokens, max_context=self.engine.max_context,
            time_to_first_token=s.time_to_first_token, choice=event.index,
        )  # fmt: skip


def _token_id(tokenizer, token: str) -> Optional[int]:
    """The id of a special token, or None when the vocabulary has no such token."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def end_mlx_thread() -> None:
    """Call last on a thread that ran the model, before it ends.

    MLX 0.32 needs ``mx.clear_streams()`` at the end of every thread that used its
    streams (ml-explore/mlx#3395, #4327): otherwise the process can abort at exit
    ("terminate called without an active exception"). Pending work is finished first.
    """
    gc.collect()  # lazy arrays in reference cycles: free them on their own thread
    mx.synchronize(generation_stream)
    mx.synchronize()
    mx.clear_streams()
    forget_lane_streams()


# ----------------------------------------------------------------- session
def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename (never half-written)."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ChatError(f"cannot write {path}: {e.strerror or e}") from None


def cache_file_for(path: Union[str, os.PathLike]) -> Path:
    """Where :meth:`ChatSession.save` keeps the prompt cache next to a conversation file."""
    path = Path(path)
    return path.with_name(path.name + ".cache.safetensors")


class ChatSession:
    """One conversation: system message, messages, sampling settings, and the engine
    that answers. Used by the terminal chat and the desktop app.

    ``messages`` holds the user and assistant turns (OpenAI format; assistant turns
    carry ``reasoning_content`` when the model thought).
    """

    def __init__(
        self,
        engine: Optional[ChatEngine] = None,
        system: Optional[str] = None,
        settings: Optional[SamplingSettings] = None,
        template_kwargs: Optional[dict] = None,
        title: str = "",
        id: Optional[str] = None,
    ):
        self.engine = engine
        self.system = system or None
        self.settings = settings or SamplingSettings()
        self.template_kwargs = dict(template_kwargs or {})
        self.messages: List[dict] = []
        self.title = title
        self.id = id or uuid.uuid4().hex[:12]
        self.last_stats: Optional[ReplyStats] = None

    def chat_messages(self) -> List[dict]:
        """The messages the model sees (system message first)."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + list(self.messages)

    def reset(self) -> None:
        """Forget the conversation (the system message and settings stay)."""
        self.messages = []
        self.last_stats = None

    def truncate(self, n: int) -> List[dict]:
        """Keep the first ``n`` messages and return the ones dropped (to edit a message
        or regenerate a reply: truncate to before it, then :meth:`send` again).
        Raises :class:`ChatError` when ``n`` is not in ``[0, len(messages)]``."""
        if not isinstance(n, int) or not 0 <= n <= len(self.messages):
            raise ChatError(f"cannot truncate a conversation of {len(self.messages)} messages to {n}")
        dropped = self.messages[n:]
        del self.messages[n:]
        self.last_stats = None
        return dropped

    def send(self, text: str, cancel: Optional[Callable[[], bool]] = None) -> Iterator[Union[Delta, ReplyStats]]:
        """Add a user message and stream the reply (see :meth:`ChatEngine.generate`).

        The assistant message is added to the history when the reply ends, also when
        it is cancelled or interrupted (with the text produced so far). When nothing
        could be generated (the prompt cannot be prepared: :class:`ChatError`; bad
        settings: ValueError) the history stays as it was.
        """
        if self.engine is None:
            raise ChatError("no model is loaded")
        if not self.title:
            self.title = " ".join(text.split())[:60]
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self.engine.prepare(self.chat_messages(), template_kwargs=self.template_kwargs)
        except BaseException:
            self.messages.pop()
            raise
        content, reasoning = [], []
        started = False
        try:
            for item in self.engine.generate(prompt, self.settings, cancel):
                started = True
                if isinstance(item, Delta):
                    (reasoning if item.kind == "reasoning" else content).append(item.text)
                else:
                    self.last_stats = item
                yield item
        except BaseException:
            if not started:  # nothing was generated (bad settings, ...): as if never sent
                self.messages.pop()
            raise
        finally:
            if started:
                reply = {"role": "assistant", "content": "".join(content)}
                if reasoning:
                    reply["reasoning_content"] = "".join(reasoning)
                self.messages.append(reply)

    # ....................................................... persistence
    def to_dict(self) -> dict:
        return {
            "format": CONVERSATION_FORMAT,
            "version": 1,
            "id": self.id,
            "title": self.title,
            "system": self.system,
            "settings": self.settings.to_dict(),
            "template_kwargs": self.template_kwargs,
            "messages": self.messages,
        }

    def load_dict(self, data: dict, source: str = "conversation") -> None:
        """Replace this session's conversation with ``data`` (from :meth:`to_dict`)."""
        if not isinstance(data, dict) or data.get("format") != CONVERSATION_FORMAT:
            raise ChatError(f"{source} is not a qnext-mlx conversation file")
        messages = data.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict)
            and m.get("role") in ("user", "assistant", "tool")
            and isinstance(m.get("content", ""), str)
            for m in messages
        ):
            raise ChatError(f"{source} has a damaged message list")
        try:
            settings = SamplingSettings.from_dict(data.get("settings") or {})
        except (TypeError, ValueError) as e:
            raise ChatError(f"{source} has bad settings: {e}") from None
        self.messages = messages
        self.system = data.get("system") or None
        self.settings = settings
        self.template_kwargs = dict(data.get("template_kwargs") or {})
        self.title = str(data.get("title") or "")
        self.id = str(data.get("id") or self.id)
        self.last_stats = None

    def save(self, path: Union[str, os.PathLike], with_cache: bool = False) -> None:
        """Write the conversation as JSON (atomically); ``with_cache`` also writes the
        prompt cache holding it next to it (:func:`cache_file_for`), so :meth:`load`
        can continue without prefilling the history again."""
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=1))
        # a parallel run's ranks each hold a share of the state: no cache file then
        with_cache = with_cache and self.engine is not None and not self.engine.parallel
        cache = self.engine.latest_cache() if with_cache else None
        if cache is not None and cache.offset:
            cache.save(cache_file_for(path))

    def load(self, path: Union[str, os.PathLike], with_cache: bool = False) -> Optional[str]:
        """Read a conversation written by :meth:`save`. With ``with_cache``, also load
        the prompt cache next to it when there is one; returns a note when that cache
        could not be used (the conversation is loaded anyway)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ChatError(f"{path} does not exist") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ChatError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        self.load_dict(data, str(path))
        cache_path = cache_file_for(path)
        if with_cache and self.engine is not None and not self.engine.parallel and cache_path.exists():
            try:
                self.engine.add_cache(ModelCache.load(cache_path, self.engine.model))
            except CacheError as e:
                return f"prompt cache not used: {e}"
        return None
