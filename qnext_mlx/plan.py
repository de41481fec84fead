"""``python -m qnext_mlx.plan``: will a Qwen3-Next model run at a given context on this machine?

    python -m qnext_mlx.plan --model PATH_OR_REPO_OR_CONFIG --context N [--kv-bits B]
        [--q-bits B] [--prefill-step-size N] [--mtp] [--backend metal|cpu] [--budget-gib G] [--json]
        [--ranks N --parallel tensor|pipeline] [--bandwidth-gbs G]

What is counted and how: :mod:`qnext_mlx.engine.plan`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from .checkpoint.paths import load_config, resolve_model_path
from .cli import Parser, add_kv_arguments, add_rope_arguments, apply_rope_arguments, parse_token_count, ranged
from .engine.plan import DEFAULT_BANDWIDTH_GBS, DEFAULT_CHUNK, PARALLEL_MODES, PARALLEL_RANKS, GiB, make_plan, render
from .errors import QnextError
from .model import ModelConfig


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m qnext_mlx.plan`` (bad flags raise :class:`ConfigError`)."""
    p = Parser(
        raise_errors=True,
        prog="python -m qnext_mlx.plan",
        description="Memory needed to run a Qwen3-Next model at a given context, and whether it fits here.",
    )
    p.add_argument("--model", required=True, help="model folder, Hugging Face repo id, or a config.json file")
    p.add_argument(
        "--context", required=True, type=parse_token_count, help="context length in tokens (e.g. 262144, 256K, 1M)"
    )
    add_kv_arguments(p, help="quantized KV cache (default 16-bit)")
    p.add_argument(
        "--q-bits",
        type=int,
        choices=[2, 3, 4, 5, 6, 8],
        default=None,
        help="weight bits for the estimate when the model has no safetensors here (default: config's, else 16)",
    )
    p.add_argument(
        "--prefill-step-size",
        "--prefill-chunk",
        dest="prefill_chunk",
        type=parse_token_count,
        default=DEFAULT_CHUNK,
        help=f"prompt tokens per prefill step, as given to generate (default {DEFAULT_CHUNK})",
    )
    p.add_argument("--mtp", action="store_true", help="include the MTP head's KV cache (speculative decoding with MTP)")
    p.add_argument(
        "--fused-attention",
        action="store_true",
        help="assume a fused (flash) attention prefill kernel: no score matrix in memory",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "metal", "cpu"],
        default="auto",
        help="plan for MLX's Metal or CPU backend (default: this machine's); the CPU backend keeps "
        "unquantized experts in float32 and unpacks quantized KV to float32 in attention",
    )
    p.add_argument(
        "--budget-gib",
        type=float,
        default=None,
        help="plan against this much memory instead of this machine's (e.g. to plan for another Mac)",
    )
    p.add_argument(
        "--ranks",
        type=int,
        choices=list(PARALLEL_RANKS),
        default=1,
        help="plan for this many processes (Macs) running one model (default 1); needs --parallel",
    )
    p.add_argument(
        "--parallel",
        choices=list(PARALLEL_MODES),
        default=None,
        help="how the ranks split the model: tensor (heads and intermediate dims) or pipeline (layers)",
    )
    p.add_argument(
        "--bandwidth-gbs",
        type=ranged(float, 0, lo_open=True),
        default=DEFAULT_BANDWIDTH_GBS,
        help=f"memory bandwidth per Mac for the predicted decode rate (default {DEFAULT_BANDWIDTH_GBS:g} GB/s, "
        "an M-series Max)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_rope_arguments(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    try:
        args = p.parse_args(argv)
        model_path = None
        path = Path(args.model).expanduser()
        if path.is_file():
            cfg = load_config(path)
            model_path = path.parent
        else:
            model_path = resolve_model_path(args.model)
            cfg = ModelConfig.from_file(model_path)
        cfg = apply_rope_arguments(args, cfg, log=None)  # the window the run would be configured with
        budget = int(args.budget_gib * GiB) if args.budget_gib else None
        plan = make_plan(
            cfg,
            args.context,
            model_name=str(args.model),
            model_path=model_path,
            kv_bits=args.kv_bits,
            q_bits=args.q_bits,
            chunk=args.prefill_chunk,
            mtp=args.mtp,
            kv_group_size=args.kv_group_size,
            fused_attention=args.fused_attention,
            cpu_backend=None if args.backend == "auto" else args.backend == "cpu",
            budget=budget,
            ranks=args.ranks,
            parallel=args.parallel,
            bandwidth_gbs=args.bandwidth_gbs,
        )
    except QnextError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(plan), indent=2))
    else:
        print(render(plan, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
