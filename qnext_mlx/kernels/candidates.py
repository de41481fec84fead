"""Per op, an ordered set of candidate implementations; the fastest one that matches the
reference on the user's own machine is kept, and the decision is cached on disk.

An :class:`Op` (``gdn_decode``, ``gdn_prefill``, ``moe_decode``, and the engine's
``mtp_default``) lists its candidates in order: ours (``qnext``), mlx-lm's where
it has one (``mlx-lm``), and the MLX reference (``reference``). The first call of an
op with a new *shape configuration* (dtypes and sizes; :attr:`Op.config`) on a
backend that has the op (``metal``: a Metal device and the GPU as default device):

1. runs the reference on the real inputs of that call;
2. runs every other candidate that supports them (:attr:`Candidate.unsupported`
   says why not, e.g. mlx-lm's DeltaNet kernel returns no per-token states for
   speculative verification) and compares its outputs with the reference's
   (:attr:`Op.verify`); a candidate that fails to run or disagrees is dropped,
   with a warning;
3. times the reference and every verified candidate on those inputs
   (:func:`time_us`: median of warm runs, graph building included, as decode
   does; or the timer given to :func:`using_timer`) and keeps the fastest.

So the op is never slower than any verified candidate, mlx-lm's included, on the
machine it runs on. The :class:`Decision` (every candidate's status, error and
time, and the choice) is written to a JSON file in the cache folder
(:func:`cache_dir`: ``$QNEXT_CACHE_DIR``, else ``~/Library/Caches/qnext-mlx`` on
macOS, ``$XDG_CACHE_HOME/qnext-mlx`` or ``~/.cache/qnext-mlx`` elsewhere), one
file per machine key: chip, OS, MLX and qnext-mlx versions (:func:`machine`).
Later processes read it and skip the measurement. ``QNEXT_KERNELS_REDO=1`` (or
:func:`redo`, ``python -m qnext_mlx.doctor --redo``) measures again;
``QNEXT_KERNELS=reference|mlx-lm|qnext`` forces one candidate for every kernel op
(where it cannot run a problem, the reference runs, and the decision says so).

The machinery is backend-neutral: a :class:`Backend` names when it is available
and its kernel factory (``mx.fast.metal_kernel`` for Metal, looked up at call
time so tests can substitute the shim's), and the candidates receive that factory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..atomic import atomic_path
from ..errors import QnextError
from ..version import __version__
from . import registry

__all__ = [
    "CACHE_DIR_ENV",
    "CANDIDATE_NAMES",
    "GPU",
    "METAL",
    "OVERRIDE_ENV",
    "REDO_ENV",
    "Backend",
    "Candidate",
    "Decision",
    "Op",
    "Timer",
    "Trial",
    "cache_dir",
    "cache_file",
    "config_string",
    "decide",
    "decisions",
    "forget",
    "gpu_available",
    "machine",
    "override",
    "redo",
    "register",
    "registered",
    "run",
    "status",
    "stored_decisions",
    "time_us",
    "using_timer",
]

logger = logging.getLogger(__name__)

OVERRIDE_ENV = "QNEXT_KERNELS"
REDO_ENV = "QNEXT_KERNELS_REDO"
CACHE_DIR_ENV = "QNEXT_CACHE_DIR"
CANDIDATE_NAMES = ("qnext", "mlx-lm", "reference")
CACHE_FORMAT = 1

# timer(fn, candidate name) -> microseconds per call of fn
Timer = Callable[[Callable[[], Any], str], float]


# ------------------------------------------------------------------ pieces
@dataclass(frozen=True)
class Backend:
    """Where an op's candidates can run: ``available()`` and the kernel ``factory()``
    (``mx.fast.metal_kernel``-compatible), both looked up when used."""

    name: str
    available: Callable[[], bool]
    factory: Callable[[], Any]


METAL = Backend("metal", lambda: registry.metal_available(), lambda: mx.fast.metal_kernel)


def gpu_available() -> bool:
    """MLX's default device is a GPU (Metal or CUDA)."""
    try:
        return mx.default_device() == mx.gpu
    except Exception:
        return False


