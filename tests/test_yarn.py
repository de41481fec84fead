"""RoPE/YaRN against transformers (the oracle), both config spellings, and the long-context options."""

from __future__ import annotations

import argparse
import json
import logging
import shutil

import mlx.core as mx
import numpy as np
import pytest

import qnext_mlx
from qnext_mlx.cli import add_rope_arguments, apply_rope_arguments
from qnext_mlx.errors import ConfigError
from qnext_mlx.model.config import ModelConfig
from qnext_mlx.model.rope import (
    RoPE,
    context_window,
    factor_for_context,
    native_context,
    rope_override,
    rope_parameters,
)

torch = pytest.importorskip("torch")

TOL = 1e-4
FREQ_TOL = 1e-6

# The published 80B's attention geometry (rotary dim 64 of 256, theta 1e7) and tiny ones.
YARN_CASES = {
    "80b_f4": dict(head_dim=256, theta=1e7, mpe=262144, rp=dict(factor=4.0, original_max_position_embeddings=262144)),
    "80b_f2": dict(head_dim=256, theta=1e7, mpe=262144, rp=dict(factor=2.0, original_max_position_embeddings=262144)),
    "80b_f1.5": dict(head_dim=256, theta=1e7, mpe=262144, rp=dict(factor=1.5, original_max_position_embeddings=262144)),
    "tiny_f4": dict(head_dim=64, theta=1e4, mpe=256, rp=dict(factor=4.0, original_max_position_embeddings=64)),
    "no_truncate": dict(
        head_dim=64, theta=1e4, mpe=256, rp=dict(factor=3.0, original_max_position_embeddings=100, truncate=False)
    ),
    "betas_mscales": dict(
        head_dim=64,
        theta=1e4,
        mpe=1024,
        rp=dict(
            factor=8.0, original_max_position_embeddings=128, beta_fast=16, beta_slow=2, mscale=0.9, mscale_all_dim=0.7
        ),
    ),
    "mscale_only": dict(
        head_dim=64, theta=1e4, mpe=1024, rp=dict(factor=8.0, original_max_position_embeddings=128, mscale=0.7)
    ),
    "attention_factor": dict(
        head_dim=64, theta=1e4, mpe=320, rp=dict(factor=2.5, original_max_position_embeddings=128, attention_factor=1.5)
    ),
    "full_rotary": dict(
        head_dim=64, theta=1e6, mpe=2048, partial=1.0, rp=dict(factor=16.0, original_max_position_embeddings=128)
    ),
}


def _tiny_config(**overrides):
    import make_tiny_checkpoint as mtc

    logging.getLogger("transformers").setLevel(logging.ERROR)  # factor/window mismatch warnings
    return mtc.tiny_config(**overrides)


def _yarn_params(c):
    return dict(rope_type="yarn", rope_theta=c["theta"], partial_rotary_factor=c.get("partial", 0.25), **c["rp"])


