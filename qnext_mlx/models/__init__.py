"""Model definitions (MLX ``nn.Module``s whose weight names match the checkpoints)."""

from .qwen3_next import Model

__all__ = ["Model"]
