"""CPU lanes: MLX CPU streams that independent pieces of work are spread over.

MLX's CPU ops are single-threaded, but each CPU stream runs on its own thread,
so work split over several streams ("lanes") runs on several cores. The
prefill GEMMs (:mod:`qnext_mlx.kernels.linear`), the grouped experts
(:mod:`qnext_mlx.kernels.moe`), the blocked attention
(:mod:`qnext_mlx.kernels.attention`) and, opt-in, the chunked delta rule
(:mod:`qnext_mlx.kernels.gated_delta_chunked`) use them.

How many: ``QNEXT_CPU_LANES`` or one per available core (at most 8); 1 turns
lanes off. On 2 idle cores a 2048-token prefill ran 1.55x faster with 2.

A stream belongs to the thread that made it: using another thread's stream
from a generation worker thread hangs the evaluation, so streams are kept per
calling thread (:func:`lane_streams`), and a thread that calls
``mx.clear_streams()`` must :func:`forget_lane_streams` afterwards.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import List

import mlx.core as mx

__all__ = [
    "cpu_lanes",
    "default_lanes",
    "forget_lane_streams",
    "lane_contexts",
    "lane_streams",
    "set_cpu_lanes",
]

_LANE_STREAMS = threading.local()


def default_lanes() -> int:
    """One lane per core available to this process, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _lanes_from_env() -> int:
    value = os.environ.get("QNEXT_CPU_LANES", "").strip()
    try:
        return max(1, int(value)) if value else default_lanes()
    except ValueError:
        return default_lanes()


_cpu_lanes = _lanes_from_env()


def set_cpu_lanes(n: int) -> None:
    """Spread CPU work over ``n`` streams (threads); 1 turns lanes off."""
    global _cpu_lanes
    _cpu_lanes = max(1, int(n))


def cpu_lanes() -> int:
    """How many CPU streams work is spread over (1 off the CPU device)."""
    return _cpu_lanes if mx.default_device() == mx.cpu else 1


def lane_streams(n: int) -> list:
    """``n`` CPU streams (each one a worker thread in MLX), created once per calling thread and reused."""
    streams = getattr(_LANE_STREAMS, "streams", None)
    if streams is None:
        streams = _LANE_STREAMS.streams = []
    while len(streams) < n:
        streams.append(mx.new_stream(mx.cpu))
    return streams[:n]


def forget_lane_streams() -> None:
    """Drop this thread's lane streams (after ``mx.clear_streams()`` they are stale)."""
    _LANE_STREAMS.streams = []


def lane_contexts(n: int) -> List:
    """``n`` context managers, each making one lane's stream the default (one
    no-op context for ``n == 1``)."""
    if n <= 1:
        return [contextlib.nullcontext()]
    return [mx.stream(s) for s in lane_streams(n)]
