"""The streaming converter: HF checkpoint -> MLX folder (float or quantized) -> load()."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import qnext_mlx
from qnext_mlx import convert as convert_cli
from qnext_mlx.checkpoint import convert as cv
from qnext_mlx.checkpoint.quant_recipes import make_recipe
from qnext_mlx.checkpoint.reader import read_safetensors_header, weight_files
from qnext_mlx.errors import CheckpointError, ConfigError, ConversionError, ModelNotFoundError
from qnext_mlx.model import Model
from qnext_mlx.model.qwen3_next import SHIFTED_NORMS

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
GS = 32  # the tiny model's dims (64, 32, 96) divide 32; 64 would leave the experts' down_proj float
VOCAB = 160


@pytest.fixture(scope="module")
def src(hf_checkpoint):
    """A float32 tiny HF checkpoint with an MTP head."""
    path, _, _ = hf_checkpoint("convert", seed=3, mtp=True)
    return path


@pytest.fixture(scope="module")
def float_model(src):
    return qnext_mlx.load_model(src)


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    """Factory: ``converted(**convert_kwargs) -> out folder``, cached per argument set."""
    made = {}

    def make(**kw):
        key = tuple(sorted(kw.items()))
        if key not in made:
            out = tmp_path_factory.mktemp("converted") / "out"
            cv.convert(src, out, progress=False, **kw)
            made[key] = out
        return made[key]

    return make


def tensors_of(folder: Path) -> dict:
    out = {}
    for f in weight_files(folder):
        out.update(mx.load(str(f)))
    return out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def leftovers(parent: Path, name: str):
    """Anything the converter may have left next to ``parent/name`` (the folder or temp folders)."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


IDS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 24))


# ----------------------------------------------------------------- float
def test_float_conversion_is_lossless(src, float_model, converted, hf_checkpoint):
    out = converted()
    weights = tensors_of(out)
    assert not Model.is_hf_layout(weights)
    assert any(k.endswith("switch_mlp.up_proj.weight") for k in weights)
    assert all(v.dtype == mx.float32 for v in weights.values())
    model = qnext_mlx.load_model(out)
    ids = mx.array(IDS)
    logits, hidden = model(ids, return_hidden=True)
    ref, ref_hidden = float_model(ids, return_hidden=True)
    assert max_abs(logits, ref) == 0.0  # same float32 numbers, same code
    _, tmodel, _ = hf_checkpoint("convert", seed=3, mtp=True)
    with torch.no_grad():
        oracle = tmodel(torch.tensor(IDS)).logits.numpy()
    assert max_abs(logits, oracle) <= 1e-4
    nxt = mx.array(IDS[:, 1:])
    assert max_abs(model.mtp_forward(hidden[:, :-1], nxt), float_model.mtp_forward(ref_hidden[:, :-1], nxt)) == 0.0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and cfg["num_nextn_predict_layers"] == 1
    assert (out / "generation_config.json").exists() and (out / "README.md").exists()


def test_dtype_bfloat16(converted):
    out = converted(dtype="bfloat16", q_bits=4, q_group_size=GS)
    weights = tensors_of(out)
    floats = {k: v.dtype for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)}
    # zero-centred norm weights are stored as 1 + w in float32 (bf16 would round them)
    norms = {k for k in floats if k.endswith(SHIFTED_NORMS)}
    assert norms and {floats[k] for k in norms} == {mx.float32}
    assert {v for k, v in floats.items() if k not in norms} == {mx.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    logits = qnext_mlx.load_model(out)(mx.array(IDS))
    assert np.isfinite(np.asarray(logits.astype(mx.float32))).all()


# ------------------------------------------------------------- quantized
def quantize_in_memory(src: Path, bits: int, recipe: str = "default") -> Model:
    """The float model quantized by MLX in memory with the same recipe: what the converter must write."""
    model = qnext_mlx.load_model(src)
    rule = make_recipe(recipe, model, bits, GS)
    nn.quantize(model, class_predicate=lambda p, m: rule(p, m) or False)
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_conversion_equals_in_memory_quantization(src, converted, bits):
    model = qnext_mlx.load_model(converted(q_bits=bits, q_group_size=GS))
    ref = quantize_in_memory(src, bits)
    ids = mx.array(IDS)
    logits, hidden = model(ids, return_hidden=True)
    ref_logits, ref_hidden = ref(ids, return_hidden=True)
    assert max_abs(logits, ref_logits) <= 1e-5
    nxt = mx.array(IDS[:, 1:])
    assert max_abs(model.mtp_forward(hidden[:, :-1], nxt), ref.mtp_forward(ref_hidden[:, :-1], nxt)) <= 1e-5


def sample_sequence(model, length: int, seed: int = 0) -> np.ndarray:
    """A sequence the float model itself finds plausible (sampled at temperature 1)."""
    mx.random.seed(seed)
    ids = [3]
    cache = model.make_cache()
    logits = model(mx.array([ids]), cache=cache)
    for _ in range(length - 1):
        ids.append(int(mx.random.categorical(logits[0, -1])))
        logits = model(mx.array([ids[-1:]]), cache=cache)
    return np.array([ids])


def perplexity(model, seq: np.ndarray):
    logits = model(mx.array(seq[:, :-1])).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, mx.array(seq[:, 1:, None]), axis=-1).mean()
    return float(mx.exp(nll)), logits