@pytest.mark.parametrize("name", sorted(YARN_CASES))
def test_inv_freq_and_attention_factor_match_transformers(name):
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    c = YARN_CASES[name]
    tcfg = _tiny_config(head_dim=c["head_dim"], rope_parameters=_yarn_params(c), max_position_embeddings=c["mpe"])
    ref_inv, ref_attn = _compute_yarn_parameters(tcfg)
    cfg = ModelConfig.from_dict(tcfg.to_dict())
    inv, attn = rope_parameters(cfg)
    assert inv.shape == (cfg.rotary_dim // 2,) == tuple(ref_inv.shape)
    assert np.max(np.abs(inv - ref_inv.numpy())) <= FREQ_TOL
    assert np.max(np.abs(inv - ref_inv.numpy()) / ref_inv.numpy()) <= FREQ_TOL  # relative too: tiny low frequencies
    assert abs(attn - ref_attn) <= FREQ_TOL
    # and YaRN actually changed something (else the comparison proves little)
    plain = 1.0 / c["theta"] ** (np.arange(0, cfg.rotary_dim, 2) / cfg.rotary_dim)
    assert np.max(np.abs(inv - plain) / plain) > 0.1


def test_missing_original_window_defaults_to_max_position_embeddings():
    """transformers falls back to max_position_embeddings (mlx-lm's YarnRoPE to 4096)."""
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    rp = dict(rope_type="yarn", rope_theta=1e4, partial_rotary_factor=0.25, factor=4.0)
    tcfg = _tiny_config(head_dim=64, rope_parameters=dict(rp), max_position_embeddings=96)
    ref_inv, ref_attn = _compute_yarn_parameters(tcfg)
    raw = {k: v for k, v in tcfg.to_dict().items() if k != "rope_parameters"}
    cfg = ModelConfig.from_dict(dict(raw, rope_parameters=rp))  # no original_max_position_embeddings
    inv, attn = rope_parameters(cfg)
    assert np.max(np.abs(inv - ref_inv.numpy())) <= FREQ_TOL and abs(attn - ref_attn) <= FREQ_TOL
    assert native_context(cfg) == 96 and context_window(cfg) == 384


def test_rope_module_rotates_first_dims_and_scales_only_them():
    """transformers' apply_rotary_pos_emb on the first rotary_dim dims, cos/sin times attention_factor."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding, apply_rotary_pos_emb

    c = YARN_CASES["tiny_f4"]
    tcfg = _tiny_config(head_dim=64, rope_parameters=_yarn_params(c), max_position_embeddings=c["mpe"])
    cfg = ModelConfig.from_dict(tcfg.to_dict())
    inv, attn = rope_parameters(cfg)
    rope = RoPE(cfg.rotary_dim, inv, attn, head_dim=64)
    x = np.random.default_rng(0).standard_normal((1, 2, 40, 64)).astype(np.float32)
    offset = 200  # beyond the 64-token original window
    pos = torch.arange(offset, offset + 40)[None]
    cos, sin = Qwen3NextRotaryEmbedding(tcfg)(torch.tensor(x), pos)
    ref, _ = apply_rotary_pos_emb(torch.tensor(x), torch.tensor(x), cos, sin)
    ours = np.array(rope(mx.array(x), offset=offset))
    # float32 angles near 240 rad carry ~1e-5 round-off in both implementations
    assert np.max(np.abs(ours - ref.numpy())) <= 5e-5
    angle = np.arange(offset, offset + 40)[:, None] * inv[None]  # float64 ground truth
    cos64, sin64 = np.cos(angle) * attn, np.sin(angle) * attn
    x1, x2 = x[..., :8].astype(np.float64), x[..., 8:16].astype(np.float64)
    exact = np.concatenate([x1 * cos64 - x2 * sin64, x2 * cos64 + x1 * sin64, x[..., 16:]], axis=-1)
    assert np.max(np.abs(ours - exact)) <= np.max(np.abs(ref.numpy() - exact)) + 1e-6  # no worse than transformers
    assert np.array_equal(ours[..., cfg.rotary_dim :], x[..., cfg.rotary_dim :])  # pass-through dims untouched


# ------------------------------------------------------------------------ logits
ORIG = 64  # tiny original window: a 150-token prompt reaches positions far beyond it
TINY_YARN = dict(
    rope_type="yarn", rope_theta=10000.0, partial_rotary_factor=0.25, factor=4.0, original_max_position_embeddings=ORIG
)


def _yarn_checkpoint(hf_checkpoint):
    return hf_checkpoint("yarn", seed=3, head_dim=64, max_position_embeddings=4 * ORIG, rope_parameters=dict(TINY_YARN))


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _rewrite_config(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _legacy(cfg, type_key="rope_type"):
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["partial_rotary_factor"] = rp["partial_rotary_factor"]
    cfg["rope_scaling"] = {
        type_key: "yarn",
        "factor": rp["factor"],
        "original_max_position_embeddings": rp["original_max_position_embeddings"],
    }


@pytest.fixture(scope="module")
def yarn_reference(hf_checkpoint):
    path, tmodel, _ = _yarn_checkpoint(hf_checkpoint)
    ids = np.random.default_rng(5).integers(0, 160, size=(1, 150))
    return path, ids, _torch_logits(tmodel, ids)


def test_yarn_logits_match_transformers_beyond_native_window(yarn_reference):
    path, ids, ref = yarn_reference
    model = qnext_mlx.load_model(path)
    assert model.config.rope_scaling["rope_type"] == "yarn"
    ours = model(mx.array(ids))
    assert _max_abs(ours, ref) <= TOL
    assert _max_abs(ours[:, 2 * ORIG :], ref[:, 2 * ORIG :]) <= TOL  # positions 128..149: 2x the native window

    # the same through the cache: prefill past the window, then token by token
    cache = model.make_cache()
    parts = [model(mx.array(ids[:, :100]), cache=cache)]
    for t in range(100, 110):
        parts.append(model(mx.array(ids[:, t : t + 1]), cache=cache))
    parts.append(model(mx.array(ids[:, 110:]), cache=cache))
    assert _max_abs(mx.concatenate(parts, axis=1), ref) <= TOL


def test_plain_rope_would_fail_this_comparison(yarn_reference, tmp_path):
    """The YaRN test is sensitive: the same weights with plain RoPE differ clearly past the window."""
    path, ids, ref = yarn_reference
    plain = _rewrite_config(
        path,
        tmp_path / "plain",
        lambda c: c.update(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
        ),
    )
    ours = qnext_mlx.load_model(plain)(mx.array(ids))
    assert _max_abs(ours[:, ORIG:], ref[:, ORIG:]) > 100 * TOL


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_legacy_rope_scaling_spelling(yarn_reference, tmp_path, type_key):
    """Published-config spelling: top-level rope_theta / partial_rotary_factor / rope_scaling."""
    path, ids, ref = yarn_reference
    legacy = _rewrite_config(path, tmp_path / "legacy", lambda c: _legacy(c, type_key))
    raw = json.loads((legacy / "config.json").read_text())
    assert "rope_parameters" not in raw and raw["rope_scaling"][type_key] == "yarn"
    model = qnext_mlx.load_model(legacy)
    assert model.config.rope_scaling == dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIG)
    assert _max_abs(model(mx.array(ids)), ref) <= TOL


def _parse(argv):
    p = argparse.ArgumentParser()
    add_rope_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["--rope-scaling", "yarn", "--rope-factor", "4", "--original-max-position-embeddings", str(ORIG)],
        ["--rope-factor", "4", "--original-max-position-embeddings", str(ORIG)],
        ["--max-context", "250", "--original-max-position-embeddings", str(ORIG)],  # 250/64 = 3.9 -> 4.0
    ],
)
def test_command_line_yarn_on_plain_checkpoint_matches_transformers(yarn_reference, tmp_path, argv, capsys):
    """A checkpoint without scaling + the command-line options == transformers configured with YaRN."""
    path, ids, ref = yarn_reference
    plain = _rewrite_config(
        path,
        tmp_path / "plain",
        lambda c: c.update(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            max_position_embeddings=ORIG,
        ),
    )
    model = qnext_mlx.load_model(plain)
    cfg = apply_rope_arguments(_parse(argv), model)
    assert cfg is model.config and cfg.rope_scaling == dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIG
    )
    assert "YaRN factor 4" in capsys.readouterr().err
    assert _max_abs(model(mx.array(ids)), ref) <= TOL
    # switching it back off restores plain RoPE (the config's own max_position_embeddings is 64)
    apply_rope_arguments(_parse(["--rope-scaling", "none"]), model, log=None)
    assert model.config.rope_scaling is None
    assert _max_abs(model(mx.array(ids))[:, ORIG:], ref[:, ORIG:]) > 100 * TOL


# ------------------------------------------------------------------- option logic
def _published_like(**extra):
    cfg = dict(
        model_type="qwen3_next",
        vocab_size=151936,
        hidden_size=2048,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        max_position_embeddings=262144,
        rope_theta=10000000,
        partial_rotary_factor=0.25,
    )
    cfg.update(extra)
    return ModelConfig.from_dict(cfg)


@pytest.mark.parametrize(
    "tokens,factor",
    [
        (1_000_000, 4.0),
        (1_010_000, 4.0),
        (1_048_576, 4.0),
        (1_048_577, 4.5),
        (524_288, 2.0),
        (512_000, 2.0),
        (600_000, 2.5),
        (262_145, 1.5),
        (262_144, None),
        (100_000, None),
    ],
)
def test_factor_for_context(tokens, factor):
    assert factor_for_context(tokens, 262_144) == factor


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--max-context", "1000000"], 4.0),
        (["--max-context", "1M"], 4.0),
        (["--max-context", "512K"], 2.0),
        (["--max-context", "600_000"], 2.5),
        (["--rope-scaling", "yarn", "--rope-factor", "2"], 2.0),
        (["--rope-factor", "3"], 3.0),
    ],
)
def test_options_pick_yarn(argv, expected):
    cfg = _published_like()
    changed, scaling, msg = rope_override(_parse(argv), cfg)
    assert changed and scaling == dict(rope_type="yarn", factor=expected, original_max_position_embeddings=262144)
    assert f"YaRN factor {expected:g}" in msg
    new = cfg.with_rope_scaling(scaling)
    assert context_window(new) == int(expected * 262144) and native_context(new) == 262144
    assert new.max_position_embeddings == 262144 and cfg.rope_scaling is None  # copy, original untouched
    # the override survives a config.json round trip (written as rope_parameters)
    assert ModelConfig.from_dict(new.to_dict()).rope_scaling == scaling


def test_max_context_within_native_window_means_no_scaling():
    cfg = _published_like(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144})
    changed, scaling, msg = rope_override(_parse(["--max-context", "200000"]), cfg)
    assert changed and scaling is None and "native window of 262,144" in msg
    assert apply_rope_arguments(_parse(["--max-context", "200000"]), cfg, log=None).rope_scaling is None
    # and the config's own original window is the one --max-context measures against
    _, scaling, _ = rope_override(_parse(["--max-context", "1000000"]), cfg)
    assert scaling["factor"] == 4.0 and scaling["original_max_position_embeddings"] == 262144


def test_no_options_leave_config_alone():
    cfg = _published_like()
    assert apply_rope_arguments(_parse([]), cfg) is cfg


def test_yarn_without_factor_keeps_config_factor_or_errors():
    with pytest.raises(ConfigError, match="--rope-factor F or --max-context N"):
        rope_override(_parse(["--rope-scaling", "yarn"]), _published_like())
    cfg = _published_like(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 262144})
    _, scaling, _ = rope_override(
        _parse(["--rope-scaling", "yarn", "--original-max-position-embeddings", "131072"]), cfg
    )
    assert scaling == dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=131072)


def test_contradictory_options_are_errors():
    with pytest.raises(ConfigError, match="--rope-scaling none"):
        rope_override(_parse(["--rope-scaling", "none", "--rope-factor", "2"]), _published_like())
    for argv in (
        ["--rope-factor", "0.5"],
        ["--rope-factor", "x"],
        ["--max-context", "-3"],
        ["--rope-factor", "2", "--max-context", "1M"],
        ["--rope-scaling", "dynamic"],
    ):
        with pytest.raises(SystemExit) as e:
            _parse(argv)
        assert e.value.code == 2


def test_apply_reads_config_from_path(tmp_path):
    cfg = _published_like()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    for target in (tmp_path, tmp_path / "config.json", str(tmp_path)):
        new = apply_rope_arguments(_parse(["--max-context", "1M"]), target, log=None)
        assert new.rope_scaling["factor"] == 4.0
