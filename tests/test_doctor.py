"""`python -m qnext_mlx.doctor` reports the backend and every kernel's status."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx

from qnext_mlx.kernels.registry import kernel_status


def test_doctor_json_lists_every_kernel():
    out = subprocess.run(
        [sys.executable, "-m", "qnext_mlx.doctor", "--json"], check=True, capture_output=True, text=True
    ).stdout
    info = json.loads(out)
    assert info["mlx"] == mx.__version__
    assert set(info["kernels"]) == set(kernel_status())
    expected = "no-metal" if not mx.metal.is_available() else None
    for st in info["kernels"].values():
        assert st["status"] in ("no-metal", "unverified", "ok", "fallback")
        if expected:
            assert st["status"] == expected


def test_doctor_text_and_bad_flag():
    res = subprocess.run([sys.executable, "-m", "qnext_mlx.doctor"], capture_output=True, text=True)
    assert res.returncode == 0 and "backend:" in res.stdout and "gdn_decode" in res.stdout
    res = subprocess.run([sys.executable, "-m", "qnext_mlx.doctor", "--nope"], capture_output=True, text=True)
    assert res.returncode == 2 and "unrecognized arguments: --nope" in res.stderr
    assert "Traceback" not in res.stderr