# Any GPU backend as the default device: for decisions that are not kernels (the
# engine's MTP default); there is no kernel factory.
GPU = Backend("gpu", lambda: gpu_available(), lambda: None)


def _supported(*args, **kwargs) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Candidate:
    """One implementation of an op.

    ``run(factory, *args, **kwargs)`` returns the op's outputs (a tuple of arrays, or
    what the op defines); ``unsupported(*args, **kwargs)`` returns why it cannot
    take these inputs, or None.
    """

    name: str
    summary: str
    run: Callable[..., Any]
    unsupported: Callable[..., Optional[str]] = _supported


@dataclass(frozen=True)
class Op:
    """An operation with candidates (in order of preference on equal times).

    ``config(*args, **kwargs)``: the shape configuration, ``((name, value), ...)``,
    that a decision is made and cached for. ``verify(got, ref, *args, **kwargs)``:
    ``(ok, max error, detail)`` of a candidate's outputs against the reference's
    (None: the candidates are not compared, only timed). ``timing``: warm-up and
    timed runs of the default timer. ``samples()``: ``[(args, kwargs)]`` of random
    problems at the shapes the doctor measures. ``overridable``: ``QNEXT_KERNELS``
    applies to it.
    """

    name: str
    summary: str
    backend: Backend
    candidates: Tuple[Candidate, ...]
    reference: str
    config: Callable[..., Tuple[Tuple[str, Any], ...]]
    verify: Optional[Callable[..., Tuple[bool, float, str]]]
    timing: Tuple[int, int] = (2, 5)
    samples: Callable[[], List[Tuple[tuple, dict]]] = lambda: []
    overridable: bool = True

    def candidate(self, name: str) -> Candidate:
        """The candidate called ``name`` (``"reference"`` names the op's reference)."""
        if name == "reference":
            name = self.reference
        for c in self.candidates:
            if c.name == name:
                return c
        raise KeyError(f"{self.name} has no candidate {name!r}")


@dataclass
class Trial:
    """What happened to one candidate: ``status`` is ``chosen``, ``slower``,
    ``mismatch``, ``failed``, ``unsupported`` or ``not measured``."""

    candidate: str
    status: str
    max_error: Optional[float] = None
    time_us: Optional[float] = None
    detail: str = ""


@dataclass
class Decision:
    """The choice for one op, backend and shape configuration, and how it was made
    (``measured``, ``disk cache``, or forced by ``QNEXT_KERNELS``)."""

    op: str
    backend: str
    config: str
    choice: str
    how: str
    trials: List[Trial] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: Dict[str, Any]) -> "Decision":
        trials = [Trial(**t) for t in d.get("trials", [])]
        return Decision(d["op"], d["backend"], d["config"], d["choice"], d["how"], trials)


_OPS: Dict[str, Op] = {}
# (backend, op, config string) -> decision, for this process
_DECISIONS: Dict[Tuple[str, str, str], Decision] = {}
# (op, signature of the arguments) -> (decision, the objects whose ids the signature holds):
# the per-call lookup, cheaper than building the configuration (decode calls each op once
# per layer and token).
_BY_SIGNATURE: Dict[Tuple[str, Any], Tuple[Decision, List[Any]]] = {}
_DISK: Optional[Dict[str, Dict[str, Any]]] = None  # the cache file's decisions, read once
_REDO = False
_TIMER: Optional[Timer] = None
_WARNED: set = set()


def register(op: Op) -> Op:
    """Make ``op`` known to :func:`status` and the doctor (registering again replaces it)."""
    _OPS[op.name] = op
    return op


def registered() -> Dict[str, Op]:
    """Every registered op by name."""
    return dict(_OPS)


def config_string(config: Sequence[Tuple[str, Any]]) -> str:
    """``(("dtype", "bfloat16"), ("T", 1))`` -> ``"dtype=bfloat16 T=1"``."""
    return " ".join(f"{k}={v}" for k, v in config)


