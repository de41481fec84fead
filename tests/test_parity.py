"""Logits of qnext_mlx against transformers' qwen3_next (the oracle) on random tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import qnext_mlx

torch = pytest.importorskip("torch")

TOL = 1e-4

CONFIGS = {
    # value/key head ratio 2, renormalised top-k, untied head
    "ratio2": dict(),
    # ratio 1, no renormalisation, tied embeddings
    "ratio1_tied": dict(
        linear_num_value_heads=2, linear_num_key_heads=2, norm_topk_prob=False, tie_word_embeddings=True
    ),
    # ratio 4, a dense mlp_only layer, a different full-attention pattern, 6 layers
    "ratio4_dense": dict(
        linear_num_value_heads=8,
        linear_num_key_heads=2,
        mlp_only_layers=[1],
        num_hidden_layers=6,
        layer_types=["linear_attention", "full_attention"] * 3,
    ),
    # MoE only every 2nd layer (decoder_sparse_step), the others dense
    "sparse_step2": dict(decoder_sparse_step=2),
}


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_full_forward_matches_transformers(hf_checkpoint, name):
    path, tmodel, _ = hf_checkpoint(name, seed=1, **CONFIGS[name])
    model = qnext_mlx.load_model(path)
    ids = np.random.default_rng(0).integers(0, 160, size=(2, 13))
    ours = model(mx.array(ids))
    assert ours.shape == (2, 13, 160)
    assert max_abs(ours, torch_logits(tmodel, ids)) <= TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_decode_matches_full_forward(hf_checkpoint, name):
    path, tmodel, _ = hf_checkpoint(name, seed=1, **CONFIGS[name])
    model = qnext_mlx.load_model(path)
    ids = np.random.default_rng(1).integers(0, 160, size=(2, 16))
    ref = torch_logits(tmodel, ids)
    cache = model.make_cache()
    out = [model(mx.array(ids[:, :9]), cache=cache)]
    for t in range(9, 16):
        out.append(model(mx.array(ids[:, t : t + 1]), cache=cache))
    ours = mx.concatenate(out, axis=1)
    assert cache.offset == 16
    assert max_abs(ours, ref) <= TOL


# mlx-lm 0.32 reads only the legacy top-level rope keys, not transformers 5's rope_parameters
MLX_LM_ROPE = {"rope_theta": 10000.0, "partial_rotary_factor": 0.25}


def test_mlx_lm_is_a_second_oracle(hf_checkpoint):
    """mlx-lm's own qwen3_next on the same weights agrees with us."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    path, _, _ = hf_checkpoint("ratio2", seed=1)
    ours = qnext_mlx.load_model(path)
    theirs, _ = mlx_lm_load_model(path, model_config=MLX_LM_ROPE)
    ids = mx.array(np.random.default_rng(2).integers(0, 160, size=(1, 21)))
    assert max_abs(ours(ids), theirs(ids)) <= TOL


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.15), ("float16", 0.03)])
def test_half_precision_checkpoints_run_on_this_backend(hf_checkpoint, dtype, tol):
    """bf16/fp16 checkpoints load and run (CPU GatherMM is float32-only) close to float32."""
    path32, tmodel, _ = hf_checkpoint("ratio2", seed=1)
    path16, _, _ = hf_checkpoint("ratio2", seed=1, dtype=dtype)
    model = qnext_mlx.load_model(path16)
    assert model.model.embed_tokens.weight.dtype == getattr(mx, dtype)
    ids = np.random.default_rng(3).integers(0, 160, size=(1, 11))
    ours = model(mx.array(ids))
    assert ours.dtype == getattr(mx, dtype)
    ref = torch_logits(tmodel, ids)
    rel = max_abs(ours.astype(mx.float32), ref) / float(np.max(np.abs(ref)))
    assert rel <= tol
    # and the float32 checkpoint cast at load time runs too
    model32 = qnext_mlx.load_model(path32, dtype=getattr(mx, dtype))
    assert model32(mx.array(ids)).dtype == getattr(mx, dtype)


