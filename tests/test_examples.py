"""Every program in examples/ runs, offline, on the bundled demo model, as a user would run it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").exists(), reason="no demo model")


def run_example(name: str, *args: str, timeout: float = 300) -> str:
    p = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_every_example_is_tested():
    tested = set(re.findall(r'run_example\("([\w.]+)"', Path(__file__).read_text()))
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_python_api():
    out = run_example("python_api.py")
    reused = re.search(r"\[follow-up: prompt (\d+) tokens, (\d+) reused from the cache\]", out)
    assert reused and 0 < int(reused.group(2)) < int(reused.group(1)), out
    assert "</think>" not in out and "tok/s" in out


def test_convert_then_chat():
    out = run_example("convert_then_chat.py")
    assert re.search(r"converted: [\d.]+ MiB, 4\.\d+ bits/weight", out), out
    cached = [int(n) for n in re.findall(r"(\d+) cached\]", out)]
    assert len(cached) == 2 and cached[1] > 0, out  # the second turn reuses the first


def test_long_context_yarn():
    out = run_example("long_context_yarn.py")
    assert "native window 4,096 tokens -> YaRN window 6,144 tokens" in out, out
    prompt = int(re.search(r"\[prompt ([\d,]+) tokens", out).group(1).replace(",", ""))
    assert prompt > 4096


@pytest.fixture(scope="module")
def server_url():
    """A real server process on 127.0.0.1 (a free port), serving the demo model."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qnext_mlx.server", "--port", "0"], stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT
    )
    try:
        url = None
        for line in proc.stderr:
            m = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line)
            if m:
                url = m.group(1)
                break
        assert url, "the server did not start"
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_openai_client(server_url):
    out = run_example("openai_client.py", "--base-url", server_url)
    lines = out.splitlines()
    assert lines[0].strip(), out  # the streamed reply
    assert any(line.startswith("tool call: lookup_verse({") for line in lines), out
    assert lines[-1].startswith("answer ("), out


def test_structured_outputs(server_url):
    out = run_example("structured_outputs.py", "--base-url", server_url)
    doc = json.loads(re.search(r"json_schema: (\{.*\})", out).group(1))
    assert doc["book"] in ("Genesis", "Exodus", "Psalms") and 1 <= doc["chapter"] <= 150, out
    call = re.search(r"forced tool call: lookup_verse\((\{.*\})\)", out)
    assert call and set(json.loads(call.group(1))) == {"book", "chapter", "verse"}, out
    assert len(re.findall(r"^logprob ", out, flags=re.M)) == 5, out
    reused = re.search(r"\[(\d+) of (\d+) input tokens reused\]", out)
    assert reused and 0 < int(reused.group(1)) < int(reused.group(2)), out


def test_qwen_agent_assistant(server_url):
    out = run_example("qwen_agent_assistant.py", "--base-url", server_url)
    assert "[calls lookup_verse(" in out and "[lookup_verse returned" in out, out
