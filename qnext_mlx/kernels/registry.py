"""What every Metal kernel wrapper shares: kernel sources and kernel objects, the Metal
check, and output comparison.

The kernel bodies live in the repository's top-level ``metal/`` folder (shipped
in the wheel as ``qnext_mlx/metal_src``): text above a ``// @body`` line is the
``header`` and text below it the ``source`` handed to ``mx.fast.metal_kernel``.
Every wrapper builds one *call description* (inputs, template, grid,
threadgroup, output shapes and dtypes) and hands it to a kernel *factory*:
``mx.fast.metal_kernel`` on a Mac, or the CPU emulator
``metal/shim/metal_shim.py:metal_kernel`` in tests, so the identical body runs
with the identical template and grid in both places. Which implementation an op
uses on the user's machine is decided by :mod:`qnext_mlx.kernels.candidates`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Sequence, Tuple

import mlx.core as mx

__all__ = [
    "MAX_DECODE_T",
    "KernelFactory",
    "compare_outputs",
    "dtype_from_name",
    "forget_kernel_objects",
    "kernel_object",
    "kernel_source_dir",
    "load_kernel_source",
    "max_rel_err",
    "metal_available",
]

# Longest token run the decode kernels take (threadgroup arrays are sized by a
# power of two >= T); longer runs belong to the prefill paths.
MAX_DECODE_T = 16

KernelFactory = Callable[..., Any]


# (factory, kernel name) -> kernel object
_KERNELS: Dict[Tuple[Any, str], Any] = {}


# ------------------------------------------------------------------ sources
def kernel_source_dir() -> Path:
    """The folder of the ``.metal`` files: ``qnext_mlx/metal_src`` in an installed wheel,
    the repository's ``metal/`` folder in a source checkout (editable installs)."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "metal_src"
    if packaged.is_dir():
        return packaged
    return package.parent / "metal"


@lru_cache(maxsize=None)
def load_kernel_source(file_name: str) -> Tuple[str, str]:
    """``(header, body)`` of the kernel source ``file_name``, split at the ``// @body`` line."""
    text = (kernel_source_dir() / file_name).read_text()
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip() == "// @body":
            return "".join(lines[:i]), "".join(lines[i + 1 :])
    return "", text


def kernel_object(
    factory: KernelFactory, file_name: str, name: str, inputs: Sequence[str], outputs: Sequence[str]
) -> Any:
    """The kernel object ``factory`` builds for ``file_name`` (made once per factory and name)."""
    key = (factory, name)
    if key not in _KERNELS:
        header, body = load_kernel_source(file_name)
        _KERNELS[key] = factory(
            name=name, input_names=list(inputs), output_names=list(outputs), source=body, header=header
        )
    return _KERNELS[key]


# ------------------------------------------------------------------ checks
def metal_available() -> bool:
    """Metal kernels can run: a Metal device and the GPU as default device (as mlx-lm checks)."""
    try:
        return bool(mx.metal.is_available()) and mx.default_device() == mx.gpu
    except Exception:  # mlx builds without the metal module
        return False


def dtype_from_name(name: str) -> Any:
    """``"float32"`` or ``str(mx.float32)`` -> ``mx.float32``."""
    return getattr(mx, name.rsplit(".", 1)[-1])


def max_rel_err(x: mx.array, ref: mx.array) -> float:
    """max |x - ref| / max(max |ref|, 1e-6), in float32."""
    x = x.astype(mx.float32)
    ref = ref.astype(mx.float32)
    scale = max(mx.abs(ref).max().item(), 1e-6)
    return mx.abs(x - ref).max().item() / scale


def compare_outputs(
    names: Sequence[str], got: Sequence[mx.array], ref: Sequence[mx.array], tol: float
) -> Tuple[bool, float, str]:
    """``(ok, worst relative error, detail)`` of kernel outputs against the reference's
    (relative to each reference's max magnitude; NaN and shape mismatches fail)."""
    errs = {}
    for n, g, r in zip(names, got, ref):
        errs[n] = max_rel_err(g, r) if tuple(g.shape) == tuple(r.shape) else float("inf")
    worst = max(errs.values())
    ok = worst <= tol and all(e == e for e in errs.values())
    detail = ", ".join(f"{n} {e:.2e}" for n, e in errs.items()) + f" (tolerance {tol:.0e})"
    return ok, worst, detail


def forget_kernel_objects() -> None:
    """Drop every kernel object (the next use builds them again, e.g. with another factory)."""
    _KERNELS.clear()
