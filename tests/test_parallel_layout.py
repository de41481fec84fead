"""The tensor-parallel cuts on the published 80B shapes (no weights: lazy arrays only).

For 2, 4 and 8 ranks, every checkpoint tensor cut by ``tensor_shard`` has exactly the shape
of the rank's local model (``tensor_local_config``), unquantized and at 4 bits in groups of
64; the ranks' shares of each split tensor add up to the whole. The numbers themselves are
checked against one process in tests/test_distributed.py.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from qnext_mlx.model import Model, ModelConfig
from qnext_mlx.model.parallel import is_split, pipeline_stages, tensor_local_config, tensor_shard

CONFIG = Path(__file__).resolve().parents[2] / "shared" / "qwen3-next-hf" / "config.json"


@pytest.fixture(scope="module")
def cfg():
    if not CONFIG.exists():
        pytest.skip("the published config is not here")
    c = ModelConfig.from_file(CONFIG)
    c.num_hidden_layers = 4  # the same widths, fewer layers: 3 DeltaNet + 1 attention
    c.layer_types = c.layer_types[:4]
    c.num_mtp_layers = 1
    return c


def shapes(model, bits=None):
    if bits is not None:
        nn.quantize(model, 64, bits, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}, dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("size", [2, 4, 8])
def test_every_cut_has_the_local_models_shape(cfg, size, bits):
    full_shapes, full = shapes(Model(cfg), bits)
    totals = {k: 0 for k in full}
    for rank in range(size):
        local_shapes, _ = shapes(Model(tensor_local_config(cfg, rank, size)), bits)
        assert set(local_shapes) == set(full_shapes)
        for name, x in full.items():
            cut = tensor_shard(name, x, cfg, rank, size)  # lazy: nothing is computed
            assert tuple(cut.shape) == local_shapes[name], (name, rank)
            kv = ("k_proj" in name or "v_proj" in name) and size > cfg.num_key_value_heads
            if not is_split(name):
                assert tuple(cut.shape) == full_shapes[name], name  # replicated as is
            elif not kv:
                assert cut.size < x.size, name
            totals[name] += cut.size
    for name, x in full.items():
        kv = ("k_proj" in name or "v_proj" in name) and size > cfg.num_key_value_heads
        if is_split(name) and not kv and "in_proj" not in name and "conv1d" not in name:
            assert totals[name] == x.size, name  # the shares tile the tensor
    assert mx.get_active_memory() < 2**30  # nothing of the 80B widths was materialized


def test_head_counts_that_do_not_split_are_one_error(cfg):
    from qnext_mlx.errors import ConfigError

    with pytest.raises(ConfigError, match="must divide by 3"):
        tensor_local_config(cfg, 0, 3)


def test_pipeline_stages_balance_bytes():
    # the largest stage as small as it can be (30: the MTP head counts with the last layer)
    assert pipeline_stages([10] * 6, 3, mtp_bytes=10) == [range(0, 3), range(3, 5), range(5, 6)]
    assert pipeline_stages([1, 1, 100, 1], 2) == [range(0, 2), range(2, 4)]  # 101, not 102
    assert pipeline_stages([5, 5], 2) == [range(0, 1), range(1, 2)]
    assert pipeline_stages([1, 1, 1, 1], 4) == [range(i, i + 1) for i in range(4)]
