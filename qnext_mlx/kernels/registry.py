"""What every Metal kernel wrapper shares: kernel sources and objects, first-use
verification against the MLX reference, the decisions taken, and their status.

The kernel bodies live in the repository's top-level ``metal/`` folder (shipped
in the wheel as ``qnext_mlx/metal_src``): text above a ``// @body`` line is the
``header`` and text below it the ``source`` handed to ``mx.fast.metal_kernel``.
Every wrapper builds one *call description* (inputs, template, grid,
threadgroup, output shapes and dtypes) and hands it to a kernel *factory*:
``mx.fast.metal_kernel`` on a Mac, or the CPU emulator
``metal/shim/metal_shim.py:metal_kernel`` in tests, so the identical body runs
with the identical template and grid in both places.

On a Mac the first call with a new configuration first runs the kernel on a
small random input and compares it with the reference (the *verifier* given to
:func:`register_kernel`); on a mismatch it logs a warning and that
configuration uses the reference path from then on. :func:`kernel_status`
reports what happened (for ``python -m qnext_mlx.doctor``); a wrapper that also
keeps its kernel only when it is faster records that decision with
:func:`decide_once`.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx

__all__ = [
    "MAX_DECODE_T",
    "KernelCheck",
    "KernelFactory",
    "compare_outputs",
    "default_config",
    "decide_once",
    "decisions",
    "dtype_from_name",
    "forget_kernel_decisions",
    "is_verified",
    "kernel_object",
    "kernel_source_dir",
    "kernel_status",
    "load_kernel_source",
    "max_rel_err",
    "metal_available",
    "recorded_check",
    "register_kernel",
    "verify_kernel",
]

logger = logging.getLogger(__name__)

# Longest token run the decode kernels take (threadgroup arrays are sized by a
# power of two >= T); longer runs belong to the prefill paths.
MAX_DECODE_T = 16

KernelFactory = Callable[..., Any]


class KernelCheck(NamedTuple):
    """What was decided for one kernel configuration (an entry of ``kernel_status``)."""

    ok: bool  # the kernel is used for this configuration
    max_error: float  # max relative error against the reference (inf: it failed to run)
    detail: str  # why, for the status line (errors, tolerance, timings)
    note: str = ""  # shown even when ok (e.g. the timings that chose the kernel)


# verifier(factory, config) -> (ok, max relative error, detail)
Verifier = Callable[[KernelFactory, Optional[Tuple]], Tuple[bool, float, str]]

# kernel name -> {config: KernelCheck}
_VERIFIED: Dict[str, Dict[Tuple, KernelCheck]] = {}
_VERIFIERS: Dict[str, Verifier] = {}
_KNOWN_KERNELS: List[str] = []
# Configuration verified when none is given (the doctor, verify_kernel without a config).
_DEFAULT_CONFIGS: Dict[str, Tuple] = {}
# (id(factory), kernel name) -> kernel object
_KERNELS: Dict[Tuple[int, str], Any] = {}


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
    key = (id(factory), name)
    if key not in _KERNELS:
        header, body = load_kernel_source(file_name)
        _KERNELS[key] = factory(
            name=name, input_names=list(inputs), output_names=list(outputs), source=body, header=header
        )
    return _KERNELS[key]


# ------------------------------------------------------------- verification
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
    (relative to each reference's max magnitude; NaN fails)."""
    errs = {n: max_rel_err(g, r) for n, g, r in zip(names, got, ref)}
    worst = max(errs.values())
    ok = worst <= tol and all(e == e for e in errs.values())
    detail = ", ".join(f"{n} {e:.2e}" for n, e in errs.items()) + f" (tolerance {tol:.0e})"
    return ok, worst, detail


def register_kernel(name: str, verifier: Verifier, default_config: Tuple) -> None:
    """Make kernel ``name`` known to :func:`verify_kernel` and :func:`kernel_status`.

    ``verifier(factory, config)`` runs the kernel through ``factory`` on a small
    input for ``config`` (``None``: ``default_config``) and returns
    ``(ok, max relative error, detail)``; it must not raise for kernel failures.
    """
    _VERIFIERS[name] = verifier
    _DEFAULT_CONFIGS[name] = default_config
    if name not in _KNOWN_KERNELS:
        _KNOWN_KERNELS.append(name)


def default_config(name: str) -> Tuple:
    """The configuration kernel ``name`` is verified with when none is given."""
    return _DEFAULT_CONFIGS[name]


