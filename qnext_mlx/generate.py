"""Text generation: the token loop, streaming text with stats, and the command line.

    python -m qnext_mlx.generate --prompt "Why is the sky blue?" [--model PATH_OR_REPO]

Layers, from the bottom:

* :func:`forward` / :func:`prefill` run the model over ids with a
  :class:`~qnext_mlx.cache.ModelCache`, leaving the cache consistent when
  interrupted (Ctrl-C), failing mid-call, or stopped between prefill chunks
  (``should_stop``: how the chat surfaces cancel a long prompt's prefill).
* :func:`generate_tokens` is THE decode loop: it yields ``(token, logprobs)``
  one token at a time; with ``mtp=`` it hands over to the speculative loop of
  :mod:`qnext_mlx.speculative` (MTP drafts, one verify pass per step), which
  keeps the same contract.
* :func:`stream_generate` adds prompt reuse, detokenization, EOS and stop
  strings, and stats; :func:`generate` collects the text.
* :func:`main` is the CLI.

Sampling uses mlx-lm's sampler and logits processors; defaults follow the
Qwen3-Next model card (temperature 0.7, top_p 0.8, top_k 20, min_p 0).
"""

from __future__ import annotations

import argparse
import importlib
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
from mlx_lm.sample_utils import make_presence_penalty, make_repetition_penalty, make_sampler

from . import speculative
from .cache import ModelCache
from .errors import ModelNotFoundError, QnextError, run_cli
from .loading import load
from .rope import add_rope_arguments, apply_rope_arguments

# mlx-lm's generate module (the package re-exports a function under the same name)
_mlx_generate = importlib.import_module("mlx_lm.generate")

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
REAL_MODEL_REPO = "Qwen/Qwen3-Next-80B-A3B-Instruct"
DEFAULT_MAX_TOKENS = 16384  # the model card: adequate for most queries
DEFAULT_TEMP = 0.7
DEFAULT_TOP_P = 0.8
DEFAULT_TOP_K = 20
DEFAULT_MIN_P = 0.0
DEFAULT_PREFILL_STEP_SIZE = 2048
# Prompts longer than this get a prefill progress bar on stderr (progress=None).
PROGRESS_MIN_TOKENS = 4096

Sampler = Callable[[mx.array], mx.array]
# () -> True to stop generating (a client went away, Ctrl-C, a Stop button)
StopCheck = Callable[[], bool]
# (tokens so far [N] (prompt + generated), logits [1, vocab]) -> logits [1, vocab]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class GenerationResponse(_mlx_generate.GenerationResponse):
    """One step of :func:`stream_generate` (mlx-lm's response, so mlx-lm's server code accepts it).

    Fields: ``text`` (new text piece, may be empty), ``token``, ``logprobs`` ``[vocab]``,
    ``from_draft``, ``prompt_tokens``, ``prompt_tps`` (prompt tokens processed per second),
    ``generation_tokens``, ``generation_tps``, ``peak_memory`` (GB), ``finish_reason``
    (None, "stop" or "length"), and ``cached_tokens``: prompt tokens reused from the cache.
    With MTP speculative decoding: ``draft_tokens`` (drafts per step, 0 without MTP),
    ``acceptance_rate`` (accepted / proposed drafts so far) and ``mean_accepted_length``
    (tokens per verify pass, accepted drafts + 1); ``from_draft`` marks accepted drafts.
    """

    cached_tokens: int = 0
    draft_tokens: int = 0
    acceptance_rate: Optional[float] = None
    mean_accepted_length: Optional[float] = None


