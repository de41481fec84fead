"""Checkpoint I/O: finding model folders, reading and validating checkpoints, conversion.

| module | holds |
| --- | --- |
| ``paths`` | model folders, Hugging Face repo ids, the bundled demo model, ``load_config`` |
| ``reader`` | safetensors headers, lazy loading, validation, :func:`load_model` / :func:`load` |
| ``convert`` | streaming Hugging Face -> MLX conversion with quantization, atomic output |
| ``quant_recipes`` | which layers get which bits |
"""

from .reader import load, load_model

__all__ = ["load", "load_model"]
