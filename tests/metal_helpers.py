"""A Mac faked on Linux for the tests: the Metal shim (metal/shim) stands in for
``mx.fast.metal_kernel``, Metal is reported available, and mlx-lm's gated-delta
kernels are built through the shim, so the real dispatch (qnext_mlx.kernels.candidates)
runs every candidate: ours, mlx-lm's and the reference."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional
from unittest import mock

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "metal" / "shim"))

import metal_shim as ms  # noqa: E402

from qnext_mlx.kernels import candidates, registry  # noqa: E402


def mlx_lm_kernels(factory=ms.metal_kernel) -> Dict[str, object]:
    """mlx-lm's gated-delta kernel objects (its module globals, None without Metal),
    built by its own factories through ``factory``: their exact sources."""
    import mlx_lm.models.gated_delta as gd

    with (
        mock.patch.object(mx.metal, "is_available", return_value=True),
        mock.patch.object(mx.fast, "metal_kernel", factory),
    ):
        return {
            "_gated_delta_kernel": gd._make_gated_delta_kernel(has_mask=False, vectorized=False),
            "_gated_delta_kernel_masked": gd._make_gated_delta_kernel(has_mask=True, vectorized=False),
            "_gated_delta_kernel_vec": gd._make_gated_delta_kernel(has_mask=False, vectorized=True),
            "_gated_delta_kernel_vec_masked": gd._make_gated_delta_kernel(has_mask=True, vectorized=True),
            "_gated_delta_kernel_xtree": gd._make_gated_delta_kernel_xtree(),
            "_gated_delta_kernel_packed": gd._make_gated_delta_packed_kernel(),
        }


@contextlib.contextmanager
def fake_mac(
    factory: Callable = ms.metal_kernel, timer: Optional[Callable] = None, cache: Optional[Path] = None
) -> Iterator[Path]:
    """Inside the block the process looks like a Mac whose Metal compiler is the shim;
    ``timer(fn, candidate) -> us`` replaces the first-use timing (None: real timing).
    Decisions go to ``cache`` (default: a new empty folder; pass the same folder to
    two blocks to see the second start read the first one's decisions), which the
    block yields. Decisions in memory and kernel objects start and end empty."""
    import mlx_lm.models.gated_delta as gd

    made = cache is None
    cache = Path(tempfile.mkdtemp(prefix="qnext-cache-")) if made else cache
    candidates.forget()
    registry.forget_kernel_objects()
    try:
        with (
            mock.patch.dict(os.environ, {candidates.CACHE_DIR_ENV: str(cache)}),
            mock.patch.object(registry, "metal_available", return_value=True),
            mock.patch.object(mx.fast, "metal_kernel", factory),
            mock.patch.multiple(gd, **mlx_lm_kernels(factory)),
            candidates.using_timer(timer),
        ):
            yield cache
    finally:
        candidates.forget()
        registry.forget_kernel_objects()
        if made:
            shutil.rmtree(cache, ignore_errors=True)


def fixed_timer(times_us: Dict[str, float], calls: Optional[List[str]] = None) -> Callable:
    """A timer that runs each candidate once (so it must work) and reports ``times_us[name]``
    (default 1000 us); ``calls`` collects the names timed."""

    def timer(fn, name):
        mx.eval(fn())
        if calls is not None:
            calls.append(name)
        return times_us.get(name, 1000.0)

    return timer


def prefer(name: str, calls: Optional[List[str]] = None) -> Callable:
    """A timer under which candidate ``name`` is the fastest (1 us; the others 1000 us)."""
    return fixed_timer({name: 1.0}, calls)
