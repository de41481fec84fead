"""The long-context options on every entry point (generate, plan, chat, server, app, convert).

The oracle is the same as in ``test_yarn.py``: a tiny checkpoint saved by
transformers *with* YaRN (factor 4 over a 64-token window) gives the reference
logits; a copy of its weights with plain RoPE plus the command-line options must
reproduce them, whether the options are applied when a chat engine loads the
model (chat, server, app) or written into a converted checkpoint (convert).
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import urllib.request

import mlx.core as mx
import numpy as np
import pytest

import qnext_mlx
from qnext_mlx import app, chat, convert, plan, server
from qnext_mlx.errors import QnextError
from qnext_mlx.serve.chat_session import load_chat_engine

# qnext_mlx.generate is the Python API's function (as in mlx-lm); the command's module is reached by name.
generate = importlib.import_module("qnext_mlx.generate")

torch = pytest.importorskip("torch")

ORIG = 64
TOL = 1e-4
YARN = dict(
    rope_type="yarn", rope_theta=10000.0, partial_rotary_factor=0.25, factor=4.0, original_max_position_embeddings=ORIG
)
PLAIN = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
PARSERS = {
    "generate": generate.build_parser,
    "plan": plan.build_parser,
    "chat": chat.build_parser,
    "server": server.build_parser,
    "app": app.build_parser,
    "convert": convert.build_parser,
}


@pytest.fixture(scope="module")
def reference(hf_checkpoint, tmp_path_factory):
    """``(plain_folder, ids, transformers_yarn_logits)``: the plain copy has tokenizer files
    and a 64-token ``max_position_embeddings``, so only the options can stretch it."""
    from tokenizer_fixture import write_tokenizer

    path, tmodel, _ = hf_checkpoint(
        "yarn", seed=3, head_dim=64, max_position_embeddings=4 * ORIG, rope_parameters=dict(YARN)
    )
    ids = np.random.default_rng(5).integers(0, 160, size=(1, 150))
    with torch.no_grad():
        ref = tmodel(torch.tensor(ids)).logits.float().numpy()
    plain = tmp_path_factory.mktemp("rope_entry") / "plain"
    shutil.copytree(path, plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg.update(rope_parameters=dict(PLAIN), max_position_embeddings=ORIG)
    (plain / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(plain, vocab_size=320)
    return plain, ids, ref


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _args(entry: str, argv):
    extra = {
        "convert": ["--hf-path", "x"],
        "plan": ["--model", "x", "--context", "1K"],
        "generate": ["--prompt", "x"],
    }.get(entry, [])
    return PARSERS[entry]().parse_args(extra + list(argv))


@pytest.mark.parametrize("entry", sorted(PARSERS))
def test_every_entry_point_takes_the_long_context_options(entry, capsys):
    a = _args(entry, ["--max-context", "1M", "--original-max-position-embeddings", "256K"])
    assert (a.max_context, a.original_max_position_embeddings) == (1 << 20, 262144)
    a = _args(entry, ["--rope-scaling", "yarn", "--rope-factor", "2.5"])
    assert (a.rope_scaling, a.rope_factor) == ("yarn", 2.5)
    for bad in (
        ["--rope-factor", "0.5"],
        ["--max-context", "0"],
        ["--rope-scaling", "ntk"],
        ["--rope-factor", "2", "--max-context", "1M"],
    ):
        if entry == "plan":  # plan's parser raises, and its main prints the one line
            with pytest.raises(QnextError):
                _args(entry, bad)
            continue
        with pytest.raises(SystemExit) as info:
            _args(entry, bad)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "error: argument" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv,limit",
    [
        (["--max-context", "250"], 250),  # 250 / 64 -> factor 4; the conversation limit is 250
        (["--rope-scaling", "yarn", "--rope-factor", "4"], 4 * ORIG),  # limit: the YaRN window
    ],
)
def test_chat_engine_applies_the_options_and_matches_transformers(reference, argv, limit, capsys):
    plain, ids, ref = reference
    args = _args("chat", argv + ["--original-max-position-embeddings", str(ORIG)])
    engine, _ = load_chat_engine(str(plain), quiet=True, max_context=args.max_context, rope_args=args)
    assert engine.model.config.rope_scaling == dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIG)
    assert engine.max_context == limit
    assert "YaRN factor 4" in capsys.readouterr().err
    assert _max_abs(engine.model(mx.array(ids)), ref) <= TOL


def test_chat_engine_without_options_keeps_the_native_window(reference):
    plain, ids, ref = reference
    engine, _ = load_chat_engine(str(plain), quiet=True, rope_args=_args("chat", []))
    assert engine.model.config.rope_scaling is None and engine.max_context == ORIG
    assert _max_abs(engine.model(mx.array(ids))[:, ORIG:], ref[:, ORIG:]) > 100 * TOL  # the options matter


def test_server_cli_reports_the_stretched_window(reference):
    plain, _, _ = reference
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qnext_mlx.server",
            "--model",
            str(plain),
            "--port",
            "0",
            "--log-level",
            "warning",
            "--max-context",
            "200",
            "--original-max-position-embeddings",
            str(ORIG),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url, lines = None, []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("serving "):
                url = line.split(" at ", 1)[1].split()[0]
                break
        assert url, "".join(lines)
        assert any("YaRN factor 3.5" in line for line in lines)  # 200 / 64 = 3.1 -> 3.5
        with urllib.request.urlopen(url + "/models", timeout=60) as r:
            models = json.loads(r.read())
        assert models["data"][0]["max_model_len"] == 200
        proc.send_signal(2)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_convert_writes_the_options_into_config(reference, tmp_path):
    plain, ids, ref = reference
    out = tmp_path / "yarn_mlx"
    assert (
        convert.main(
            [
                "--hf-path",
                str(plain),
                "--mlx-path",
                str(out),
                "--quiet",
                "--rope-factor",
                "4",
                "--original-max-position-embeddings",
                str(ORIG),
            ]
        )
        == 0
    )
    raw = json.loads((out / "config.json").read_text())
    want = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIG)
    assert raw["rope_scaling"] == want  # the key mlx-lm reads
    assert {k: raw["rope_parameters"][k] for k in want} == want  # transformers 5's, kept consistent
    model = qnext_mlx.load_model(out)
    assert model.config.rope_scaling == want
    assert _max_abs(model(mx.array(ids)), ref) <= TOL

    # and back off: --rope-scaling none on the YaRN conversion gives plain RoPE again
    back = tmp_path / "plain_again"
    assert (
        convert.main(
            [
                "--hf-path",
                str(_as_hf(out, plain, tmp_path)),
                "--mlx-path",
                str(back),
                "--quiet",
                "--rope-scaling",
                "none",
            ]
        )
        == 0
    )
    raw = json.loads((back / "config.json").read_text())
    assert raw["rope_scaling"] is None and raw["rope_parameters"]["rope_type"] == "default"
    assert qnext_mlx.load_model(back).config.rope_scaling is None


def _as_hf(converted, plain, tmp_path):
    """The plain Hugging Face checkpoint with the converted (YaRN) config.json."""
    src = tmp_path / "yarn_hf"
    shutil.copytree(plain, src)
    shutil.copy(converted / "config.json", src / "config.json")
    return src


def test_convert_rejects_contradictory_options_cleanly(reference, tmp_path, capsys):
    plain, _, _ = reference
    out = tmp_path / "never"
    assert (
        convert.main(
            ["--hf-path", str(plain), "--mlx-path", str(out), "--quiet", "--rope-scaling", "none", "--rope-factor", "2"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--rope-scaling none" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".never.*"))
