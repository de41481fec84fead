"""Model configuration read from a checkpoint's ``config.json``.

Both spellings found in the wild are accepted: the published 80B config
(top-level ``rope_theta``, ``partial_rotary_factor``, ``rope_scaling``) and the
``rope_parameters`` block that transformers 5 writes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import ConfigError

LINEAR, FULL = "linear_attention", "full_attention"

# Keys without a sensible default: a config lacking one cannot describe a model.
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)

# Defaults follow transformers' Qwen3NextConfig so that a config it accepts, we accept.
_DEFAULTS: Dict[str, Any] = {
    "intermediate_size": 5632,
    "head_dim": 256,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "num_experts_per_tok": 10,
    "num_experts": 512,
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "max_position_embeddings": 32768,
    "full_attention_interval": 4,
}

_SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")


@dataclass
class ModelConfig:
    """Architecture hyper-parameters of a Qwen3-Next checkpoint (see ``from_dict``)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    decoder_sparse_step: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    num_experts_per_tok: int
    num_experts: int
    norm_topk_prob: bool
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    layer_types: List[str]
    mlp_only_layers: List[int]
    rope_theta: float
    partial_rotary_factor: float
    rope_scaling: Optional[Dict[str, Any]] = None
    # None: not stated in config.json; the loader infers it from ``mtp.*`` tensors.
    num_mtp_layers: Optional[int] = None
    quantization: Optional[Dict[str, Any]] = None
    model_type: str = "qwen3_next"
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, cfg: Dict[str, Any]) -> "ModelConfig":
        """Build and validate a config from the parsed ``config.json`` dictionary."""
        if not isinstance(cfg, dict):
            raise ConfigError("config.json must hold a JSON object")
        cfg = dict(cfg.get("text_config") or {}, **{k: v for k, v in cfg.items() if k != "text_config"})
        model_type = cfg.get("model_type", "qwen3_next")
        if model_type != "qwen3_next":
            raise ConfigError(f"config.json: model_type is {model_type!r}, expected 'qwen3_next'")
        missing = [k for k in _REQUIRED if k not in cfg]
        if missing:
            raise ConfigError(f"config.json: missing required key(s) {', '.join(missing)}")

        values = {k: cfg.get(k, d) for k, d in _DEFAULTS.items()}
        values.update({k: cfg[k] for k in _REQUIRED})
        if values.get("head_dim") is None:
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]

        rope_theta, partial, scaling = _parse_rope(cfg)
        n_layers = _int(values, "num_hidden_layers")
        layer_types = _parse_layer_types(cfg, n_layers, values.pop("full_attention_interval"))
        mlp_only = cfg.get("mlp_only_layers") or []
        if not isinstance(mlp_only, list) or not all(isinstance(i, int) and 0 <= i < n_layers for i in mlp_only):
            raise ConfigError(f"config.json: mlp_only_layers must be a list of layer indices in [0, {n_layers})")

        num_mtp = cfg.get("num_nextn_predict_layers", cfg.get("mtp_num_hidden_layers"))
        quant = cfg.get("quantization", cfg.get("quantization_config"))

        config = cls(
            **values,
            layer_types=layer_types,
            mlp_only_layers=list(mlp_only),
            rope_theta=rope_theta,
            partial_rotary_factor=partial,
            rope_scaling=scaling,
            num_mtp_layers=num_mtp,
            quantization=quant,
            model_type=model_type,
            raw=cfg,
        )
        config.validate()
        return config

    @classmethod
    def from_file(cls, path: Path | str) -> "ModelConfig":
        """Read ``config.json`` (a file, or a folder containing it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json at {path.parent}: is this a model folder?")
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(cfg)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first unknown or inconsistent key."""
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "linear_conv_kernel_dim",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_num_key_heads",
            "linear_num_value_heads",
            "decoder_sparse_step",
            "max_position_embeddings",
        )
        for key in positive:
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config.json: {key} must be a positive integer, got {v!r}")
        for key in (
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "intermediate_size",
        ):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"config.json: {key} must be a non-negative integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "config.json: num_attention_heads "
                f"({self.num_attention_heads}) must be a multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                "config.json: linear_num_value_heads "
                f"({self.linear_num_value_heads}) must be a multiple of linear_num_key_heads "
                f"({self.linear_num_key_heads})"
            )
        if self.num_experts > 0 and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                f"[1, num_experts={self.num_experts}]"
            )
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"config.json: partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2:
            raise ConfigError(
                f"config.json: partial_rotary_factor {self.partial_rotary_factor} x head_dim {self.head_dim} "
                "gives an odd rotary dim"
            )
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ConfigError(f"config.json: rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if self.num_mtp_layers is not None and (not isinstance(self.num_mtp_layers, int) or self.num_mtp_layers < 0):
            raise ConfigError(
                f"config.json: num_nextn_predict_layers must be a non-negative integer, got {self.num_mtp_layers!r}"
            )
        if self.quantization is not None:
            q = self.quantization
            if not isinstance(q, dict) or "bits" not in q or "group_size" not in q:
                raise ConfigError("config.json: quantization must be an object with 'bits' and 'group_size'")

    # ---------------------------------------------------------------- derived
    @property
    def rotary_dim(self) -> int:
        """Number of leading head dims that RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_linear(self, layer_idx: int) -> bool:
        """True when layer ``layer_idx`` is a Gated DeltaNet layer."""
        return self.layer_types[layer_idx] == LINEAR

    def is_moe(self, layer_idx: int) -> bool:
        """True when layer ``layer_idx`` uses the sparse MoE block (else a dense MLP)."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def with_rope_scaling(self, scaling: Optional[Dict[str, Any]]) -> "ModelConfig":
        """A copy whose RoPE scaling is ``scaling`` (None: plain RoPE), e.g. from the command line.

        ``scaling`` is a ``rope_scaling`` block such as ``{"rope_type": "yarn",
        "factor": 4.0, "original_max_position_embeddings": 262144}``; it is
        validated like config.json and replaces any scaling the checkpoint had
        (``to_dict`` writes it back as ``rope_parameters``).
        """
        block = dict(scaling or {"rope_type": "default"})
        block.update(rope_theta=self.rope_theta, partial_rotary_factor=self.partial_rotary_factor)
        theta, partial, parsed = _parse_rope({"rope_parameters": block})
        raw = {
            k: v
            for k, v in self.raw.items()
            if k not in ("rope_scaling", "rope_parameters", "rope_theta", "partial_rotary_factor")
        }
        raw["rope_parameters"] = dict(
            parsed or {"rope_type": "default"}, rope_theta=theta, partial_rotary_factor=partial
        )
        return dataclasses.replace(self, rope_scaling=parsed, raw=raw)

    def to_dict(self) -> Dict[str, Any]:
        """The config as written back to ``config.json`` (original keys kept)."""
        out = dict(self.raw)
        for f in dataclasses.fields(self):
            if f.name in (
                "raw",
                "num_mtp_layers",
                "quantization",
                "rope_theta",
                "partial_rotary_factor",
                "rope_scaling",
            ):
                continue
            out[f.name] = getattr(self, f.name)
        out.pop("full_attention_interval", None)
        rope = {
            "rope_type": (self.rope_scaling or {}).get("rope_type", "default"),
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
        }
        rope.update(self.rope_scaling or {})
        out["rope_parameters"] = rope
        for k in ("rope_theta", "partial_rotary_factor", "rope_scaling"):
            out.pop(k, None)
        if self.num_mtp_layers is not None:
            out["num_nextn_predict_layers"] = self.num_mtp_layers
        if self.quantization is not None:
            out["quantization"] = self.quantization
            out.pop("quantization_config", None)
        return out


def _int(values: Dict[str, Any], key: str) -> int:
    v = values[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"config.json: {key} must be an integer, got {v!r}")
    return v


def _parse_rope(cfg: Dict[str, Any]):
    """Return ``(rope_theta, partial_rotary_factor, scaling or None)`` from either spelling."""
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError("config.json: rope_parameters must be an object")
    params = dict(params or {})
    legacy = cfg.get("rope_scaling")
    if legacy is not None and not isinstance(legacy, dict):
        raise ConfigError("config.json: rope_scaling must be an object or null")
    scaling = dict(legacy or {})
    scaling.update({k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    if not isinstance(partial, (int, float)):
        raise ConfigError(f"config.json: partial_rotary_factor must be a number, got {partial!r}")
    rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    scaling["rope_type"] = rope_type
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"config.json: rope type {rope_type!r} is not supported (supported: {', '.join(_SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return float(theta), float(partial), None
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1.0:
        raise ConfigError(f"config.json: rope scaling 'factor' must be a number >= 1, got {factor!r}")
    return float(theta), float(partial), scaling


def _parse_layer_types(cfg: Dict[str, Any], n_layers: int, interval: Any) -> List[str]:
    types = cfg.get("layer_types")
    if types is None:
        if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
            raise ConfigError(f"config.json: full_attention_interval must be a positive integer, got {interval!r}")
        return [FULL if (i + 1) % interval == 0 else LINEAR for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers:
        raise ConfigError(f"config.json: layer_types must be a list of num_hidden_layers={n_layers} entries")
    bad = sorted({t for t in types if t not in (LINEAR, FULL)}, key=str)
    if bad:
        raise ConfigError(f"config.json: layer_types has unknown value(s) {bad}; expected {LINEAR!r} or {FULL!r}")
    return list(types)