# --------------------------------------------------------------- sampling
def check_sampling(temp: float, top_p: float, top_k: int, min_p: float,
                   presence_penalty: float = 0.0, repetition_penalty: Optional[float] = None) -> None:
    """Raise ValueError (one line) for out-of-range sampling parameters."""
    if not temp >= 0:
        raise ValueError(f"temperature must be >= 0, got {temp}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if not -2 <= presence_penalty <= 2:
        raise ValueError(f"presence_penalty must be in [-2, 2], got {presence_penalty}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def make_logits_processors(prompt_len: int, presence_penalty: float = 0.0,
                           repetition_penalty: Optional[float] = None,
                           repetition_context_size: int = 20,
                           presence_context_size: int = DEFAULT_MAX_TOKENS) -> List[LogitsProcessor]:
    """mlx-lm's penalty processors, fed the right tokens.

    The presence penalty (OpenAI semantics, as the model card means it) counts the
    generated tokens only; the repetition penalty looks at the last
    ``repetition_context_size`` tokens of prompt + generation, as in mlx-lm.
    """
    processors: List[LogitsProcessor] = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    if presence_penalty:
        presence = make_presence_penalty(presence_penalty, presence_context_size)
        processors.append(lambda tokens, logits: presence(tokens[prompt_len:], logits))
    return processors


# ------------------------------------------------------------ model calls
def forward(model, cache: ModelCache, ids: mx.array, return_hidden: bool = False):
    """``model(ids [1, L], cache) -> logits [1, L, vocab]`` (and the final hidden
    states ``[1, L, hidden]`` with ``return_hidden``), all or nothing.

    Building the graph updates the layer caches one by one; if that is cut short
    (KeyboardInterrupt, an error) the cache is put back as it was, so it always
    holds exactly the tokens it has recorded.
    """
    snap = cache.snapshot()
    try:
        if return_hidden:
            return model(ids, cache=cache, return_hidden=True)
        return model(ids, cache=cache)
    except BaseException:
        cache.restore(snap)
        raise


def _eval_cache(cache: ModelCache) -> None:
    mx.eval([c.state for c in cache] + [c.state for c in cache.mtp])


def prefill(model, cache: ModelCache, tokens: Sequence[int], step_size: int = DEFAULT_PREFILL_STEP_SIZE,
            progress: Optional[bool] = None,
            on_hidden: Optional[Callable[[mx.array], None]] = None,
            should_stop: Optional[StopCheck] = None) -> bool:
    """Feed ``tokens`` through the model in chunks of ``step_size``, evaluating the
    cache after each (memory stays bounded by one chunk's activations).

    ``progress``: True/False forces the stderr progress bar on/off; None shows it
    for more than ``PROGRESS_MIN_TOKENS`` tokens. Interrupted (Ctrl-C), the cache
    holds exactly the chunks completed so far. ``on_hidden(h [1, chunk, hidden])``
    gets each chunk's final hidden states before the cache is evaluated (the MTP
    head's prefill, :mod:`qnext_mlx.speculative`).

    ``should_stop()`` is called before each chunk (so between chunks, once the
    previous one is evaluated): when it returns True no further chunk runs and
    the cache holds exactly the chunks completed so far, tokens recorded, so a
    later call can go on from there. Returns True when all ``tokens`` were
    processed, False when stopped early.
    """
    if step_size < 1:
        raise ValueError(f"prefill_step_size must be >= 1, got {step_size}")
    n = len(tokens)
    if n == 0:
        return True
    show = progress if progress is not None else n > PROGRESS_MIN_TOKENS
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="Prefill", unit="tok", unit_scale=True, file=sys.stderr, leave=False)
    try:
        for start in range(0, n, step_size):
            if should_stop is not None and should_stop():
                return False
            chunk = mx.array(list(tokens[start : start + step_size]), dtype=mx.int32)[None]
            if on_hidden is None:
                forward(model, cache, chunk)  # the logits are never evaluated, so never computed
            else:
                on_hidden(forward(model, cache, chunk, return_hidden=True)[1])
            _eval_cache(cache)
            mx.clear_cache()
            if bar is not None:
                bar.update(chunk.shape[1])
    finally:
        if bar is not None:
            bar.close()
    return True


def decode_step(model, cache: ModelCache, ids: mx.array) -> mx.array:
    """Run ``ids`` (``[L]``) and return the logits of the last position ``[1, vocab]``."""
    return forward(model, cache, ids[None])[:, -1, :]


