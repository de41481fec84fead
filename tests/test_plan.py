"""The memory planner: exact KV/state arithmetic, the published 80B's figures, measured peaks, the CLI."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from qnext_mlx import plan as plan_cli
from qnext_mlx.engine import plan as P
from qnext_mlx.model.config import ModelConfig

GiB = 2**30

# The published Qwen3-Next-80B-A3B config.json (the keys that size it).
PUBLISHED_80B = dict(
    architectures=["Qwen3NextForCausalLM"],
    model_type="qwen3_next",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=5120,
    num_hidden_layers=48,
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_conv_kernel_dim=4,
    num_experts=512,
    num_experts_per_tok=10,
    moe_intermediate_size=512,
    shared_expert_intermediate_size=512,
    decoder_sparse_step=1,
    norm_topk_prob=True,
    mlp_only_layers=[],
    full_attention_interval=4,
    rope_theta=10000000,
    partial_rotary_factor=0.25,
    rope_scaling=None,
    max_position_embeddings=262144,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=False,
    torch_dtype="bfloat16",
)


@pytest.fixture(scope="module")
def cfg80():
    return ModelConfig.from_dict(PUBLISHED_80B)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PUBLISHED_80B))
    return path


def test_published_kv_is_24_kib_per_token(cfg80):
    assert P.kv_bytes_per_token(cfg80) == 12 * 2 * 2 * 256 * 2 == 24 * 1024
    assert P.kv_cache_bytes(cfg80, 1 << 20) == 24 * GiB  # 1M = 2^20 tokens: exactly 24 GiB
    assert P.kv_cache_bytes(cfg80, 1_000_000) == 1_000_192 * 24 * 1024  # 256-token steps; 22.9 GiB = 24.6 GB
    assert P.kv_cache_bytes(cfg80, 262_144) == 6 * GiB
    # quantized: bits/8 per element + a bf16 scale and bias per group of 64
    assert P.kv_bytes_per_token(cfg80, kv_bits=4) == 12 * 2 * 2 * 256 * (0.5 + 4 / 64) == 6912
    assert P.kv_bytes_per_token(cfg80, kv_bits=8) == 12 * 2 * 2 * 256 * (1 + 4 / 64) == 13056
    assert P.kv_cache_bytes(cfg80, 1 << 20, kv_bits=4) == 6.75 * GiB


def test_published_deltanet_state_and_parameters(cfg80):
    # 36 layers x (32 x 128 x 128 float32 recurrent + 3 x 8192 bf16 conv)
    assert P.deltanet_state_bytes(cfg80) == 36 * (32 * 128 * 128 * 4 + 3 * 8192 * 2)
    nbytes, params = P.estimate_weight_bytes(cfg80)
    assert params == 79_674_391_296  # "80B total"
    assert nbytes == 2 * params
    q4, _ = P.estimate_weight_bytes(cfg80, bits=4)
    # experts dominate: 48 x 512 x 3 x 2048 x 512 weights at 4.5 bits (4 + 2 x 16 / 64)
    experts = 48 * 512 * 3 * 2048 * 512 * (0.5 + 4 / 64)
    assert experts < q4 < experts + 3 * GiB and 41 * GiB < q4 < 43 * GiB


@pytest.mark.parametrize("kv_bits", [None, 4, 8])
def test_kv_formula_matches_mlx_lm_caches(kv_bits):
    cfg = ModelConfig.from_dict(
        dict(
            model_type="qwen3_next",
            vocab_size=160,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=256,
        )
    )
    cache = KVCache() if kv_bits is None else QuantizedKVCache(group_size=64, bits=kv_bits)
    k = mx.zeros((1, 2, 300, 256), dtype=mx.bfloat16)
    cache.update_and_fetch(k, k)
    assert cache.nbytes == P.kv_cache_bytes(cfg, 300, kv_bits=kv_bits, layers=1)


def test_weights_and_states_match_a_real_checkpoint(hf_checkpoint):
    import qnext_mlx

    path, _, _ = hf_checkpoint("ratio2", seed=1)
    cfg = ModelConfig.from_file(path)
    found = P.checkpoint_weights(path)
    assert found["activation_dtype_bytes"] == 4 and found["mtp_layers"] == 0
    model = qnext_mlx.load_model(path)
    loaded = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    assert found["bytes"] == loaded == P.estimate_weight_bytes(cfg, dtype_bytes=4)[0]
    cache = model.make_cache()
    model(mx.array(np.arange(12)[None] % 160), cache=cache)
    states = sum(c[0].nbytes + c[1].nbytes for c, layer in zip(cache, model.layers) if layer.is_linear)
    assert states == P.deltanet_state_bytes(cfg, dtype_bytes=4)


@pytest.mark.parametrize("kv_bits", [None, 4])
def test_peak_memory_model_matches_measurement(kv_bits):
    """Prefill through the cache in chunks on this backend; the planner's total within 20% of MLX's peak."""
    from qnext_mlx.model import Model

    cfg = ModelConfig.from_dict(
        dict(
            model_type="qwen3_next",
            vocab_size=160,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=256,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            # attention first, so its scores are computed (the last layer's output is never evaluated in prefill)
            layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        )
    )
    model = Model(cfg)
    mx.eval(model.parameters())
    weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    T, C = 1024, 256
    ids = mx.random.randint(0, 160, (1, T), key=mx.random.key(0))
    mx.eval(ids)
    cache = model.make_cache(kv_bits=kv_bits)
    mx.clear_cache()
    base = mx.get_active_memory() - weights
    mx.reset_peak_memory()
    for s in range(0, T, C):
        model(ids[:, s : s + C], cache=cache)
        mx.eval([c.state for c in cache])
    measured = mx.get_peak_memory() - base
    cpu = not mx.metal.is_available()
    acts = P.activation_bytes(cfg, T, C, dtype_bytes=4, kv_bits=kv_bits, expert_dtype_bytes=4, cpu_backend=cpu)
    predicted = (
        P.estimate_weight_bytes(cfg, dtype_bytes=4)[0]
        + P.kv_cache_bytes(cfg, T, kv_bits, 4)
        + P.deltanet_state_bytes(cfg, 4)
        + acts["peak"]
    )
    if cpu and kv_bits is None:  # blocked causal attention (kernels/attention.py), a block per lane in flight
        from qnext_mlx.kernels.attention import PREFILL_BLOCK
        from qnext_mlx.kernels.linear import cpu_lanes

        blk = min(PREFILL_BLOCK, C)
        n = min(cpu_lanes(), C // blk)
        assert acts["attention_scores"] == n * (8 * blk * T * 4 + blk * T + 2 * 2 * 256 * T * 4) + 2 * 256 * T * 4
    else:
        assert acts["attention_scores"] == 8 * C * T * 4 + C * T
    assert 0.8 <= predicted / measured <= 1.2, (predicted, measured)


def _plan_json(capsys, argv):
    assert plan_cli.main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_published_80b_at_1m(config_file, capsys):
    out = _plan_json(
        capsys,
        ["--model", str(config_file), "--context", "1M", "--q-bits", "4", "--backend", "metal", "--budget-gib", "1000"],
    )
    assert out["kv_cache"] == 24 * GiB and out["kv_bytes_per_token"] == 24576
    assert out["rope"]["needed_factor"] == 4.0 and "--max-context 1048576" in out["rope"]["advice"]
    assert 41 * GiB < out["weights"] < 43 * GiB and out["weights_source"].startswith("estimated")
    scores = out["activations"]["attention_scores"]
    assert scores == 16 * 2048 * (1 << 20) * 2 + 2048 * (1 << 20)  # unfused prefill scores of a 2048 chunk
    assert out["total"] == out["weights"] + out["kv_cache"] + out["deltanet_state"] + out["activations"]["peak"]
    assert out["fits"] is True and out["backend"] == "metal"


def test_cli_suggests_a_prefill_chunk_that_fits(config_file, capsys):
    argv = ["--model", str(config_file), "--context", "1000000", "--q-bits", "4", "--backend", "metal"]
    out = _plan_json(capsys, argv + ["--budget-gib", "96"])
    assert out["fits"] is False and out["suggested_chunk"] == 512
    assert out["kv_cache"] == 1_000_192 * 24576
    fused = _plan_json(capsys, argv + ["--budget-gib", "96", "--fused-attention"])
    assert fused["fits"] is True and fused["activations"]["attention_scores"] == 0
    small = _plan_json(capsys, argv + ["--budget-gib", "96", "--prefill-step-size", "512"])
    assert small["fits"] is True
    assert plan_cli.main(argv + ["--budget-gib", "96"]) == 0
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "--prefill-step-size 512" in text and "24.00 KiB/token" in text


def test_cli_256k_quantized_kv_and_mtp(config_file, capsys):
    out = _plan_json(
        capsys,
        [
            "--model",
            str(config_file),
            "--context",
            "256K",
            "--q-bits",
            "4",
            "--kv-bits",
            "4",
            "--mtp",
            "--backend",
            "metal",
            "--budget-gib",
            "1000",
        ],
    )
    assert out["kv_cache"] == 262144 * 6912 and out["mtp_kv_cache"] == 262144 * 6912 // 12
    assert out["rope"]["advice"].startswith("within the native window")


def test_cli_reads_a_checkpoint_folder(hf_checkpoint, capsys):
    path, _, _ = hf_checkpoint("ratio2", seed=1)
    out = _plan_json(capsys, ["--model", str(path), "--context", "4096", "--q-bits", "4"])
    assert out["weights"] == P.checkpoint_weights(path)["bytes"]
    assert out["weights_source"].startswith("safetensors headers") and "--q-bits ignored" in out["notes"][0]
    assert out["activation_dtype_bytes"] == 4 and out["machine"]["budget"] > 0


def test_cli_yarn_config_covers_the_context(tmp_path, capsys):
    cfg = dict(
        PUBLISHED_80B, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = _plan_json(capsys, ["--model", str(tmp_path), "--context", "1000000", "--q-bits", "4"])
    assert out["rope"]["configured_window"] == 1 << 20 and "needed_factor" not in out["rope"]


def test_machine_memory_reports_a_rule():
    m = P.machine_memory()
    assert m["budget"] and m["budget"] > 0 and m["rule"]
    if not mx.metal.is_available():
        assert m["budget"] == m["total_ram"] and "total RAM" in m["rule"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "/no/such/folder", "--context", "1000"], "does not exist"),
        (["--context", "1000"], "--model"),
        (["--model", ".", "--context", "lots"], "--context"),
        (["--model", ".", "--context", "1000", "--kv-bits", "3"], "--kv-bits"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    assert plan_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
