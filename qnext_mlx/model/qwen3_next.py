"""Qwen3-Next in MLX: Gated DeltaNet + gated attention + sparse MoE + the MTP head.

Weight names follow the MLX layout that mlx-lm also uses (experts stacked under
``switch_mlp``, zero-centred norm weights stored shifted by +1, conv1d as
``[C, K, 1]``); :meth:`Model.sanitize` maps a Hugging Face checkpoint onto it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.switch_layers import SwitchGLU

from ..errors import CheckpointError
from ..kernels.attention import attention
from ..kernels.linear import cpu_compute_dtype
from ..kernels.metal_gdn import gated_delta_decode
from ..kernels.metal_moe import moe_combine, moe_decode
from ..kernels.moe import grouped_switch_glu, switch_glu_lanes, use_grouped_experts
from .cache import ModelCache
from .config import ModelConfig
from .parallel import PipelineStage
from .rope import build_rope


class RMSNorm(nn.RMSNorm):
    """Qwen3-Next's zero-centred RMSNorm, with the weight stored as ``1 + w``.

    Checkpoints in Hugging Face layout get the +1 in float32 (:meth:`Model.sanitize`):
    in bf16 it would round ``1 + w`` to 8 bits. Like transformers, the product is
    formed in float32 and cast back to the input dtype.
    """

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps).astype(x.dtype)


class GatedRMSNorm(nn.Module):
    """DeltaNet output norm: ``weight * rmsnorm(x) * silu(z)`` (weight not zero-centred)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array, z: mx.array) -> mx.array:
        """x, z: ``[..., dims]``; returns ``[..., dims]`` in x's dtype."""
        y = mx.fast.rms_norm(x, self.weight, self.eps).astype(mx.float32)
        return (y * nn.silu(z.astype(mx.float32))).astype(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and the MoE's shared expert."""

    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Gated full attention: GQA, per-head q/k norms, partial RoPE, sigmoid output gate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        bias = cfg.attention_bias
        # q_proj is twice as wide: per head, [query | gate].
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim * 2, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.rope = make_rope(cfg)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        """x: ``[B, L, hidden]`` -> ``[B, L, hidden]``."""
        B, L, _ = x.shape
        q, gate = mx.split(self.q_proj(x).reshape(B, L, self.n_heads, 2 * self.head_dim), 2, axis=-1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(k).transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, cache=cache, scale=self.scale, mask=mask)  # CPU: kernels/attention.py
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out * mx.sigmoid(gate.reshape(B, L, -1)))


