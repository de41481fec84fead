"""The planner over several Macs (``--ranks N --parallel tensor|pipeline``): memory per rank, communication
per decoded token and the predicted decode rate, on the published 80B config at 4 bits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qnext_mlx import plan as plan_cli
from qnext_mlx.engine import plan as P
from qnext_mlx.errors import ConfigError
from qnext_mlx.model.config import ModelConfig

GiB = 2**30
CONFIG_80B = Path(__file__).resolve().parents[2] / "shared" / "qwen3-next-hf" / "config.json"

# Replicated under tensor parallelism, named independently of the planner's classifier.
REPLICATED = re.compile(
    r"(embed_tokens|lm_head|^model\.norm\.|\.mlp\.gate\.|shared_expert_gate|layernorm|q_norm|k_norm|"
    r"linear_attn\.norm\.|^mtp\.fc\.|^mtp\.pre_fc_norm|^mtp\.norm\.)"
)


def _config_80b() -> dict:
    if CONFIG_80B.exists():
        return json.loads(CONFIG_80B.read_text())
    from test_plan import PUBLISHED_80B  # the same keys, for a checkout without ../shared

    return dict(PUBLISHED_80B)


@pytest.fixture(scope="module")
def cfg80():
    return ModelConfig.from_dict(_config_80b())


@pytest.fixture(scope="module")
def tensors4(cfg80):
    """Per-tensor bytes of the 80B at 4 bits (group 64), without and with its MTP layer."""
    return P.weight_tensor_bytes(cfg80, 4, 64, 2, 0)[0], P.weight_tensor_bytes(cfg80, 4, 64, 2, 1)[0]


def _plan(cfg, ranks, mode, tensors, **kw):
    return P.parallel_plan(cfg, ranks, mode, 4, 64, context=262144, tensors=tensors, **kw)


def test_tensor_weights_per_rank(cfg80, tensors4):
    tensors = tensors4[0]
    total = sum(tensors.values())
    assert total == P.estimate_weight_bytes(cfg80, 4)[0]
    replicated = sum(b for name, b in tensors.items() if REPLICATED.search(name))
    one, two, four = (_plan(cfg80, n, "tensor", tensors) for n in (1, 2, 4))
    assert one.weights_per_rank == [total] and one.comm["all_sums"] == 0
    assert 0.45 * total < two.weights_per_rank[0] < 0.6 * total
    assert two.weights_replicated == replicated and two.weights_split == total - replicated
    # 2 ranks: every split tensor halves exactly (1 of 2 KV heads, 8 of 16 key heads, ...)
    assert two.weights_split_per_rank == [(total - replicated) // 2] * 2
    assert two.weights_per_rank == [(total - replicated) // 2 + replicated] * 2
    # 4 ranks: a quarter, except k_proj/v_proj: 2 KV heads, so each rank holds one (a half)
    kv_proj = sum(b for name, b in tensors.items() if re.search(r"\.(k|v)_proj\.", name))
    assert four.weights_split_per_rank[0] == (total - replicated - kv_proj) // 4 + kv_proj // 2
    assert four.heads == {
        "ranks": 4,
        "value_heads": 8,
        "key_heads": 4,
        "query_heads": 4,
        "kv_heads": 1,
        "moe_intermediate": 128,
        "shared_expert_intermediate": 128,
        "intermediate": 1280,
    }


def test_tensor_caches_per_rank(cfg80, tensors4):
    T = 262144
    two, four = (_plan(cfg80, n, "tensor", tensors4[0], kv_bits=4) for n in (2, 4))
    assert two.kv_cache_per_rank == [P.kv_cache_bytes(cfg80, T, kv_bits=4) // 2] * 2
    assert four.kv_cache_per_rank == two.kv_cache_per_rank[:1] * 4  # 1 KV head per rank from 2 ranks on
    assert "KV cache does not shrink past 2 ranks" in four.notes[0]
    full = P.deltanet_state_bytes(cfg80)
    assert two.deltanet_state_per_rank[0] * 2 == full and four.deltanet_state_per_rank[0] * 4 == full
    # narrower layers, narrower activations; the residual stream and the logits stay whole
    one_act = P.activation_bytes(cfg80, T, P.DEFAULT_CHUNK, kv_bits=4)["peak"]
    assert two.activations_peak_per_rank[0] < one_act
    assert (
        two.total_per_rank[0]
        == (two.weights_per_rank[0] + two.kv_cache_per_rank[0] + two.deltanet_state_per_rank[0])
        + two.activations_peak_per_rank[0]
    )


def test_tensor_communication_per_token(cfg80, tensors4):
    two = _plan(cfg80, 2, "tensor", tensors4[0])
    assert two.comm == {"all_sums": 2 * 48, "sends": 0, "message_bytes": 2048 * 2, "hops": 96}
    assert two.comm_seconds["ring-tcp"] == pytest.approx(96 * (300e-6 + 4096 / 1.25e9), rel=1e-12)
    assert two.comm_seconds["jaccl-rdma"] == pytest.approx(96 * (30e-6 + 4096 / 5e9), rel=1e-12)
    assert two.comm_seconds["ring-tcp"] == pytest.approx(0.029114573, rel=1e-8)
    four = _plan(cfg80, 4, "tensor", tensors4[0])
    assert four.comm["hops"] == 96 * 3 and four.comm_seconds["jaccl-rdma"] == pytest.approx(288 * 30.8192e-6)
    drafting = _plan(cfg80, 2, "tensor", tensors4[1], mtp_layers=1, mtp=True)
    assert drafting.comm["all_sums"] == 2 * 48 + 2
    assert drafting.mtp_kv_cache_per_rank == [P.kv_cache_bytes(cfg80, 262144, layers=1) // 2] * 2
    assert P.link_seconds(5, 1000, P.Link("x", 1e-3, 1e6, "")) == pytest.approx(5 * (1e-3 + 1e-3))


def test_decode_prediction_reads_active_weights(cfg80, tensors4):
    tensors = tensors4[0]
    experts = sum(b for name, b in tensors.items() if ".switch_mlp." in name)
    embed = sum(b for name, b in tensors.items() if "embed_tokens" in name)
    rest = sum(tensors.values()) - experts - embed
    single = rest + experts * 10 / 512 + embed / 151936
    one = _plan(cfg80, 1, "tensor", tensors)
    assert one.bytes_read_per_token == pytest.approx(single, abs=1)
    assert one.tokens_per_s["ring-tcp"] == pytest.approx(400e9 / single)
    # 2 ranks: each reads half of the split tensors' active bytes and all of the replicated ones
    repl = [n for n in tensors if REPLICATED.search(n)]
    repl_read = sum(tensors[n] / 151936 if "embed_tokens" in n else tensors[n] for n in repl)
    two = _plan(cfg80, 2, "tensor", tensors, bandwidth_gbs=800)
    assert two.bytes_read_per_token == pytest.approx((single - repl_read) / 2 + repl_read, abs=1)
    compute = two.bytes_read_per_token / 800e9
    assert two.compute_seconds == pytest.approx(compute)
    for link in ("ring-tcp", "jaccl-rdma"):
        assert two.tokens_per_s[link] == pytest.approx(1 / (compute + two.comm_seconds[link]))
    assert two.tokens_per_s["compute only"] > 1.8 * two.single_process_tokens_per_s / 2


def test_pipeline_memory_and_communication(cfg80, tensors4):
    T = 262144
    plain = _plan(cfg80, 4, "pipeline", tensors4[0])
    assert plain.stages == [(0, 12), (12, 24), (24, 36), (36, 48)]  # 48 layers of 4-layer period: equal bytes
    assert plain.kv_cache_per_rank == [P.kv_cache_bytes(cfg80, T, layers=3)] * 4
    assert plain.deltanet_state_per_rank == [P.deltanet_state_bytes(cfg80) // 4] * 4
    assert plain.comm == {"all_sums": 1, "sends": 3, "message_bytes": 4096, "hops": 6}
    assert plain.comm_seconds["ring-tcp"] == pytest.approx(6 * (300e-6 + 4096 / 1.25e9), rel=1e-12)

    tensors = tensors4[1]  # with the MTP head: it goes to the last rank and counts in the balance
    total = sum(tensors.values())
    four = _plan(cfg80, 4, "pipeline", tensors, mtp_layers=1, mtp=True)
    assert sum(four.weights_split_per_rank) == four.weights_split
    assert four.weights_split + four.weights_replicated == total
    head = sum(b for n, b in tensors.items() if n.startswith(("model.embed_tokens.", "model.norm.", "lm_head.")))
    assert four.weights_replicated == head
    mtp = sum(b for n, b in tensors.items() if n.startswith("mtp."))
    per_layer = [sum(b for n, b in tensors.items() if P.tensor_layer(n) == i) for i in range(48)]
    expected = [sum(per_layer[a:b]) for a, b in four.stages]
    expected[-1] += mtp
    assert four.weights_split_per_rank == expected
    assert four.weights_per_rank == [x + head for x in expected]
    attn = [sum(cfg80.layer_types[i] == "full_attention" for i in range(a, b)) for a, b in four.stages]
    assert four.kv_cache_per_rank == [P.kv_cache_bytes(cfg80, T, layers=n) for n in attn]
    assert four.mtp_kv_cache_per_rank == [0, 0, 0, P.kv_cache_bytes(cfg80, T, layers=1)]
    assert four.comm == {"all_sums": 2, "sends": 3, "message_bytes": 4096, "hops": 9}  # + the MTP output
    # a token walks every stage in turn: no speed-up, the single-process rate minus communication
    assert four.tokens_per_s["compute only"] == pytest.approx(four.single_process_tokens_per_s)
    t = 1 / four.single_process_tokens_per_s + four.comm_seconds["jaccl-rdma"]
    assert four.tokens_per_s["jaccl-rdma"] == pytest.approx(1 / t)
    assert max(four.total_per_rank) < plain.weights_split  # memory is split


def test_classification_matches_the_model_sharding(cfg80, tensors4):
    """The planner splits exactly the tensors the tensor-parallel model splits, and plans its stages."""
    from qnext_mlx.model.parallel import is_split, pipeline_stages

    tensors = tensors4[1]
    heads = P.shard_heads(cfg80, 4)
    for name in tensors:
        assert is_split(name) == (P.tensor_shard_fraction(name, cfg80, heads) != 1), name
    layer_bytes = [sum(b for n, b in tensors.items() if P.tensor_layer(n) == i) for i in range(48)]
    mtp = sum(b for n, b in tensors.items() if n.startswith("mtp."))
    for ranks in (2, 4, 8):
        pp = _plan(cfg80, ranks, "pipeline", tensors, mtp_layers=1)
        assert pp.stages == [(r.start, r.stop) for r in pipeline_stages(layer_bytes, ranks, mtp)]


def test_heads_that_do_not_divide(cfg80):
    import dataclasses

    with pytest.raises(ConfigError, match=r"query heads \(12\)"):
        P.shard_heads(dataclasses.replace(cfg80, num_attention_heads=12, num_key_value_heads=2), 8)
    with pytest.raises(ConfigError, match=r"DeltaNet value heads \(12\)"):
        P.shard_heads(dataclasses.replace(cfg80, linear_num_value_heads=12, linear_num_key_heads=4), 8)
    with pytest.raises(ConfigError, match="quantization group"):
        P.shard_heads(cfg80, 8, bits=4, group_size=128)  # 512 / 8 = 64 expert columns per rank
    assert P.shard_heads(cfg80, 8, bits=4, group_size=64).moe_intermediate == 64


def _run(capsys, argv):
    code = plan_cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_config_80b()))
    return path


def test_cli_json_and_text(config_file, capsys):
    base = ["--model", str(config_file), "--context", "256K", "--q-bits", "4", "--budget-gib", "48"]
    code, out, _ = _run(capsys, base + ["--ranks", "2", "--parallel", "tensor", "--json"])
    assert code == 0
    par = json.loads(out)["parallel"]
    assert par["ranks"] == 2 and par["mode"] == "tensor" and par["comm"]["all_sums"] == 96
    assert par["budget"] == 48 * GiB and par["fits"] is True
    assert par["comm_seconds"]["ring-tcp"] == pytest.approx(96 * (300e-6 + 4096 / 1.25e9))
    code, out, _ = _run(capsys, base + ["--ranks", "4", "--parallel", "pipeline", "--bandwidth-gbs", "546"])
    assert code == 0
    assert "pipeline over 4 ranks: layers 0-11, 12-23, 24-35, 36-47" in out
    assert "1 all-sum + 3 sends" in out and "546 GB/s" in out and "300 us a hop" in out
    code, out, _ = _run(capsys, base + ["--json"])
    assert code == 0 and json.loads(out)["parallel"] is None  # one process: the plan as before


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--ranks", "2"], "--ranks 2 needs --parallel"),
        (["--ranks", "3", "--parallel", "tensor"], "--ranks"),
        (["--ranks", "2", "--parallel", "data"], "--parallel"),
        (["--ranks", "2", "--parallel", "tensor", "--bandwidth-gbs", "0"], "--bandwidth-gbs"),
    ],
)
def test_cli_bad_combinations(config_file, capsys, extra, message):
    code, _, err = _run(capsys, ["--model", str(config_file), "--context", "4096"] + extra)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_heads_that_do_not_divide(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(_config_80b(), num_attention_heads=12)))
    code, _, err = _run(capsys, ["--model", str(path), "--context", "4096", "--ranks", "8", "--parallel", "tensor"])
    assert code == 2 and "query heads (12)" in err and len(err.strip().splitlines()) == 1


def test_checkpoint_folder_names(hf_checkpoint):
    """Hugging Face names (``mlp.experts.E``): the split covers everything but the replicated tensors."""
    path, _, _ = hf_checkpoint("ratio2", seed=1)
    cfg = ModelConfig.from_file(path)
    found = P.checkpoint_weights(path)
    plan = P.make_plan(cfg, 4096, model_path=path, ranks=2, parallel="tensor", budget=GiB)
    pp = plan.parallel
    assert sum(found["tensors"].values()) == found["bytes"] == pp.weights_split + pp.weights_replicated
    assert pp.weights_replicated == sum(b for n, b in found["tensors"].items() if REPLICATED.search(n))
    assert pp.weights_split_per_rank == [pp.weights_split // 2] * 2
    assert pp.deltanet_state_per_rank == [P.deltanet_state_bytes(cfg, dtype_bytes=4) // 2] * 2
