"""The model: config, RoPE/YaRN, the Qwen3-Next blocks and MTP head (MLX ``nn.Module``s
whose weight names match the checkpoints, with ``sanitize``), and the per-model cache.

| module | holds |
| --- | --- |
| ``config`` | :class:`ModelConfig`, read from ``config.json`` |
| ``rope`` | partial RoPE, linear scaling and YaRN as transformers computes them |
| ``qwen3_next`` | the blocks, :class:`Model` (with the MTP head) and ``sanitize`` |
| ``cache`` | :class:`ModelCache`: the model's per-layer states, snapshots, reuse, save/load |
"""

from .cache import ModelCache
from .config import ModelConfig
from .qwen3_next import Model

__all__ = ["Model", "ModelCache", "ModelConfig"]
