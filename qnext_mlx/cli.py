"""What the command-line entry points share: the parser, value types, flags and the error wrapper.

Entry modules (``python -m qnext_mlx.generate``, ``.convert``, ``.server``, ``.chat``,
``.app``, ``.plan``, ``.doctor``) hold only their command line; the flags several of
them take are defined here once:

* :class:`Parser` (one ``error:`` line and exit status 2 for a bad flag) and
  :func:`ranged` (numbers in a range);
* :func:`run_cli`: a :class:`~qnext_mlx.errors.QnextError` becomes one ``error:`` line
  (exit 2), Ctrl-C exit 130;
* :func:`add_sampling_arguments`, :func:`add_chat_options` (chat and app);
* the long-context flags: :func:`add_rope_arguments`, :func:`apply_rope_arguments`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Optional, Union

from .checkpoint.paths import load_config
from .checkpoint.sharded import init_group
from .engine.distributed import Watchdog, broadcast_object, is_leader
from .engine.sampling import DEFAULT_MAX_TOKENS, DEFAULT_MIN_P, DEFAULT_TEMP, DEFAULT_TOP_K, DEFAULT_TOP_P
from .errors import ConfigError, QnextError
from .model import ModelConfig
from .model.rope import FACTOR_STEP, apply_rope_options
from .serve.chat_session import SamplingSettings

__all__ = [
    "Parser",
    "MODEL_HELP",
    "add_chat_options",
    "add_kv_arguments",
    "add_reply_arguments",
    "add_rope_arguments",
    "add_sampling_arguments",
    "apply_rope_arguments",
    "parse_factor",
    "parse_token_count",
    "print_to_stderr",
    "ranged",
    "run_cli",
    "settings_from_args",
]


def run_cli(body: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run a command-line entry point's ``body``; returns its exit status.

    A :class:`QnextError` prints ``error: <message>`` (one line, no traceback)
    and gives 2; Ctrl-C prints ``interrupted`` and gives 130.
    """
    try:
        return body()
    except QnextError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag or value as one ``error: ...`` line and exit status 2
    (no usage dump); with ``raise_errors=True`` it raises :class:`~qnext_mlx.errors.ConfigError`
    instead, for a ``main`` that reports every error itself (``plan``)."""

    def __init__(self, *args, raise_errors: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.raise_errors = raise_errors

    def error(self, message):  # one line, no usage dump
        if self.raise_errors:
            raise ConfigError(message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def ranged(kind, lo=None, hi=None, lo_open=False):
    """argparse type: a ``kind`` (int/float) in [lo, hi] (or (lo, hi] with ``lo_open``)."""

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        too_low = lo is not None and (v <= lo if lo_open else v < lo)
        too_high = hi is not None and v > hi
        if too_low or too_high or v != v:  # v != v: NaN
            bounds = [f"{'>' if lo_open else '>='} {lo}"] if lo is not None else []
            bounds += [f"<= {hi}"] if hi is not None else []
            raise argparse.ArgumentTypeError(f"must be {' and '.join(bounds)}, got {text}")
        return v

    return parse


def add_sampling_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--temp``, ``--top-p``, ``--top-k`` and ``--min-p`` with the model card's defaults
    and their ranges (``prefix`` starts each help text, e.g. the server's "default ")."""
    p.add_argument(
        "--temp",
        type=ranged(float, 0),
        default=DEFAULT_TEMP,
        help=f"{prefix}sampling temperature; 0 = greedy (default {DEFAULT_TEMP})",
    )
    p.add_argument(
        "--top-p",
        type=ranged(float, 0, 1, lo_open=True),
        default=DEFAULT_TOP_P,
        help=f"{prefix}nucleus sampling (default {DEFAULT_TOP_P})",
    )
    p.add_argument(
        "--top-k", type=ranged(int, 0), default=DEFAULT_TOP_K, help=f"{prefix}top-k, 0 = off (default {DEFAULT_TOP_K})"
    )
    p.add_argument(
        "--min-p",
        type=ranged(float, 0, 1),
        default=DEFAULT_MIN_P,
        help=f"{prefix}minimum probability relative to the top token (default {DEFAULT_MIN_P:g})",
    )


MODEL_HELP = "model folder or Hugging Face repo id (default: the bundled demo model)"


def add_reply_arguments(
    p: argparse.ArgumentParser, max_tokens_help: str = "most tokens per reply", seed_help: str = "random seed"
) -> None:
    """``--max-tokens``, the sampling flags, ``--presence-penalty`` and ``--seed`` (generate, chat)."""
    p.add_argument("--max-tokens", type=ranged(int, 1), default=DEFAULT_MAX_TOKENS,
                   help=f"{max_tokens_help} (default {DEFAULT_MAX_TOKENS})")  # fmt: skip
    add_sampling_arguments(p)
    p.add_argument("--presence-penalty", type=ranged(float, -2, 2), default=0.0,
                   help="penalty for tokens already generated, 0..2 against repetition (default 0)")  # fmt: skip
    p.add_argument("--seed", type=ranged(int, 0, 2**64 - 1), default=None, help=seed_help)


def add_kv_arguments(
    p: argparse.ArgumentParser, help: str = "quantize the attention KV cache", group_size: bool = True
) -> None:
    """``--kv-bits {4,8}`` and, with ``group_size``, ``--kv-group-size {32,64,128}``."""
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help=help)
    if group_size:
        p.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=64,
                       help="group size of the quantized KV cache (default 64)")  # fmt: skip