def verify_kernel(name: str, factory: KernelFactory, config: Optional[Tuple] = None) -> Tuple[bool, float, str]:
    """Run kernel ``name`` through ``factory`` on a small input and compare with the reference.

    ``config``: for ``"gdn_decode"`` ``(dtype, weight dtype, Dk, Dv, K, Hv/Hk)``
    (default float32, float32, 128, 128, 4, 2; the per-token states are checked
    too); for ``"gdn_prefill"`` ``(dtype, Dk, Dv, Hv/Hk)`` (default float32,
    128, 128, 2); for ``"moe_decode"`` see :mod:`qnext_mlx.kernels.metal_moe`.
    Dtypes are written as ``str(mx.float32)``.
    Returns ``(ok, max relative error, detail)``.
    """
    if name not in _VERIFIERS:
        raise ValueError(f"unknown kernel {name!r}; known: {', '.join(_KNOWN_KERNELS)}")
    return _VERIFIERS[name](factory, config)


def decide_once(name: str, config: Tuple, decide: Callable[[], KernelCheck]) -> KernelCheck:
    """The decision recorded for kernel ``name`` and ``config``, made by ``decide()`` the first time."""
    results = _VERIFIED.setdefault(name, {})
    if config not in results:
        results[config] = decide()
    return results[config]


def recorded_check(name: str, config: Tuple) -> Optional[KernelCheck]:
    """The decision recorded for ``name`` and ``config``, or None when none was taken."""
    return _VERIFIED.get(name, {}).get(config)


def is_verified(name: str, config: Tuple, factory: KernelFactory) -> bool:
    """True when kernel ``name`` matches the reference for ``config`` (verified the first time)."""

    def check() -> KernelCheck:
        ok, err, detail = verify_kernel(name, factory, config)
        if not ok:
            logger.warning(
                "Metal kernel %s %s disagrees with the reference (%s); using the reference path", name, config, detail
            )
        return KernelCheck(ok, err, detail)

    return decide_once(name, config, check).ok


def decisions() -> Dict[str, Dict[Tuple, KernelCheck]]:
    """A copy of every decision taken so far: kernel name -> {configuration: check}."""
    return {name: dict(results) for name, results in _VERIFIED.items() if results}


def forget_kernel_decisions() -> None:
    """Forget every decision and kernel object (the next use verifies again)."""
    _VERIFIED.clear()
    _KERNELS.clear()


def kernel_status(verify: bool = False) -> Dict[str, Dict[str, Any]]:
    """Per kernel: ``{"status": ..., "max_error": float | None, "detail": str}``.

    ``status``: ``"no-metal"`` (no Metal device, or the default device is the
    CPU: the reference path runs), ``"unverified"`` (not used yet), ``"ok"``
    (every configuration used so far matched the reference, and where a kernel
    is kept only when faster, was faster) or ``"fallback"`` (at least one did
    not; those use the reference path; ``detail`` says which and why).
    ``verify=True`` (for ``python -m qnext_mlx.doctor``) first verifies, on
    Metal, each kernel not used yet with its default configuration.
    """
    available = metal_available()
    if verify and available:
        for name in _KNOWN_KERNELS:
            if not _VERIFIED.get(name):
                is_verified(name, _DEFAULT_CONFIGS[name], mx.fast.metal_kernel)
    status = {}
    for name in _KNOWN_KERNELS:
        results = _VERIFIED.get(name, {})
        if not available and not results:
            status[name] = {
                "status": "no-metal",
                "max_error": None,
                "detail": "Metal is not available (or the default device is the CPU)",
            }
        elif not results:
            status[name] = {"status": "unverified", "max_error": None, "detail": "not used yet"}
        else:
            bad = {c: r for c, r in results.items() if not r.ok}
            worst = max(r.max_error for r in results.values())
            if bad:
                detail = "; ".join(f"{c}: {r.detail}" for c, r in bad.items())
                status[name] = {"status": "fallback", "max_error": worst, "detail": detail}
            else:
                # Entries with a note (e.g. a timing that chose the kernel) show it;
                # the others are counted.
                notes = [r.note for r in results.values() if r.note]
                plain = len(results) - len(notes)
                detail = "; ".join(([f"{plain} configuration(s) verified"] if plain else []) + notes)
                status[name] = {"status": "ok", "max_error": worst, "detail": detail}
    return status
