"""``python -m qnext_mlx.app``: the desktop chat app.

    python -m qnext_mlx.app [--model PATH_OR_REPO] [--data-dir FOLDER]

The app itself (window, conversation store, generation thread): :mod:`qnext_mlx.ui.desktop`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

from .cli import Parser, add_rope_arguments, ranged
from .errors import QnextError
from .serve.chat_session import ChatEngine, load_chat_engine
from .ui.desktop import ConversationStore, app_data_dir, run_app


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m qnext_mlx.app", description="Desktop chat app for Qwen3-Next in MLX.")
    p.add_argument(
        "--model", help="model folder or Hugging Face repo id (default: the last one used, else the bundled demo model)"
    )
    p.add_argument("--data-dir", help=f"folder for conversations and settings (default: {app_data_dir()})")
    p.add_argument(
        "--max-tokens",
        type=ranged(int, 1),
        default=None,
        help="most tokens per reply (default: the saved setting, 16384 at first)",
    )
    # --max-context N: the longest conversation, and YaRN when N exceeds the native window
    add_rope_arguments(p)
    return p


def main(
    argv: Optional[Sequence[str]] = None,
    load_engine: Optional[Callable[[Optional[str]], Tuple[ChatEngine, str]]] = None,
) -> int:
    """CLI entry point (``load_engine``: how to load a model, for embedding);
    returns the exit status (2 for user errors)."""
    args = build_parser().parse_args(argv)
    try:
        store = ConversationStore(Path(args.data_dir) if args.data_dir else app_data_dir())
        settings = store.load_settings()
        if args.model:
            settings.model = args.model
        if args.max_tokens:
            settings.sampling.max_tokens = args.max_tokens
        if load_engine is None:

            def load_engine(model):
                return load_chat_engine(model, quiet=True, max_context=args.max_context, rope_args=args)

        return run_app(store, settings, load_engine)
    except QnextError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
