"""`python -m qnext_mlx.doctor` reports the backend and, per op, the candidates and decisions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import mlx.core as mx

from qnext_mlx.kernels import candidates


def _doctor(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "qnext_mlx.doctor", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )


def test_doctor_json_lists_every_op_with_its_candidates():
    res = _doctor("--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["mlx"] == mx.__version__
    assert info["machine"] == candidates.machine()
    assert info["decision_cache"] == str(candidates.cache_file())
    ops = info["ops"]
    for name in ("gdn_decode", "gdn_prefill"):
        assert [c["name"] for c in ops[name]["candidates"]] == ["qnext", "mlx-lm", "reference"]
    assert [c["name"] for c in ops["moe_decode"]["candidates"]] == ["qnext", "mlx-lm"]
    assert [c["name"] for c in ops["mtp_default"]["candidates"]] == ["mtp", "off"]
    if not mx.metal.is_available():  # off a Mac: listed, nothing decided
        for op in ops.values():
            assert op["available"] is False and op["decisions"] == []


def test_doctor_shows_cached_decisions(tmp_path, capsys, monkeypatch):
    # A decision file as a Mac run leaves it, for this machine: the doctor lists it.
    from qnext_mlx import doctor

    trials = [
        candidates.Trial("qnext", "chosen", 1e-6, 41.0),
        candidates.Trial("mlx-lm", "slower", 3e-3, 55.0),
        candidates.Trial("reference", "slower", 0.0, 120.0, "the reference"),
    ]
    decision = candidates.Decision("gdn_decode", "metal", "dtype=bfloat16 B=1 T=1", "qnext", "measured", trials)
    monkeypatch.setenv(candidates.CACHE_DIR_ENV, str(tmp_path))
    candidates.forget()
    path = candidates.cache_file()
    key = "metal/gdn_decode/dtype=bfloat16 B=1 T=1"
    payload = {"format": 1, "machine": candidates.machine(), "decisions": {key: decision.to_json()}}
    path.write_text(json.dumps(payload))
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "dtype=bfloat16 B=1 T=1: qnext (disk cache)" in out
    assert re.search(r"qnext\s+chosen\s+err 1\.0e-06\s+41 us", out)
    assert re.search(r"reference\s+slower\s+err 0\.0e\+00\s+120 us", out)
    assert doctor.main(["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    (d,) = info["ops"]["gdn_decode"]["decisions"]
    assert d["choice"] == "qnext" and [t["time_us"] for t in d["trials"]] == [41.0, 55.0, 120.0]
    # --redo forgets them (and, on a Mac, measures again)
    try:
        assert doctor.main(["--redo", "--json"]) == 0
    finally:
        candidates.redo(False)
    assert json.loads(capsys.readouterr().out)["ops"]["gdn_decode"]["decisions"] == []
    assert not path.exists()


def test_doctor_text_bad_flag_and_bad_override():
    res = _doctor()
    assert res.returncode == 0 and "backend:" in res.stdout and "gdn_decode" in res.stdout
    assert "not decided here (no metal backend)" in res.stdout or mx.metal.is_available()
    res = _doctor("--nope")
    assert res.returncode == 2 and "unrecognized arguments: --nope" in res.stderr
    assert "Traceback" not in res.stderr
    res = _doctor("--json", QNEXT_KERNELS="fast")
    assert res.returncode == 2 and res.stderr.strip().startswith("error: QNEXT_KERNELS='fast'")
    assert "Traceback" not in res.stderr