def make_rope(cfg: ModelConfig) -> nn.Module:
    """RoPE over the first ``cfg.rotary_dim`` dims of each head (half-split, not interleaved),
    with linear or YaRN scaling computed as transformers does (see :mod:`qnext_mlx.model.rope`)."""
    return build_rope(cfg)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer (linear attention with a delta-rule state).

    Cache: an mlx-lm ``ArraysCache(size=2)`` holding the conv state
    ``[B, K-1, conv_dim]`` and the recurrent state ``[B, Hv, Dv, Dk]`` (float32).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_k_heads = cfg.linear_num_key_heads
        self.num_v_heads = cfg.linear_num_value_heads
        self.head_k_dim = cfg.linear_key_head_dim
        self.head_v_dim = cfg.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_kernel_size = cfg.linear_conv_kernel_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj_qkvz = nn.Linear(cfg.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(cfg.hidden_size, 2 * self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=self.conv_kernel_size,
            groups=self.conv_dim,
            bias=False,
            padding=0,
        )
        self.dt_bias = mx.ones((self.num_v_heads,))
        self.A_log = mx.zeros((self.num_v_heads,))
        self.norm = GatedRMSNorm(self.head_v_dim, eps=cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, cfg.hidden_size, bias=False)

    def _split_projections(self, qkvz: mx.array, ba: mx.array):
        """Undo the per-key-head grouping of ``in_proj_qkvz`` / ``in_proj_ba``.

        The checkpoint groups the outputs per key head as
        ``[q (Dk) | k (Dk) | v (r*Dv) | z (r*Dv)]`` and ``[b (r) | a (r)]``, r = Hv/Hk.
        """
        B, L, _ = qkvz.shape
        nk, dk, dv = self.num_k_heads, self.head_k_dim, self.head_v_dim
        r = self.num_v_heads // nk
        qkvz = qkvz.reshape(B, L, nk, -1)
        q, k, v, z = mx.split(qkvz, [dk, 2 * dk, 2 * dk + r * dv], axis=-1)
        b, a = mx.split(ba.reshape(B, L, nk, 2 * r), [r], axis=-1)
        return (
            q.reshape(B, L, -1),
            k.reshape(B, L, -1),
            v.reshape(B, L, -1),
            z.reshape(B, L, self.num_v_heads, dv),
            b.reshape(B, L, self.num_v_heads),
            a.reshape(B, L, self.num_v_heads),
        )

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        """x: ``[B, L, hidden]`` -> ``[B, L, hidden]``; updates ``cache`` in place."""
        B, L, _ = x.shape
        q, k, v, z, b, a = self._split_projections(self.in_proj_qkvz(x), self.in_proj_ba(x))
        conv_state = cache[0] if cache is not None else None
        state = cache[1] if cache is not None else None
        mixed = mx.concatenate([q, k, v], axis=-1)
        # Speculative verification (qnext_mlx.engine.speculative) sets ``capture_steps`` on the
        # cache: keep every token's state so a rejected draft can be rolled back.
        capture = cache is not None and getattr(cache, "capture_steps", False)
        # conv + SiLU + q/k norms + gates + delta rule: the fused Metal kernel for
        # short runs where verified, else the MLX path (chunked for prefill).
        y, new_conv_state, new_state, *states = gated_delta_decode(
            mixed,
            self.conv1d.weight,
            conv_state,
            a,
            b,
            self.A_log,
            self.dt_bias,
            state,
            num_k_heads=self.num_k_heads,
            head_k_dim=self.head_k_dim,
            head_v_dim=self.head_v_dim,
            return_all_states=capture,
        )
        if cache is not None:
            if capture:
                # conv state after token t = rows t+1 .. t+K-1 of [old conv state; inputs]
                if conv_state is None:
                    conv_state = mx.zeros((B, self.conv_kernel_size - 1, mixed.shape[-1]), dtype=mixed.dtype)
                cache.steps = (mx.concatenate([conv_state.astype(mixed.dtype), mixed], axis=1), states[0])
            cache[0], cache[1] = new_conv_state, new_state
        y = self.norm(y.astype(x.dtype), z)
        return self.out_proj(y.reshape(B, L, -1))


class SparseMoeBlock(nn.Module):
    """Softmax router, top-k experts (gathered matmuls) and a sigmoid-gated shared expert."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """x: ``[B, L, hidden]`` -> ``[B, L, hidden]``."""
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        inds = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        scores = mx.take_along_axis(probs, inds, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        # MLX's CPU GatherMM is float32-only; the loader stores unquantized expert
        # weights in float32 on that backend and the input follows them.
        expert_dtype = getattr(self.switch_mlp.up_proj, "weight").dtype
        # Quantized experts: 16-bit activations go in float32 on the CPU, where the
        # quantized kernels are about 11x faster in float32 (kernels/linear.py).
        quantized = "scales" in self.switch_mlp.up_proj
        xe = x.astype(cpu_compute_dtype(x)) if quantized else x.astype(expert_dtype)
        if use_grouped_experts(inds.size, self.gate.weight.shape[0]):
            # Prefill on the CPU: tokens grouped by expert, plain GEMMs (kernels/moe.py).
            y = grouped_switch_glu(self.switch_mlp, xe, inds)
        else:  # decode: gathered kernels, expert slots split over the CPU lanes
            # On Metal, quantized experts: the fused gather-MoE kernel where it was
            # verified and timed faster than gather_qmm (None elsewhere, always on the CPU).
            fused = moe_decode(self, x, inds, scores)
            if fused is not None:
                return fused
            y = switch_glu_lanes(self.switch_mlp, xe, inds)
        return moe_combine(self, x, y, scores)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: token mixer (DeltaNet or attention), then MoE or dense MLP."""

    def __init__(self, cfg: ModelConfig, is_linear: bool, is_moe: bool):
        super().__init__()
        self.is_linear = is_linear
        if is_linear:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = Attention(cfg)
        self.mlp = SparseMoeBlock(cfg) if is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        # Tensor parallel (model/parallel.py): each rank's mixer and MLP give a partial sum.
        self.reduce_group = None

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        mixer = self.linear_attn if self.is_linear else self.self_attn
        h = x + self._reduce(mixer(self.input_layernorm(x), mask, cache))
        return h + self._reduce(self.mlp(self.post_attention_layernorm(h)))

    def _reduce(self, y: mx.array) -> mx.array:
        group = self.reduce_group
        return y if group is None else mx.distributed.all_sum(y, group=group)


def stage_output(stage: PipelineStage, h: mx.array) -> mx.array:
    """Pass a pipeline stage's hidden state ``[B, L, hidden]`` on and return the last
    stage's on every rank (one ``all_sum`` with zeros from the other ranks).

    Under pipeline parallel every collective runs as soon as it is built: the ranks'
    graphs differ, so left lazy their sends, receives and sums could be evaluated in
    different orders on different ranks (and a caller that evaluates only the caches
    would never send at all).
    """
    if stage.rank < stage.size - 1:
        sent = mx.distributed.send(h, stage.rank + 1, group=stage.group)
        mx.eval(sent)
        h = mx.zeros_like(sent)
    out = mx.distributed.all_sum(h, group=stage.group)
    mx.eval(out)
    return out


class Qwen3NextModel(nn.Module):
    """Embedding, the decoder stack and the final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, cfg.is_linear(i), cfg.is_moe(i)) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.stage: Optional[PipelineStage] = None  # pipeline parallel: what this rank runs
        # a frozenset, not a list: MLX modules keep lists as parameter containers
        self.attention_layers = frozenset(i for i, t in enumerate(cfg.layer_types) if t != "linear_attention")

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """inputs: ``[B, L]`` token ids -> final normed hidden states ``[B, L, hidden]``."""
        h = self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        stage = self.stage
        owned = range(len(self.layers)) if stage is None else stage.layers
        first_attn = next((i for i in owned if i in self.attention_layers), None)
        mask = create_attention_mask(h, cache[first_attn] if first_attn is not None else None)
        if stage is not None and stage.rank > 0:
            mx.eval(h)  # what the ids depend on (the MTP drafts' collectives) first
            h = mx.distributed.recv_like(h, stage.rank - 1, group=stage.group)
            mx.eval(h)
        for i in owned:
            layer = self.layers[i]
            h = layer(h, None if layer.is_linear else mask, cache[i])
        if stage is not None:
            h = stage_output(stage, h)
        return self.norm(h)


class MultiTokenPredictor(nn.Module):
    """The MTP head (``mtp.*``): predicts token t+2 from h_t and token t+1.

    ``fc(concat[pre_fc_norm_embedding(embed(t+1)), pre_fc_norm_hidden(h_t)])``
    -> full-attention decoder layer(s) -> ``norm``; the caller applies the
    shared ``lm_head``. Embedding and head are shared with the main model and
    are therefore not parameters of this module.
    """

    def __init__(self, cfg: ModelConfig, num_layers: int):
        super().__init__()
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.layers = [DecoderLayer(cfg, is_linear=False, is_moe=cfg.num_experts > 0) for _ in range(num_layers)]
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, hidden: mx.array, next_embeds: mx.array, cache=None) -> mx.array:
        """hidden, next_embeds: ``[B, L, hidden]`` -> normed MTP hidden states ``[B, L, hidden]``.

        ``cache``: one KV cache per MTP layer (or None); position i of this
        call is the pair (h_i, t_{i+1}), at the cache's offset + i.
        """
        x = mx.concatenate([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], axis=-1)
        x = self.fc(x)
        caches = cache if cache is not None else [None] * len(self.layers)
        mask = create_attention_mask(x, caches[0])
        for layer, c in zip(self.layers, caches):
            x = layer(x, mask, c)
        return self.norm(x)


SHIFTED_NORMS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "q_norm.weight",
    "k_norm.weight",
    "model.norm.weight",
    "mtp.norm.weight",
    "mtp.pre_fc_norm_embedding.weight",
    "mtp.pre_fc_norm_hidden.weight",
)


class Model(nn.Module):
    """Qwen3-Next causal LM: ``model(ids, cache=None) -> logits [B, L, vocab]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model_type = cfg.model_type
        self.model = Qwen3NextModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.num_mtp_layers:
            self.mtp = MultiTokenPredictor(cfg, cfg.num_mtp_layers)
        self.parallel = None  # a model.parallel.ParallelLayout when loaded for one rank of several

    @property
    def layers(self) -> List[DecoderLayer]:
        return self.model.layers

    @property
    def has_mtp(self) -> bool:
        return "mtp" in self

    def __call__(self, inputs: mx.array, cache=None, return_hidden: bool = False):
        """inputs: ``[B, L]`` ids. Returns logits ``[B, L, vocab]``, and the final
        normed hidden states ``[B, L, hidden]`` too when ``return_hidden``."""
        h = self.model(inputs, cache)
        if hasattr(cache, "record_tokens"):  # ModelCache tracks ids/offset (DeltaNet has no offset)
            cache.record_tokens(inputs)
        logits = self.lm_logits(h)
        return (logits, h) if return_hidden else logits

    def lm_logits(self, h: mx.array) -> mx.array:
        """Apply the (tied or untied) LM head: ``[..., hidden] -> [..., vocab]``."""
        if self.config.tie_word_embeddings:
            embed = self.model.embed_tokens
            if "scales" in embed:  # a quantized product: float32 activations on the CPU (kernels/linear.py)
                return embed.as_linear(h.astype(cpu_compute_dtype(h))).astype(h.dtype)
            return embed.as_linear(h)
        return self.lm_head(h)

    def mtp_forward(self, hidden: mx.array, next_ids: mx.array, cache=None, return_hidden: bool = False):
        """Draft logits from the MTP head.

        Args:
            hidden: ``[B, L, hidden]`` final normed hidden states h_i of the main
                model (or of a previous MTP step, when chaining drafts).
            next_ids: ``[B, L]`` the tokens t_{i+1} that follow each h_i.
            cache: list of per-MTP-layer KV caches (``make_cache().mtp``) or None.
        Returns:
            logits ``[B, L, vocab]`` for t_{i+2}, and the MTP hidden states when asked.
        """
        if not self.has_mtp:
            raise ValueError("this checkpoint has no MTP head (no mtp.* tensors)")
        h = self.mtp(hidden, self.model.embed_tokens(next_ids), cache)
        stage = self.model.stage
        if stage is not None:  # the head runs on the last stage (model/parallel.py)
            h = mx.distributed.all_sum(h, group=stage.group)
            mx.eval(h)  # at once, as every pipeline collective (see stage_output)
        logits = self.lm_logits(h)
        return (logits, h) if return_hidden else logits

    def make_cache(self, kv_bits: Optional[int] = None, kv_group_size: int = 64):
        """A fresh :class:`qnext_mlx.model.cache.ModelCache` for incremental decoding."""
        return ModelCache.for_model(self, kv_bits=kv_bits, kv_group_size=kv_group_size)

    # ------------------------------------------------------------ checkpoints
    @staticmethod
    def is_hf_layout(weights: Dict[str, Any]) -> bool:
        """True for Hugging Face layout (per-expert tensors, torch conv1d, centred norms)."""
        for k, v in weights.items():
            if ".experts." in k:
                return True
            if k.endswith("conv1d.weight") and v.shape[-1] != 1:
                return True
        return False

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map checkpoint tensors onto this module's layout (idempotent for MLX layout).

        Hugging Face layout: stack per-expert tensors into ``switch_mlp``, move
        conv1d from ``[C, 1, K]`` to ``[C, K, 1]`` and shift zero-centred norm
        weights by +1. mlx-lm checkpoints are already in this layout.
        """
        cfg = self.config
        weights = dict(weights)
        if cfg.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        if not self.has_mtp:
            weights = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
        if not self.is_hf_layout(weights):
            return weights
        prefixes = {k.split(".experts.")[0] for k in weights if ".experts." in k}
        for prefix in sorted(prefixes):
            fused = weights.pop(f"{prefix}.experts.gate_up_proj", None)
            if fused is not None:  # transformers 5 in-memory layout: [E, 2I, H]
                gate, up = mx.split(fused, 2, axis=1)
                weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate
                weights[f"{prefix}.switch_mlp.up_proj.weight"] = up
                weights[f"{prefix}.switch_mlp.down_proj.weight"] = weights.pop(f"{prefix}.experts.down_proj")
                continue
            for name in ("gate_proj", "up_proj", "down_proj"):
                parts = [weights.pop(f"{prefix}.experts.{e}.{name}.weight", None) for e in range(cfg.num_experts)]
                if any(p is None for p in parts):
                    missing = [e for e, p in enumerate(parts) if p is None]
                    raise CheckpointError(
                        f"checkpoint lacks expert(s) {missing[:8]}{'...' if len(missing) > 8 else ''} "
                        f"of {prefix}.experts.*.{name}.weight"
                    )
                weights[f"{prefix}.switch_mlp.{name}.weight"] = mx.stack(parts)
        for k, v in list(weights.items()):
            if k.endswith("conv1d.weight") and v.ndim == 3 and v.shape[-1] != 1:
                weights[k] = v.moveaxis(2, 1)
            elif k.endswith(SHIFTED_NORMS) and v.ndim == 1:
                weights[k] = v.astype(mx.float32) + 1.0  # float32: see RMSNorm
        return weights

    @property
    def quant_predicate(self):
        """Default quantization overrides: router and shared-expert gates at 8 bits."""

        def predicate(path: str, module) -> Any:
            if path.endswith("mlp.gate") or path.endswith("shared_expert_gate"):
                return {"group_size": 64, "bits": 8}
            return True

        return predicate