# bits: (relative logit error, |perplexity change|). Measured on this checkpoint (float ppl 134.27 on
# the sampled sequence, group 32, default recipe): 8 bits 0.129 / -0.38, 4 bits 0.747 / +8.52. A broken
# quantizer lands above these bounds (test_quality_bounds_catch_a_broken_quantizer): scales off by 10%
# gives 1.10 / +24 at 8 bits and 1.14 / +30 at 4 bits; rows shifted by one 1.40 / +64; zero biases
# 2.12 / +77. Bounds: the measured values with about 15% margin.
QUALITY_BOUNDS = {8: (0.15, 1.0), 4: (0.86, 10.0)}


def _quality(model, seq, ppl_float, ref):
    ppl, logits = perplexity(model, seq)
    return rel_err(ref, logits), ppl - ppl_float


def test_quantized_logits_stay_close_to_float(src, float_model, converted):
    """Relative logit error and perplexity change at 8 and 4 bits (group 32).

    The tiny random model is far more sensitive than a trained one: its routers
    are near-uniform, so small perturbations flip top-k expert choices (torch's
    own model moves its logits by ~26% when in_proj_qkvz gets 0.5% noise). The
    bounds are the measured values with margin; 8 bits must beat 4 bits.
    """
    seq = sample_sequence(float_model, 96)
    ppl_float, ref = perplexity(float_model, seq)
    errs, dppl = {}, {}
    for bits in (8, 4):
        model = qnext_mlx.load_model(converted(q_bits=bits, q_group_size=GS))
        errs[bits], dppl[bits] = _quality(model, seq, ppl_float, ref)
    print(
        f"\nfloat ppl {ppl_float:.3f}; "
        + "; ".join(
            f"{b}-bit: relative logit error {errs[b]:.4f}, ppl {ppl_float + dppl[b]:.3f} ({dppl[b]:+.3f})"
            for b in (8, 4)
        )
    )
    assert errs[8] < errs[4]
    assert abs(dppl[8]) < abs(dppl[4])
    for bits, (max_err, max_dppl) in QUALITY_BOUNDS.items():
        assert errs[bits] <= max_err
        assert abs(dppl[bits]) <= max_dppl


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("breakage", ["scales off by 10%", "rows shifted by one"])
def test_quality_bounds_catch_a_broken_quantizer(src, float_model, converted, bits, breakage):
    """The bounds above are tight enough to fail a conversion whose quantized tensors are wrong."""
    seq = sample_sequence(float_model, 96)
    ppl_float, ref = perplexity(float_model, seq)
    model = qnext_mlx.load_model(converted(q_bits=bits, q_group_size=GS))
    for _, module in model.named_modules():
        if "scales" not in module:
            continue
        if breakage == "scales off by 10%":
            module.scales = module.scales * 1.1
        else:
            for name in ("weight", "scales", "biases"):
                setattr(module, name, mx.roll(module[name], 1, axis=-2))
    err, dppl = _quality(model, seq, ppl_float, ref)
    max_err, max_dppl = QUALITY_BOUNDS[bits]
    assert err > max_err and abs(dppl) > max_dppl, (err, dppl)


