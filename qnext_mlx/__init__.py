"""qnext-mlx: Qwen3-Next (Gated DeltaNet + gated attention + sparse MoE + MTP) in MLX.

The public API::

    model, tokenizer = qnext_mlx.load("path/or/repo")    # checkpoint -> Model + tokenizer
    for r in qnext_mlx.stream_generate(model, tokenizer, prompt): print(r.text, end="")
    cache = qnext_mlx.ModelCache.for_model(model)         # or model.make_cache()

The package is laid out in rooms by layer (see CONTRIBUTING.md); imports run one way:
entry modules -> ui -> serve -> engine -> checkpoint -> model -> kernels.
"""

from .checkpoint.reader import load, load_model

# ``qnext_mlx.generate`` is the function here, as ``mlx_lm.generate`` is in mlx-lm; the
# command ``python -m qnext_mlx.generate`` is a module of that name, and importing it
# (``import qnext_mlx.generate``) rebinds the package attribute to the module.
# ``qnext_mlx.engine.generate`` always names the function.
from .engine.stream import GenerationResponse, batch_generate, generate, stream_batch, stream_generate
from .errors import CheckpointError, ConfigError, ModelNotFoundError, QnextError
from .model import Model, ModelCache, ModelConfig
from .version import __version__

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GenerationResponse",
    "Model",
    "ModelCache",
    "ModelConfig",
    "ModelNotFoundError",
    "QnextError",
    "__version__",
    "batch_generate",
    "generate",
    "load",
    "load_model",
    "stream_batch",
    "stream_generate",
]
