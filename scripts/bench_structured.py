#!/usr/bin/env python3
"""Constrained decoding's cost: our server's tok/s with and without a JSON-schema grammar.

    python scripts/bench_structured.py [--clients 1,8] [--tokens 128] [--out scripts/results/bench-structured]

One ``qnext_mlx.server`` process on the bundled demo model (127.0.0.1), driven through the
``openai`` client by 1 and 8 concurrent streaming clients, each sending ``--requests`` chat
requests of ``--tokens`` tokens at temperature 0.7 (seeded):

* unconstrained: free text, end-of-sequence tokens biased away (``logit_bias`` -100) so every
  reply has exactly ``--tokens`` tokens;
* constrained: ``response_format`` ``json_schema`` (an object holding an array of at least 500
  bounded integers), so the grammar masks every token and the reply also runs to ``--tokens``.

Per mode and client count: aggregate generated tok/s (all tokens over the run's wall time)
and the per-request decode rate (tokens after the first over the time from first to last);
then constrained / unconstrained. The per-token mask cost at the real 151,936-token
vocabulary is ``scripts/bench_grammar.py``'s. JSON + PNG written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_serving import Server, concurrently  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "values": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 500}
    },  # fmt: skip
    "required": ["values"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "List many numbers, as JSON."}]


def one_request(client, model: str, mode: str, tokens: int, seed: int, eos_bias: Dict[str, int]) -> dict:
    extra = {}
    if mode == "constrained":
        extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "values", "schema": SCHEMA}}
    else:
        extra["logit_bias"] = eos_bias
    t0 = time.perf_counter()
    stamps: List[float] = []
    usage = None
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=tokens, temperature=0.7,
                                            seed=seed, stream=True, stream_options={"include_usage": True},
                                            **extra)  # fmt: skip
    text = []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
    n = usage.completion_tokens if usage else len(stamps)
    rate = (n - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
    return {"tokens": n, "ttft": stamps[0] - t0 if stamps else None, "decode_tok_s": rate, "text": "".join(text)}


def run(url: str, model: str, mode: str, clients: int, requests: int, tokens: int, eos_bias) -> dict:
    def one(client, k: int, r: int) -> dict:
        return one_request(client, model, mode, tokens, seed=100 * k + r, eos_bias=eos_bias)

    results, wall = concurrently(url, clients, requests, one)
    if mode == "constrained":  # what the grammar let through parses as far as it got
        assert all(r["text"].startswith('{"values": [') for r in results), results[0]["text"][:80]
    total = sum(r["tokens"] for r in results)
    rates = [r["decode_tok_s"] for r in results if r["decode_tok_s"]]
    return {"mode": mode, "clients": clients, "requests": len(results), "tokens": total, "wall_s": wall,
            "tok_s": total / wall, "decode_tok_s_median": statistics.median(rates) if rates else None}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1,8")
    p.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "bench-structured")
    args = p.parse_args(argv)
    import mlx.core as mx

    from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR
    from qnext_mlx.checkpoint.reader import load

    _, tokenizer = load(DEMO_MODEL_DIR)
    eos_bias = {str(t): -100 for t in tokenizer.eos_token_ids}
    clients = [int(c) for c in args.clients.split(",")]
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "mlx": mx.__version__,
                    "loadavg_start": list(os.getloadavg())},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": [],
    }  # fmt: skip
    server = Server("qnext", DEMO_MODEL_DIR, args.tokens)
    try:
        run(server.url, server.model_id, "constrained", 1, 1, 16, eos_bias)  # warm-up: first grammar, first pass
        for c in clients:
            for mode in ("unconstrained", "constrained"):
                r = run(server.url, server.model_id, mode, c, args.requests, args.tokens, eos_bias)
                result["runs"].append(r)
                print(f"{c} client(s), {mode:13s}: {r['tok_s']:6.1f} tok/s aggregate, "
                      f"{r['decode_tok_s_median']:6.1f} tok/s per request", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        server.close()
    result["ratios"] = {}
    for c in clients:
        free, cons = (next(r for r in result["runs"] if r["clients"] == c and r["mode"] == m)
                      for m in ("unconstrained", "constrained"))  # fmt: skip
        result["ratios"][str(c)] = {
            "aggregate": cons["tok_s"] / free["tok_s"],
            "per_request": cons["decode_tok_s_median"] / free["decode_tok_s_median"],
        }
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out.with_suffix(".json"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = range(len(clients))
        for i, mode in enumerate(("unconstrained", "constrained")):
            vals = [next(r["tok_s"] for r in result["runs"] if r["clients"] == c and r["mode"] == mode)
                    for c in clients]  # fmt: skip
            ax.bar([x + (i - 0.5) * 0.4 for x in xs], vals, 0.4, label=mode)
        ax.set_xticks(list(xs), [f"{c} client(s)" for c in clients])
        ax.set_ylabel("aggregate tok/s")
        ax.set_title("qnext-mlx server, demo model: JSON-schema grammar vs free text", fontsize=10)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    for c, r in result["ratios"].items():
        print(f"{c} client(s): constrained / unconstrained = {r['aggregate']:.3f} aggregate, "
              f"{r['per_request']:.3f} per request")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