def generate_tokens(
    model,
    cache: ModelCache,
    prompt: Sequence[int],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    progress: Optional[bool] = None,
    checkpoint_at: Sequence[int] = (),
    mtp: Optional[speculative.MTPDecoding] = None,
    should_stop: Optional[StopCheck] = None,
) -> Iterator[Tuple[int, mx.array]]:
    """Yield ``(token, logprobs [vocab])`` for up to ``max_tokens`` new tokens.

    The cache must already hold a prefix of ``prompt`` (``cache.offset`` tokens,
    e.g. after :meth:`ModelCache.reuse`, or none). The rest is prefilled, keeping a
    checkpoint just before the last prompt token (so the same prompt, or a longer
    one, can be reused later) and at the positions in ``checkpoint_at`` (e.g. the
    end of a shared system prompt); then decoding starts. Every token yielded has
    been fed to the model as well (decode is pipelined one step ahead), so when
    the loop ends the cache holds prompt + all yielded tokens.

    ``should_stop()`` is checked between prefill chunks (:func:`prefill`): when it
    returns True there, the loop ends without yielding anything and the cache holds
    the part of the prompt processed so far (a prefix of ``prompt``, reusable).
    Between generated tokens the caller decides (it just stops iterating).

    This is the one decode loop. ``mtp``: a :class:`~qnext_mlx.speculative.MTPDecoding`
    (drafts per step, sampling settings; ``sampler`` must then be None) decodes with
    MTP drafts instead, same contract (:func:`~qnext_mlx.speculative.speculative_generate_tokens`).
    """
    if mtp is not None:
        if sampler is not None:
            raise ValueError("MTP decoding samples from its settings (mtp.temp, ...), not from a sampler function")
        yield from speculative.speculative_generate_tokens(
            model, cache, prompt, decoding=mtp, max_tokens=max_tokens, logits_processors=logits_processors,
            prefill_step_size=prefill_step_size, progress=progress, checkpoint_at=checkpoint_at,
            should_stop=should_stop,
        )
        return
    prompt = list(prompt)
    if cache.offset >= len(prompt):
        raise ValueError(f"the cache already holds {cache.offset} tokens of a {len(prompt)}-token prompt")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    stream = _mlx_generate.generation_stream
    history = mx.array(prompt, dtype=mx.int32) if logits_processors else None

    def step(ids: mx.array, generated: bool = True) -> Tuple[mx.array, mx.array]:
        nonlocal history
        with mx.stream(stream):
            logits = decode_step(model, cache, ids)
            if logits_processors:
                if generated:  # the prompt is in the history already
                    history = mx.concatenate([history, ids])
                for processor in logits_processors:
                    logits = processor(history, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            return sampler(logprobs), logprobs.squeeze(0)

    with mx.stream(stream):
        for stop in sorted(set(checkpoint_at)) + [len(prompt) - 1]:
            if cache.offset < stop <= len(prompt) - 1:
                if not prefill(model, cache, prompt[cache.offset : stop], prefill_step_size, progress,
                               should_stop=should_stop):
                    return
                cache.keep_checkpoint()
    y, logprobs = step(mx.array(prompt[-1:], dtype=mx.int32), generated=False)
    mx.async_eval(y, logprobs)
    n = 0
    while True:
        # Queue the next step before handing out this token: the device works while
        # the caller detokenizes. The yielded token is thereby in the cache too.
        if n + 1 < max_tokens:
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y, next_logprobs)
        else:  # the last token: feed it so the cache holds every yielded token
            with mx.stream(stream):
                forward(model, cache, y[None])
                mx.async_eval([c.state for c in cache])
        yield y.item(), logprobs
        n += 1
        if n == max_tokens:
            return
        if n % 256 == 0:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs


# ------------------------------------------------------------- text stream
def peak_memory_gb() -> float:
    """Peak memory in GB: MLX's counter on a GPU; on the CPU backend (where MLX does
    not count the memory-mapped weights) the process's max RSS when that is larger."""
    peak = mx.get_peak_memory()
    if peak and mx.default_device() != mx.cpu:
        return peak / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return max(peak, rss) / 1e9


