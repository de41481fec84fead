#!/usr/bin/env python
"""Decode speed with and without MTP speculative decoding, per number of drafts K.

    python scripts/bench_mtp.py                        # the demo model, K = 1..4
    python scripts/bench_mtp.py --model PATH --ks 2 3 --max-tokens 256 --json OUT

For each K (and once without MTP) the same prompt is decoded ``--max-tokens``
tokens on a fresh cache, ``--reps`` times, after one short warm-up run of every
path; the best run counts (the machine may be shared). Timed is the decode only:
from the first generated token to the last (the prefill, MTP prefill included, is
left out), as wall-clock tok/s and as
tokens per second of process CPU time (steadier on a shared machine; it counts
MLX's worker thread too, so it ignores the overlap of graph building and compute). Greedy by default, so every run
must produce the same tokens as plain decoding, which is checked. Reported per K:
tok/s, speedup over plain decoding, draft acceptance rate and mean accepted length
(tokens per verify pass, accepted drafts + 1).

Without ``--model`` the bundled demo model is used when installed, otherwise a
random tiny checkpoint with an MTP head (whose drafts are almost never accepted:
that shows the overhead, not the gain).

``bench_mtp()`` is the entry point for ``scripts/bench.py --mtp``; it returns a
JSON-able dict, and ``format_table()`` renders it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import qnext_mlx  # noqa: E402
from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR  # noqa: E402
from qnext_mlx.engine.decode import generate_tokens  # noqa: E402
from qnext_mlx.engine.speculative import MTPDecoding  # noqa: E402
from qnext_mlx.engine.text import format_prompt  # noqa: E402

DEFAULT_PROMPT = "Write a short story about a robot who learns to paint, in about 200 words."


def _decode(
    model,
    prompt_ids: Sequence[int],
    max_tokens: int,
    k: Optional[int],
    temp: float,
    seed: int,
    top_p: float = 1.0,
    top_k: int = 0,
) -> Dict:
    """One decode run; ``k=None`` is plain decoding. Returns tokens, decode time and stats."""
    mx.random.seed(seed)
    cache = model.make_cache()
    mtp = MTPDecoding(num_draft_tokens=k, temp=temp, top_p=top_p, top_k=top_k) if k else None
    sampler = None
    if not k and temp > 0:
        from mlx_lm.sample_utils import make_sampler

        sampler = make_sampler(temp=temp, top_p=top_p, top_k=top_k)
    tokens: List[int] = []
    first = first_cpu = None
    for t, _ in generate_tokens(model, cache, prompt_ids, max_tokens=max_tokens, mtp=mtp, sampler=sampler):
        if first is None:
            first, first_cpu = time.perf_counter(), time.process_time()
        tokens.append(t)
    elapsed = time.perf_counter() - first
    cpu = time.process_time() - first_cpu
    out = {
        "tokens": tokens,
        "seconds": elapsed,
        "tok_s": (len(tokens) - 1) / elapsed if elapsed > 0 else 0.0,
        "cpu_tok_s": (len(tokens) - 1) / cpu if cpu > 0 else 0.0,
    }
    if mtp:
        out.update(acceptance_rate=mtp.stats.acceptance_rate, mean_accepted_length=mtp.stats.mean_accepted_length)
    return out


def bench_mtp(
    model,
    prompt_ids: Sequence[int],
    ks: Sequence[int] = (1, 2, 3, 4),
    max_tokens: int = 256,
    reps: int = 2,
    temp: float = 0.0,
    seed: int = 0,
    log=print,
    top_p: float = 1.0,
    top_k: int = 0,
) -> Dict:
    """tok/s of plain decoding and of MTP decoding for each K in ``ks`` (best of ``reps``).

    Args:
        model: a loaded qnext_mlx model with an MTP head.
        prompt_ids: the prompt's token ids.
        temp, top_p, top_k: sampling settings; temp 0 = greedy (MTP output is then
            checked to equal plain output).
    Returns:
        ``{"device", "prompt_tokens", "max_tokens", "plain": {"tok_s"}, "mtp": {K: {"tok_s",
        "speedup", "acceptance_rate", "mean_accepted_length"}}}``.
    """
    if not model.has_mtp:
        raise ValueError("the model has no MTP head")
    runs = {None: None}
    for k in ks:
        runs[k] = None
    # Warm up every path that is timed (plain and each K: each has graphs of its own
    # sizes to build, and on a GPU kernels to compile and select), so that no first-use
    # cost falls inside a timing.
    for k in runs:
        _decode(model, prompt_ids, min(8, max_tokens), k, temp, seed, top_p, top_k)
    best_cpu = {k: 0.0 for k in runs}
    for rep in range(reps):
        for k in runs:  # alternate, so a change of machine load hits all alike
            r = _decode(model, prompt_ids, max_tokens, k, temp, seed, top_p, top_k)
            if runs[k] is None or r["tok_s"] > runs[k]["tok_s"]:
                runs[k] = r
            best_cpu[k] = max(best_cpu[k], r["cpu_tok_s"])
            label = "plain" if k is None else f"MTP K={k}"
            log(f"rep {rep + 1}/{reps} {label}: {r['tok_s']:.1f} tok/s ({r['cpu_tok_s']:.1f} per CPU second)")
    plain = runs[None]
    result = {
        "device": str(mx.default_device()),
        "platform": platform.platform(),
        "prompt_tokens": len(prompt_ids),
        "max_tokens": max_tokens,
        "temp": temp,
        "top_p": top_p,
        "top_k": top_k,
        "plain": {"tok_s": plain["tok_s"], "cpu_tok_s": best_cpu[None]},
        "mtp": {},
    }
    for k in ks:
        r = runs[k]
        if temp == 0 and r["tokens"] != plain["tokens"]:
            raise AssertionError(f"MTP K={k} greedy output differs from plain decoding")
        result["mtp"][str(k)] = {
            "tok_s": r["tok_s"],
            "speedup": r["tok_s"] / plain["tok_s"] if plain["tok_s"] else 0.0,
            "cpu_tok_s": best_cpu[k],
            "cpu_speedup": best_cpu[k] / best_cpu[None] if best_cpu[None] else 0.0,
            "acceptance_rate": r["acceptance_rate"],
            "mean_accepted_length": r["mean_accepted_length"],
        }
    return result


def format_table(result: Dict) -> str:
    lines = [
        f"device {result['device']}, prompt {result['prompt_tokens']} tokens, "
        f"{result['max_tokens']} generated, temp {result['temp']} top_p {result['top_p']} top_k {result['top_k']}",
        f"{'':>10} {'tok/s':>8} {'speedup':>8} {'tok/cpu-s':>10} {'speedup':>8} {'accepted':>9} {'tok/step':>9}",
        f"{'plain':>10} {result['plain']['tok_s']:>8.1f} {1.0:>8.2f} {result['plain']['cpu_tok_s']:>10.1f} "
        f"{1.0:>8.2f} {'':>9} {'':>9}",
    ]
    for k, r in result["mtp"].items():
        lines.append(
            f"{'MTP K=' + k:>10} {r['tok_s']:>8.1f} {r['speedup']:>8.2f} {r['cpu_tok_s']:>10.1f} "
            f"{r['cpu_speedup']:>8.2f} {100 * r['acceptance_rate']:>8.1f}% {r['mean_accepted_length']:>9.2f}"
        )
    return "\n".join(lines)


def _tiny_mtp_checkpoint() -> Path:
    sys.path.insert(0, str(REPO / "scripts"))
    import make_tiny_checkpoint as mtc

    out = Path(tempfile.mkdtemp(prefix="qnext-bench-mtp-"))
    model, head = mtc.build(mtc.tiny_config(), seed=0, mtp=True)
    mtc.save(model, head, out, dtype="float32")
    return out


def load_for_bench(path: Optional[str], prompt: str):
    """``(model, prompt_ids, description)``: ``path``, else the demo model, else a tiny random one."""
    if path is None and (DEMO_MODEL_DIR / "model.safetensors").exists():
        path = str(DEMO_MODEL_DIR)
    if path is None:
        model = qnext_mlx.load_model(_tiny_mtp_checkpoint())
        ids = list(range(1, 33))
        return model, ids, "random tiny checkpoint (no demo model installed)"
    model, tokenizer = qnext_mlx.load(path)
    text = format_prompt(tokenizer, prompt) if getattr(tokenizer, "chat_template", None) else prompt
    return model, tokenizer.encode(text, add_special_tokens=False), path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the demo model)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4], help="draft counts to measure")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--temp", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args(argv)
    model, ids, what = load_for_bench(args.model, args.prompt)
    print(f"model: {what}", file=sys.stderr)
    result = bench_mtp(
        model,
        ids,
        args.ks,
        args.max_tokens,
        args.reps,
        args.temp,
        log=lambda m: print(m, file=sys.stderr),
        top_p=args.top_p,
        top_k=args.top_k,
    )
    try:  # a path inside the repository is recorded relative to it
        what = str(Path(what).resolve().relative_to(REPO))
    except (ValueError, OSError):
        pass
    result["model"] = what
    try:
        result["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    print(format_table(result))
    if args.json:
        tmp = args.json.with_name(f".{args.json.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