def add_chat_options(p: argparse.ArgumentParser) -> None:
    """Model and sampling options shared by the terminal chat and the desktop app's first start."""
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--system", help="system message")
    add_reply_arguments(p)
    add_kv_arguments(p, group_size=False)
    # --max-context N: the conversation limit, and YaRN when N exceeds the native window
    add_rope_arguments(p)


def settings_from_args(args: argparse.Namespace) -> SamplingSettings:
    """The :class:`SamplingSettings` of :func:`add_chat_options`' flags."""
    return SamplingSettings(
        temp=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        presence_penalty=args.presence_penalty,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )


# ---------------------------------------------------------------- long context
def parse_factor(text: str) -> float:
    """argparse type: a finite number >= 1 (a YaRN factor)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}") from None
    if not math.isfinite(v) or v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return v


def parse_token_count(text: str) -> int:
    """A positive token count; accepts 262144, 256K / 256k (x1024), 1M (x1024^2)."""
    t = text.strip()
    mult = 1
    if t[-1:] in ("k", "K"):
        mult, t = 1024, t[:-1]
    elif t[-1:] in ("m", "M"):
        mult, t = 1024 * 1024, t[:-1]
    try:
        v = int(t.replace("_", "").replace(",", "")) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive token count (e.g. 262144, 256K, 1M), got {text!r}"
        ) from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive token count, got {text!r}")
    return v


def add_rope_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the long-context options to an entry point's parser.

    ``--rope-scaling {yarn,none}``, ``--rope-factor F``, ``--original-max-position-embeddings N``
    and ``--max-context N`` (picks the smallest adequate factor). They override
    whatever RoPE scaling config.json has; see :func:`apply_rope_arguments`.
    """
    g = parser.add_argument_group(
        "long context (RoPE scaling; overrides config.json)",
        "The model is trained on 262,144 positions; YaRN stretches that. Use the smallest factor "
        "your workload needs: static YaRN can hurt short texts.",
    )
    g.add_argument(
        "--rope-scaling",
        choices=["yarn", "none"],
        default=None,
        help="'yarn' to enable YaRN (with --rope-factor or --max-context), 'none' to turn "
        "off scaling that config.json enables",
    )
    ex = g.add_mutually_exclusive_group()
    ex.add_argument(
        "--rope-factor",
        type=parse_factor,
        default=None,
        metavar="F",
        help="YaRN factor: context = F x original window (4.0 -> about 1M tokens, 2.0 -> 512K)",
    )
    ex.add_argument(
        "--max-context",
        type=parse_token_count,
        default=None,
        metavar="N",
        help="tokens you need (e.g. 1000000 or 1M): picks the smallest YaRN factor, in steps of "
        f"{FACTOR_STEP}, that covers N, or none if N fits the native window; chat, server "
        "and app also take N as the longest prompt + reply",
    )
    g.add_argument(
        "--original-max-position-embeddings",
        type=parse_token_count,
        default=None,
        metavar="N",
        help="the pre-training window YaRN stretches (default: from config.json, 262144 for Qwen3-Next)",
    )


def print_to_stderr(message: str) -> None:
    """Print one line to stderr (the default place for a command's notes)."""
    print(message, file=sys.stderr)


def apply_rope_arguments(
    args: argparse.Namespace,
    target: Union[ModelConfig, str, os.PathLike, object],
    log: Optional[Callable[[str], None]] = print_to_stderr,
) -> ModelConfig:
    """Apply the long-context flags (:func:`add_rope_arguments`) to a loaded model (its RoPE
    modules are rebuilt in place), a :class:`ModelConfig`, or a model folder / ``config.json``
    / repo id; returns the effective config. ``log`` gets the one-line summary of the
    choice (default: stderr; None: silent); see :func:`qnext_mlx.model.rope.apply_rope_options`."""
    if isinstance(target, (str, os.PathLike)):
        target = load_config(target)
    return apply_rope_options(args, target, log=log)


# ------------------------------------------------------------------ parallel runs
def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """``--parallel {tensor,pipeline}``: split the model over the ranks ``mlx.launch`` started."""
    p.add_argument(
        "--parallel",
        choices=["tensor", "pipeline"],
        default=None,
        help="split the model over the ranks mlx.launch started (see docs/distributed.md); rank 0 prints or "
        "serves, the others follow",
    )


class ParallelRun:
    """One command's place in a parallel run (``--parallel``), or a single process.

    Attributes:
        mode: ``"tensor"``, ``"pipeline"`` or None (one process).
        group: the ``mx.distributed`` group (None for one process).
        leader: True on rank 0 (and for one process): it prints or serves.
    """

    def __init__(self, mode: Optional[str]):
        self.mode = mode
        self.group = None
        self.watchdog = None
        if mode is not None:
            self.group = init_group()
            self.watchdog = Watchdog(self.group).start()
        self.leader = is_leader(self.group)
        if not self.leader:  # the followers print nothing but errors
            sys.stdout = open(os.devnull, "w")

    def share(self, value):
        """Rank 0's ``value`` on every rank (as is for one process)."""
        return broadcast_object(value, self.group)

    def finish(self, status: int) -> int:
        """This rank ends (normally or with a reported error): the other ranks then give it
        a heartbeat timeout to end too instead of failing at once."""
        if self.watchdog is not None:
            self.watchdog.finish()
        return status

    def __enter__(self) -> "ParallelRun":
        return self

    def __exit__(self, *exc) -> None:
        self.finish(0)
