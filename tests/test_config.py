"""config.json parsing: both rope spellings, layer types, MTP count."""

from __future__ import annotations

import pytest

from qnext_mlx.errors import ConfigError
from qnext_mlx.model.config import ModelConfig

# The published Qwen3-Next-80B-A3B-Instruct config.json (legacy rope spelling).
PUBLISHED_80B = {
    "architectures": ["Qwen3NextForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "full_attention_interval": 4,
    "head_dim": 256,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_value_head_dim": 128,
    "max_position_embeddings": 262144,
    "mlp_only_layers": [],
    "model_type": "qwen3_next",
    "moe_intermediate_size": 512,
    "norm_topk_prob": True,
    "num_attention_heads": 16,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "num_hidden_layers": 48,
    "num_key_value_heads": 2,
    "output_router_logits": False,
    "partial_rotary_factor": 0.25,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000000,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 512,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def test_published_80b_config():
    c = ModelConfig.from_dict(PUBLISHED_80B)
    assert c.layer_types.count("full_attention") == 12
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"][:3] == [3, 7, 11]
    assert c.rope_theta == 1e7 and c.partial_rotary_factor == 0.25 and c.rotary_dim == 64
    assert c.rope_scaling is None
    assert all(c.is_moe(i) for i in range(48))
    assert c.num_mtp_layers is None  # inferred from mtp.* tensors at load time


def test_rope_parameters_spelling_matches_legacy():
    new = dict(PUBLISHED_80B)
    for k in ("rope_theta", "partial_rotary_factor", "rope_scaling"):
        new.pop(k)
    new["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25}
    a, b = ModelConfig.from_dict(PUBLISHED_80B), ModelConfig.from_dict(new)
    assert (a.rope_theta, a.partial_rotary_factor, a.rope_scaling) == (
        b.rope_theta,
        b.partial_rotary_factor,
        b.rope_scaling,
    )


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_yarn_in_both_spellings(spelling):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}
    cfg = dict(PUBLISHED_80B, **{spelling: yarn})
    c = ModelConfig.from_dict(cfg)
    assert c.rope_scaling["rope_type"] == "yarn" and c.rope_scaling["factor"] == 4.0
    assert c.rope_scaling["original_max_position_embeddings"] == 262144
    assert c.rope_theta == 1e7


def test_layer_types_take_precedence_and_mtp_count():
    cfg = dict(
        PUBLISHED_80B,
        num_hidden_layers=4,
        num_nextn_predict_layers=1,
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
    )
    c = ModelConfig.from_dict(cfg)
    assert c.layer_types[0] == "full_attention" and c.num_mtp_layers == 1


def test_round_trip_through_to_dict():
    c = ModelConfig.from_dict(PUBLISHED_80B)
    again = ModelConfig.from_dict(c.to_dict())
    assert again == c


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"vocab_size": None}, "vocab_size"),
        ({"full_attention_interval": 0}, "full_attention_interval"),
        ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 0.5}}, "factor"),
        ({"rope_theta": -1}, "rope_theta"),
        ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
        ({"quantization": {"bits": 4}}, "quantization"),
    ],
)
def test_bad_values(changes, key):
    cfg = dict(PUBLISHED_80B, **changes)
    if changes.get("vocab_size", 0) is None:
        cfg.pop("vocab_size")
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict(cfg)
