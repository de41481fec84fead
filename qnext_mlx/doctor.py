"""``python -m qnext_mlx.doctor``: the MLX backend, device memory and each kernel's status.

On a Mac every Metal kernel is run once on a small input and compared with the
MLX reference; a kernel that disagrees is reported as ``fallback`` and the
engine uses the reference path for it.
"""

from __future__ import annotations

import json
import platform
import sys
from typing import Any, Dict

import mlx.core as mx

from .cli import Parser
from .kernels.registry import kernel_status


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


def report() -> Dict[str, Any]:
    """Everything the doctor prints, as a dictionary."""
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
    info["kernels"] = kernel_status(verify=True)
    return info


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def main(argv=None) -> int:
    parser = Parser(prog="python -m qnext_mlx.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    info = report()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"MLX {info['mlx']} on Python {info['python']} ({info['platform']})")
    backend = "Metal" if info["metal_available"] else "CUDA" if info["cuda_available"] else "CPU"
    print(f"backend: {backend} (default device {info['default_device']})")
    print(f"system memory: {_gib(info['system_memory_bytes'])}")
    dev = info.get("device") or {}
    if "max_recommended_working_set_size" in dev:
        print(f"GPU working set (recommended max): {_gib(dev['max_recommended_working_set_size'])}")
    print("kernels:")
    for name, st in info["kernels"].items():
        err = "" if st["max_error"] is None else f", max rel. error {st['max_error']:.1e}"
        print(f"  {name:<12} {st['status']}{err} - {st['detail']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
