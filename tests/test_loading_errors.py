"""Bad inputs give one clear QnextError, never a crash or a traceback-worthy exception."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import qnext_mlx
from qnext_mlx.checkpoint.reader import read_safetensors_header
from qnext_mlx.errors import CheckpointError, ConfigError, ModelNotFoundError


@pytest.fixture
def ckpt(hf_checkpoint, tmp_path) -> Path:
    """A private copy of a tiny checkpoint that a test may damage."""
    src, _, _ = hf_checkpoint("ratio2", seed=1)
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        qnext_mlx.load_model(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        qnext_mlx.load_model(ckpt)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        qnext_mlx.load_model(ckpt)


@pytest.mark.parametrize(
    "changes,key",
    [
        (dict(num_key_value_heads=3), "num_attention_heads"),
        (dict(linear_num_key_heads=3), "linear_num_value_heads"),
        (dict(layer_types=["linear_attention"] * 3), "layer_types"),
        (dict(layer_types=["linear_attention"] * 3 + ["sliding"]), "layer_types"),
        (dict(hidden_size="64"), "hidden_size"),
        (dict(num_experts_per_tok=99), "num_experts_per_tok"),
        (dict(model_type="llama"), "model_type"),
        (dict(rope_parameters={"rope_type": "longrope", "factor": 2.0}), "rope type"),
        (dict(mlp_only_layers=[7]), "mlp_only_layers"),
    ],
)
def test_bad_config_values_name_the_key(ckpt, changes, key):
    _edit_config(ckpt, **changes)
    with pytest.raises(ConfigError, match=key):
        qnext_mlx.load_model(ckpt)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        qnext_mlx.load_model(ckpt)


@pytest.mark.parametrize("garbage", [b"", b"\x01\x02", b"\xff" * 64, (20).to_bytes(8, "little") + b"{" * 20])
def test_corrupt_safetensors(ckpt, garbage):
    (ckpt / "model.safetensors").write_bytes(garbage)
    with pytest.raises(CheckpointError):
        qnext_mlx.load_model(ckpt)


def test_no_weight_files(ckpt):
    for f in ckpt.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        qnext_mlx.load_model(ckpt)


def test_index_names_a_missing_shard(ckpt):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        qnext_mlx.load_model(ckpt)


def _rewrite_weights(ckpt: Path, fn):
    f = ckpt / "model.safetensors"
    weights = dict(mx.load(str(f)))
    fn(weights)
    mx.save_safetensors(str(f), weights)


def test_missing_unexpected_and_misshaped_tensors_are_listed(ckpt):
    def damage(w):
        del w["model.layers.0.linear_attn.A_log"]
        w["model.layers.0.extra.weight"] = mx.zeros((2,))
        w["model.norm.weight"] = mx.zeros((3,))

    _rewrite_weights(ckpt, damage)
    with pytest.raises(CheckpointError) as e:
        qnext_mlx.load_model(ckpt)
    msg = str(e.value)
    assert "missing: model.layers.0.linear_attn.A_log" in msg
    assert "unexpected: model.layers.0.extra.weight" in msg
    assert "misshaped: model.norm.weight (3,) (expected (64,))" in msg


def test_missing_expert_is_named(ckpt):
    _rewrite_weights(ckpt, lambda w: w.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"expert\(s\) \[5\] of model.layers.2.mlp.experts.\*.up_proj"):
        qnext_mlx.load_model(ckpt)


def test_header_reader_reports_shapes(ckpt):
    header = read_safetensors_header(ckpt / "model.safetensors")
    assert header["model.embed_tokens.weight"] == ("F32", (160, 64))


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status")


def test_loading_is_lazy(ckpt):
    """A big tensor is not read at load time, only when it is used."""
    big = 48_000  # vocab = 16 * big = 768,000 rows of 64 float32: ~197 MB per matrix
    rng = np.random.default_rng(0)
    _rewrite_weights(
        ckpt,
        lambda w: w.update(
            {
                "model.embed_tokens.weight": mx.array(rng.standard_normal((big * 16, 64), dtype=np.float32)),
                "lm_head.weight": mx.array(rng.standard_normal((big * 16, 64), dtype=np.float32)),
            }
        ),
    )
    _edit_config(ckpt, vocab_size=big * 16)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    assert size > 350e6
    before = _rss_bytes()
    model = qnext_mlx.load_model(ckpt)
    grown = _rss_bytes() - before
    assert grown < 0.2 * size, f"loading read {grown / 1e6:.0f} MB of a {size / 1e6:.0f} MB checkpoint"
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, big * 16)


def test_load_without_tokenizer_files_fails_naming_the_folder(ckpt, chat_model_dir, capsys, monkeypatch):
    gen = importlib.import_module("qnext_mlx.generate")  # the command's module (qnext_mlx.generate is the function)
    from qnext_mlx.checkpoint import reader as loading
    from qnext_mlx.serve.chat_session import load_chat_engine

    assert not [p.name for p in ckpt.iterdir() if "tokenizer" in p.name or p.name == "vocab.json"]
    read = []
    original = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: read.append(a) or original(*a, **k))
    with pytest.raises(ModelNotFoundError) as info:
        qnext_mlx.load(ckpt)
    message = str(info.value)
    assert str(ckpt) in message and "has no tokenizer files" in message and "\n" not in message
    assert read == []  # it fails before reading any weights
    # The callers rely on it: the chat surfaces and the generate CLI (one line, exit 2).
    with pytest.raises(ModelNotFoundError, match="has no tokenizer files"):
        load_chat_engine(str(ckpt), quiet=True)
    capsys.readouterr()
    assert gen.main(["--model", str(ckpt), "--prompt", "hi"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {message}\n"

    # Any one tokenizer file will do; with the tokenizer there, load() works.
    (ckpt / "vocab.json").write_text("{}")
    loading.check_tokenizer_files(ckpt)
    (ckpt / "vocab.json").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(chat_model_dir / name, ckpt / name)
    model, tokenizer = qnext_mlx.load(ckpt)
    assert read and tokenizer.encode("hi")
