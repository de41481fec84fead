"""Quantization recipes: which modules get how many bits.

A recipe maps a module path of :class:`qnext_mlx.model.Model` (``"model.layers.3.mlp.gate"``)
and the module itself to ``{"group_size": g, "bits": b}``, or to ``None`` to keep it
in floating point. Only modules with ``to_quantized`` (Linear, Embedding and mlx-lm's
SwitchLinear) whose input dim divides the group size are quantized, as in mlx-lm;
conv1d, norms, ``A_log`` and ``dt_bias`` always stay float.

| module                                   | ``default`` | ``mixed``            |
| ---------------------------------------- | ----------- | -------------------- |
| routed experts (``switch_mlp``)          | bits        | bits                 |
| router ``mlp.gate``, ``shared_expert_gate`` | 8 (group 64) | 8 (group 64)     |
| ``embed_tokens``, ``lm_head``            | bits        | 8                    |
| attention, DeltaNet, shared expert, dense MLP, ``mtp.fc`` | bits | 6 (8 when bits > 4) |

The router and shared-expert gates are tiny and steer every token, so they keep
8 bits (the model's own :attr:`Model.quant_predicate`, the same choice mlx-lm
makes). The ``mixed`` recipe spends bits where they are cheap: the routed
experts hold ~97% of the 80B model's weights, everything else is a few GB.
MTP layers are decoder layers under ``mtp.layers.N`` and follow the same rules.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import mlx.nn as nn

RECIPES = ("default", "mixed")
QUANT_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)

QuantParams = Dict[str, int]


def make_recipe(
    recipe: str, model: nn.Module, bits: int, group_size: int
) -> Callable[[str, nn.Module], Optional[QuantParams]]:
    """The per-module rule of ``recipe`` for a run at ``bits`` / ``group_size``.

    Args:
        recipe: one of :data:`RECIPES`.
        model: the (unquantized) :class:`Model`; its ``quant_predicate`` gives
            the sensitive modules' settings.
        bits, group_size: the run's default quantization.
    Returns:
        ``rule(path, module) -> {"group_size", "bits"} | None`` (None: keep float).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r} (choose from {', '.join(RECIPES)})")
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits}")
    sensitive = getattr(model, "quant_predicate", None)
    high = 6 if bits <= 4 else 8

    def choose(path: str, module: nn.Module) -> QuantParams:
        if sensitive is not None:
            special: Any = sensitive(path, module)
            if isinstance(special, dict):
                return {"group_size": int(special["group_size"]), "bits": int(special["bits"])}
        if recipe == "mixed":
            if path.endswith(("embed_tokens", "lm_head")):
                return {"group_size": group_size, "bits": 8}
            if ".switch_mlp." not in path:
                return {"group_size": group_size, "bits": max(high, bits)}
        return {"group_size": group_size, "bits": bits}

    def rule(path: str, module: nn.Module) -> Optional[QuantParams]:
        if not hasattr(module, "to_quantized"):
            return None
        params = choose(path, module)
        # mx.quantize works on groups along the input dim (the weight's last axis)
        if module.weight.shape[-1] % params["group_size"]:
            return None
        return params

    return rule