# ------------------------------------------------------------------- timing
def time_us(fn: Callable[[], Any], label: str = "", warmup: int = 2, runs: int = 5) -> float:
    """Median wall time of ``mx.eval(fn())`` in microseconds after ``warmup`` runs (the
    first compiles the kernels); graph building is included, as in decode."""
    for _ in range(warmup):
        mx.eval(fn())
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        mx.eval(fn())
        samples.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(samples)


@contextlib.contextmanager
def using_timer(timer: Optional[Timer]) -> Iterator[None]:
    """Time candidates with ``timer(fn, candidate name) -> microseconds`` inside the block."""
    global _TIMER
    previous, _TIMER = _TIMER, timer
    try:
        yield
    finally:
        _TIMER = previous


# ---------------------------------------------------------------- the cache
def cache_dir() -> Path:
    """``$QNEXT_CACHE_DIR``, else the platform's cache folder + ``qnext-mlx``."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "qnext-mlx"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qnext-mlx"


def _chip() -> str:
    try:
        info = mx.device_info()
        name = str(info.get("device_name") or "")
        arch = str(info.get("architecture") or "")
        return " ".join(p for p in (name, f"({arch})" if arch and arch != name else "") if p) or platform.machine()
    except Exception:  # MLX without device_info
        return platform.machine() or "unknown"


def machine() -> Dict[str, str]:
    """What a cached decision is valid for: chip, OS, MLX and qnext-mlx versions."""
    system = platform.system()
    release = platform.mac_ver()[0] if system == "Darwin" else platform.release()
    return {"chip": _chip(), "os": f"{system} {release}".strip(), "mlx": mx.__version__, "qnext_mlx": __version__}


def cache_file() -> Path:
    """This machine's decision file: ``kernels-<hash of machine()>.json`` in :func:`cache_dir`."""
    digest = hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"kernels-{digest}.json"


def _read_disk() -> Dict[str, Dict[str, Any]]:
    path = cache_file()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("ignoring the kernel decision cache %s (%s)", path, e)
        return {}
    if data.get("format") != CACHE_FORMAT or data.get("machine") != machine():
        return {}
    return dict(data.get("decisions", {}))


def _disk() -> Dict[str, Dict[str, Any]]:
    global _DISK
    if _DISK is None:
        _DISK = {} if (_REDO or os.environ.get(REDO_ENV) == "1") else _read_disk()
    return _DISK


def _store(key: str, decision: Decision) -> None:
    """Add ``decision`` to the cache file (re-read first: another process may have added
    entries), written to a temporary name and renamed."""
    entries = {} if _REDO else _read_disk()
    entries.update(_disk())
    entries[key] = decision.to_json()
    _disk()[key] = decision.to_json()
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "machine": machine(), "decisions": entries}, indent=1))
    except OSError as e:  # a read-only home: keep the decision for this process
        logger.warning("could not write the kernel decision cache %s (%s)", path, e)


def stored_decisions() -> List[Decision]:
    """The decisions in this machine's cache file."""
    return [Decision.from_json(d) for d in _read_disk().values()]


def decisions() -> List[Decision]:
    """The decisions this process has taken or read so far."""
    return list(_DECISIONS.values())


def forget(disk: bool = False) -> None:
    """Forget this process's decisions (the next use looks at the cache file again);
    ``disk``: also delete this machine's cache file."""
    global _DISK
    _DECISIONS.clear()
    _BY_SIGNATURE.clear()
    _DISK = None
    _WARNED.clear()
    if disk:
        with contextlib.suppress(FileNotFoundError):
            cache_file().unlink()


def redo(on: bool = True) -> None:
    """Measure every op again from now on in this process (the cache file is rewritten)."""
    global _REDO
    _REDO = on
    forget()


