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
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..checkpoint.reader import ST_DTYPE_SIZE, read_safetensors_header, weight_files
from ..errors import ConfigError, QnextError
from ..kernels.attention import MIN_ROWS, PREFILL_BLOCK
from ..kernels.lanes import cpu_lanes as current_cpu_lanes
from ..model import Model, ModelConfig
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
) -> float:
    """KV cache bytes per token over the full-attention layers (or ``layers`` of them).

    16-bit: ``layers x 2 x kv_heads x head_dim x dtype_bytes``. Quantized:
    ``bits / 8`` per element plus scale and bias (``dtype_bytes`` each) per group.
    """
    if layers is None:
        layers = sum(1 for t in cfg.layer_types if t == "full_attention")
    elements = layers * 2 * cfg.num_key_value_heads * cfg.head_dim
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
) -> int:
    """Bytes the KV caches hold at ``tokens`` (rounded up to the cache's 256-token step)."""
    allocated = math.ceil(tokens / KV_STEP) * KV_STEP
    return int(round(allocated * kv_bytes_per_token(cfg, kv_bits, dtype_bytes, group_size, layers)))


def deltanet_state_bytes(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """Recurrent (float32 ``Hv x Dv x Dk``) plus conv (``(K-1) x conv_dim``) state of all DeltaNet layers."""
    n = sum(1 for t in cfg.layer_types if t == "linear_attention")
    conv_dim = (
        2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads * cfg.linear_value_head_dim
    )
    recurrent = cfg.linear_num_value_heads * cfg.linear_value_head_dim * cfg.linear_key_head_dim * 4
    conv = (cfg.linear_conv_kernel_dim - 1) * conv_dim * dtype_bytes
    return n * (recurrent + conv)


def estimate_weight_bytes(
    cfg: ModelConfig, bits: Optional[int] = None, group_size: int = 64, dtype_bytes: int = 2, mtp_layers: int = 0
) -> Tuple[int, int]:
    """``(bytes, parameters)`` of the model's weights, without any weights.

    Builds the MLX module tree lazily (its random initial values are never
    evaluated, so nothing is allocated), quantizes it the way our converter
    does when ``bits`` is given (every Linear/Embedding whose input dim is a
    multiple of ``group_size``; router and shared-expert gates at 8 bits) and
    sums the parameter sizes, counting floating-point tensors (weights,
    scales, biases, norms) at ``dtype_bytes``.
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
    total = 0
    for _, p in tree_flatten(model.parameters()):
        total += p.size * (dtype_bytes if mx.issubdtype(p.dtype, mx.floating) else p.itemsize)
    return int(total), int(params)


def _with_mtp(cfg: ModelConfig, mtp_layers: int) -> ModelConfig:
    return dataclasses.replace(cfg, num_mtp_layers=mtp_layers)


def checkpoint_weights(model_path: Path) -> Optional[Dict[str, Any]]:
    """Sizes from the safetensors headers of a model folder (None when it has no weights).

    Returns ``{"bytes", "files", "activation_dtype_bytes", "expert_16bit_bytes",
    "mtp_layers"}``. The activation dtype is that of the embedding's scales
    (quantized) or weight; ``expert_16bit_bytes`` counts unquantized 16-bit
    expert tensors, which the CPU backend holds in float32.
    """
    try:
        files = weight_files(model_path)
    except QnextError:
        return None
    total = experts16 = 0
    embed: Dict[str, str] = {}
    mtp = set()
    for f in files:
        for name, (dtype, shape) in read_safetensors_header(f).items():
            n = math.prod(shape) * ST_DTYPE_SIZE[dtype]
            total += n
            is_expert = ".experts." in name or ".switch_mlp." in name
            if is_expert and name.endswith(".weight") and dtype in ("BF16", "F16"):
                experts16 += n
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
) -> Plan:
    """Compute the :class:`Plan` (see the module docstring for the memory model)."""
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
    if found is not None:
        if q_bits is not None:
            notes.append("--q-bits ignored: the folder's safetensors give the real weight size")
        weights, params = found["bytes"], None
        source = f"safetensors headers ({found['files']} file{'s' * (found['files'] > 1)})"
        if cpu_backend and found["expert_16bit_bytes"]:
            weights += found["expert_16bit_bytes"]  # float32 copies replace the 16-bit ones
            expert_bytes = 4
            notes.append("CPU backend: unquantized 16-bit experts are held in float32 (GatherMM is float32-only)")
    else:
        bits = q_bits if q_bits is not None else (cfg.quantization or {}).get("bits")
        gs = (cfg.quantization or {}).get("group_size", group_size) if q_bits is None else group_size
        weights, params = estimate_weight_bytes(cfg, bits, gs, dtype_bytes, mtp_layers)
        source = (
            f"estimated from config.json, {bits}-bit (group {gs})" if bits else "estimated from config.json, 16-bit"
        )
        if cpu_backend and not bits and cfg.num_experts:
            n_moe = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers)) + mtp_layers
            extra = n_moe * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * (4 - dtype_bytes)
            weights += extra
            expert_bytes = 4
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
    lines.append(f"verdict    {verdict}")
    for note in plan.notes:
        lines.append(f"note       {note}")
    return "\n".join(lines)
