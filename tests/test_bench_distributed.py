"""scripts/bench_distributed.py runs end to end at tiny sizes: one process, our tensor and
pipeline parallel over 2 ranks and mlx-lm's pipeline mode (``mlx.launch`` on 127.0.0.1),
and writes the JSON and the chart (about a minute on 2 cores)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not installed"),
]


def test_tiny_run_writes_json_and_chart(tmp_path):
    out = tmp_path / "bd"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_distributed.py"), "--layers", "2", "--experts", "8",
           "--prompt-tokens", "16", "--decode-tokens", "4", "--reps", "1", "--work", str(tmp_path / "work"),
           "--out", str(out), "--timeout", "600"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "bd.json").read_text())
    assert (tmp_path / "bd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "bd.partial.json").exists()
    configs = result["configs"]
    assert list(configs) == ["qnext-1", "qnext-tensor-2", "qnext-pipeline-2", "mlx_lm-1", "mlx_lm-pipeline-2"]
    vocab = result["config"]["vocab_size"]
    for name, entry in configs.items():
        assert entry["ranks"] == (1 if name.endswith("-1") else 2)
        assert len(entry["per_rank"]) == entry["ranks"]
        (run,) = entry["runs"]
        assert len(run["tokens"]) == 4 and all(0 <= t < vocab for t in run["tokens"])
        assert run["prefill_tok_s"] > 0 and run["decode_tok_s"] > 0
        assert entry["best"]["decode_tok_s"] == run["decode_tok_s"]
    # 2 ranks on 2 cores: each rank runs one CPU lane of ours
    assert configs["qnext-tensor-2"]["cpu_lanes"] == max(1, (result["machine"]["cpus"] or 1) // 2)
    ratios = result["ratios"]
    assert ratios["qnext_tensor2_vs_mlx_lm_pipeline2_decode"] == pytest.approx(
        configs["qnext-tensor-2"]["best"]["decode_tok_s"] / configs["mlx_lm-pipeline-2"]["best"]["decode_tok_s"]
    )
    assert ratios["vs_same_engine_1"]["mlx_lm-pipeline-2"]["decode"] is not None
    assert "loadavg_start" in result["machine"] and "loadavg_end" in result["machine"]
    assert "ours tensor 2 / mlx-lm pipeline 2" in res.stdout
