"""scripts/make_tiny_checkpoint.py writes a real HF-format checkpoint, MTP tensors included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import qnext_mlx
from qnext_mlx.checkpoint.reader import read_safetensors_header

ROOT = Path(__file__).resolve().parents[1]


def test_cli_writes_sharded_checkpoint_with_mtp(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "tiny"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/make_tiny_checkpoint.py"),
            str(out),
            "--seed",
            "3",
            "--mtp",
            "--dtype",
            "bfloat16",
            "--max-shard-size",
            "100KB",
            "--set",
            "num_experts=4",
        ],
        check=True,
        capture_output=True,
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["num_experts"] == 4
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2  # several shards plus the MTP shard
    names = set(index)
    for name in (
        "mtp.fc.weight",
        "mtp.pre_fc_norm_embedding.weight",
        "mtp.pre_fc_norm_hidden.weight",
        "mtp.norm.weight",
        "mtp.layers.0.self_attn.q_proj.weight",
        "mtp.layers.0.mlp.gate.weight",
        "mtp.layers.0.mlp.experts.3.down_proj.weight",
        "mtp.layers.0.mlp.shared_expert_gate.weight",
        "model.layers.0.mlp.experts.0.gate_proj.weight",
        "model.layers.0.linear_attn.conv1d.weight",
    ):
        assert name in names, name
    header = read_safetensors_header(out / index["model.layers.0.linear_attn.conv1d.weight"])
    assert header["model.layers.0.linear_attn.conv1d.weight"] == ("BF16", (128, 1, 4))  # torch layout: [conv_dim, 1, K]
    model = qnext_mlx.load_model(out)
    assert model.has_mtp and len(model.mtp.layers) == 1
