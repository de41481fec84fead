"""Rotary position embedding for Qwen3-Next: partial RoPE, linear scaling and YaRN.

Matches transformers (``modeling_rope_utils`` + ``modeling_qwen3_next``):

* only the first ``rotary_dim = int(head_dim * partial_rotary_factor)`` dims of
  each head are rotated, half-split (``rotate_half``: dim ``i`` pairs with
  ``i + rotary_dim / 2``); the remaining dims pass through unchanged;
* the inverse frequencies are computed over ``rotary_dim`` (not ``head_dim``),
  which is also the ``dim`` that YaRN's correction range is measured in;
* YaRN's ``attention_factor`` multiplies cos and sin, i.e. the *rotated* part
  of q and k only (so the rotary part of each attention logit is scaled by
  ``attention_factor ** 2`` and the pass-through part is not).

mlx-lm's ``YarnRoPE`` agrees with transformers for the published config, but
not in the corners: it ignores ``attention_factor`` and ``truncate``, treats
``mscale``/``mscale_all_dim`` differently when only one is given, and assumes
``original_max_position_embeddings = 4096`` when the key is missing (transformers
falls back to ``max_position_embeddings``). Hence this module.

Also here: what the long-context options ask for (:func:`rope_override`) and
applying it to a model (:func:`apply_rope_options`); the command-line flags
themselves are in :mod:`qnext_mlx.cli`.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ConfigError
from .config import ModelConfig

# --max-context picks the smallest YaRN factor in these steps that covers the request.
FACTOR_STEP = 0.5
# The largest factor the published model card validates (262,144 x 4 -> 1,010,000 tokens tested).
MAX_VALIDATED_FACTOR = 4.0


# --------------------------------------------------------------------------- frequencies
def default_inv_freq(dim: int, base: float) -> np.ndarray:
    """Plain RoPE inverse frequencies ``base ** (-2i / dim)``, float64 ``[dim // 2]``."""
    return 1.0 / (float(base) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def yarn_attention_factor(
    factor: float,
    attention_factor: Optional[float] = None,
    mscale: Optional[float] = None,
    mscale_all_dim: Optional[float] = None,
) -> float:
    """YaRN's cos/sin multiplier, exactly as transformers' ``_compute_yarn_parameters``.

    An explicit ``attention_factor`` wins; otherwise ``0.1 ln(factor) + 1``, or the
    ratio ``get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)`` when
    *both* mscale keys are set (and non-zero).
    """

    def get_mscale(scale: float, m: float = 1.0) -> float:
        if scale <= 1:
            return 1.0
        return 0.1 * m * math.log(scale) + 1.0

    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    return float(get_mscale(factor))


def yarn_inv_freq(
    dim: int,
    base: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: Optional[float] = None,
    beta_slow: Optional[float] = None,
    truncate: bool = True,
) -> np.ndarray:
    """YaRN inverse frequencies, float64 ``[dim // 2]``.

    ``dim`` is the number of *rotated* dims (``rotary_dim``). Dims whose
    wavelength is short compared with the original window keep their
    frequency (extrapolation), long ones are divided by ``factor``
    (interpolation), with a linear ramp between the correction bounds found
    from ``beta_fast`` (default 32) and ``beta_slow`` (default 1) rotations.
    Computed in float64 (transformers works in float32; the two agree to
    about one float32 ulp).
    """
    beta_fast = beta_fast or 32  # transformers: `get("beta_fast") or 32`
    beta_slow = beta_slow or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp  # weight of the unscaled frequency
    pos_freqs = float(base) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    return (1.0 / (factor * pos_freqs)) * (1.0 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def original_max_positions(cfg: ModelConfig) -> int:
    """The pre-training window YaRN stretches (transformers' default: ``max_position_embeddings``)."""
    scaling = cfg.rope_scaling or {}
    return int(scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings)


def rope_parameters(cfg: ModelConfig) -> Tuple[np.ndarray, float]:
    """``(inv_freq float64 [rotary_dim // 2], attention_factor)`` for a config.

    Covers the rope types the config accepts: ``default``, ``linear`` and ``yarn``.
    """
    dim, base = cfg.rotary_dim, cfg.rope_theta
    scaling = cfg.rope_scaling
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return default_inv_freq(dim, base), 1.0
    if rope_type == "linear":
        return default_inv_freq(dim, base) / float(scaling["factor"]), 1.0
    if rope_type == "yarn":
        original = original_max_positions(cfg)
        factor = scaling.get("factor") or cfg.max_position_embeddings / original
        inv_freq = yarn_inv_freq(
            dim,
            base,
            float(factor),
            original,
            beta_fast=scaling.get("beta_fast"),
            beta_slow=scaling.get("beta_slow"),
            truncate=scaling.get("truncate", True),
        )
        attn = yarn_attention_factor(
            float(factor), scaling.get("attention_factor"), scaling.get("mscale"), scaling.get("mscale_all_dim")
        )
        return inv_freq, attn
    raise ConfigError(f"rope type {rope_type!r} is not supported (supported: default, linear, yarn)")


# ---------------------------------------------------------------------------- module
class RoPE(nn.Module):
    """Half-split RoPE over the first ``dims`` features, with YaRN's attention factor.

    Args:
        dims: rotated dims (``rotary_dim``), even.
        inv_freq: ``[dims // 2]`` inverse frequencies (any float dtype; see :func:`rope_parameters`).
        attention_factor: multiplier of the rotated features (transformers scales cos and sin).
        head_dim: full head size; the features after ``dims`` are left untouched.
    """

    def __init__(self, dims: int, inv_freq: np.ndarray, attention_factor: float = 1.0, head_dim: Optional[int] = None):
        super().__init__()
        inv_freq = np.asarray(inv_freq, dtype=np.float64)
        if inv_freq.shape != (dims // 2,):
            raise ValueError(f"inv_freq must have shape ({dims // 2},), got {inv_freq.shape}")
        self.dims = dims
        self.attention_factor = float(attention_factor)
        # mx.fast.rope takes periods (it computes theta = position / freqs); rounding
        # 1/inv_freq once from float64 keeps the kernel's reciprocal within one ulp.
        self._freqs = mx.array((1.0 / inv_freq).astype(np.float32))
        scale = None
        if self.attention_factor != 1.0:
            scale = np.ones(head_dim or dims, dtype=np.float32)
            scale[:dims] = self.attention_factor
            scale = mx.array(scale)
        self._scale = scale  # [head_dim] multiplier of the rotated dims, or None

    def __call__(self, x: mx.array, offset: Union[int, mx.array] = 0) -> mx.array:
        """x: ``[B, heads, L, head_dim]`` at positions ``offset .. offset+L-1`` -> same shape."""
        if self._scale is not None:
            # Rotation is linear, so scaling before it equals scaling cos and sin.
            x = x * self._scale.astype(x.dtype)
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)


def build_rope(cfg: ModelConfig) -> RoPE:
    """The RoPE module of an attention layer for ``cfg`` (``make_rope`` in the model)."""
    inv_freq, attn = rope_parameters(cfg)
    return RoPE(cfg.rotary_dim, inv_freq, attn, head_dim=cfg.head_dim)


def set_model_rope(model, cfg: ModelConfig) -> None:
    """Give ``model`` the config ``cfg`` and rebuild every attention layer's RoPE (MTP included).

    RoPE has no weights, so this is safe on a loaded model; caches filled
    under the old RoPE are not valid afterwards.
    """
    model.config = cfg
    layers = list(model.layers) + (list(model.mtp.layers) if getattr(model, "has_mtp", False) else [])
    for layer in layers:
        if not layer.is_linear:
            layer.self_attn.rope = build_rope(cfg)


# ---------------------------------------------------------------------- context window
def native_context(cfg: ModelConfig) -> int:
    """Positions the model was trained on (the window before any YaRN stretch)."""
    if (cfg.rope_scaling or {}).get("rope_type") == "yarn":
        return original_max_positions(cfg)
    return cfg.max_position_embeddings


def context_window(cfg: ModelConfig) -> int:
    """Longest context the RoPE setting is meant for: ``factor x original`` under YaRN."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "yarn":
        return int(float(scaling["factor"]) * original_max_positions(cfg))
    return cfg.max_position_embeddings


def factor_for_context(tokens: int, native: int, step: float = FACTOR_STEP) -> Optional[float]:
    """Smallest YaRN factor, a multiple of ``step``, with ``factor * native >= tokens``.

    ``None`` when ``tokens`` fits the native window (no scaling needed).
    Example: 1,000,000 tokens over 262,144 native -> 4.0; 524,288 -> 2.0; 300,000 -> 1.5.
    """
    if tokens <= native:
        return None
    steps = math.ceil(tokens / (native * step) - 1e-12)
    return steps * step


def yarn_scaling(factor: float, original: int) -> Dict[str, Any]:
    """The ``rope_scaling`` block for YaRN (the spelling in the model card)."""
    return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original)}


# --------------------------------------------------------------- long-context options
def rope_override(options: Any, cfg: ModelConfig) -> Tuple[bool, Optional[Dict[str, Any]], str]:
    """What the long-context options ask for, given the checkpoint's config.

    ``options``: any object with the attributes the long-context flags set
    (``rope_scaling``, ``rope_factor``, ``max_context``,
    ``original_max_position_embeddings``; missing ones count as not given), e.g.
    the namespace parsed by :func:`qnext_mlx.cli.add_rope_arguments`'s options.

    Returns ``(changed, rope_scaling or None, message)``; ``changed`` is False when
    no option was given (the config stays as it is). Raises :class:`ConfigError`
    for contradictory options.
    """
    mode = getattr(options, "rope_scaling", None)
    factor = getattr(options, "rope_factor", None)
    max_context = getattr(options, "max_context", None)
    original = getattr(options, "original_max_position_embeddings", None)
    if mode is None and factor is None and max_context is None and original is None:
        return False, None, ""
    if factor is not None and max_context is not None:
        raise ConfigError("give --rope-factor or --max-context, not both")
    if mode == "none":
        if factor is not None or max_context is not None or original is not None:
            raise ConfigError(
                "--rope-scaling none takes no --rope-factor, --max-context or --original-max-position-embeddings"
            )
        return True, None, f"RoPE scaling off: native window of {native_context(cfg):,} tokens"
    native = original or native_context(cfg)
    if max_context is not None:
        f = factor_for_context(max_context, native)
        if f is None:
            return (
                True,
                None,
                (f"--max-context {max_context:,} fits the native window of {native:,} tokens: RoPE scaling off"),
            )
        return (
            True,
            yarn_scaling(f, native),
            (
                f"--max-context {max_context:,}: YaRN factor {f:g} over {native:,} native positions "
                f"-> window of {int(f * native):,} tokens (smallest factor in steps of {FACTOR_STEP:g})"
                + _beyond_note(f)
            ),
        )
    if factor is None:
        current = cfg.rope_scaling or {}
        if current.get("rope_type") != "yarn":
            raise ConfigError("--rope-scaling yarn needs --rope-factor F or --max-context N")
        factor = float(current["factor"])  # keep config.json's factor (possibly a new original window)
    return (
        True,
        yarn_scaling(factor, native),
        (
            f"YaRN factor {factor:g} over {native:,} native positions -> window of {int(factor * native):,} tokens"
            + _beyond_note(factor)
        ),
    )


def _beyond_note(factor: float) -> str:
    if factor > MAX_VALIDATED_FACTOR:
        return f" (note: the model card validates factors up to {MAX_VALIDATED_FACTOR:g})"
    return ""


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def apply_rope_options(options: Any, target, log: Optional[Callable[[str], None]] = _to_stderr) -> ModelConfig:
    """Apply the long-context options (see :func:`rope_override`) to a model or a config.

    Args:
        options: the parsed long-context options.
        target: a loaded :class:`qnext_mlx.model.Model` (its RoPE modules are
            rebuilt in place) or a :class:`ModelConfig`.
        log: called with the one-line summary of the choice (default: print to
            stderr; None: silent).
    Returns:
        The effective :class:`ModelConfig` (the same object when no option was given).
    """
    is_model = not isinstance(target, ModelConfig)
    cfg = target.config if is_model else target
    changed, scaling, message = rope_override(options, cfg)
    if not changed:
        return cfg
    new_cfg = cfg.with_rope_scaling(scaling)
    if is_model:
        set_model_rope(target, new_cfg)
    if log is not None and message:
        log(f"rope: {message}")
    return new_cfg