def _encode(tokenizer, prompt: Union[str, Sequence[int], mx.array]) -> List[int]:
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        add_special = bos is None or not prompt.startswith(bos)
        return list(tokenizer.encode(prompt, add_special_tokens=add_special))
    if isinstance(prompt, mx.array):
        return prompt.reshape(-1).tolist()
    return [int(t) for t in prompt]


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could begin a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float = DEFAULT_TEMP,
    top_p: float = DEFAULT_TOP_P,
    top_k: int = DEFAULT_TOP_K,
    min_p: float = DEFAULT_MIN_P,
    presence_penalty: float = 0.0,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    prompt_cache: Optional[ModelCache] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    stop_strings: Optional[Sequence[str]] = None,
    progress: Optional[bool] = None,
    checkpoint_at: Sequence[int] = (),
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    mtp: Optional[bool] = None,
    num_draft_tokens: Optional[int] = None,
    should_stop: Optional[StopCheck] = None,
) -> Iterator[GenerationResponse]:
    """Generate text for ``prompt``, yielding :class:`GenerationResponse` pieces as they decode.

    Args:
        prompt: text (used as is: apply the chat template first, see
            :func:`format_prompt`) or token ids.
        temp, top_p, top_k, min_p: sampling (model-card defaults); ``temp=0`` is greedy.
        presence_penalty: subtracted from the logits of tokens already generated.
        repetition_penalty: mlx-lm's multiplicative penalty over the last 20 tokens.
        seed: seeds MLX's random generator first (reproducible sampling).
        prompt_cache: a :class:`ModelCache` to use and update; the part of the prompt
            it already holds is not processed again (see :meth:`ModelCache.reuse`).
            Without one, a fresh cache with ``kv_bits`` / ``kv_group_size`` is made.
        prefill_step_size: prompt chunk size.
        stop_strings: stop when the text contains one (it is not emitted).
        progress: prefill progress bar (None: only for long prompts).
        checkpoint_at: prompt positions where the cache keeps a reusable checkpoint
            (besides the one before the last prompt token), e.g. :func:`static_prefix_len`.
        sampler, logits_processors: replace the ones built from the arguments above.
        mtp: speculative decoding with the model's MTP head (same output; greedy:
            token for token, sampling: in distribution). None: on when the model has
            an MTP head, no ``sampler`` is given and MTP is faster on this backend
            (:func:`qnext_mlx.speculative.mtp_default`).
        num_draft_tokens: MTP drafts per step, 1..4 (default
            :data:`qnext_mlx.speculative.DEFAULT_NUM_DRAFT_TOKENS`).
        should_stop: called between prefill chunks and after every generated token
            (when the consumer asks for the next response); True ends the generation
            with ``finish_reason`` "cancelled". Stopped during the prefill, the one
            response has no text, ``token`` None and ``generation_tokens`` 0, and
            ``prompt_cache`` holds the prompt prefix processed so far (a later call
            with the same prompt goes on from there).

    Generation stops at the tokenizer's EOS tokens (not emitted), a stop string,
    ``max_tokens`` or ``should_stop``; the last response has ``finish_reason``
    "stop", "length" or "cancelled" and the final stats.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    check_sampling(temp, top_p, top_k, min_p, presence_penalty, repetition_penalty)
    decoding = _mtp_decoding(model, mtp, num_draft_tokens, sampler, temp, top_p, top_k, min_p)
    if seed is not None:
        mx.random.seed(seed)
    ids = _encode(tokenizer, prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    cache = prompt_cache if prompt_cache is not None else model.make_cache(kv_bits=kv_bits, kv_group_size=kv_group_size)
    if sampler is None:
        sampler = make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    if logits_processors is None:
        logits_processors = make_logits_processors(len(ids), presence_penalty, repetition_penalty,
                                                   presence_context_size=max_tokens)
    stops = [s for s in (stop_strings or []) if s]
    eos = set(tokenizer.eos_token_ids)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()

    tic = time.perf_counter()
    cached = cache.reuse(ids)
    tokens = generate_tokens(model, cache, ids, max_tokens=max_tokens,
                             logits_processors=logits_processors, prefill_step_size=prefill_step_size,
                             progress=progress, checkpoint_at=checkpoint_at,
                             sampler=None if decoding else sampler, mtp=decoding, should_stop=should_stop)
    pending = ""  # text held back because it may be the start of a stop string
    prompt_tps = 0.0
    n = 0
    token, logprobs = None, None

    def response(text: str, finish: Optional[str]) -> GenerationResponse:
        elapsed = time.perf_counter() - tic
        stats = decoding.stats if decoding else None
        return GenerationResponse(
            text=text, token=token, logprobs=logprobs, from_draft=bool(stats and stats.from_draft),
            prompt_tokens=len(ids), prompt_tps=prompt_tps, generation_tokens=n,
            generation_tps=n / elapsed if elapsed > 0 else 0.0, peak_memory=peak_memory_gb(),
            finish_reason=finish, cached_tokens=cached,
            draft_tokens=decoding.num_draft_tokens if decoding else 0,
            acceptance_rate=stats.acceptance_rate if stats else None,
            mean_accepted_length=stats.mean_accepted_length if stats else None,
        )

    with _mlx_generate.wired_limit(model, [_mlx_generate.generation_stream]):
        try:
            for token, logprobs in tokens:
                if n == 0:
                    prompt_time = time.perf_counter() - tic
                    prompt_tps = (len(ids) - cached) / prompt_time if prompt_time > 0 else 0.0
                    tic = time.perf_counter()
                n += 1
                if token in eos:
                    detokenizer.finalize()
                    yield response(pending + detokenizer.last_segment, "stop")
                    return
                detokenizer.add_token(token)
                if n == max_tokens:
                    detokenizer.finalize()
                text = pending + detokenizer.last_segment
                if stops:
                    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
                    if hits:
                        yield response(text[: min(hits)], "stop")
                        return
                    hold = 0 if n == max_tokens else _stop_holdback(text, stops)
                    text, pending = text[: len(text) - hold], text[len(text) - hold :]
                if n == max_tokens:
                    yield response(text, "length")
                    return
                yield response(text, None)
                if should_stop is not None and should_stop():
                    detokenizer.finalize()  # text held back (stop-string prefix, partial character) goes out
                    yield response(pending + detokenizer.last_segment, "cancelled")
                    return
            # generate_tokens yields at least one token unless should_stop fired during
            # the prefill: the reply is cancelled before its first token.
            elapsed = time.perf_counter() - tic
            prompt_tps = (cache.offset - cached) / elapsed if elapsed > 0 else 0.0
            yield response("", "cancelled")
        finally:
            tokens.close()


def _mtp_decoding(model, mtp: Optional[bool], num_draft_tokens: Optional[int], sampler, temp: float,
                  top_p: float, top_k: int, min_p: float):
    """The :class:`~qnext_mlx.speculative.MTPDecoding` for :func:`stream_generate`, or None (plain decoding)."""
    if num_draft_tokens is not None and not 1 <= num_draft_tokens <= speculative.MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens must be in 1..{speculative.MAX_DRAFT_TOKENS}, got {num_draft_tokens}")
    if mtp is None:
        mtp = sampler is None and speculative.mtp_default(model)
    if not mtp:
        return None
    if not speculative.mtp_available(model):
        raise ValueError("this model has no MTP head (no mtp.* tensors; converted without it?); decode without MTP")
    if sampler is not None:
        raise ValueError("MTP decoding needs the sampling settings (temp, top_p, ...), not a sampler function")
    return speculative.MTPDecoding(
        num_draft_tokens=num_draft_tokens or speculative.DEFAULT_NUM_DRAFT_TOKENS,
        temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
    )


def generate(model, tokenizer, prompt, **kwargs) -> str:
    """The whole text :func:`stream_generate` produces (same arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


# ------------------------------------------------------------ chat / think
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
    """Streaming filter that removes ``<think>...</think>`` spans from text pieces.

    Pieces may split a tag anywhere; a possible partial tag is held back until
    the next piece decides. ``inside=True`` starts within a think span (thinking
    models' templates open ``<think>`` in the prompt, so the reply only closes it).
    Whitespace right after ``</think>`` is dropped too.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, inside: bool = False):
        self.inside = inside
        self._buf = ""
        self._strip = False  # drop whitespace just after a closing tag

    def feed(self, text: str) -> str:
        """Filtered text that can be shown now."""
        self._buf += text
        out = []
        while True:
            tag = self.CLOSE if self.inside else self.OPEN
            i = self._buf.find(tag)
            if i < 0:
                hold = _stop_holdback(self._buf, [tag])
                ready, self._buf = self._buf[: len(self._buf) - hold], self._buf[len(self._buf) - hold :]
                if not self.inside:
                    out.append(self._visible(ready))
                break
            if not self.inside:
                out.append(self._visible(self._buf[:i]))
            else:
                self._strip = True
            self._buf = self._buf[i + len(tag) :]
            self.inside = not self.inside
        return "".join(out)

    def _visible(self, text: str) -> str:
        if self._strip:
            stripped = text.lstrip()
            if stripped:
                self._strip = False
            return stripped
        return text

    def flush(self) -> str:
        """Whatever is still held back (an unfinished tag outside a think span)."""
        text, self._buf = self._buf, ""
        return "" if self.inside else self._visible(text)


def prompt_opens_think(prompt_text: str) -> bool:
    """True when the formatted prompt leaves a ``<think>`` span open (thinking templates)."""
    return prompt_text.rfind(ThinkFilter.OPEN) > prompt_text.rfind(ThinkFilter.CLOSE)


# ---------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _ranged(kind, lo=None, hi=None, lo_open=False):
    """argparse type: a ``kind`` (int/float) in [lo, hi] (or (lo, hi] with ``lo_open``)."""

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        too_low = lo is not None and (v <= lo if lo_open else v < lo)
        too_high = hi is not None and v > hi
        if too_low or too_high or v != v:  # v != v: NaN
            bounds = [f"{'>' if lo_open else '>='} {lo}"] if lo is not None else []
            bounds += [f"<= {hi}"] if hi is not None else []
            raise argparse.ArgumentTypeError(f"must be {' and '.join(bounds)}, got {text}")
        return v

    return parse


def add_sampling_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--temp``, ``--top-p``, ``--top-k`` and ``--min-p`` with the model card's defaults
    and their ranges (``prefix`` starts each help text, e.g. the server's "default ")."""
    p.add_argument("--temp", type=_ranged(float, 0), default=DEFAULT_TEMP,
                   help=f"{prefix}sampling temperature; 0 = greedy (default {DEFAULT_TEMP})")
    p.add_argument("--top-p", type=_ranged(float, 0, 1, lo_open=True), default=DEFAULT_TOP_P,
                   help=f"{prefix}nucleus sampling (default {DEFAULT_TOP_P})")
    p.add_argument("--top-k", type=_ranged(int, 0), default=DEFAULT_TOP_K,
                   help=f"{prefix}top-k, 0 = off (default {DEFAULT_TOP_K})")
    p.add_argument("--min-p", type=_ranged(float, 0, 1), default=DEFAULT_MIN_P,
                   help=f"{prefix}minimum probability relative to the top token (default {DEFAULT_MIN_P:g})")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m qnext_mlx.generate",
        description="Generate text with Qwen3-Next in MLX. Text goes to stdout, stats to stderr.",
    )
    p.add_argument("--model", help="model folder or Hugging Face repo id (default: the bundled demo model)")
    p.add_argument("--prompt", required=True, help="the prompt; '-' reads it from stdin")
    p.add_argument("--system", help="system message (chat template)")
    p.add_argument("--no-chat-template", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--max-tokens", type=_ranged(int, 1), default=DEFAULT_MAX_TOKENS,
                   help=f"most tokens to generate (default {DEFAULT_MAX_TOKENS})")
    add_sampling_arguments(p)
    p.add_argument("--presence-penalty", type=_ranged(float, -2, 2), default=0.0,
                   help="penalty for tokens already generated, 0..2 against repetition (default 0)")
    p.add_argument("--repetition-penalty", type=_ranged(float, 0, lo_open=True), default=None,
                   help="multiplicative penalty over the last 20 tokens (default off)")
    p.add_argument("--seed", type=_ranged(int, 0, 2**64 - 1), default=None, help="random seed (reproducible sampling)")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help="quantize the attention KV cache")
    p.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=64,
                   help="group size of the quantized KV cache (default 64)")
    p.add_argument("--prefill-step-size", type=_ranged(int, 1), default=DEFAULT_PREFILL_STEP_SIZE,
                   help=f"prompt chunk size (default {DEFAULT_PREFILL_STEP_SIZE})")
    p.add_argument("--prompt-cache", metavar="FILE",
                   help="load the cache from FILE when it exists, reuse it, and save it back afterwards")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--hide-thinking", action="store_true", help="do not print <think>...</think> spans")
    p.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=None,
                   help="speculative decoding with the model's MTP head (same output); default: on when the "
                        "model has one and MTP is faster on this backend (GPU: on, CPU backend: off)")
    p.add_argument("--num-draft-tokens", type=_ranged(int, 1, speculative.MAX_DRAFT_TOKENS), default=None,
                   metavar="K", help=f"MTP draft tokens per step, 1..{speculative.MAX_DRAFT_TOKENS} "
                                     f"(default {speculative.DEFAULT_NUM_DRAFT_TOKENS})")
    p.add_argument("--verbose", action="store_true", help="also print model, prompt and cache details to stderr")
    add_rope_arguments(p)
    return p