DEMO = ROOT / "qnext_mlx" / "demo_model"
# Revelation 21:1-4 (KJV, public domain): text of the kind the demo model was trained on.
PASSAGE = (
    "Rev21:1 And I saw a new heaven and a new earth: for the first heaven and the first earth were passed away; "
    "and there was no more sea.\nRev21:2 And I John saw the holy city, new Jerusalem, coming down from God out of "
    "heaven, prepared as a bride adorned for her husband.\nRev21:3 And I heard a great voice out of heaven saying, "
    "Behold, the tabernacle of God is with men, and he will dwell with them, and they shall be his people, and God "
    "himself shall be with them, and be their God.\nRev21:4 And God shall wipe away all tears from their eyes; and "
    "there shall be no more death, neither sorrow, nor crying, neither shall there be any more pain: for the former "
    "things are passed away.\n"
)
# bits: (relative logit error, |relative perplexity change|). Measured on the demo model (group 64) on
# this passage (176 tokens, float ppl 52.71): 8 bits 0.024 / +0.14%, 4 bits 0.064 / -0.02%; on the
# corpus's last 1024 tokens: 8 bits 0.022 / +0.12%, 4 bits 0.072 / +2.3%.
DEMO_BOUNDS = {8: (0.05, 0.01), 4: (0.15, 0.06)}


@pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="the demo model is not trained yet")
def test_demo_model_quality(tmp_path):
    """The trained demo model (real text, real tokenizer) converted at 8 and 4 bits."""
    model, tokenizer = qnext_mlx.load(DEMO)
    seq = np.array([tokenizer.encode(PASSAGE)])
    ppl_float, ref = perplexity(model, seq)
    errs, dppl = {}, {}
    for bits in (8, 4):
        out = tmp_path / f"demo-{bits}"
        cv.convert(DEMO, out, q_bits=bits, progress=False)
        quantized, tok = qnext_mlx.load(out)
        assert tok.encode(PASSAGE) == seq[0].tolist()
        ppl, logits = perplexity(quantized, seq)
        errs[bits], dppl[bits] = rel_err(ref, logits), ppl / ppl_float - 1
    print(
        f"\ndemo model, {seq.shape[1]} tokens: float ppl {ppl_float:.3f}; "
        + "; ".join(
            f"{b}-bit: relative logit error {errs[b]:.4f}, ppl {ppl_float * (1 + dppl[b]):.3f} ({100 * dppl[b]:+.2f}%)"
            for b in (8, 4)
        )
    )
    assert errs[8] < errs[4]
    for bits, (max_err, max_dppl) in DEMO_BOUNDS.items():
        assert errs[bits] <= max_err
        assert abs(dppl[bits]) <= max_dppl


def packed_bits(weights: dict, path: str, in_dim: int, group_size: int) -> int:
    """Bits per weight of a quantized module, read back from its tensors' shapes."""
    wq, scales = weights[f"{path}.weight"], weights[f"{path}.scales"]
    assert scales.shape[-1] * group_size == in_dim, path
    return wq.shape[-1] * 32 // in_dim


@pytest.mark.parametrize("recipe", ["default", "mixed"])
def test_config_bits_match_the_tensors(converted, float_model, recipe):
    out = converted(q_bits=4, q_group_size=GS, recipe=recipe)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["group_size"] == GS
    weights = tensors_of(out)
    written = {}
    for path, module in float_model.named_modules():
        if not hasattr(module, "to_quantized"):
            continue
        in_dim = module.weight.shape[-1]
        if f"{path}.scales" not in weights:
            assert path not in q, path
            assert weights[f"{path}.weight"].dtype == mx.float32
            written[path] = None
            continue
        params = q.get(path, {"bits": q["bits"], "group_size": q["group_size"]})
        written[path] = packed_bits(weights, path, in_dim, params["group_size"])
        assert written[path] == params["bits"], path
    # router and shared-expert gates keep 8 bits (group 64); experts take --q-bits, in the MTP layer too
    for prefix in ("model.layers.0", "model.layers.3", "mtp.layers.0"):
        assert written[f"{prefix}.mlp.gate"] == 8 and q[f"{prefix}.mlp.gate"] == {"group_size": 64, "bits": 8}
        assert written[f"{prefix}.mlp.shared_expert_gate"] == 8
        assert written[f"{prefix}.mlp.switch_mlp.up_proj"] == 4
        assert written[f"{prefix}.mlp.switch_mlp.down_proj"] == 4
    assert written["model.layers.0.mlp.shared_expert.down_proj"] is None  # in_dim 48 % 32 != 0 stays float
    high = {"default": 4, "mixed": 6}[recipe]
    head = {"default": 4, "mixed": 8}[recipe]
    assert written["model.embed_tokens"] == head and written["lm_head"] == head
    assert written["model.layers.0.linear_attn.in_proj_qkvz"] == high
    assert written["model.layers.3.self_attn.q_proj"] == high
    assert written["mtp.fc"] == high
    # conv1d, norms, A_log and dt_bias stay float
    for name in (
        "model.layers.0.linear_attn.conv1d.weight",
        "model.layers.0.linear_attn.A_log",
        "model.layers.0.linear_attn.dt_bias",
        "model.norm.weight",
        "mtp.norm.weight",
    ):
        assert weights[name].dtype == mx.float32 and f"{name[: -len('.weight')]}.scales" not in weights
    assert qnext_mlx.load_model(out)(mx.array(IDS)).shape == (2, 24, VOCAB)


