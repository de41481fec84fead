"""Write files so that a failure (full disk, Ctrl-C) never leaves one half-written."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path: Union[str, os.PathLike], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds it is renamed
    onto ``path`` (atomic on one file system), otherwise it is removed.

    ``suffix`` ends the temporary name (``mx.save_safetensors`` wants ``.safetensors``).
    Errors propagate (``OSError`` for the caller to turn into its own message).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
