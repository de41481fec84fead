"""The model calls every decode loop is built from: all-or-nothing forward passes and chunked prefill.

* :func:`forward` runs the model over ids with a :class:`~qnext_mlx.model.ModelCache`,
  leaving the cache consistent when interrupted (Ctrl-C) or failing mid-call;
* :func:`prefill` feeds a prompt in chunks, evaluating the cache after each, and
  can be stopped between chunks (``should_stop``: how the chat surfaces cancel a
  long prompt's prefill);
* :data:`generation_stream` is mlx-lm's generation stream, which every loop here
  runs on (so mlx-lm's ``wired_limit`` and helpers apply).
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Optional, Sequence

import mlx.core as mx
from tqdm import tqdm

from ..model.cache import ModelCache

__all__ = [
    "DEFAULT_PREFILL_STEP_SIZE",
    "PROGRESS_MIN_TOKENS",
    "StopCheck",
    "decode_step",
    "eval_cache",
    "forward",
    "generation_stream",
    "mlx_lm_generate",
    "prefill",
]

# mlx-lm's generate module (the mlx_lm package re-exports a function under the same name)
mlx_lm_generate = importlib.import_module("mlx_lm.generate")
generation_stream = mlx_lm_generate.generation_stream

DEFAULT_PREFILL_STEP_SIZE = 2048
# Prompts longer than this get a prefill progress bar on stderr (progress=None).
PROGRESS_MIN_TOKENS = 4096

# () -> True to stop generating (a client went away, Ctrl-C, a Stop button)
StopCheck = Callable[[], bool]


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


def eval_cache(cache: ModelCache) -> None:
    """Evaluate every layer state of ``cache`` (MTP caches included)."""
    mx.eval([c.state for c in cache] + [c.state for c in cache.mtp])


def prefill(
    model,
    cache: ModelCache,
    tokens: Sequence[int],
    step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    progress: Optional[bool] = None,
    on_hidden: Optional[Callable[[mx.array], None]] = None,
    should_stop: Optional[StopCheck] = None,
) -> bool:
    """Feed ``tokens`` through the model in chunks of ``step_size``, evaluating the
    cache after each (memory stays bounded by one chunk's activations).

    ``progress``: True/False forces the stderr progress bar on/off; None shows it
    for more than ``PROGRESS_MIN_TOKENS`` tokens. Interrupted (Ctrl-C), the cache
    holds exactly the chunks completed so far. ``on_hidden(h [1, chunk, hidden])``
    gets each chunk's final hidden states before the cache is evaluated (the MTP
    head's prefill, :mod:`qnext_mlx.engine.speculative`).

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
            eval_cache(cache)
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
