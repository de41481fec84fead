"""Loading one rank's share of a checkpoint for tensor or pipeline parallel runs.

The layouts are :mod:`qnext_mlx.model.parallel`'s. Every tensor is cut to the rank's
share while still lazy (memory-mapped) and then read one at a time, so a rank's resident
weights are its share (about 1/N of the split part) plus the replicated part, and its
peak while loading exceeds that by one checkpoint tensor at most.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx

from ..errors import CheckpointError, ConfigError
from ..model import Model, ModelConfig
from ..model.parallel import (
    MODES,
    ParallelLayout,
    PipelineStage,
    RemoteMTP,
    SkippedLayer,
    pipeline_stages,
    stage_bytes,
    tensor_local_config,
    tensor_shard,
)
from ..version import __version__

__all__ = [
    "check_same_everywhere",
    "describe",
    "init_group",
    "materialize",
    "run_fingerprint",
    "shard_checkpoint",
]


def init_group(group=None):
    """The ``mx.distributed`` group to split over: ``group``, else the one ``mlx.launch``
    set up; raises :class:`ConfigError` when there is only one rank."""
    group = group if group is not None else mx.distributed.init()
    if group.size() < 2:
        raise ConfigError(
            "--parallel needs 2 or more ranks: start it with mlx.launch "
            "(e.g. mlx.launch -n 2 --backend ring --python PY -- -m qnext_mlx.generate ...; see docs/distributed.md)"
        )
    return group


def run_fingerprint(model_path: Path) -> bytes:
    """32 bytes that every rank of one run must share: package versions, config.json and
    the weight files' names and sizes."""
    h = hashlib.sha256()
    h.update(f"qnext-mlx {__version__} mlx {mx.__version__}\n".encode())
    model_path = Path(model_path)
    h.update((model_path / "config.json").read_bytes())
    for f in sorted(model_path.glob("*.safetensors")):
        h.update(f"{f.name} {f.stat().st_size}\n".encode())
    return h.digest()


def check_same_everywhere(group, model_path: Path) -> None:
    """Raise :class:`ConfigError` on every rank when the ranks differ in package versions
    or model files (one ``all_gather`` of :func:`run_fingerprint`)."""
    mine = mx.array(list(run_fingerprint(model_path)), dtype=mx.uint8)
    every = mx.distributed.all_gather(mine, group=group).reshape(group.size(), -1)
    mx.eval(every)
    rows = [bytes(r) for r in every.tolist()]
    odd = [r for r, fp in enumerate(rows) if fp != rows[0]]
    if odd:
        raise ConfigError(
            f"rank(s) {', '.join(map(str, odd))} have other model files or package versions than rank 0 "
            f"(qnext-mlx {__version__}, mlx {mx.__version__}, {model_path}): install the same everywhere"
        )


def shard_checkpoint(
    config: ModelConfig, model: Model, weights: Dict[str, mx.array], mode: str, group
) -> Tuple[Model, Dict[str, mx.array], ParallelLayout]:
    """This rank's model and tensors for ``mode`` over ``group``.

    Args:
        config: the checkpoint's config.
        model: the full model :func:`~qnext_mlx.checkpoint.reader.open_checkpoint` built
            (unevaluated, so it holds no memory).
        weights: every checkpoint tensor, lazy, in MLX layout.
        mode: ``"tensor"`` or ``"pipeline"``.
        group: the ``mx.distributed`` group (2 or more ranks).
    Returns:
        ``(model, weights, layout)``: the rank's model (not quantized yet), its lazy
        tensors and where it sits.
    """
    if mode not in MODES:
        raise ConfigError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}")
    rank, size = group.rank(), group.size()
    if mode == "tensor":
        local = tensor_local_config(config, rank, size)
        model = Model(local)
        for layer in list(model.layers) + (list(model.mtp.layers) if model.has_mtp else []):
            layer.reduce_group = group
        weights = {k: tensor_shard(k, v, config, rank, size) for k, v in weights.items()}
        return model, weights, ParallelLayout(mode, rank, size, group)
    layer_bytes, mtp_bytes = stage_bytes(weights, config.num_hidden_layers)
    stages = pipeline_stages(layer_bytes, size, mtp_bytes if model.has_mtp else 0)
    own = stages[rank]
    for i, layer in enumerate(model.layers):
        if i not in own:
            model.model.layers[i] = SkippedLayer(layer.is_linear)
    last = rank == size - 1
    if model.has_mtp and not last:
        model.mtp = RemoteMTP(len(model.mtp.layers))
    model.model.stage = PipelineStage(rank, size, group, own)

    def keep(name: str) -> bool:
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) in own
        return last or not name.startswith("mtp.")

    weights = {k: v for k, v in weights.items() if keep(k)}
    return model, weights, ParallelLayout(mode, rank, size, group, stages)


def materialize(weights: Dict[str, mx.array]) -> None:
    """Read the (cut) tensors one at a time, so that no more than one whole checkpoint
    tensor is in memory beside the rank's share."""
    for v in weights.values():
        try:
            mx.eval(v)
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot read a checkpoint tensor: {e}") from None


def describe(layout: Optional[ParallelLayout]) -> str:
    """One line for logs: ``tensor parallel, rank 0 of 2`` or ``pipeline ..., layers 0-23``."""
    if layout is None:
        return "one process"
    where = f"{layout.mode} parallel, rank {layout.rank} of {layout.size}"
    if layout.layers is not None:
        where += f", layers {layout.layers.start}-{layout.layers.stop - 1}"
    return where
