"""``python -m qnext_mlx.generate``: streamed generation from the command line.

    python -m qnext_mlx.generate --prompt "Why is the sky blue?" [--model PATH_OR_REPO]

Text goes to stdout (the model's reasoning dimmed, or between ``[thinking]``
markers without colour; ``--hide-thinking`` leaves it out), stats to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .checkpoint.paths import REAL_MODEL_REPO, resolve_model_arg
from .checkpoint.reader import load
from .checkpoint.sharded import describe
from .cli import (
    MODEL_HELP,
    ParallelRun,
    Parser,
    add_kv_arguments,
    add_parallel_arguments,
    add_reply_arguments,
    add_rope_arguments,
    apply_rope_arguments,
    ranged,
    run_cli,
)
from .engine import speculative
from .engine.primitives import DEFAULT_PREFILL_STEP_SIZE
from .engine.stream import GenerationResponse, stream_generate
from .engine.text import ThinkFilter, encode_prompt, format_prompt, prompt_opens_think, static_prefix_len
from .errors import QnextError
from .model import ModelCache
from .ui.terminal import ReasoningPrinter


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m qnext_mlx.generate",
        description="Generate text with Qwen3-Next in MLX. Text goes to stdout, stats to stderr.",
    )
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="the prompt; '-' reads it from stdin")
    p.add_argument("--system", help="system message (chat template)")
    p.add_argument("--no-chat-template", action="store_true", help="send the prompt as is, without the chat template")
    add_reply_arguments(p, max_tokens_help="most tokens to generate", seed_help="random seed (reproducible sampling)")
    p.add_argument(
        "--repetition-penalty",
        type=ranged(float, 0, lo_open=True),
        default=None,
        help="multiplicative penalty over the last 20 tokens (default off)",
    )
    add_kv_arguments(p)
    p.add_argument(
        "--prefill-step-size",
        type=ranged(int, 1),
        default=DEFAULT_PREFILL_STEP_SIZE,
        help=f"prompt chunk size (default {DEFAULT_PREFILL_STEP_SIZE})",
    )
    p.add_argument(
        "--prompt-cache",
        metavar="FILE",
        help="load the cache from FILE when it exists, reuse it, and save it back afterwards",
    )
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--hide-thinking", action="store_true", help="do not print the model's reasoning (<think> spans)")
    p.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="show the reasoning dimmed (auto: when the output is a terminal); without colour it is "
        "marked [thinking] ... [/thinking]",
    )
    p.add_argument(
        "--mtp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="speculative decoding with the model's MTP head (same output); default: on when the "
        "model has one and MTP is faster on this backend (GPU: on, CPU backend: off)",
    )
    p.add_argument(
        "--num-draft-tokens",
        type=ranged(int, 1, speculative.MAX_DRAFT_TOKENS),
        default=None,
        metavar="K",
        help=f"MTP draft tokens per step, 1..{speculative.MAX_DRAFT_TOKENS} "
        f"(default {speculative.DEFAULT_NUM_DRAFT_TOKENS})",
    )
    p.add_argument("--verbose", action="store_true", help="also print model, prompt and cache details to stderr")
    add_rope_arguments(p)
    add_parallel_arguments(p)
    return p


def read_prompt(arg: str) -> str:
    if arg != "-":
        return arg
    text = sys.stdin.read()
    if not text.strip():
        raise QnextError("--prompt - read an empty prompt from stdin")
    return text


def open_cache(args, model) -> ModelCache:
    if args.prompt_cache and Path(args.prompt_cache).exists():
        cache = ModelCache.load(args.prompt_cache, model)
        if args.kv_bits is not None and cache.kv_bits != args.kv_bits:
            raise QnextError(
                f"{args.prompt_cache} holds a KV cache with kv_bits={cache.kv_bits}; "
                f"drop --kv-bits or use another --prompt-cache file"
            )
        return cache
    try:
        return model.make_cache(kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    except ValueError as e:
        raise QnextError(str(e)) from None


def _run(args) -> int:
    with ParallelRun(args.parallel) as run:
        return _generate(args, run)


def _generate(args, run: ParallelRun) -> int:
    prompt = run.share(read_prompt(args.prompt) if run.leader else None)
    path, is_demo = resolve_model_arg(args.model)
    if is_demo and run.leader:
        print(
            "note: running the bundled demo model (a tiny model for trying the tools offline). "
            f"For the real model pass --model {REAL_MODEL_REPO} or a local MLX conversion.",
            file=sys.stderr,
        )
    # a folder without tokenizer files: ModelNotFoundError
    model, tokenizer = load(path, parallel=args.parallel, group=run.group)
    apply_rope_arguments(args, model)  # before the cache: its fingerprint includes the RoPE scaling
    if args.mtp and not model.has_mtp:
        raise QnextError(f"{path} has no MTP head (no mtp.* tensors; converted without it?); drop --mtp")
    if run.group is not None:  # what rank 0 would pick by chance or by timing, every rank picks
        args.seed = run.share(args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little"))
        args.mtp = run.share(args.mtp if args.mtp is not None else speculative.mtp_default(model))
    text = format_prompt(tokenizer, prompt, args.system, chat_template=not args.no_chat_template)
    ids = encode_prompt(tokenizer, text)
    cache = open_cache(args, model)
    if args.verbose and run.leader:
        print(f"model: {path} ({describe(model.parallel)})", file=sys.stderr)
        print(f"prompt ({len(ids)} tokens):\n{text}", file=sys.stderr)
        print(f"cache: {cache.offset} tokens held, kv_bits={cache.kv_bits}", file=sys.stderr)
    think = ThinkFilter(inside=prompt_opens_think(text))
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    show = ReasoningPrinter(sys.stdout, color, hide=args.hide_thinking)
    checkpoints = [] if args.no_chat_template else [static_prefix_len(tokenizer, prompt, args.system)]
    last = None
    interrupted = False
    try:
        for last in stream_generate(
            model,
            tokenizer,
            ids,
            max_tokens=args.max_tokens,
            temp=args.temp,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            presence_penalty=args.presence_penalty,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            prompt_cache=cache,
            prefill_step_size=args.prefill_step_size,
            stop_strings=args.stop,
            checkpoint_at=checkpoints,
            mtp=args.mtp,
            num_draft_tokens=args.num_draft_tokens,
        ):
            show.write(think.feed_parts(last.text))
    except KeyboardInterrupt:
        interrupted = True
    show.write(think.flush_parts())
    show.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None and run.leader:
        cached = f" ({last.cached_tokens} cached)" if last.cached_tokens else ""
        print(
            f"Prompt: {last.prompt_tokens} tokens{cached}, {last.prompt_tps:.1f} tok/s | "
            f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"Peak memory: {last.peak_memory:.2f} GB{mtp_stats_text(last)}",
            file=sys.stderr,
        )
    if args.prompt_cache and run.leader:
        cache.save(args.prompt_cache)
        if args.verbose:
            print(f"saved the prompt cache ({cache.offset} tokens) to {args.prompt_cache}", file=sys.stderr)
    if interrupted:
        held = f"; {args.prompt_cache} holds the {cache.offset} tokens processed" if args.prompt_cache else ""
        print(f"interrupted{held}", file=sys.stderr)
        return 130
    return 0


def mtp_stats_text(r: GenerationResponse) -> str:
    """`` | MTP K=2: 71.3% accepted, 2.43 tokens/step`` when MTP ran, else empty."""
    if not r.draft_tokens:
        return ""
    return (
        f" | MTP K={r.draft_tokens}: {100 * (r.acceptance_rate or 0):.1f}% accepted, "
        f"{r.mean_accepted_length or 0:.2f} tokens/step"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status (2 for user errors, 130 when interrupted)."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args))  # Ctrl-C there: while loading, before generation started


if __name__ == "__main__":
    sys.exit(main())
