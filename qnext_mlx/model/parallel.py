"""Tensor and pipeline parallel layouts of Qwen3-Next over the ranks of an ``mx.distributed`` group.

Tensor parallel (``mode="tensor"``) over N ranks: every rank runs every layer on its share
of the heads and widths, and one ``all_sum`` after each token mixer and one after each
MoE/MLP rebuild the full hidden state (``DecoderLayer.reduce_group``):

- DeltaNet: value heads evenly; key heads likewise while N <= key heads, else each rank
  holds the key head its value heads need. ``in_proj_qkvz``/``in_proj_ba`` rows, conv
  channels, ``dt_bias``, ``A_log`` and the states follow; ``out_proj`` by input columns.
- Attention: query heads (``q_proj`` rows with their gate half, ``o_proj`` columns); KV
  heads split while N <= KV heads, else each rank holds the one its query heads use.
- Routed experts: within each expert, ``moe_intermediate_size / N`` of every expert on
  every rank (each rank reads 1/N of every active expert's bytes, whatever the router
  picks; split by expert, a rank's share of a token's top-k would vary token to token).
- Shared expert, dense MLPs: by intermediate width.
- Router, gates, norms, embeddings, LM head, ``mtp.fc``: replicated.

A rank's module tree is the model of :func:`tensor_local_config` (the same classes at
the local widths), and :func:`tensor_shard` cuts each checkpoint tensor to its share
before anything is read (row and column selections work on quantized tensors too:
packed weights, scales and biases are cut in their own units).

Pipeline parallel (``mode="pipeline"``): rank r runs the contiguous layers
:func:`pipeline_stages` gives it (balanced by weight bytes), receives the hidden state
from rank r-1 and sends its own to rank r+1; the last stage's output reaches every rank
through one ``all_sum`` so that all ranks hold the same logits (embedding, final norm and
LM head are replicated). The MTP head lives on the last stage (:class:`RemoteMTP`
elsewhere).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError
from .config import ModelConfig

__all__ = [
    "MODES",
    "ParallelLayout",
    "PipelineStage",
    "RemoteMTP",
    "SkippedLayer",
    "is_split",
    "pipeline_stages",
    "stage_bytes",
    "tensor_local_config",
    "tensor_shard",
]

MODES = ("tensor", "pipeline")


@dataclass
class ParallelLayout:
    """Where this process sits: ``mode`` (``"tensor"`` or ``"pipeline"``), its ``rank`` in
    a ``group`` of ``size`` ranks, and for pipeline the layers each rank runs."""

    mode: str
    rank: int
    size: int
    group: object = None
    stages: Optional[List[range]] = None

    @property
    def layers(self) -> Optional[range]:
        """The decoder layers this rank runs (pipeline), None for tensor parallel."""
        return self.stages[self.rank] if self.stages is not None else None


# ------------------------------------------------------------------ tensor parallel
@dataclass(frozen=True)
class _Heads:
    """One rank's heads: a contiguous range of value (or query) heads and the key (or KV)
    heads they read."""

    lo: int
    hi: int
    kv_lo: int
    kv_hi: int


def _share(n: int, groups: int, rank: int, size: int, what: str) -> _Heads:
    """Split ``n`` heads grouped onto ``groups`` shared heads (GQA-like) over ``size`` ranks."""
    if n % size:
        raise ConfigError(f"tensor parallel over {size} ranks: {what} ({n}) must divide by {size}")
    per = n // size
    lo, hi = rank * per, (rank + 1) * per
    ratio = n // groups
    kv_lo, kv_hi = lo // ratio, (hi - 1) // ratio + 1
    counts = {min(hi, (g + 1) * ratio) - max(lo, g * ratio) for g in range(kv_lo, kv_hi)}
    if len(counts) != 1 or per % (kv_hi - kv_lo):
        raise ConfigError(
            f"tensor parallel over {size} ranks does not split {what} ({n} on {groups} shared heads) evenly"
        )
    return _Heads(lo, hi, kv_lo, kv_hi)


def _check_width(width: int, size: int, what: str) -> None:
    if width % size:
        raise ConfigError(f"tensor parallel over {size} ranks: {what} ({width}) must divide by {size}")


def tensor_local_config(cfg: ModelConfig, rank: int, size: int) -> ModelConfig:
    """The config of rank ``rank``'s share (same classes, local head counts and widths);
    raises :class:`ConfigError` when the heads or widths do not split over ``size``."""
    dn = _share(cfg.linear_num_value_heads, cfg.linear_num_key_heads, rank, size, "DeltaNet value heads")
    at = _share(cfg.num_attention_heads, cfg.num_key_value_heads, rank, size, "attention query heads")
    for width, what in (
        (cfg.moe_intermediate_size, "moe_intermediate_size"),
        (cfg.shared_expert_intermediate_size, "shared_expert_intermediate_size"),
        (cfg.intermediate_size, "intermediate_size"),
    ):
        _check_width(width, size, what)
    return dataclasses.replace(
        cfg,
        linear_num_value_heads=dn.hi - dn.lo,
        linear_num_key_heads=dn.kv_hi - dn.kv_lo,
        num_attention_heads=at.hi - at.lo,
        num_key_value_heads=at.kv_hi - at.kv_lo,
        moe_intermediate_size=cfg.moe_intermediate_size // size,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size // size,
        intermediate_size=cfg.intermediate_size // size,
    )


def _rows(x: mx.array, idx: Sequence[int], axis: int) -> mx.array:
    # take, not a slice: a slice is a view that would keep the whole tensor resident
    return mx.take(x, mx.array(list(idx), dtype=mx.int32), axis=axis)


def _columns(x: mx.array, lo: int, hi: int, width: int, name: str) -> mx.array:
    """Input columns ``[lo, hi)`` of a logical width ``width`` along the last axis, in the
    tensor's own units (packed quantized words, scale groups or plain columns)."""
    n = x.shape[-1]
    if (lo * n) % width or (hi * n) % width:
        raise ConfigError(f"tensor parallel: {name} ({width} columns stored as {n}) cannot be cut at column {lo}")
    return _rows(x, range(lo * n // width, hi * n // width), axis=-1)


def _deltanet_rows(cfg: ModelConfig, h: _Heads):
    """Row indices of ``in_proj_qkvz``, ``in_proj_ba`` and conv channels for heads ``h``."""
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    ratio = cfg.linear_num_value_heads // cfg.linear_num_key_heads
    block = 2 * dk + 2 * ratio * dv  # per key head: [q | k | v (ratio heads) | z (ratio heads)]
    key_dim = cfg.linear_num_key_heads * dk
    qkvz: List[int] = []
    ba: List[int] = []
    conv_q: List[int] = []
    conv_k: List[int] = []
    conv_v: List[int] = []
    for kh in range(h.kv_lo, h.kv_hi):
        local = [v - kh * ratio for v in range(max(h.lo, kh * ratio), min(h.hi, (kh + 1) * ratio))]
        base = kh * block
        qkvz += list(range(base, base + 2 * dk))
        for part in (0, 1):  # v heads, then z heads
            start = base + 2 * dk + part * ratio * dv
            for j in local:
                qkvz += list(range(start + j * dv, start + (j + 1) * dv))
        ba += [kh * 2 * ratio + j for j in local] + [kh * 2 * ratio + ratio + j for j in local]
        conv_q += list(range(kh * dk, (kh + 1) * dk))
        conv_k += list(range(key_dim + kh * dk, key_dim + (kh + 1) * dk))
    for v in range(h.lo, h.hi):
        conv_v += list(range(2 * key_dim + v * dv, 2 * key_dim + (v + 1) * dv))
    return qkvz, ba, conv_q + conv_k + conv_v


def tensor_shard(name: str, x: mx.array, cfg: ModelConfig, rank: int, size: int) -> mx.array:
    """Rank ``rank``'s share of the checkpoint tensor ``name`` (MLX layout, after
    :meth:`Model.sanitize`) for tensor parallel over ``size`` ranks; replicated tensors
    come back unchanged. Lazy in, lazy out: nothing is read until evaluated."""
    parts = name.split(".")
    param = parts[-1]
    module = parts[-2] if len(parts) > 1 else ""
    if "linear_attn" in parts:
        dn = _share(cfg.linear_num_value_heads, cfg.linear_num_key_heads, rank, size, "DeltaNet value heads")
        dv = cfg.linear_value_head_dim
        if module in ("in_proj_qkvz", "in_proj_ba", "conv1d"):
            qkvz, ba, conv = _deltanet_rows(cfg, dn)
            return _rows(x, {"in_proj_qkvz": qkvz, "in_proj_ba": ba, "conv1d": conv}[module], axis=0)
        if param in ("dt_bias", "A_log"):
            return _rows(x, range(dn.lo, dn.hi), axis=0)
        if module == "out_proj":
            return _out_columns(x, param, dn.lo * dv, dn.hi * dv, cfg.linear_num_value_heads * dv, name, rank)
        return x  # the gated norm: per head dim, shared
    if "self_attn" in parts:
        at = _share(cfg.num_attention_heads, cfg.num_key_value_heads, rank, size, "attention query heads")
        hd = cfg.head_dim
        if module == "q_proj":
            return _rows(x, range(at.lo * 2 * hd, at.hi * 2 * hd), axis=0)
        if module in ("k_proj", "v_proj"):
            return _rows(x, range(at.kv_lo * hd, at.kv_hi * hd), axis=0)
        if module == "o_proj":
            return _out_columns(x, param, at.lo * hd, at.hi * hd, cfg.num_attention_heads * hd, name, rank)
        return x  # q_norm, k_norm
    if "switch_mlp" in parts:
        width = cfg.moe_intermediate_size
        lo, hi = rank * width // size, (rank + 1) * width // size
        if module in ("gate_proj", "up_proj"):
            return _rows(x, range(lo, hi), axis=-2)  # [E, I, H]: each expert's rows
        if module == "down_proj":
            return _out_columns(x, param, lo, hi, width, name, rank)
        return x
    if module in ("gate_proj", "up_proj", "down_proj") and "mlp" in parts:  # shared expert or dense MLP
        width = cfg.shared_expert_intermediate_size if "shared_expert" in parts else cfg.intermediate_size
        lo, hi = rank * width // size, (rank + 1) * width // size
        if module == "down_proj":
            return _out_columns(x, param, lo, hi, width, name, rank)
        return _rows(x, range(lo, hi), axis=0)
    return x


def _out_columns(x: mx.array, param: str, lo: int, hi: int, width: int, name: str, rank: int) -> mx.array:
    """An output projection (summed over ranks afterwards): its input columns; its bias
    is added once, on rank 0."""
    if param == "bias":
        return x if rank == 0 else mx.zeros_like(x)
    return _columns(x, lo, hi, width, name)


def is_split(name: str) -> bool:
    """Whether tensor parallel splits the tensor ``name`` (see the module docstring)."""
    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 else ""
    if "linear_attn" in parts:
        return module != "norm"
    if "self_attn" in parts:
        return module not in ("q_norm", "k_norm")
    return "switch_mlp" in parts or (module in ("gate_proj", "up_proj", "down_proj") and "mlp" in parts)


# ---------------------------------------------------------------- pipeline parallel
@dataclass(frozen=True)
class PipelineStage:
    """What a pipeline rank runs: decoder ``layers`` and whether it holds the MTP head."""

    rank: int
    size: int
    group: object
    layers: range


def pipeline_stages(layer_bytes: Sequence[int], size: int, mtp_bytes: int = 0) -> List[range]:
    """Contiguous layer ranges for ``size`` ranks, balancing weight bytes (the MTP head
    counts with the last stage); every rank gets at least one layer.

    Args:
        layer_bytes: bytes of each decoder layer's weights, in order.
        size: ranks.
        mtp_bytes: bytes of the MTP head (on the last rank).
    """
    n = len(layer_bytes)
    if size < 1 or size > n:
        raise ConfigError(f"pipeline parallel over {size} ranks needs at least {size} layers (the model has {n})")
    # The smallest largest-stage bound that fits (binary search over the bound, greedy cuts).
    loads = list(layer_bytes)

    def cuts(bound: int) -> Optional[List[int]]:
        out, acc = [], 0
        for i, b in enumerate(loads):
            extra = mtp_bytes if i == n - 1 else 0
            if acc and acc + b + extra > bound:
                out.append(i)
                acc = 0
            acc += b + extra
            if acc > bound:
                return None
        return out if len(out) <= size - 1 else None

    lo, hi = max(loads[:-1] + [loads[-1] + mtp_bytes]), sum(loads) + mtp_bytes
    while lo < hi:
        mid = (lo + hi) // 2
        if cuts(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    bounds = cuts(lo)
    # Fewer cuts than ranks (tiny layers): split the longest stages until every rank has one.
    starts = [0] + bounds
    while len(starts) < size:
        ends = starts[1:] + [n]
        lengths = [e - s for s, e in zip(starts, ends)]
        k = max(range(len(starts)), key=lambda i: lengths[i])
        starts.insert(k + 1, starts[k] + lengths[k] // 2)
    ends = starts[1:] + [n]
    return [range(s, e) for s, e in zip(starts, ends)]


class SkippedLayer(nn.Module):
    """A decoder layer another pipeline rank runs: no weights, never called."""

    def __init__(self, is_linear: bool):
        super().__init__()
        self.is_linear = is_linear


class RemoteMTP(nn.Module):
    """The MTP head on another pipeline rank: its output here is zeros, which the
    stage's ``all_sum`` replaces with the last rank's."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.layers = [SkippedLayer(False) for _ in range(num_layers)]

    def __call__(self, hidden: mx.array, next_embeds: mx.array, cache=None) -> mx.array:
        """Advance the MTP caches' offsets as the real head would (the decode loops read
        them) with one tiny zero head per position; return zeros ``[B, L, hidden]``."""
        B, L, _ = hidden.shape
        for c in cache or []:
            dim = getattr(c, "group_size", 1) if hasattr(c, "bits") else 1  # quantized KV: one group
            # depending on ``hidden``: the last rank's MTP cache depends on the main model's
            # all_sum, so evaluating the caches must run that all_sum here too
            stand_in = mx.depends(mx.zeros((B, 1, L, dim), dtype=hidden.dtype), hidden)
            c.update_and_fetch(stand_in, stand_in)
        # zeros that depend on ``hidden``: every rank must reach the head's all_sum after the
        # main model's, and on the last rank the head's input comes from it
        return mx.depends(mx.zeros_like(hidden), hidden)


def stage_bytes(weights: Dict[str, mx.array], num_layers: int):
    """Per-layer and MTP weight bytes of a checkpoint's (lazy) tensors: ``(layer_bytes, mtp_bytes)``."""
    layer = [0] * num_layers
    mtp = 0
    for k, v in weights.items():
        if k.startswith("model.layers."):
            layer[int(k.split(".")[2])] += v.nbytes
        elif k.startswith("mtp."):
            mtp += v.nbytes
    return layer, mtp
