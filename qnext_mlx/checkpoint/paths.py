"""Where models are: local folders, Hugging Face repo ids, the bundled demo model, and their config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

from ..errors import ModelNotFoundError
from ..model.config import ModelConfig

__all__ = [
    "DEMO_MODEL_DIR",
    "MODEL_FILE_PATTERNS",
    "REAL_MODEL_REPO",
    "load_config",
    "resolve_model_arg",
    "resolve_model_path",
]

# The tiny model shipped in the package (qnext_mlx/demo_model), used when no --model is given.
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"
REAL_MODEL_REPO = "Qwen/Qwen3-Next-80B-A3B-Instruct"
# Files next to the weights that a model folder needs (downloads ask for these only).
MODEL_FILE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.md",
]


def resolve_model_path(path_or_repo: str | os.PathLike) -> Path:
    """A local model folder for a path, or for a Hugging Face repo id via the hub cache.

    Raises :class:`ModelNotFoundError` with what to do when neither works.
    """
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; --model takes a model folder or a Hugging Face repo id")
        return path
    text = str(path_or_repo)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise ModelNotFoundError(f"model folder {text} does not exist")
    try:
        from huggingface_hub import snapshot_download  # the hub client only when a repo id is asked for

        return Path(snapshot_download(text, allow_patterns=MODEL_FILE_PATTERNS))
    except Exception as e:  # network, auth, unknown repo: one line, with the fix
        kind = type(e).__name__
        raise ModelNotFoundError(
            f"could not get {text} from the Hugging Face Hub ({kind}). Check the repo id and your network, "
            f"or download it once with `huggingface-cli download {text}` and pass the local folder to --model"
        ) from None


def resolve_model_arg(model: Optional[str]) -> Tuple[str, bool]:
    """``(path_or_repo, is_demo)``: the bundled demo model when ``model`` is None."""
    if model is not None:
        return model, False
    if not (DEMO_MODEL_DIR / "config.json").exists():
        raise ModelNotFoundError(
            f"the bundled demo model is not installed (no {DEMO_MODEL_DIR / 'config.json'}); "
            f"pass --model PATH_OR_REPO, e.g. --model {REAL_MODEL_REPO}"
        )
    return str(DEMO_MODEL_DIR), True


def load_config(path_or_repo: Union[str, os.PathLike]) -> ModelConfig:
    """``ModelConfig`` from a model folder, a ``config.json`` file, or a Hugging Face repo id."""
    path = Path(path_or_repo).expanduser()
    if path.is_file():
        return ModelConfig.from_file(path)
    return ModelConfig.from_file(resolve_model_path(path_or_repo))