def _read_prompt(arg: str) -> str:
    if arg != "-":
        return arg
    text = sys.stdin.read()
    if not text.strip():
        raise QnextError("--prompt - read an empty prompt from stdin")
    return text


def resolve_model_arg(model: Optional[str]) -> Tuple[str, bool]:
    """``(path_or_repo, is_demo)``: the bundled demo model when ``model`` is None."""
    if model is not None:
        return model, False
    if not (DEMO_MODEL_DIR / "config.json").exists():
        raise ModelNotFoundError(
            f"the bundled demo model is not installed (no {DEMO_MODEL_DIR / 'config.json'}); "
            f"pass --model PATH_OR_REPO, e.g. --model {REAL_MODEL_REPO}"
        )
    return str(DEMO_MODEL_DIR), True


def _open_cache(args, model) -> ModelCache:
    if args.prompt_cache and Path(args.prompt_cache).exists():
        cache = ModelCache.load(args.prompt_cache, model)
        if args.kv_bits is not None and cache.kv_bits != args.kv_bits:
            raise QnextError(
                f"{args.prompt_cache} holds a KV cache with kv_bits={cache.kv_bits}; "
                f"drop --kv-bits or use another --prompt-cache file"
            )
        return cache
    try:
        return model.make_cache(kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    except ValueError as e:
        raise QnextError(str(e)) from None


def _run(args) -> int:
    prompt = _read_prompt(args.prompt)
    path, is_demo = resolve_model_arg(args.model)
    if is_demo:
        print(
            "note: running the bundled demo model (a tiny model for trying the tools offline). "
            f"For the real model pass --model {REAL_MODEL_REPO} or a local MLX conversion.",
            file=sys.stderr,
        )
    model, tokenizer = load(path)  # a folder without tokenizer files: ModelNotFoundError
    apply_rope_arguments(args, model)  # before the cache: its fingerprint includes the RoPE scaling
    if args.mtp and not model.has_mtp:
        raise QnextError(f"{path} has no MTP head (no mtp.* tensors; converted without it?); drop --mtp")
    text = format_prompt(tokenizer, prompt, args.system, chat_template=not args.no_chat_template)
    ids = _encode(tokenizer, text)
    cache = _open_cache(args, model)
    if args.verbose:
        print(f"model: {path}", file=sys.stderr)
        print(f"prompt ({len(ids)} tokens):\n{text}", file=sys.stderr)
        print(f"cache: {cache.offset} tokens held, kv_bits={cache.kv_bits}", file=sys.stderr)
    think = ThinkFilter(inside=prompt_opens_think(text)) if args.hide_thinking else None
    checkpoints = [] if args.no_chat_template else [static_prefix_len(tokenizer, prompt, args.system)]
    last = None
    interrupted = False
    try:
        for last in stream_generate(
            model, tokenizer, ids, max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p,
            top_k=args.top_k, min_p=args.min_p, presence_penalty=args.presence_penalty,
            repetition_penalty=args.repetition_penalty, seed=args.seed, prompt_cache=cache,
            prefill_step_size=args.prefill_step_size, stop_strings=args.stop, checkpoint_at=checkpoints,
            mtp=args.mtp, num_draft_tokens=args.num_draft_tokens,
        ):
            piece = think.feed(last.text) if think else last.text
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
    if think:
        sys.stdout.write(think.flush())
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None:
        cached = f" ({last.cached_tokens} cached)" if last.cached_tokens else ""
        print(
            f"Prompt: {last.prompt_tokens} tokens{cached}, {last.prompt_tps:.1f} tok/s | "
            f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"Peak memory: {last.peak_memory:.2f} GB{_mtp_stats_text(last)}",
            file=sys.stderr,
        )
    if args.prompt_cache:
        cache.save(args.prompt_cache)
        if args.verbose:
            print(f"saved the prompt cache ({cache.offset} tokens) to {args.prompt_cache}", file=sys.stderr)
    if interrupted:
        held = f"; {args.prompt_cache} holds the {cache.offset} tokens processed" if args.prompt_cache else ""
        print(f"interrupted{held}", file=sys.stderr)
        return 130
    return 0


def _mtp_stats_text(r: GenerationResponse) -> str:
    """`` | MTP K=2: 71.3% accepted, 2.43 tokens/step`` when MTP ran, else empty."""
    if not r.draft_tokens:
        return ""
    return (f" | MTP K={r.draft_tokens}: {100 * (r.acceptance_rate or 0):.1f}% accepted, "
            f"{r.mean_accepted_length or 0:.2f} tokens/step")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status (2 for user errors, 130 when interrupted)."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args))  # Ctrl-C there: while loading, before generation started


if __name__ == "__main__":
    sys.exit(main())
