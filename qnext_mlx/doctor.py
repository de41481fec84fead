"""``python -m qnext_mlx.doctor``: the MLX backend, device memory, and per op the candidate
implementations, their errors and timings, and the choice.

On a Mac each op (``gdn_decode``, ``gdn_prefill``, ``moe_decode``) is decided for the
model's shapes unless already decided: every candidate (ours, mlx-lm's, the MLX
reference) is verified against the reference and timed, and the fastest verified
one is kept and cached on disk (``qnext_mlx.kernels.candidates``); the decisions a
model run took are listed too. ``--redo`` measures again. Elsewhere the ops and
their candidates are listed and the MLX reference runs.
"""

from __future__ import annotations

import json
import platform
import sys
from typing import Any, Dict

import mlx.core as mx

from .cli import Parser, run_cli
from .engine import speculative  # noqa: F401  (registers the mtp_default decision)
from .kernels import candidates


def _system_memory_bytes() -> int | None:
    try:
        if sys.platform == "darwin":
            import subprocess

            return int(subprocess.check_output(["sysctl", "-n", "hw.memsize"]).strip())
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def report(measure: bool = True) -> Dict[str, Any]:
    """Everything the doctor prints, as a dictionary; ``measure``: decide the ops' sample
    problems where their backend is available (see :func:`qnext_mlx.kernels.candidates.status`)."""
    info: Dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mlx": mx.__version__,
        "default_device": str(mx.default_device()),
        "metal_available": bool(mx.metal.is_available()),
        "cuda_available": bool(getattr(mx, "cuda", None) and mx.cuda.is_available()),
        "system_memory_bytes": _system_memory_bytes(),
    }
    if info["metal_available"] or info["cuda_available"]:
        try:
            dev = mx.device_info()
            info["device"] = {k: v for k, v in dev.items() if isinstance(v, (int, float, str))}
        except Exception as e:  # older MLX: no device_info
            info["device"] = {"error": str(e)}
    info["machine"] = candidates.machine()
    info["decision_cache"] = str(candidates.cache_file())
    info["override"] = candidates.override()
    info["ops"] = candidates.status(measure=measure)
    return info


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def _trial_line(t: Dict[str, Any]) -> str:
    err = "" if t["max_error"] is None else f"err {t['max_error']:.1e}"
    us = "" if t["time_us"] is None else f"{t['time_us']:.0f} us"
    detail = f"  {t['detail']}" if t["detail"] and t["status"] not in ("chosen", "slower") else ""
    return f"      {t['candidate']:<10} {t['status']:<12} {err:<13} {us:>12}{detail}"


def _print(info: Dict[str, Any]) -> None:
    print(f"MLX {info['mlx']} on Python {info['python']} ({info['platform']})")
    backend = "Metal" if info["metal_available"] else "CUDA" if info["cuda_available"] else "CPU"
    print(f"backend: {backend} (default device {info['default_device']})")
    print(f"system memory: {_gib(info['system_memory_bytes'])}")
    dev = info.get("device") or {}
    if "max_recommended_working_set_size" in dev:
        print(f"GPU working set (recommended max): {_gib(dev['max_recommended_working_set_size'])}")
    print(f"decisions cached in {info['decision_cache']}")
    if info["override"]:
        print(f"{candidates.OVERRIDE_ENV}={info['override']}: that candidate is forced where it can run")
    print("ops:")
    for name, op in info["ops"].items():
        print(f"  {name}: {op['summary']}")
        for c in op["candidates"]:
            ref = " (the reference)" if c["name"] == op["reference"] else ""
            print(f"    {c['name']:<10} {c['summary']}{ref}")
        if not op["available"] and not op["decisions"]:
            print(f"    not decided here (no {op['backend']} backend): {op['reference']} runs")
        for d in op["decisions"]:
            print(f"    {d['config']}: {d['choice']} ({d['how']})")
            for t in d["trials"]:
                print(_trial_line(t))


def main(argv=None) -> int:
    parser = Parser(prog="python -m qnext_mlx.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--redo", action="store_true", help="measure every op again (replaces this machine's cached decisions)"
    )
    args = parser.parse_args(argv)

    def run() -> int:
        if args.redo:
            candidates.forget(disk=True)
            candidates.redo()
        info = report()
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            _print(info)
        return 0

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
