#!/usr/bin/env python3
"""Grammar engines at Qwen3-Next's real vocabulary: the per-token cost of the next-token mask.

    python scripts/bench_grammar.py [--out scripts/results/bench-grammar]

The vocabulary is Qwen's own byte-level BPE (151,643 tokens, the ``qwen.tiktoken`` file
that Qwen-Agent ships; Qwen3-Next's 151,936 rows are these plus special and padding ids).
For each JSON schema below, a valid document is tokenized with that BPE and fed one token at
a time; before each token the engine computes the mask of allowed next tokens. Reported: the
mask time per token (median, p95, max) and the grammar compile time, for llguidance and, when
importable, xgrammar (which needs torch and triton at run time: a test-only dependency here).
JSON + PNG written to ``--out``.
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
VOCAB_ROWS = 151936  # Qwen3-Next's embedding rows

SCHEMAS: Dict[str, dict] = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "enum": ["A", "B", "C", "D"]},
            "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
            "evidence": {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"source": {"type": "string"}, "verified": {"type": "boolean"}},
                    "required": ["source", "verified"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["answer", "confidence", "evidence"],
        "additionalProperties": False,
    },
}
DOCUMENTS = {
    "flat": {"name": "Abraham son of Terah, of Ur of the Chaldees", "age": 175, "ok": True},
    "nested": {
        "answer": "C",
        "confidence": 87,
        "evidence": [
            {"source": "Genesis 11:31, the journey out of Ur", "verified": True},
            {"source": "a tradition of the Chaldees", "verified": False},
        ],  # fmt: skip
    },
}


def qwen_encoding():
    """Qwen's BPE as a tiktoken Encoding (the ranks file from Qwen-Agent; Qwen2/3's pattern)."""
    import base64

    import qwen_agent
    import tiktoken

    ranks_file = Path(qwen_agent.__file__).parent / "utils" / "qwen.tiktoken"
    ranks = {}
    for line in ranks_file.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    specials = {"<|endoftext|>": len(ranks), "<|im_start|>": len(ranks) + 1, "<|im_end|>": len(ranks) + 2}
    return tiktoken.Encoding("qwen", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def time_llguidance(enc, schema: dict, document: str) -> dict:
    import llguidance
    import llguidance.numpy as lnp
    from llguidance.tiktoken import lltokenizer_from_encoding

    tok = lltokenizer_from_encoding(enc, n_vocab=VOCAB_ROWS, eos_token=enc.encode_single_token("<|im_end|>"))
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(tok, grammar)
    compile_s = time.perf_counter() - t0
    mask = lnp.allocate_token_bitmask(1, VOCAB_ROWS)
    ids = enc.encode(document)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        lnp.fill_next_token_bitmask(matcher, mask, 0)
        times.append(time.perf_counter() - t0)
        allowed = (mask[0, t // 32] >> (t % 32)) & 1
        assert allowed, f"llguidance refused a token of a valid document: {t}"
        assert matcher.consume_token(t), matcher.get_error()
    out = summarize("llguidance", compile_s, times)
    # the engine writes JSON with Qwen's separators: time it on the document written so
    out.update(engine_mask(tok, enc, schema, enc.encode(json.dumps(json.loads(document)))))
    return out


def engine_mask(ll_tokenizer, enc, schema: dict, ids: List[int]) -> dict:
    """What the batch engine pays per token for the mask: the constraint's history sync, the
    bitmask fill, its unpacking to ``[1, vocab]`` and the masking of a logits row (MLX,
    evaluated), through :class:`qnext_mlx.engine.constraint.GrammarConstraint` itself."""
    import mlx.core as mx

    from qnext_mlx.engine.constraint import Grammar, GrammarTokenizer, json_grammar

    eos = [enc.encode_single_token("<|im_end|>")]
    gtok = GrammarTokenizer(ll_tokenizer, VOCAB_ROWS, eos, lambda text, **_: enc.encode(text))
    grammar = Grammar(gtok, f"start: answer\n{json_grammar(schema, 'answer')}\n")
    constraint = grammar.constraint(0)
    logits = mx.random.normal((1, VOCAB_ROWS))
    mx.eval(logits)
    times = []
    for n in range(len(ids)):
        history = mx.array(ids[:n], dtype=mx.int32)
        t0 = time.perf_counter()
        mx.eval(constraint(history, logits))
        times.append(time.perf_counter() - t0)
    assert constraint.active, "the engine's grammar refused a token of a valid document"
    us = sorted(1e6 * t for t in times)
    return {"engine_mask_us_median": statistics.median(us), "engine_mask_us_p95": us[int(0.95 * (len(us) - 1))]}


def time_xgrammar(enc, schema: dict, document: str) -> dict:
    import torch
    import xgrammar as xgr

    vocab: List[bytes] = [b""] * VOCAB_ROWS
    for i in range(enc.n_vocab):
        vocab[i] = enc.decode_single_token_bytes(i)
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=VOCAB_ROWS,
                             stop_token_ids=[enc.encode_single_token("<|im_end|>")])  # fmt: skip
    t0 = time.perf_counter()
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                             separators=(",", ":"))  # fmt: skip
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, VOCAB_ROWS)
    times = []
    for t in enc.encode(document):
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - t0)
        assert (int(mask[0, t // 32]) >> (t % 32)) & 1, f"xgrammar refused a token of a valid document: {t}"
        assert matcher.accept_token(t)
    del torch
    return summarize("xgrammar", compile_s, times)


def summarize(engine: str, compile_s: float, times: List[float]) -> dict:
    us = sorted(1e6 * t for t in times)
    return {
        "engine": engine, "compile_ms": 1000 * compile_s, "tokens": len(us),
        "mask_us_median": statistics.median(us), "mask_us_p95": us[int(0.95 * (len(us) - 1))], "mask_us_max": us[-1],
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "bench-grammar")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    enc = qwen_encoding()
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    results = {"machine": machine, "vocab_rows": VOCAB_ROWS, "bpe_tokens": enc.n_vocab - 3,
               "schemas": {}}  # fmt: skip
    engines = [("llguidance", time_llguidance), ("xgrammar", time_xgrammar)]
    for name, schema in SCHEMAS.items():
        document = json.dumps(DOCUMENTS[name], separators=(",", ":"))
        results["schemas"][name] = {"document_tokens": len(enc.encode(document)), "engines": {}}
        for engine, fn in engines:
            try:
                runs = [fn(enc, schema, document) for _ in range(args.reps)]
            except ImportError as e:
                print(f"{engine}: not available ({e})", file=sys.stderr)
                continue
            best = min(runs, key=lambda r: r["mask_us_median"])
            results["schemas"][name]["engines"][engine] = best
            print(f"{name:7s} {engine:10s} compile {best['compile_ms']:7.1f} ms; mask per token: median "
                  f"{best['mask_us_median']:7.1f} us, p95 {best['mask_us_p95']:7.1f} us, "
                  f"max {best['mask_us_max']:8.1f} us")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, args.out.with_suffix(".json"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels, med, p95 = [], [], []
        for name, entry in results["schemas"].items():
            for engine, r in entry["engines"].items():
                labels.append(f"{name}\n{engine}")
                med.append(r["mask_us_median"])
                p95.append(r["mask_us_p95"])
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], med, 0.4, label="median")
        ax.bar([x + 0.2 for x in xs], p95, 0.4, label="p95")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("mask per token (us)")
        ax.set_title(f"next-token mask at {VOCAB_ROWS:,} vocabulary rows (Qwen BPE)", fontsize=10)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