def override() -> Optional[str]:
    """The candidate ``QNEXT_KERNELS`` forces, or None; a bad value is a user error."""
    value = os.environ.get(OVERRIDE_ENV, "").strip()
    if not value:
        return None
    if value not in CANDIDATE_NAMES:
        raise QnextError(f"{OVERRIDE_ENV}={value!r}: expected one of {', '.join(CANDIDATE_NAMES)} (or unset)")
    return value


# ---------------------------------------------------------------- deciding
def _arrays(tree: Any) -> List[mx.array]:
    if isinstance(tree, mx.array):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [a for t in tree for a in _arrays(t)]
    if isinstance(tree, dict):
        return [a for t in tree.values() for a in _arrays(t)]
    return []


def _eval(out: Any) -> Any:
    arrays = _arrays(out)
    if arrays:
        mx.eval(arrays)
    return out


def _warn_once(key: Any, msg: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(msg, *args)


def _forced(op: Op, name: str, args: tuple, kwargs: dict, config: str) -> Decision:
    try:
        cand = op.candidate(name)
    except KeyError:
        cand = None
    reason = f"{op.name} has no {name!r} candidate" if cand is None else cand.unsupported(*args, **kwargs)
    if reason:
        msg = "%s=%s: %s %s: %s; using %s"
        _warn_once((op.name, name, config), msg, OVERRIDE_ENV, name, op.name, config, reason, op.reference)
        how = f"{OVERRIDE_ENV}={name} cannot run here ({reason})"
        return Decision(op.name, op.backend.name, config, op.reference, how)
    return Decision(op.name, op.backend.name, config, cand.name, f"forced by {OVERRIDE_ENV}={name}")


def _measure(op: Op, args: tuple, kwargs: dict, config: str) -> Tuple[Decision, Dict[str, Any]]:
    factory = op.backend.factory()
    _eval((args, kwargs))  # time the op only, not what produced its inputs
    ref = op.candidate(op.reference)
    ref_out = _eval(ref.run(factory, *args, **kwargs))
    outputs: Dict[str, Any] = {ref.name: ref_out}
    trials: Dict[str, Trial] = {ref.name: Trial(ref.name, "slower", 0.0 if op.verify else None, detail="the reference")}
    for cand in op.candidates:
        if cand is ref:
            continue
        reason = cand.unsupported(*args, **kwargs)
        if reason:
            trials[cand.name] = Trial(cand.name, "unsupported", detail=reason)
            continue
        try:
            out = _eval(cand.run(factory, *args, **kwargs))
        except Exception as e:  # a compile or launch failure on the device
            trials[cand.name] = Trial(cand.name, "failed", detail=f"{type(e).__name__}: {e}"[:500])
            logger.warning("%s %s: candidate %s failed to run (%s); not used", op.name, config, cand.name, e)
            continue
        err = None
        if op.verify is not None:
            ok, err, detail = op.verify(out, ref_out, *args, **kwargs)
            if not ok:
                trials[cand.name] = Trial(cand.name, "mismatch", err, detail=detail)
                msg = "%s %s: candidate %s disagrees with the reference (%s); not used"
                logger.warning(msg, op.name, config, cand.name, detail)
                continue
        outputs[cand.name] = out
        trials[cand.name] = Trial(cand.name, "slower", err)
    warmup, runs = op.timing
    timer = _TIMER or (lambda fn, label: time_us(fn, label, warmup, runs))
    for name in list(outputs):
        cand = op.candidate(name)
        try:
            trials[name].time_us = float(timer(lambda c=cand: c.run(factory, *args, **kwargs), name))
        except Exception as e:  # a failure on a later run
            trials[name] = Trial(name, "failed", trials[name].max_error, detail=f"{type(e).__name__}: {e}"[:500])
            if name != ref.name:
                del outputs[name]
    timed = [c.name for c in op.candidates if c.name in outputs and trials[c.name].time_us is not None]
    choice = min(timed, key=lambda n: trials[n].time_us) if timed else ref.name
    trials[choice].status = "chosen"
    ordered = [trials.get(c.name, Trial(c.name, "not measured")) for c in op.candidates]
    decision = Decision(op.name, op.backend.name, config, choice, "measured", ordered)
    times = ", ".join(f"{t.candidate} {t.time_us:.0f} us" for t in ordered if t.time_us is not None)
    logger.info("%s %s: using %s (%s)", op.name, config, choice, times)
    return decision, outputs


def _signature(tree: Any, objects: List[Any]) -> Any:
    """Shapes and dtypes of the arrays in ``tree``, plain values as they are, other objects
    (a model block) by identity (kept in ``objects`` so the identity stays theirs)."""
    if isinstance(tree, mx.array):
        return (tuple(tree.shape), tree.dtype)
    if isinstance(tree, (list, tuple)):
        return tuple(_signature(t, objects) for t in tree)
    if isinstance(tree, dict):
        return tuple((k, _signature(v, objects)) for k, v in sorted(tree.items()))
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    objects.append(tree)
    return ("object", id(tree))


def decide(op: Op, *args, **kwargs) -> Tuple[Decision, Optional[Any]]:
    """The decision for these inputs' shape configuration (taken now if it is the first
    time, see the module docstring), and the chosen candidate's outputs when they were
    computed while deciding (else None)."""
    objects: List[Any] = []
    signature = (op.name, _signature((args, kwargs), objects))
    known = _BY_SIGNATURE.get(signature)
    if known is not None:
        return known[0], None
    decision, outputs = _decide(op, args, kwargs)
    _BY_SIGNATURE[signature] = (decision, objects)
    return decision, outputs


def _decide(op: Op, args: tuple, kwargs: dict) -> Tuple[Decision, Optional[Any]]:
    config = config_string(op.config(*args, **kwargs))
    key = (op.backend.name, op.name, config)
    if key in _DECISIONS:
        return _DECISIONS[key], None
    forced = override() if op.overridable else None
    if forced:
        decision = _DECISIONS[key] = _forced(op, forced, args, kwargs, config)
        return decision, None
    disk_key = "/".join(key)
    stored = _disk().get(disk_key)
    if stored is not None:
        decision = Decision.from_json(stored)
        names = {c.name for c in op.candidates}
        if decision.choice in names and not op.candidate(decision.choice).unsupported(*args, **kwargs):
            decision.how = "disk cache"
            _DECISIONS[key] = decision
            return decision, None
    decision, outputs = _measure(op, args, kwargs, config)
    _DECISIONS[key] = decision
    _store(disk_key, decision)
    return decision, outputs.get(decision.choice)


def run(op: Op, *args, **kwargs) -> Any:
    """The op's outputs through the candidate chosen for these inputs (see :func:`decide`);
    the backend must be available."""
    decision, outputs = decide(op, *args, **kwargs)
    if outputs is not None:
        return outputs
    return op.candidate(decision.choice).run(op.backend.factory(), *args, **kwargs)


def status(measure: bool = False) -> Dict[str, Dict[str, Any]]:
    """Per registered op: backend, whether it is available here, its candidates
    (``name``, ``summary``) and its decisions (this process's, then the cache file's),
    as plain data for ``python -m qnext_mlx.doctor``. ``measure``: where the backend is
    available, first decide every op's sample problems (:attr:`Op.samples`)."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, op in _OPS.items():
        available = bool(op.backend.available())
        if measure and available:
            for args, kwargs in op.samples():
                decide(op, *args, **kwargs)
        seen = {(d.backend, d.op, d.config) for d in _DECISIONS.values()}
        mine = [d for d in _DECISIONS.values() if d.op == name]
        stored = [d for d in stored_decisions() if d.op == name and (d.backend, d.op, d.config) not in seen]
        for d in stored:
            d.how = "disk cache"
        out[name] = {
            "summary": op.summary,
            "backend": op.backend.name,
            "available": available,
            "reference": op.reference,
            "candidates": [{"name": c.name, "summary": c.summary} for c in op.candidates],
            "decisions": [d.to_json() for d in mine + stored],
        }
    return out