def test_mtp_kept_and_dropped(src, converted):
    kept = converted(q_bits=8, q_group_size=GS)
    names = set(tensors_of(kept))
    assert "mtp.fc.scales" in names and "mtp.layers.0.mlp.switch_mlp.up_proj.scales" in names
    assert qnext_mlx.load_model(kept).has_mtp

    dropped = converted(q_bits=8, q_group_size=GS, drop_mtp=True)
    assert not any(k.startswith("mtp.") for k in tensors_of(dropped))
    cfg = json.loads((dropped / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 0
    assert not any(k.startswith("mtp.") for k in cfg["quantization"])
    model = qnext_mlx.load_model(dropped)
    assert not model.has_mtp
    # the main model is the same with or without the head
    assert max_abs(model(mx.array(IDS)), qnext_mlx.load_model(kept)(mx.array(IDS))) == 0.0


def test_mlx_lm_loads_a_drop_mtp_conversion(converted):
    """A second reader of our output: mlx-lm's own qwen3_next, quantized, agrees with ours."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    out = converted(q_bits=4, q_group_size=GS, drop_mtp=True)
    theirs, _ = mlx_lm_load_model(out)
    ours = qnext_mlx.load_model(out)
    ids = mx.array(IDS)
    assert max_abs(ours(ids), theirs(ids)) <= 1e-4


def test_quantizing_an_mlx_float_conversion(converted):
    """An unquantized MLX folder is a valid input too (sanitize is idempotent on it)."""
    float_out = converted()
    direct = converted(q_bits=4, q_group_size=GS)
    again = float_out.parent / "again"
    cv.convert(float_out, again, q_bits=4, q_group_size=GS, progress=False)
    a, b = tensors_of(direct), tensors_of(again)
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="already quantized"):
        cv.convert(again, again.parent / "twice", q_bits=4, progress=False)
    assert not (again.parent / "twice").exists()


# ---------------------------------------------------------- output folder
def test_shards_and_index(converted):
    out = converted(q_bits=4, q_group_size=GS, max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    seen = {}
    for f in files:
        header = read_safetensors_header(out / f)
        assert all(index["weight_map"][k] == f for k in header)
        seen.update(header)
        size = sum(mx.load(str(out / f))[k].nbytes for k in header)
        assert size <= 100_000 or len(header) == 1
    assert set(seen) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors_of(out).values())
    # same tensors as a single-shard conversion
    single = tensors_of(converted(q_bits=4, q_group_size=GS))
    sharded = tensors_of(out)
    assert single.keys() == sharded.keys() and all(mx.array_equal(single[k], sharded[k]) for k in single)


def test_streamed_safetensors_match_mlx_and_the_safetensors_library(tmp_path):
    """Our one-tensor-at-a-time writer produces files both MLX and the reference reader accept."""
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    tensors = {
        "bf16": mx.array(rng.standard_normal((3, 5)).astype(np.float32)).astype(mx.bfloat16),
        "f32_transposed": mx.array(rng.standard_normal((4, 6)).astype(np.float32)).T,  # a strided view
        "conv_moveaxis": mx.array(rng.standard_normal((6, 1, 4)).astype(np.float32)).moveaxis(2, 1),
        "packed": mx.array(rng.integers(0, 2**32, size=(2, 3), dtype=np.uint32)),
        "f16": mx.array(rng.standard_normal((7,)).astype(np.float16)),
        "flags": mx.array([True, False, True]),
    }
    expected = {k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v) for k, v in tensors.items()}
    path = tmp_path / "x.safetensors"
    names = sorted(tensors)
    nbytes = cv.write_safetensors(path, dict(tensors), names)
    assert nbytes == sum(v.nbytes for v in tensors.values())
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0 and path.stat().st_size == 8 + header_len + nbytes  # data 8-byte aligned
    assert read_safetensors_header(path)
    loaded = mx.load(str(path))
    for k in names:
        got = loaded[k].astype(mx.float32) if loaded[k].dtype == mx.bfloat16 else loaded[k]
        assert loaded[k].dtype == tensors[k].dtype and np.array_equal(np.array(got), expected[k]), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "mlx"}
        for k in names:
            assert np.array_equal(
                f.get_tensor(k).float().numpy() if k == "bf16" else f.get_tensor(k).numpy(), expected[k]
            ), k


def test_tokenizer_files_copied_and_load_reads_them(chat_model_dir, tmp_path):
    source = tmp_path / "with-tokenizer"
    shutil.copytree(chat_model_dir, source)
    (source / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (source / "README.md").write_text("# the source model card\n")
    (source / "LICENSE").write_text("Apache License 2.0\n")

    out = tmp_path / "out"
    res = cv.convert(source, out, q_bits=4, q_group_size=GS, progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "LICENSE"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    card = (out / "README.md").read_text()
    assert "4-bit" in card and str(source) in card and "library_name: mlx" in card
    assert "the source model card" not in card
    assert res.num_shards == 1 and res.quantization["bits"] == 4 and 4 < res.bits_per_weight < 8
    model, tokenizer = qnext_mlx.load(out)
    _, ref_tokenizer = qnext_mlx.load(source)
    text = "Hello world, how are you today?"
    assert tokenizer.encode(text) == ref_tokenizer.encode(text)
    assert tokenizer.eos_token_ids == ref_tokenizer.eos_token_ids
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == ref_tokenizer.apply_chat_template(
        messages, tokenize=False
    )
    assert model(mx.array([tokenizer.encode(text)])).shape[-1] == 320


def test_output_is_an_ordinary_folder(converted, tmp_path):
    out = converted()
    (tmp_path / "ref").mkdir()
    assert out.stat().st_mode == (tmp_path / "ref").stat().st_mode
    assert leftovers(out.parent, "out") == ["out"]


# ----------------------------------------------------------------- errors
def test_missing_input(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        cv.convert(tmp_path / "nope", tmp_path / "out", progress=False)
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("damage", ["truncate", "corrupt_header", "missing_shard"])
def test_broken_input_leaves_nothing(src, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    shard = broken / "model-mtp.safetensors"
    if damage == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 1000])
        match = "truncated"
    elif damage == "corrupt_header":
        data = bytearray(shard.read_bytes())
        data[8:40] = b"x" * 32
        shard.write_bytes(bytes(data))
        match = "corrupt"
    else:
        shard.unlink()
        match = "missing"
    with pytest.raises(CheckpointError, match=match):
        cv.convert(broken, tmp_path / "out", q_bits=4, progress=False)
    assert leftovers(tmp_path, "out") == []


def test_failure_while_writing_leaves_nothing(src, tmp_path, monkeypatch):
    calls = []
    real_raw_bytes = cv._raw_bytes

    def failing_raw_bytes(arr):
        calls.append(1)
        if len(calls) == 40:
            raise OSError(28, "No space left on device")
        return real_raw_bytes(arr)

    monkeypatch.setattr(cv, "_raw_bytes", failing_raw_bytes)
    with pytest.raises(ConversionError, match="No space left"):
        cv.convert(src, tmp_path / "out", q_bits=4, q_group_size=GS, max_shard_size="100KB", progress=False)
    assert len(calls) == 40
    assert leftovers(tmp_path, "out") == []


def test_interrupt_leaves_nothing(src, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cv, "copy_side_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cv.convert(src, tmp_path / "out", progress=False)
    assert leftovers(tmp_path, "out") == []


def test_not_enough_disk_space(src, tmp_path, monkeypatch):
    monkeypatch.setattr(cv.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConversionError, match="not enough disk space"):
        cv.convert(src, tmp_path / "out", progress=False)
    assert leftovers(tmp_path, "out") == []


def test_existing_output_needs_force(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists; pass --force"):
        cv.convert(src, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    cv.convert(src, out, q_bits=4, q_group_size=GS, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path, "out") == ["out"]


def test_output_must_not_hold_the_input(src, tmp_path):
    outer = tmp_path / "outer"
    shutil.copytree(src, outer / "model")
    for target in (outer, outer / "model"):
        with pytest.raises(ConversionError, match="holds the input"):
            cv.convert(outer / "model", target, force=True, progress=False)
    assert (outer / "model" / "config.json").exists()


# -------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--hf-path", "x", "--q-bits", "7"], "invalid choice: 7"),
        (["--hf-path", "x", "--q-group-size", "48"], "invalid choice: 48"),
        (["--mlx-path", "y"], "--hf-path"),
    ],
)
def test_cli_bad_flags_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_cli_errors_one_line(src, tmp_path, capsys):
    assert convert_cli.main(["--hf-path", str(tmp_path / "nope"), "--mlx-path", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model folder") and err.count("\n") == 1
    (tmp_path / "o").mkdir()
    assert convert_cli.main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err


def test_cli_end_to_end_with_mlx_lm_spelling(src, tmp_path):
    """``python -m qnext_mlx.convert -q`` (mlx-lm's flag) quantizes to 4 bits; progress goes to stderr."""
    out = tmp_path / "q"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qnext_mlx.convert",
            "--hf-path",
            str(src),
            "--mlx-path",
            str(out),
            "-q",
            "--q-group-size",
            str(GS),
            "--recipe",
            "mixed",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "converting" in proc.stderr and "peak memory" in proc.stderr
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["lm_head"] == {"group_size": GS, "bits": 8}


# ----------------------------------------------------------------- upload
class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records calls, touches no network."""

    calls: list = []
    fail = False

    def create_repo(self, repo_id, repo_type="model", exist_ok=False, **kw):
        FakeHfApi.calls.append(("create_repo", repo_id, repo_type, exist_ok))

    def upload_folder(self, folder_path, repo_id, repo_type="model", **kw):
        if FakeHfApi.fail:
            raise RuntimeError("401 Unauthorized")
        FakeHfApi.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))


def test_upload_uses_huggingface_hub(src, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls, FakeHfApi.fail = [], False
    out = tmp_path / "up"
    cv.convert(src, out, q_bits=4, q_group_size=GS, upload_repo="me/tiny-4bit", progress=False)
    assert FakeHfApi.calls[0] == ("create_repo", "me/tiny-4bit", "model", True)
    kind, repo, files = FakeHfApi.calls[1]
    assert (kind, repo) == ("upload_folder", "me/tiny-4bit")
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "README.md"} <= set(files)
    assert 'load("me/tiny-4bit")' in (out / "README.md").read_text()

    FakeHfApi.fail = True
    with pytest.raises(ConversionError, match="complete but uploading it to me/x failed"):
        cv.convert(src, tmp_path / "up2", q_bits=4, q_group_size=GS, upload_repo="me/x", progress=False)
    assert (tmp_path / "up2" / "config.json").exists()  # the conversion itself is kept


# ------------------------------------------------------------- benchmark
def test_benchmark_synthetic_checkpoint_uses_the_real_names(src, tmp_path):
    """scripts/bench_convert.py writes the same tensor names and shapes as transformers does."""
    import bench_convert

    from qnext_mlx.model.config import ModelConfig

    config = ModelConfig.from_file(src)
    config.num_mtp_layers = 1
    real = {}
    for f in weight_files(src):
        real.update({k: shape for k, (_, shape) in read_safetensors_header(f).items()})
    assert bench_convert.hf_tensor_specs(config) == real

    syn = tmp_path / "syn"
    _, shards = bench_convert.write_synthetic_checkpoint(syn, {"num_hidden_layers": 2}, shard_bytes=50_000)
    assert shards > 1
    res = cv.convert(syn, tmp_path / "syn-q", q_bits=4, q_group_size=GS, progress=False)
    assert res.peak_rss_bytes > 0
    model = qnext_mlx.load_model(tmp_path / "syn-q")
    assert model.has_mtp and model(mx.array(IDS)).shape == (2, 24, VOCAB)


def test_parse_size():
    assert cv.parse_size("5GB") == 5 * 10**9
    assert cv.parse_size("200mb") == 200 * 10**6
    assert cv.parse_size("1.5GiB") == int(1.5 * 2**30)
    assert cv.parse_size("1000") == 1000
    with pytest.raises(ConversionError):
        cv.parse_size("lots")
