"""scripts/bench_mac.py (meant for Macs) runs end to end at tiny sizes on the CPU backend.

The bundled demo model converted to 4 bits (MTP head kept) is benchmarked with
``--quick``: both engines must agree (the script's parity gate), and the JSON, chart
and markdown must hold every section a Mac user would paste into an issue. The
kernel-choice table is checked on a decision as a Mac run records it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def demo_4bit(tmp_path_factory):
    from qnext_mlx.checkpoint import convert as cv
    from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR

    out = tmp_path_factory.mktemp("bench-mac") / "demo-4bit"
    cv.convert(DEMO_MODEL_DIR, out, q_bits=4, q_group_size=64, progress=False)
    return out


def test_quick_run_writes_json_chart_and_markdown(demo_4bit, tmp_path):
    out = tmp_path / "report"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_mac.py"),
            "--model",
            str(demo_4bit),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((out / "bench_mac.json").read_text())
    parity = data["parity"]  # the demo model runs in bfloat16: agreement, not bit equality
    assert parity["ok"] and parity["activations"] == "bfloat16" and parity["top1_agreement"] >= 0.9
    assert set(data["prefill"]) == {"64", "128"}
    for row in [*data["prefill"].values(), data["decode"]]:
        assert set(row) >= {"qnext_mlx", "mlx_lm", "ratio", "ratio_cpu"}
        assert row["qnext_mlx"] > 0 and row["mlx_lm"] > 0
    assert data["decode"]["tokens"] == 8 and data["reps"] == 2
    for name in ("qnext_mlx", "mlx_lm"):
        assert data["memory_gb"][name]["peak"] >= data["memory_gb"][name]["weights"] > 0
        assert len(data["timings"][name]["decode"]["runs"]) == 2  # both reps kept
    mtp = data["mtp"]
    assert set(mtp["mtp"]) == {"1"} and 0 <= mtp["mtp"]["1"]["acceptance_rate"] <= 1
    assert data["metal"] is False and data["kernel_choices"] == [] and data["mtp_default"] is False
    assert set(data["machine"]) >= {"chip", "os", "mlx", "qnext_mlx", "mlx_lm"}
    assert str(demo_4bit) not in (out / "bench_mac.json").read_text()  # no home folder in the report
    md = (out / "bench_mac.md").read_text()
    assert md.startswith("## qnext-mlx vs mlx-lm on ")
    assert "| prefill 64 |" in md and "| decode |" in md and "| K=1 |" in md
    assert "Not a Metal run" in md and md in res.stdout
    assert (out / "bench_mac.png").stat().st_size > 1000 or "matplotlib is not installed" in res.stderr


def test_markdown_lists_the_kernel_choices():
    import bench_mac

    trial = lambda c, s, e, t: {"candidate": c, "status": s, "max_error": e, "time_us": t, "detail": ""}  # noqa: E731
    result = {
        "argv": ["--model", "m"],
        "metal": True,
        "machine": {"chip": "Apple M3 Max (applegpu_g15s)", "os": "Darwin 15.1", "mlx": "0.32.4", "mlx_lm": "0.32.2"}
        | {"qnext_mlx": "0.1.0", "device": "Device(gpu, 0)"},
        "model": {"name": "m", "weights_gb": 41.8},
        "reps": 2,
        "parity": {"max_logit_diff": 1e-3, "max_abs_logit": 20.0, "activations": "bfloat16", "top1_agreement": 1.0},
        "prefill": {"512": {"qnext_mlx": 900.0, "mlx_lm": 800.0, "ratio": 1.125, "ratio_cpu": 1.0}},
        "decode": {"qnext_mlx": 60.0, "mlx_lm": 55.0, "ratio": 1.09, "ratio_cpu": 1.0, "same_tokens": True},
        "memory_gb": {"qnext_mlx": {"weights": 41.8, "peak": 43.0}, "mlx_lm": {"weights": 41.8, "peak": 44.0}},
        "mtp_skipped": "--no-mtp",
        "kernel_choices": [
            {
                "op": "gdn_decode",
                "config": "dtype=bfloat16 B=1 T=1",
                "choice": "qnext",
                "how": "measured",
                "trials": [trial("qnext", "chosen", 1e-6, 41.0), trial("mlx-lm", "slower", 3e-3, 55.0)],
            }
        ],
    }
    md = bench_mac.markdown(result)
    assert "## qnext-mlx vs mlx-lm on Apple M3 Max" in md
    assert "| prefill 512 | 900.0 | 800.0 | 1.12x | 1.00x |" in md
    row = "| gdn_decode | dtype=bfloat16 B=1 T=1 | qnext (measured) | qnext: chosen, err 1.0e-06, 41 us; "
    assert row + "mlx-lm: slower, err 3.0e-03, 55 us |" in md
    assert "MTP: --no-mtp." in md and "Not a Metal run" not in md
