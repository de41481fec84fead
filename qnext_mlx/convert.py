"""``python -m qnext_mlx.convert``: Hugging Face checkpoint -> MLX, optionally quantized.

    python -m qnext_mlx.convert --hf-path Qwen/Qwen3-Next-80B-A3B-Instruct --mlx-path qwen3-next-4bit --q-bits 4

The conversion itself (streamed shard by shard, written atomically) is
:func:`qnext_mlx.checkpoint.convert.convert`.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from .checkpoint.convert import DEFAULT_MAX_SHARD_SIZE, DTYPES, convert
from .checkpoint.quant_recipes import GROUP_SIZES, QUANT_BITS, RECIPES
from .cli import Parser, add_rope_arguments, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m qnext_mlx.convert",
        description="Convert a Qwen3-Next checkpoint to MLX (optionally quantized), streaming shard by shard.",
    )
    p.add_argument("--hf-path", "--model", required=True, help="source folder or Hugging Face repo id")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize (4 bits unless --q-bits says otherwise)")
    p.add_argument("--q-bits", type=int, choices=QUANT_BITS, help="bits per weight; implies -q")
    p.add_argument("--q-group-size", type=int, choices=GROUP_SIZES, default=64, help="quantization group size")
    p.add_argument("--dtype", choices=DTYPES, help="float dtype of the output (default: the config's)")
    p.add_argument(
        "--recipe",
        choices=RECIPES,
        help="default: gates at 8 bits, the rest at --q-bits; mixed: also embeddings/head at 8, "
        "attention and shared experts at 6 (see qnext_mlx/checkpoint/quant_recipes.py); implies -q",
    )
    p.add_argument("--drop-mtp", action="store_true", help="leave out the MTP head (mtp.* tensors)")
    p.add_argument("--upload-repo", help="push the result to this Hugging Face repo")
    p.add_argument("--force", action="store_true", help="replace --mlx-path if it exists")
    p.add_argument(
        "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="output shard size, e.g. 5GB or 500MB (default 5GB)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_rope_arguments(p)  # written into the output's config.json
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    bits = args.q_bits if args.q_bits is not None else (4 if args.quantize or args.recipe else None)

    def run() -> int:
        convert(
            args.hf_path,
            args.mlx_path,
            q_bits=bits,
            q_group_size=args.q_group_size,
            dtype=args.dtype,
            recipe=args.recipe,
            drop_mtp=args.drop_mtp,
            upload_repo=args.upload_repo,
            force=args.force,
            max_shard_size=args.max_shard_size,
            progress=not args.quiet,
            rope_args=args,
        )
        return 0

    return run_cli(run, interrupted="error: interrupted")


if __name__ == "__main__":
    raise SystemExit(main())
