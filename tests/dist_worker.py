"""Run under ``mlx.launch`` by tests/test_distributed.py: compare a tensor or pipeline
parallel model with the single-process one on every rank and write what was measured.

    mlx.launch -n N --backend ring --python PY -- tests/dist_worker.py OUT MODE CKPT[,CKPT...] [--generate]

Per checkpoint (loaded in float32): the largest absolute logit difference for a full
prefill, for a chunked prefill followed by one-token steps, and for the MTP head; the
rank's resident parameter bytes, its MLX active memory after loading, and the bytes the
single-process model's split and replicated tensors take. With ``--generate``: 100
greedy tokens with and without MTP, parallel and single. Writes ``OUT/rank{r}.json``.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from qnext_mlx.checkpoint.reader import load
from qnext_mlx.engine.decode import generate_tokens
from qnext_mlx.engine.speculative import MTPDecoding, speculative_generate_tokens
from qnext_mlx.model.parallel import is_split


def param_bytes(model) -> dict:
    split = repl = 0
    for name, p in tree_flatten(model.parameters()):
        if is_split(name):
            split += p.nbytes
        else:
            repl += p.nbytes
    return {"split": split, "replicated": repl, "total": split + repl}


def greedy(model, ids, mtp: bool):
    cache = model.make_cache()
    if mtp:
        it = speculative_generate_tokens(model, cache, ids, decoding=MTPDecoding(num_draft_tokens=2), max_tokens=100)
    else:
        it = generate_tokens(model, cache, ids, max_tokens=100)
    return [int(t) for t, _ in it]


def compare(path: str, mode: str, group, generate: bool) -> dict:
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    par, tokenizer = load(path, dtype=mx.float32, parallel=mode, group=group)
    gc.collect()
    mx.clear_cache()
    active = mx.get_active_memory() - before
    ref, _ = load(path, dtype=mx.float32, lazy=False)
    vocab = ref.config.vocab_size
    ids = mx.array([[(7 * i + 3) % vocab for i in range(40)]])
    full = float(mx.abs(ref(ids) - par(ids)).max())
    ca, cb = ref.make_cache(), par.make_cache()
    la, lb = [ref(ids[:, :29], cache=ca)], [par(ids[:, :29], cache=cb)]
    for t in range(29, 40):
        la.append(ref(ids[:, t : t + 1], cache=ca))
        lb.append(par(ids[:, t : t + 1], cache=cb))
    incremental = float(mx.abs(mx.concatenate(la, axis=1) - mx.concatenate(lb, axis=1)).max())
    out = {
        "full": full,
        "incremental": incremental,
        "logit_scale": float(mx.abs(ref(ids)).max()),
        "resident": param_bytes(par),
        "reference": param_bytes(ref),
        "active_after_load": active,
        "local_config": {
            k: getattr(par.config, k)
            for k in ("linear_num_value_heads", "linear_num_key_heads", "num_attention_heads", "num_key_value_heads")
        },
    }
    if ref.has_mtp:
        h = ref.model(ids)
        out["mtp"] = float(mx.abs(ref.mtp_forward(h, ids) - par.mtp_forward(par.model(ids), ids)).max())
    if generate:
        prompt = tokenizer.encode("Once upon a time") if tokenizer is not None else [1, 2, 3]
        out["greedy"] = {
            "single": greedy(ref, prompt, False),
            "parallel": greedy(par, prompt, False),
        }
        if ref.has_mtp:
            out["greedy"]["single_mtp"] = greedy(ref, prompt, True)
            out["greedy"]["parallel_mtp"] = greedy(par, prompt, True)
    return out


def main() -> int:
    out_dir, mode, paths = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
    generate = "--generate" in sys.argv[4:]
    group = mx.distributed.init()
    result = {"rank": group.rank(), "size": group.size(), "mode": mode, "checkpoints": {}}
    for path in paths:
        result["checkpoints"][path] = compare(path, mode, group, generate)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{group.rank()}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
