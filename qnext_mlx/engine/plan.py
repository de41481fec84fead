"""Memory planner: will a Qwen3-Next model run at a given context on this machine?

    python -m qnext_mlx.plan --model PATH_OR_REPO_OR_CONFIG --context N [--kv-bits B]
        [--q-bits B] [--prefill-step-size N] [--mtp] [--backend metal|cpu] [--budget-gib G] [--json]

Adds up, from the config alone (no weights are read; a model folder's
safetensors headers give the exact weight size):

* weights: the safetensors tensors as stored, or an estimate from the config
  (``--q-bits``; default 16-bit) with the quantization rules of our converter
  (group 64, router and shared-expert gates at 8 bits);
* KV cache: ``tokens x full-attention layers x 2 (K, V) x KV heads x head_dim``
  elements; 16-bit (2 bytes), or with ``--kv-bits B`` MLX's ``QuantizedKVCache``
  layout: B/8 bytes per element plus a scale and a bias (activation dtype) per
  group of 64. mlx-lm's caches grow in steps of 256 tokens;
* DeltaNet state: per linear-attention layer, the float32 recurrent state
  ``Hv x Dv x Dk`` plus the conv state ``(K - 1) x conv_dim``; constant in length;
* peak activations of one prefill chunk (see :func:`activation_bytes`): the
  dominant term at long context is the attention score matrix, because MLX
  runs head-dim-256 prefill attention unfused (it materialises
  ``heads x chunk x context`` scores) on the CPU backend and, by default, on
  Metal too;

and compares the total with the memory budget: on a Mac with Metal, MLX's
recommended working set (the wired limit mlx-lm generates under); elsewhere
the total RAM. When the default prefill chunk does not fit, it suggests one
that does.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..checkpoint.reader import ST_DTYPE_SIZE, read_safetensors_header, weight_files
from ..errors import ConfigError, QnextError
from ..kernels.attention import MIN_ROWS, PREFILL_BLOCK
from ..kernels.lanes import cpu_lanes as current_cpu_lanes
from ..model import Model, ModelConfig
from ..model.parallel import pipeline_stages, tensor_local_config
from ..model.rope import context_window, factor_for_context, native_context

GiB = 1024**3
KV_STEP = 256  # mlx-lm's KVCache / QuantizedKVCache grow in steps of 256 tokens
DEFAULT_CHUNK = 2048  # generate's (and mlx-lm's) default --prefill-step-size
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}  # floating safetensors dtypes an activation can have


# ----------------------------------------------------------------------------- parts
def kv_bytes_per_token(
    cfg: ModelConfig,
    kv_bits: Optional[int] = None,
    dtype_bytes: int = 2,
    group_size: int = 64,
    layers: Optional[int] = None,
    kv_heads: Optional[int] = None,
) -> float:
    """KV cache bytes per token over the full-attention layers (or ``layers`` of them).

    16-bit: ``layers x 2 x kv_heads x head_dim x dtype_bytes``. Quantized:
    ``bits / 8`` per element plus scale and bias (``dtype_bytes`` each) per group.
    ``kv_heads`` (default the config's) counts the KV heads one process holds
    (tensor parallel: :attr:`ShardHeads.kv_heads`).
    """
    if layers is None:
        layers = sum(1 for t in cfg.layer_types if t == "full_attention")
    heads = cfg.num_key_value_heads if kv_heads is None else kv_heads
    elements = layers * 2 * heads * cfg.head_dim
    if kv_bits is None:
        return float(elements * dtype_bytes)
    return elements * (kv_bits / 8 + 2 * dtype_bytes / group_size)


def kv_cache_bytes(
    cfg: ModelConfig,
    tokens: int,
    kv_bits: Optional[int] = None,
    dtype_bytes: int = 2,
    group_size: int = 64,
    layers: Optional[int] = None,
    kv_heads: Optional[int] = None,
) -> int:
    """Bytes the KV caches hold at ``tokens`` (rounded up to the cache's 256-token step)."""
    allocated = math.ceil(tokens / KV_STEP) * KV_STEP
    return int(round(allocated * kv_bytes_per_token(cfg, kv_bits, dtype_bytes, group_size, layers, kv_heads)))


def deltanet_state_bytes(
    cfg: ModelConfig,
    dtype_bytes: int = 2,
    *,
    layers: Optional[int] = None,
    key_heads: Optional[int] = None,
    value_heads: Optional[int] = None,
) -> int:
    """Recurrent (float32 ``Hv x Dv x Dk``) plus conv (``(K-1) x conv_dim``) state of all DeltaNet layers.

    ``layers`` (default all DeltaNet layers), ``key_heads`` and ``value_heads``
    (default the config's) size one process's share: tensor parallel holds
    :attr:`ShardHeads.key_heads` / :attr:`ShardHeads.value_heads` of every layer,
    pipeline parallel all heads of its stage's layers.
    """
    n = sum(1 for t in cfg.layer_types if t == "linear_attention") if layers is None else layers
    hk = cfg.linear_num_key_heads if key_heads is None else key_heads
    hv = cfg.linear_num_value_heads if value_heads is None else value_heads
    conv_dim = 2 * hk * cfg.linear_key_head_dim + hv * cfg.linear_value_head_dim
    recurrent = hv * cfg.linear_value_head_dim * cfg.linear_key_head_dim * 4
    conv = (cfg.linear_conv_kernel_dim - 1) * conv_dim * dtype_bytes
    return n * (recurrent + conv)


def weight_tensor_bytes(
    cfg: ModelConfig, bits: Optional[int] = None, group_size: int = 64, dtype_bytes: int = 2, mtp_layers: int = 0
) -> Tuple[Dict[str, int], int]:
    """``({name: bytes}, parameters)`` of every weight tensor, without any weights.

    Builds the MLX module tree lazily (its random initial values are never
    evaluated, so nothing is allocated), quantizes it the way our converter
    does when ``bits`` is given (every Linear/Embedding whose input dim is a
    multiple of ``group_size``; router and shared-expert gates at 8 bits) and
    sizes each parameter (names as in the checkpoint, e.g.
    ``model.layers.0.mlp.switch_mlp.gate_proj.scales``), counting
    floating-point tensors (weights, scales, biases, norms) at ``dtype_bytes``.
    ``parameters`` counts the unquantized model's elements.
    """
    model = Model(_with_mtp(cfg, mtp_layers))
    params = sum(p.size for _, p in tree_flatten(model.parameters()))
    if bits is not None:
        special = model.quant_predicate

        def predicate(path, module):
            if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
                return False
            choice = special(path, module)
            return {"group_size": group_size, "bits": bits} if choice is True else choice

        nn.quantize(model, group_size, bits, class_predicate=predicate)
    sizes = {
        name: int(p.size * (dtype_bytes if mx.issubdtype(p.dtype, mx.floating) else p.itemsize))
        for name, p in tree_flatten(model.parameters())
    }
    return sizes, int(params)


def estimate_weight_bytes(
    cfg: ModelConfig, bits: Optional[int] = None, group_size: int = 64, dtype_bytes: int = 2, mtp_layers: int = 0
) -> Tuple[int, int]:
    """``(bytes, parameters)`` of the model's weights, without any weights: the sum of
    :func:`weight_tensor_bytes` (same arguments)."""
    sizes, params = weight_tensor_bytes(cfg, bits, group_size, dtype_bytes, mtp_layers)
    return sum(sizes.values()), params


def _with_mtp(cfg: ModelConfig, mtp_layers: int) -> ModelConfig:
    return dataclasses.replace(cfg, num_mtp_layers=mtp_layers)


def checkpoint_weights(model_path: Path) -> Optional[Dict[str, Any]]:
    """Sizes from the safetensors headers of a model folder (None when it has no weights).

    Returns ``{"bytes", "files", "activation_dtype_bytes", "expert_16bit_bytes",
    "mtp_layers", "tensors"}``. The activation dtype is that of the embedding's scales
    (quantized) or weight; ``expert_16bit_bytes`` counts unquantized 16-bit
    expert tensors, which the CPU backend holds in float32; ``tensors`` maps
    each tensor name to its bytes as stored, and ``expert_16bit_tensors`` lists
    the names counted in ``expert_16bit_bytes``.
    """
    try:
        files = weight_files(model_path)
    except QnextError:
        return None
    total = experts16 = 0
    embed: Dict[str, str] = {}
    mtp = set()
    tensors: Dict[str, int] = {}
    experts16_names: List[str] = []
    for f in files:
        for name, (dtype, shape) in read_safetensors_header(f).items():
            n = math.prod(shape) * ST_DTYPE_SIZE[dtype]
            total += n
            tensors[name] = tensors.get(name, 0) + n
            is_expert = ".experts." in name or ".switch_mlp." in name
            if is_expert and name.endswith(".weight") and dtype in ("BF16", "F16"):
                experts16 += n
                experts16_names.append(name)
            if name.startswith("model.embed_tokens."):
                embed[name.rsplit(".", 1)[1]] = dtype
            if name.startswith("mtp.layers."):
                mtp.add(name.split(".")[2])
    act = embed.get("scales") or embed.get("weight")
    return {
        "bytes": total,
        "files": len(files),
        "activation_dtype_bytes": DTYPE_BYTES.get(act),
        "expert_16bit_bytes": experts16,
        "mtp_layers": len(mtp),
        "tensors": tensors,
        "expert_16bit_tensors": experts16_names,
    }


def activation_bytes(
    cfg: ModelConfig,
    context: int,
    chunk: int,
    *,
    dtype_bytes: int = 2,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    fused_attention: bool = False,
    expert_dtype_bytes: Optional[int] = None,
    cpu_backend: bool = False,
    cpu_lanes: Optional[int] = None,
) -> Dict[str, int]:
    """Peak transient memory of one prefill chunk of ``chunk`` tokens ending at ``context``.

    MLX frees each intermediate once its consumers have run, so the peak is
    the residual stream plus the working set of the largest single layer:

    * residual stream: ``4 x chunk x hidden`` (input, norm, mixer output, sum);
    * attention layer: q/gate/k/v projections and outputs, plus, when unfused,
      the scores ``heads x chunk x context`` (one buffer: masking and softmax
      reuse it) and the ``chunk x context`` boolean causal mask, plus one
      layer's K/V copy while its cache grows (mlx-lm concatenates) and, with a
      quantized KV cache on the CPU backend, one layer's K/V unpacked to float32.
      On the CPU backend with a 16-bit cache, prefill attention runs in query
      blocks (:mod:`qnext_mlx.kernels.attention`), one block per CPU lane at a
      time (``cpu_lanes``, default this machine's): per block in flight its
      scores, mask and K/V copies, plus one transposed copy of the keys;
    * DeltaNet layer: projections, conv input/output, the float32 working
      copies of q/k/v (x3) and the intra-chunk ``64 x 64`` matrices of the
      chunked delta rule;
    * MoE layer: float32 router logits/probabilities and, per routed
      (token, expert) pair, the gathered input, gate/up/product and output;
    * logits of the last position (float32).
    """
    b = dtype_bytes
    be = expert_dtype_bytes or b
    C, T, H = chunk, context, cfg.hidden_size
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    residual = 4 * C * H * b

    # q/gate/k/v projections, roped q/k, attention output and gated output
    proj = C * (2 * nh * hd + 2 * nkv * hd) * b + C * (nh + nkv) * hd * b + 2 * C * nh * hd * b
    if not fused_attention:
        proj += 2 * C * nh * hd * b  # the unfused path's scaled and re-laid-out copies of q
    # One score buffer: MLX donates it through the mask and the softmax (measured: peak =
    # scores + mask on the CPU backend, for both mx.fast SDPA and mlx-lm's quantized SDPA).
    scores = 0 if fused_attention else nh * C * T * b + C * T
    if cpu_backend and kv_bits is None and not fused_attention and C >= MIN_ROWS:
        block = min(PREFILL_BLOCK, C)
        in_flight = min(cpu_lanes or current_cpu_lanes(), -(-C // block))
        scores = in_flight * (nh * block * T * b + block * T + 2 * nkv * hd * T * b) + nkv * hd * T * b
    kv_growth = kv_cache_bytes(cfg, T, kv_bits, b, kv_group_size, layers=1)
    dequant = 0
    if kv_bits is not None and cpu_backend and not fused_attention:
        # measured: the CPU backend's quantized matmul unpacks one layer's K and V to float32
        dequant = 2 * nkv * hd * T * 4
    attention = proj + scores + kv_growth + dequant

    hk, hv, dk, dv = (
        cfg.linear_num_key_heads,
        cfg.linear_num_value_heads,
        cfg.linear_key_head_dim,
        cfg.linear_value_head_dim,
    )
    conv_dim = 2 * hk * dk + hv * dv
    deltanet = (
        C * (2 * hk * dk + 2 * hv * dv + 2 * hv) * b
        + 2 * C * conv_dim * b
        + 3 * C * (2 * hv * dk + hv * dv) * 4
        + 3 * C * hv * 64 * 4
    )

    if cfg.num_experts:
        k, inter = cfg.num_experts_per_tok, cfg.moe_intermediate_size
        moe = (
            2 * C * cfg.num_experts * 4
            + C * k * (2 * H + 3 * inter) * be
            + 3 * C * cfg.shared_expert_intermediate_size * b
        )
    else:
        moe = 3 * C * cfg.intermediate_size * b
    logits = cfg.vocab_size * 4
    return {
        "residual": int(residual),
        "attention_layer": int(attention),
        "attention_scores": int(scores),
        "deltanet_layer": int(deltanet),
        "moe_layer": int(moe),
        "logits": int(logits),
        "peak": int(residual + max(attention, deltanet, moe) + logits),
    }


# --------------------------------------------------------------------------- parallel
PARALLEL_MODES = ("tensor", "pipeline")
PARALLEL_RANKS = (1, 2, 4, 8)
# Unified-memory bandwidth the decode prediction divides by: an M-series Max-class Mac
# (M1/M2 Max 400 GB/s, M3 Max 300-400, M4 Max 410-546); pass the target's with --bandwidth-gbs.
DEFAULT_BANDWIDTH_GBS = 400.0


@dataclass(frozen=True)
class Link:
    """An interconnect between ranks, as assumed by the plan: latency per hop and bandwidth."""

    name: str
    hop_latency_s: float
    bandwidth_bytes_s: float
    description: str


# The plan's assumptions, not measurements (see docs/distributed.md).
LINKS: Tuple[Link, ...] = (
    Link(
        "ring-tcp", 300e-6, 1.25e9, "MLX ring backend over TCP (10 GbE / Thunderbolt bridge): 300 us a hop, 1.25 GB/s"
    ),
    Link("jaccl-rdma", 30e-6, 5e9, "MLX JACCL backend, RDMA over Thunderbolt 5: 30 us a hop, 5 GB/s"),
)


def all_sum_hops(ranks: int) -> int:
    """Sequential hops of one all-sum of a small (``[hidden]``) vector in a ring of ``ranks``: ``ranks - 1``."""
    return max(ranks - 1, 0)


def link_seconds(hops: int, message_bytes: int, link: Link) -> float:
    """Time of ``hops`` hops in turn, each carrying ``message_bytes``: ``hops x (latency + bytes / bandwidth)``."""
    return hops * (link.hop_latency_s + message_bytes / link.bandwidth_bytes_s)


@dataclass(frozen=True)
class ShardHeads:
    """What one rank holds of every layer under tensor parallelism over ``ranks`` processes.

    DeltaNet: ``value_heads`` of ``linear_num_value_heads`` and the ``key_heads``
    those value heads need (``linear_num_key_heads / ranks``, or 1 shared key
    head when ranks outnumber the key heads). Attention: ``query_heads`` and the
    ``kv_heads`` they need (``num_key_value_heads / ranks``, or 1). MLPs: the
    intermediate slices (routed experts are split within each expert).
    """

    ranks: int
    value_heads: int
    key_heads: int
    query_heads: int
    kv_heads: int
    moe_intermediate: int
    shared_expert_intermediate: int
    intermediate: int


def shard_heads(cfg: ModelConfig, ranks: int, bits: Optional[int] = None, group_size: int = 64) -> ShardHeads:
    """The per-rank split of tensor parallelism over ``ranks`` (that of
    :func:`qnext_mlx.model.parallel.tensor_local_config`); :class:`ConfigError` when it does not divide.

    With ``bits`` (quantized weights) every column-split input width per rank
    (``out_proj``, ``o_proj``, the ``down_proj`` of experts and MLPs) must also
    be a multiple of the quantization ``group_size``: a scale group cannot be cut.
    """
    local = tensor_local_config(cfg, 0, ranks)
    if bits is not None and ranks > 1:
        has_dense = not all(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
        widths = [
            ("DeltaNet out_proj columns", local.linear_num_value_heads * cfg.linear_value_head_dim),
            ("attention o_proj columns", local.num_attention_heads * cfg.head_dim),
            ("moe_intermediate_size", local.moe_intermediate_size if cfg.num_experts else 0),
            ("shared_expert_intermediate_size", local.shared_expert_intermediate_size if cfg.num_experts else 0),
            ("intermediate_size", local.intermediate_size if has_dense else 0),
        ]
        for what, width in widths:
            if width % group_size:
                raise ConfigError(
                    f"tensor parallel over {ranks} ranks: {what} per rank ({width}) is not a multiple of "
                    f"the quantization group ({group_size})"
                )
    return ShardHeads(
        ranks=ranks,
        value_heads=local.linear_num_value_heads,
        key_heads=local.linear_num_key_heads,
        query_heads=local.num_attention_heads,
        kv_heads=local.num_key_value_heads,
        moe_intermediate=local.moe_intermediate_size,
        shared_expert_intermediate=local.shared_expert_intermediate_size,
        intermediate=local.intermediate_size,
    )


_DENSE_MLP = re.compile(r"\.mlp\.(gate_proj|up_proj|down_proj)\.")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def is_expert_tensor(name: str) -> bool:
    """True for a routed expert's tensor (MLX ``switch_mlp`` stacks or Hugging Face ``experts.E``)."""
    return ".switch_mlp." in name or ".experts." in name


def tensor_shard_fraction(name: str, cfg: ModelConfig, heads: ShardHeads) -> Fraction:
    """The share of tensor ``name`` (a checkpoint name) one rank holds under tensor parallelism.

    Split (rows or input columns, by head or intermediate slice): ``linear_attn.*``
    but its ``norm``; ``self_attn.*`` but ``q_norm``/``k_norm``; routed experts
    (within each expert), ``shared_expert.*`` and dense ``mlp.{gate,up,down}_proj``.
    Replicated (fraction 1): the router ``mlp.gate``, ``shared_expert_gate``, norms,
    embeddings, ``lm_head``, ``mtp.fc``. A quantized tensor's ``scales``/``biases``
    follow its weight, so the fraction applies to their bytes too.
    """
    if heads.ranks == 1:
        return Fraction(1)
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    if ".linear_attn." in name:
        if ".norm." in name:
            return Fraction(1)
        if ".in_proj_qkvz." in name:  # per key head: q (dk), k (dk), then v and z of its value heads
            return Fraction(heads.key_heads * 2 * dk + heads.value_heads * 2 * dv, hk * 2 * dk + hv * 2 * dv)
        if ".conv1d." in name:  # channels: q, k (key heads) and v (value heads)
            return Fraction(2 * heads.key_heads * dk + heads.value_heads * dv, 2 * hk * dk + hv * dv)
        return Fraction(heads.value_heads, hv)  # in_proj_ba, dt_bias, A_log, out_proj
    if ".self_attn." in name:
        if ".q_norm." in name or ".k_norm." in name:
            return Fraction(1)
        if ".k_proj." in name or ".v_proj." in name:
            return Fraction(heads.kv_heads, cfg.num_key_value_heads)
        return Fraction(heads.query_heads, cfg.num_attention_heads)  # q_proj (with its gate half), o_proj
    if is_expert_tensor(name) or ".shared_expert." in name or _DENSE_MLP.search(name):
        return Fraction(1, heads.ranks)
    return Fraction(1)


def tensor_active_fraction(name: str, cfg: ModelConfig, mtp: bool = False) -> Fraction:
    """The share of tensor ``name`` one decoded token reads: ``top-k / num_experts`` of the routed
    experts, one row of the embedding, all of the rest; the MTP head only when it drafts (``mtp``)."""
    if name.startswith("mtp.") and not mtp:
        return Fraction(0)
    if is_expert_tensor(name) and cfg.num_experts:
        return Fraction(cfg.num_experts_per_tok, cfg.num_experts)
    if ".embed_tokens." in name:
        return Fraction(1, cfg.vocab_size)
    return Fraction(1)


def tensor_layer(name: str) -> Optional[int]:
    """The decoder layer a tensor belongs to (``model.layers.I.``), else None (embedding, norm, head, MTP)."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


@dataclass
class ParallelPlan:
    """Memory per rank and decode cost of running one model over ``ranks`` processes (bytes, seconds).

    Lists hold one entry per rank. ``weights_split`` are the bytes divided
    among the ranks (all ranks together), ``weights_replicated`` those every
    rank holds whole; ``weights_per_rank[r] = weights_split_per_rank[r] +
    weights_replicated``. ``comm`` counts per decoded token the all-sums and
    point-to-point sends of one ``[hidden]`` vector (``message_bytes``) and the
    hops they take; ``comm_seconds`` prices them per link of :data:`LINKS`.
    ``tokens_per_s`` is the prediction ``1 / (bytes_read_per_token /
    bandwidth + comm_seconds)``, ``"compute only"`` without communication.
    """

    ranks: int
    mode: str
    stages: List[Tuple[int, int]]
    heads: Optional[Dict[str, int]]
    weights_split: int
    weights_replicated: int
    weights_split_per_rank: List[int]
    weights_per_rank: List[int]
    kv_cache_per_rank: List[int]
    mtp_kv_cache_per_rank: List[int]
    deltanet_state_per_rank: List[int]
    activations_peak_per_rank: List[int]
    total_per_rank: List[int]
    budget: Optional[int]
    fits: Optional[bool]
    comm: Dict[str, int]
    comm_seconds: Dict[str, float]
    bandwidth_gbs: float
    bytes_read_per_token_per_rank: List[int]
    bytes_read_per_token: int
    single_process_bytes_read_per_token: int
    compute_seconds: float
    tokens_per_s: Dict[str, float]
    single_process_tokens_per_s: float
    assumptions: List[str]
    notes: List[str] = field(default_factory=list)


def parallel_plan(
    cfg: ModelConfig,
    ranks: int,
    mode: str,
    bits: Optional[int] = None,
    group_size: int = 64,
    *,
    context: int = 4096,
    tensors: Optional[Dict[str, int]] = None,
    dtype_bytes: int = 2,
    mtp_layers: int = 0,
    mtp: bool = False,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    chunk: int = DEFAULT_CHUNK,
    fused_attention: bool = False,
    cpu_backend: bool = False,
    expert_dtype_bytes: Optional[int] = None,
    bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS,
    links: Sequence[Link] = LINKS,
    budget: Optional[int] = None,
) -> ParallelPlan:
    """Plan ``cfg`` over ``ranks`` processes in ``mode`` (``"tensor"`` or ``"pipeline"``).

    ``tensors`` maps checkpoint names (Hugging Face or MLX layout) to bytes (a folder's safetensors headers,
    :func:`checkpoint_weights`); without it they are estimated at ``bits``
    (:func:`weight_tensor_bytes`, ``mtp_layers`` MTP layers). ``mtp``: the MTP
    head drafts (its KV cache, reads and tensor-parallel all-sums count).

    * tensor: every rank holds :func:`tensor_shard_fraction` of each tensor, the
      KV heads and DeltaNet heads of :func:`shard_heads`, and the activations of
      a model that narrow; one all-sum of ``[hidden]`` after each mixer and each
      MoE/MLP (2 per layer, 2 per MTP layer when it drafts), each
      :func:`all_sum_hops` hops; a token reads one rank's share of the weights.
    * pipeline: :func:`qnext_mlx.model.parallel.pipeline_stages` layers per rank
      (the MTP head counted with the last), embedding, final norm and ``lm_head``
      on every rank; ``ranks - 1`` sends plus one all-sum of the final hidden
      state per token (and one of the MTP head's output when it drafts); a token
      walks every stage in turn, so it reads all the weights (no speed-up).
    """
    if mode not in PARALLEL_MODES:
        raise ConfigError(f"--parallel must be tensor or pipeline, got {mode!r}")
    if ranks not in PARALLEL_RANKS:
        raise ConfigError(f"--ranks must be one of {', '.join(map(str, PARALLEL_RANKS))}, got {ranks}")
    if not bandwidth_gbs > 0:
        raise ConfigError(f"--bandwidth-gbs must be > 0, got {bandwidth_gbs}")
    if tensors is None:
        tensors = weight_tensor_bytes(cfg, bits, group_size, dtype_bytes, mtp_layers)[0]
    n_layers = cfg.num_hidden_layers
    attn_layers = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    kv_kw = dict(kv_bits=kv_bits, dtype_bytes=dtype_bytes, group_size=kv_group_size)
    act_kw = dict(
        dtype_bytes=dtype_bytes,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        fused_attention=fused_attention,
        expert_dtype_bytes=expert_dtype_bytes,
        cpu_backend=cpu_backend,
    )
    c = min(chunk, context)
    message = cfg.hidden_size * dtype_bytes
    total_weights = sum(tensors.values())
    active = {name: tensor_active_fraction(name, cfg, mtp) for name in tensors}
    single_read = int(sum(b * active[name] for name, b in tensors.items()))
    notes: List[str] = []

    if mode == "tensor":
        heads = shard_heads(cfg, ranks, bits, group_size)
        share = {name: tensor_shard_fraction(name, cfg, heads) for name in tensors}
        replicated = sum(b for name, b in tensors.items() if share[name] == 1)
        split_share = int(sum(b * share[name] for name, b in tensors.items() if share[name] != 1))
        kv = kv_cache_bytes(cfg, context, kv_heads=heads.kv_heads, **kv_kw)
        mtp_kv = kv_cache_bytes(cfg, context, layers=mtp_layers, kv_heads=heads.kv_heads, **kv_kw) if mtp else 0
        states = deltanet_state_bytes(cfg, dtype_bytes, key_heads=heads.key_heads, value_heads=heads.value_heads)
        narrow = dataclasses.replace(
            cfg,
            num_attention_heads=heads.query_heads,
            num_key_value_heads=heads.kv_heads,
            linear_num_key_heads=heads.key_heads,
            linear_num_value_heads=heads.value_heads,
            moe_intermediate_size=heads.moe_intermediate,
            shared_expert_intermediate_size=heads.shared_expert_intermediate,
            intermediate_size=heads.intermediate,
        )
        peak = activation_bytes(narrow, context, c, **act_kw)["peak"]
        read = int(sum(b * share[name] * active[name] for name, b in tensors.items()))
        all_sums = 0 if ranks == 1 else 2 * n_layers + (2 * mtp_layers if mtp else 0)
        comm = {"all_sums": all_sums, "sends": 0, "message_bytes": message, "hops": all_sums * all_sum_hops(ranks)}
        stages = [(0, n_layers)] * ranks
        split_per_rank, kv_per_rank, mtp_kv_per_rank = [split_share] * ranks, [kv] * ranks, [mtp_kv] * ranks
        states_per_rank, peak_per_rank, read_per_rank = [states] * ranks, [peak] * ranks, [read] * ranks
        critical_read = read
        heads_dict: Optional[Dict[str, int]] = dataclasses.asdict(heads)
        if heads.kv_heads * ranks > cfg.num_key_value_heads:
            notes.append(
                f"tensor: {ranks} ranks share the {cfg.num_key_value_heads} KV heads: each rank holds "
                f"{heads.kv_heads} (replicated), so the KV cache does not shrink past {cfg.num_key_value_heads} ranks"
            )
    else:
        layer_of = {name: tensor_layer(name) for name in tensors}
        layer_bytes = [0] * n_layers
        for name, b in tensors.items():
            if layer_of[name] is not None:
                layer_bytes[layer_of[name]] += b
        mtp_bytes = sum(b for name, b in tensors.items() if name.startswith("mtp."))
        replicated = total_weights - sum(layer_bytes) - mtp_bytes
        stages = [(r.start, r.stop) for r in pipeline_stages(layer_bytes, ranks, mtp_bytes)]
        split_per_rank = [sum(layer_bytes[a:b]) for a, b in stages]
        split_per_rank[-1] += mtp_bytes
        kv_per_rank = [
            kv_cache_bytes(cfg, context, layers=sum(a <= i < b for i in attn_layers), **kv_kw) for a, b in stages
        ]
        mtp_kv_per_rank = [0] * ranks
        if mtp:
            mtp_kv_per_rank[-1] = kv_cache_bytes(cfg, context, layers=mtp_layers, **kv_kw)
        states_per_rank = [
            deltanet_state_bytes(cfg, dtype_bytes, layers=sum(cfg.is_linear(i) for i in range(a, b))) for a, b in stages
        ]
        peak_per_rank = [activation_bytes(cfg, context, c, **act_kw)["peak"]] * ranks
        read_layers = [0] * n_layers
        read_rest = 0.0
        for name, b in tensors.items():
            if layer_of[name] is not None:
                read_layers[layer_of[name]] += b * active[name]
            elif not name.startswith("mtp."):
                read_rest += b * active[name]
        read_mtp = sum(b * active[name] for name, b in tensors.items() if name.startswith("mtp."))
        read_per_rank = [int(sum(read_layers[a:b]) + read_rest) for a, b in stages]
        read_per_rank[-1] += int(read_mtp)
        critical_read = single_read  # every stage in turn, the head once
        sends = ranks - 1
        all_sums = (2 if mtp else 1) if ranks > 1 else 0  # the final hidden state; the MTP head's output
        comm = {"all_sums": all_sums, "sends": sends, "message_bytes": message}
        comm["hops"] = sends + all_sums * all_sum_hops(ranks)
        heads_dict = None
        if mtp and ranks > 1:
            notes.append("pipeline: the MTP head runs on the last rank; one more all-sum brings its output to all")
    weights_per_rank = [s + replicated for s in split_per_rank]
    totals = [
        w + k + m + s + a
        for w, k, m, s, a in zip(weights_per_rank, kv_per_rank, mtp_kv_per_rank, states_per_rank, peak_per_rank)
    ]
    bandwidth = bandwidth_gbs * 1e9
    compute = critical_read / bandwidth
    comm_s = {link.name: link_seconds(comm["hops"], message, link) for link in links}
    speeds = {"compute only": 1 / compute}
    speeds.update({name: 1 / (compute + t) for name, t in comm_s.items()})
    assumptions = [
        f"decode is memory-bandwidth bound: {bandwidth_gbs:g} GB/s per Mac (--bandwidth-gbs), reading the weights a "
        f"token uses ({cfg.num_experts_per_tok} of {cfg.num_experts} experts a layer, one embedding row); "
        "KV cache reads and compute are not counted",
        f"an all-sum of one [hidden] vector ({cfg.hidden_size} x {dtype_bytes} B) takes ranks - 1 hops in a ring, "
        "a send one hop; each hop carries the whole vector",
    ] + [link.description for link in links]
    return ParallelPlan(
        ranks=ranks,
        mode=mode,
        stages=stages,
        heads=heads_dict,
        weights_split=int(total_weights - replicated),
        weights_replicated=int(replicated),
        weights_split_per_rank=split_per_rank,
        weights_per_rank=weights_per_rank,
        kv_cache_per_rank=kv_per_rank,
        mtp_kv_cache_per_rank=mtp_kv_per_rank,
        deltanet_state_per_rank=states_per_rank,
        activations_peak_per_rank=peak_per_rank,
        total_per_rank=totals,
        budget=budget,
        fits=None if not budget else max(totals) <= budget,
        comm=comm,
        comm_seconds=comm_s,
        bandwidth_gbs=float(bandwidth_gbs),
        bytes_read_per_token_per_rank=read_per_rank,
        bytes_read_per_token=int(critical_read),
        single_process_bytes_read_per_token=single_read,
        compute_seconds=compute,
        tokens_per_s=speeds,
        single_process_tokens_per_s=bandwidth / single_read,
        assumptions=assumptions,
        notes=notes,
    )


# ---------------------------------------------------------------------------- machine
def machine_memory() -> Dict[str, Any]:
    """Total RAM, what is free now, and the budget the plan is checked against (with its rule)."""
    total = available = None
    system = platform.system()
    if system == "Linux":
        try:
            info = {}
            for line in Path("/proc/meminfo").read_text().splitlines():
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
            total, available = info.get("MemTotal"), info.get("MemAvailable")
        except (OSError, ValueError, IndexError):
            pass
    elif system == "Darwin":
        try:
            total = int(
                subprocess.run(
                    ["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, check=True
                ).stdout.strip()
            )
        except (OSError, ValueError, subprocess.CalledProcessError):
            pass
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = None
    working_set = None
    try:
        if mx.metal.is_available():
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            working_set = int(info["max_recommended_working_set_size"])
    except Exception:  # older MLX or no Metal device: fall back to total RAM
        working_set = None
    if working_set:
        budget, rule = (
            working_set,
            (
                "Metal: MLX's recommended working set (the wired limit mlx-lm runs under; "
                "raise it with `sudo sysctl iogpu.wired_limit_mb=N`)"
            ),
        )
    else:
        budget, rule = total, "total RAM (MLX CPU backend; no Metal device)"
    return {
        "system": system,
        "total_ram": total,
        "available_ram": available,
        "metal_working_set": working_set,
        "budget": budget,
        "rule": rule,
    }


# ------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """Memory plan of one model at one context (bytes unless said otherwise)."""

    model: str
    context: int
    kv_bits: Optional[int]
    activation_dtype_bytes: int
    weights: int
    weights_source: str
    parameters: Optional[int]
    kv_cache: int
    kv_bytes_per_token: float
    mtp_kv_cache: int
    deltanet_state: int
    prefill_chunk: int
    fused_attention: bool
    activations: Dict[str, int]
    total: int
    rope: Dict[str, Any]
    machine: Dict[str, Any]
    fits: Optional[bool]
    backend: str = "metal"
    suggested_chunk: Optional[int] = None
    notes: List[str] = field(default_factory=list)
    parallel: Optional[ParallelPlan] = None


def make_plan(
    cfg: ModelConfig,
    context: int,
    *,
    model_name: str = "",
    model_path: Optional[Path] = None,
    kv_bits: Optional[int] = None,
    q_bits: Optional[int] = None,
    group_size: int = 64,
    chunk: int = DEFAULT_CHUNK,
    mtp: bool = False,
    kv_group_size: int = 64,
    fused_attention: bool = False,
    cpu_backend: Optional[bool] = None,
    budget: Optional[int] = None,
    ranks: int = 1,
    parallel: Optional[str] = None,
    bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS,
) -> Plan:
    """Compute the :class:`Plan` (see the module docstring for the memory model).

    With ``parallel`` (``"tensor"`` or ``"pipeline"``; required when ``ranks > 1``)
    it also holds the :func:`parallel_plan` over ``ranks`` processes, planned
    against the same per-Mac budget.
    """
    if ranks not in PARALLEL_RANKS:
        raise ConfigError(f"--ranks must be one of {', '.join(map(str, PARALLEL_RANKS))}, got {ranks}")
    if ranks > 1 and parallel is None:
        raise ConfigError(f"--ranks {ranks} needs --parallel tensor or --parallel pipeline")
    if parallel is not None and parallel not in PARALLEL_MODES:
        raise ConfigError(f"--parallel must be tensor or pipeline, got {parallel!r}")
    if not bandwidth_gbs > 0:
        raise ConfigError(f"--bandwidth-gbs must be > 0, got {bandwidth_gbs}")
    if context <= 0:
        raise ConfigError(f"--context must be a positive number of tokens, got {context}")
    if kv_bits not in (None, 4, 8):
        raise ConfigError(f"--kv-bits must be 4 or 8, got {kv_bits}")
    if cpu_backend is None:
        cpu_backend = not mx.metal.is_available()
    notes: List[str] = []
    found = checkpoint_weights(model_path) if model_path is not None else None
    mtp_layers = cfg.num_mtp_layers or (found or {}).get("mtp_layers") or 0
    if mtp and not mtp_layers:
        if found is not None:
            notes.append("--mtp: this checkpoint has no MTP head (no mtp.* tensors); its KV is not counted")
        else:
            mtp_layers = 1  # Qwen3-Next publishes one MTP layer
    dtype_bytes = (found or {}).get("activation_dtype_bytes") or 2

    expert_bytes = dtype_bytes
    tensors: Dict[str, int] = {}
    bits = None
    gs = group_size
    if found is not None:
        if q_bits is not None:
            notes.append("--q-bits ignored: the folder's safetensors give the real weight size")
        weights, params = found["bytes"], None
        source = f"safetensors headers ({found['files']} file{'s' * (found['files'] > 1)})"
        tensors = dict(found["tensors"])
        q = cfg.quantization or {}
        bits, gs = q.get("bits"), q.get("group_size", group_size)
        if cpu_backend and found["expert_16bit_bytes"]:
            weights += found["expert_16bit_bytes"]  # float32 copies replace the 16-bit ones
            for name in found["expert_16bit_tensors"]:
                tensors[name] *= 2
            expert_bytes = 4
            notes.append("CPU backend: unquantized 16-bit experts are held in float32 (GatherMM is float32-only)")
    else:
        bits = q_bits if q_bits is not None else (cfg.quantization or {}).get("bits")
        gs = (cfg.quantization or {}).get("group_size", group_size) if q_bits is None else group_size
        tensors, params = weight_tensor_bytes(cfg, bits, gs, dtype_bytes, mtp_layers)
        weights = sum(tensors.values())
        source = (
            f"estimated from config.json, {bits}-bit (group {gs})" if bits else "estimated from config.json, 16-bit"
        )
        if cpu_backend and not bits and cfg.num_experts:
            n_moe = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers)) + mtp_layers
            extra = n_moe * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * (4 - dtype_bytes)
            weights += extra
            expert_bytes = 4
            for name in tensors:
                if is_expert_tensor(name) and name.endswith(".weight"):
                    tensors[name] = tensors[name] * 4 // dtype_bytes
            notes.append("CPU backend: unquantized experts are held in float32 (GatherMM is float32-only)")

    kv = kv_cache_bytes(cfg, context, kv_bits, dtype_bytes, kv_group_size)
    mtp_kv = kv_cache_bytes(cfg, context, kv_bits, dtype_bytes, kv_group_size, layers=mtp_layers) if mtp else 0
    states = deltanet_state_bytes(cfg, dtype_bytes)
    act_kw = dict(
        dtype_bytes=dtype_bytes,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        fused_attention=fused_attention,
        expert_dtype_bytes=expert_bytes,
        cpu_backend=cpu_backend,
    )
    acts = activation_bytes(cfg, context, min(chunk, context), **act_kw)
    fixed = weights + kv + mtp_kv + states
    total = fixed + acts["peak"]

    native, window = native_context(cfg), context_window(cfg)
    rope: Dict[str, Any] = {"native_window": native, "configured_window": window}
    if context > window:
        f = factor_for_context(context, native)
        rope["needed_factor"] = f
        rope["advice"] = (
            f"context exceeds the configured window of {window:,}: pass --max-context {context} (YaRN factor {f:g})"
        )
    elif context > native:
        rope["advice"] = f"the configured YaRN covers it (window {window:,})"
    else:
        rope["advice"] = "within the native window: no RoPE scaling needed"

    machine = machine_memory()
    if budget is not None:
        machine["budget"], machine["rule"] = budget, "given with --budget-gib"
    fits = None if not machine["budget"] else total <= machine["budget"]
    suggested = None
    if fits is False and not fused_attention:
        c = min(chunk, context)
        while c > 16:
            c //= 2
            a = activation_bytes(cfg, context, c, **act_kw)
            if fixed + a["peak"] <= machine["budget"]:
                suggested = c
                break
    par = None
    if parallel is not None:
        par = parallel_plan(
            cfg,
            ranks,
            parallel,
            bits,
            gs,
            context=context,
            tensors=tensors,
            mtp_layers=mtp_layers,
            mtp=mtp and bool(mtp_layers),
            chunk=chunk,
            bandwidth_gbs=bandwidth_gbs,
            budget=machine["budget"],
            **act_kw,
        )
    return Plan(
        model=model_name,
        context=context,
        kv_bits=kv_bits,
        activation_dtype_bytes=dtype_bytes,
        weights=int(weights),
        weights_source=source,
        parameters=params,
        kv_cache=kv,
        kv_bytes_per_token=kv_bytes_per_token(cfg, kv_bits, dtype_bytes, kv_group_size),
        mtp_kv_cache=mtp_kv,
        deltanet_state=states,
        prefill_chunk=min(chunk, context),
        fused_attention=fused_attention,
        activations=acts,
        total=int(total),
        rope=rope,
        machine=machine,
        fits=fits,
        backend="cpu" if cpu_backend else "metal",
        suggested_chunk=suggested,
        notes=notes,
        parallel=par,
    )


# ------------------------------------------------------------------------------ output
def fmt_bytes(n: Optional[float]) -> str:
    """``1536 -> '1.50 KiB'``; binary units."""
    if n is None:
        return "unknown"
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def render(plan: Plan, cfg: ModelConfig) -> str:
    """The plan as a readable table."""
    n_attn = sum(1 for t in cfg.layer_types if t == "full_attention")
    n_lin = cfg.num_hidden_layers - n_attn
    kv_kind = f"{plan.kv_bits}-bit (group 64)" if plan.kv_bits else f"{8 * plan.activation_dtype_bytes}-bit"
    a = plan.activations
    rows = [
        (
            "weights",
            plan.weights,
            plan.weights_source + (f", {plan.parameters / 1e9:.1f}B parameters" if plan.parameters else ""),
        ),
        (
            "KV cache",
            plan.kv_cache,
            f"{kv_kind}: {n_attn} attention layers x {fmt_bytes(plan.kv_bytes_per_token)}/token",
        ),
    ]
    if plan.mtp_kv_cache:
        rows.append(("MTP head KV cache", plan.mtp_kv_cache, "MTP drafting (--mtp)"))
    rows += [
        ("DeltaNet state", plan.deltanet_state, f"{n_lin} layers, constant in context"),
        (
            "peak activations",
            a["peak"],
            f"prefill chunk {plan.prefill_chunk:,} tokens, "
            + (
                "fused attention"
                if plan.fused_attention
                else f"unfused attention scores {fmt_bytes(a['attention_scores'])}"
            ),
        ),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [
        f"model      {plan.model} (MLX {plan.backend} backend, {8 * plan.activation_dtype_bytes}-bit activations)",
        f"context    {plan.context:,} tokens; RoPE: native window {plan.rope['native_window']:,}, "
        f"configured {plan.rope['configured_window']:,}: {plan.rope['advice']}",
        "",
    ]
    for name, n, note in rows:
        lines.append(f"  {name:<{width}}  {fmt_bytes(n):>11}   {note}")
    lines.append(f"  {'-' * width}  {'-' * 11}")
    lines.append(f"  {'total':<{width}}  {fmt_bytes(plan.total):>11}")
    m = plan.machine
    lines.append("")
    lines.append(
        f"budget     {fmt_bytes(m['budget'])} = {m['rule']}"
        + (f"; RAM {fmt_bytes(m['total_ram'])}" if m.get("total_ram") and m["total_ram"] != m["budget"] else "")
        + (f", {fmt_bytes(m['available_ram'])} free now" if m.get("available_ram") else "")
    )
    if plan.fits is None:
        verdict = "unknown (could not read this machine's memory)"
    elif plan.fits:
        verdict = f"FITS ({fmt_bytes(m['budget'] - plan.total)} to spare)"
    else:
        verdict = f"DOES NOT FIT (short by {fmt_bytes(plan.total - m['budget'])})"
        if plan.suggested_chunk:
            verdict += (
                f"; it fits with a prefill chunk of {plan.suggested_chunk} tokens "
                f"(generate --prefill-step-size {plan.suggested_chunk})"
            )
        elif plan.kv_bits is None:
            verdict += "; try --kv-bits 4, a smaller --context or smaller weights"
        else:
            verdict += "; try a smaller --context or smaller weights"
    lines.append(f"verdict    {'one process: ' if plan.parallel else ''}{verdict}")
    for note in plan.notes:
        lines.append(f"note       {note}")
    if plan.parallel is not None:
        lines += ["", render_parallel(plan.parallel, cfg)]
    return "\n".join(lines)


def _fmt_seconds(t: float) -> str:
    return f"{t * 1e3:.2f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"


def render_parallel(pp: ParallelPlan, cfg: ModelConfig) -> str:
    """The :class:`ParallelPlan` as readable lines: memory per rank, communication and predicted decode rate."""
    n = pp.ranks
    if pp.mode == "tensor":
        h = pp.heads or {}
        how = (
            f"per rank: {h['value_heads']} of {cfg.linear_num_value_heads} DeltaNet value heads, "
            f"{h['key_heads']} of {cfg.linear_num_key_heads} key heads; {h['query_heads']} of "
            f"{cfg.num_attention_heads} query heads, {h['kv_heads']} of {cfg.num_key_value_heads} KV heads; "
            f"experts' intermediate {h['moe_intermediate']} of {cfg.moe_intermediate_size}"
        )
    else:
        how = "layers " + ", ".join(f"{a}-{b - 1}" for a, b in pp.stages) + " (embedding, norm, lm_head on every rank)"
    lines = [f"parallel   {pp.mode} over {n} rank{'s' * (n > 1)}: {how}"]
    ranks = [0] if pp.mode == "tensor" else list(range(n))
    header = "rank" if pp.mode == "pipeline" else "each rank"
    lines.append(
        f"  {header:<9}  {'weights':>11}  {'KV cache':>11}  {'DeltaNet':>11}  {'activations':>11}  {'total':>11}"
    )
    for r in ranks:
        label = str(r) if pp.mode == "pipeline" else ""
        kv = pp.kv_cache_per_rank[r] + pp.mtp_kv_cache_per_rank[r]
        cells = (pp.weights_per_rank[r], kv, pp.deltanet_state_per_rank[r], pp.activations_peak_per_rank[r])
        lines.append(
            f"  {label:<9}  "
            + "  ".join(f"{fmt_bytes(x):>11}" for x in cells)
            + f"  {fmt_bytes(pp.total_per_rank[r]):>11}"
        )
    lines.append(
        f"  weights: split {fmt_bytes(pp.weights_split)} over the ranks"
        f" + replicated {fmt_bytes(pp.weights_replicated)} on each"
    )
    if pp.fits is None:
        verdict = "unknown (no memory budget)"
    elif pp.fits:
        verdict = f"FITS: largest rank {fmt_bytes(max(pp.total_per_rank))} of {fmt_bytes(pp.budget)} per Mac"
    else:
        verdict = f"DOES NOT FIT: largest rank {fmt_bytes(max(pp.total_per_rank))} of {fmt_bytes(pp.budget)} per Mac"
    lines.append(f"verdict    {n} ranks: {verdict}")
    c = pp.comm
    parts = []
    if c["all_sums"]:
        parts.append(f"{c['all_sums']} all-sum{'s' * (c['all_sums'] > 1)}")
    if c["sends"]:
        parts.append(f"{c['sends']} send{'s' * (c['sends'] > 1)}")
    what = " + ".join(parts) or "none"
    lines.append(
        f"comm       per decoded token: {what} of {fmt_bytes(c['message_bytes'])} ([hidden] = {cfg.hidden_size}), "
        f"{c['hops']} hops: " + ", ".join(f"{name} {_fmt_seconds(t)}" for name, t in pp.comm_seconds.items())
    )
    lines.append(
        f"decode     predicted at {pp.bandwidth_gbs:g} GB/s: reads {fmt_bytes(pp.bytes_read_per_token)} a token "
        f"({_fmt_seconds(pp.compute_seconds)}); tok/s "
        + ", ".join(f"{name} {v:.1f}" for name, v in pp.tokens_per_s.items())
        + f" (one process {pp.single_process_tokens_per_s:.1f})"
    )
    for a in pp.assumptions:
        lines.append(f"assumes    {a}")
    for note in pp.notes:
        lines.append(f"note       {note}")
    return "\n".join(lines)
