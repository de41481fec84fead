#!/usr/bin/env python3
"""Write a random Qwen3-Next checkpoint in the real Hugging Face format.

    python scripts/make_tiny_checkpoint.py OUT [--seed N] [--mtp] [--set key=value ...]

The model is a transformers ``Qwen3NextForCausalLM`` with every parameter
randomised (norm weights, decay and bias terms too, so that layout mistakes
show), saved with ``save_pretrained``; ``--mtp`` adds an MTP head under the
real ``mtp.*`` names. Needs torch and transformers (the ``test`` extra).
Also importable: tests use :func:`tiny_config`, :func:`build` and :class:`TorchMTP`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TINY = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    decoder_sparse_step=1,
    norm_topk_prob=True,
    mlp_only_layers=[],
    max_position_embeddings=2048,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
)


def tiny_config(**overrides):
    """A transformers ``Qwen3NextConfig`` for a tiny model (``TINY`` plus overrides)."""
    from transformers import Qwen3NextConfig

    kw = dict(TINY)
    kw.update(overrides)
    return Qwen3NextConfig(**kw)


class TorchMTP:
    """Independent torch implementation of the published MTP definition.

    ``fc(concat[pre_fc_norm_embedding(embed(t+1)), pre_fc_norm_hidden(h)]) -> layer(s) -> norm``;
    the caller applies the LM head. Built lazily so importing this file needs no torch.
    """

    def __new__(cls, config, num_layers: int = 1):
        import torch
        from torch import nn
        from transformers.models.qwen3_next import modeling_qwen3_next as mq

        attn_config = config.__class__(
            **{**config.to_dict(), "layer_types": ["full_attention"] * config.num_hidden_layers}
        )

        class _MTP(nn.Module):
            def __init__(self):
                super().__init__()
                h = config.hidden_size
                self.fc = nn.Linear(2 * h, h, bias=False)
                self.pre_fc_norm_embedding = mq.Qwen3NextRMSNorm(h, eps=config.rms_norm_eps)
                self.pre_fc_norm_hidden = mq.Qwen3NextRMSNorm(h, eps=config.rms_norm_eps)
                # layer_idx 0 is full attention in attn_config and MoE when the model has experts
                self.layers = nn.ModuleList(mq.Qwen3NextDecoderLayer(attn_config, 0) for _ in range(num_layers))
                self.norm = mq.Qwen3NextRMSNorm(h, eps=config.rms_norm_eps)
                self.rotary_emb = mq.Qwen3NextRotaryEmbedding(attn_config)

            def forward(self, hidden, next_embeds, position_offset: int = 0):
                x = torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1)
                x = self.fc(x)
                L = x.shape[1]
                pos = torch.arange(position_offset, position_offset + L)[None].expand(x.shape[0], -1)
                pe = self.rotary_emb(x, pos)
                mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
                for layer in self.layers:
                    x = layer(x, position_embeddings=pe, attention_mask=mask, position_ids=pos)
                return self.norm(x)

        return _MTP()


def randomize_(module, seed: int) -> None:
    """Give every parameter a random value at a scale that keeps activations sane."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.0 - 1.0)
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.ndim == 1:  # norm weights (zero-centred ones and the gated norm's)
                base = 1.0 if name.endswith("linear_attn.norm.weight") else 0.0
                p.copy_(base + torch.randn(p.shape, generator=g) * 0.2)
            elif "conv1d" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                # gain 0.5 keeps logits O(1) and float32 round-off (~1e-5) well under the parity bound
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 * fan_in**-0.5)


def build(config, seed: int = 0, mtp: bool = False):
    """A randomised ``Qwen3NextForCausalLM`` (and its ``TorchMTP`` head or None)."""
    import torch
    from transformers import Qwen3NextForCausalLM

    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(config).eval()
    randomize_(model, seed)
    head = None
    if mtp:
        head = TorchMTP(config).eval()
        randomize_(head, seed + 1)
    return model, head


def save(model, head, out: Path, dtype: str = "float32", max_shard_size: str = "50GB") -> None:
    """``save_pretrained`` plus the MTP tensors in their own shard, indexed like the real model."""
    import torch
    from safetensors.torch import save_file

    tdtype = getattr(torch, dtype)
    model.to(tdtype).save_pretrained(out, max_shard_size=max_shard_size)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if head is None:
        cfg_path.write_text(json.dumps(cfg, indent=2))
        return
    cfg["num_nextn_predict_layers"] = len(head.layers)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    tensors = {f"mtp.{k}": v.to(tdtype).contiguous() for k, v in mtp_state_dict(head).items()}
    save_file(tensors, str(out / "model-mtp.safetensors"), metadata={"format": "pt"})
    index_path = out / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:  # single shard: write an index so both files are found the documented way
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in f.keys()}}
    index["weight_map"].update({k: "model-mtp.safetensors" for k in tensors})
    index_path.write_text(json.dumps(index, indent=2))


def mtp_state_dict(head):
    """The MTP head's tensors with the checkpoint's per-expert names (no ``mtp.`` prefix)."""
    out = {}
    for k, v in head.state_dict().items():
        if k.startswith("rotary_emb"):
            continue
        if k.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H] -> per-expert gate/up
            prefix = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = v[e, :inter]
                out[f"{prefix}{e}.up_proj.weight"] = v[e, inter:]
        elif k.endswith("mlp.experts.down_proj"):
            prefix = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="output folder (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mtp", action="store_true", help="add an MTP head (mtp.* tensors)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--max-shard-size", default="50GB", help="shard size passed to save_pretrained, e.g. 200MB")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (JSON value), e.g. --set hidden_size=2048",
    )
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            p.error(f"--set takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k] = _parse_value(v)
    model, head = build(tiny_config(**overrides), seed=args.seed, mtp=args.mtp)
    args.out.mkdir(parents=True, exist_ok=True)
    save(model, head, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
