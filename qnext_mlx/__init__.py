"""qnext-mlx: Qwen3-Next (Gated DeltaNet + gated attention + sparse MoE + MTP) in MLX."""

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, ModelNotFoundError, QnextError
from .loading import load, load_model

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "ModelNotFoundError",
    "QnextError",
    "load",
    "load_model",
]