def test_mtp_head_matches_torch_reference(hf_checkpoint):
    path, tmodel, thead = hf_checkpoint("mtp", seed=2, mtp=True)
    model = qnext_mlx.load_model(path)
    assert model.has_mtp
    ids = np.random.default_rng(4).integers(0, 160, size=(2, 12))
    with torch.no_grad():
        h = tmodel.model(torch.tensor(ids)).last_hidden_state
        emb = tmodel.model.embed_tokens(torch.tensor(ids[:, 1:]))
        ref = tmodel.lm_head(thead(h[:, :-1], emb)).numpy()
    logits, hidden = model(mx.array(ids), return_hidden=True)
    assert max_abs(hidden, h.numpy()) <= TOL
    ours = model.mtp_forward(hidden[:, :-1], mx.array(ids[:, 1:]))
    assert max_abs(ours, ref) <= TOL

    # incrementally through the MTP layer's own KV cache: 6 pairs, then one at a time
    cache = model.make_cache()
    assert len(cache.mtp) == 1
    parts = [model.mtp_forward(hidden[:, :6], mx.array(ids[:, 1:7]), cache=cache.mtp)]
    for i in range(6, 11):
        parts.append(model.mtp_forward(hidden[:, i : i + 1], mx.array(ids[:, i + 1 : i + 2]), cache=cache.mtp))
    assert max_abs(mx.concatenate(parts, axis=1), ref) <= TOL


def test_model_without_mtp_tensors_has_no_head(hf_checkpoint):
    path, _, _ = hf_checkpoint("ratio2", seed=1)
    model = qnext_mlx.load_model(path)
    assert not model.has_mtp
    with pytest.raises(ValueError, match="no MTP head"):
        model.mtp_forward(mx.zeros((1, 1, 64)), mx.zeros((1, 1), dtype=mx.int32))


def _mlx_lm_convert(src, dst, bits=None):
    """What ``mlx_lm.convert`` writes, without its tokenizer step (tiny checkpoints have none)."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(src, lazy=True, model_config=MLX_LM_ROPE)
    if bits is not None:
        model, config = quantize_model(model, config, 32, bits, quant_predicate=model.quant_predicate)
    save_model(dst, model)
    save_config(config, config_path=dst / "config.json")
    return model


def test_loads_mlx_lm_converted_checkpoints(hf_checkpoint, tmp_path):
    path, tmodel, _ = hf_checkpoint("mtp", seed=2, mtp=True)
    ids = np.random.default_rng(5).integers(0, 160, size=(1, 10))
    ref = torch_logits(tmodel, ids)

    _mlx_lm_convert(path, tmp_path / "fp")
    model = qnext_mlx.load_model(tmp_path / "fp")
    assert not model.has_mtp  # mlx-lm drops the MTP head
    assert max_abs(model(mx.array(ids)), ref) <= TOL

    theirs = _mlx_lm_convert(path, tmp_path / "q4", bits=4)
    model = qnext_mlx.load_model(tmp_path / "q4")
    assert "scales" in model.layers[0].mlp.switch_mlp.up_proj
    assert model.layers[0].mlp.gate.bits == 8  # per-module override from config.json
    ours = model(mx.array(ids))
    # same quantized weights and the same maths as mlx-lm
    assert max_abs(ours, theirs(mx.array(ids))) <= 1e-3


DEMO = Path(qnext_mlx.__file__).parent / "demo_model"


@pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="demo model not built")
def test_trained_bf16_demo_model_matches_transformers():
    """A trained bf16 checkpoint: the zero-centred norms' +1 must not be rounded to bf16
    (mlx-lm's way moves these logits by up to 0.4)."""
    from transformers import AutoTokenizer, Qwen3NextForCausalLM

    text = (
        "In the beginning God created the heaven and the earth. And the earth was without form, "
        "and void; and darkness was upon the face of the deep."
    )
    ids = AutoTokenizer.from_pretrained(DEMO).encode(text)
    tmodel = Qwen3NextForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    ours = qnext_mlx.load_model(DEMO, dtype=mx.float32)
    assert max_abs(ours(mx.array([ids])), torch_logits(tmodel, np.array([ids]))) <= TOL
