#!/usr/bin/env python
"""Side-by-side benchmark: qnext_mlx against mlx-lm's ``qwen3_next`` on identical weights.

    python scripts/bench.py                      # full run: prefill 512/2K/8K, decode
    python scripts/bench.py --quick --json OUT   # smoke run, under 5 minutes on 2 cores
    python scripts/bench.py --mtp [--ks 1 2 3 4]    # MTP speculative vs plain decoding (scripts/bench_mtp.py)

One random MLX-layout checkpoint (4-bit affine, group 64; router and
shared-expert gates at 8 bits, as mlx-lm's ``quant_predicate`` does) is written
once and loaded by both engines: ``qnext_mlx.load_model`` and
``mlx_lm.utils.load_model``. Before any timing the two engines' logits on the
same prompt are compared (``max_logit_diff`` in the output) and greedy decoding
is checked to pick the same tokens: a mismatch (tokens differ, or logits differ
by more than ``PARITY_TOLERANCE`` of their scale) stops the benchmark with exit
status 1 and no results, and so do differing decode tokens after the timed runs.
With 16-bit activations the engines round differently, so there the check is
that logits agree within ``PARITY_TOLERANCE_16BIT`` of their scale and pick the
same top token at ``PARITY_TOP1_16BIT`` of the prompt's positions (a wrong
weight or formula fails both by far); decode tokens are then compared, not required.

Measured, per engine, on MLX's default device (the CPU backend on Linux):

- prefill tok/s at each length: a fresh cache, all but the last prompt token
  fed in steps of 2048 tokens as ``mlx_lm.generate`` does (``prefill_step_size``),
  the caches and final hidden states evaluated after every step (the LM head
  never runs on them), then the last token alone for the logits;
- decode tok/s: greedy tokens after a 512-token prompt, one ``mx.eval`` per token;
- memory: the parameters' size and the transient peak above it
  (``mx.get_peak_memory`` over the engine's runs, reset before them).

Three engines are timed: ``qnext_mlx`` (its CPU work spread over one MLX CPU
stream per core, ``QNEXT_CPU_LANES``; ``--lanes`` sets it), ``qnext_mlx_1lane``
(the same model with lanes off: one thread, as mlx-lm) and ``mlx_lm`` (every CPU
op on one thread). Each measurement runs ``--reps`` times (at least 2), the
order of the engines reversed on every other rep, so each goes first as often.
Every run's wall-clock and process CPU seconds are kept; the reported figures
are the best wall time and the best CPU time. Every ratio is given both ways,
qnext / mlx-lm: by wall clock (``ratio``: tok/s over tok/s, what a user waits)
and by CPU seconds (``ratio_cpu``: mlx-lm's CPU seconds over qnext's for the same
work, what it costs: on 2 cores the lanes can double the first without touching
the second); ``ratio_1lane`` and ``ratio_1lane_cpu`` for the one-lane run. The
load average before and after is recorded (the machine may be shared).
``--profile TOKENS`` instead times each component of both engines (CPU seconds
per DeltaNet / attention / MoE block and LM head, scaled to the whole model).

Configurations. The default has the real Qwen3-Next-80B-A3B layer widths
(hidden 2048; DeltaNet 32 value / 16 key heads of 128; attention 16 query /
2 KV heads of 256; experts of 512 with top-10 routing and a 512 shared expert)
with 4 layers (3 DeltaNet + 1 attention), 64 experts and an 8192-token
vocabulary. The full run takes about 1.5 hours on 2 cores (mlx-lm prefills
about 4 tok/s there). ``--quick`` halves the widths (hidden 1024; 16 value /
8 key DeltaNet heads and 8 query / 1 KV attention heads, head dims kept; 32
experts of 256, top-10), keeps 2 layers (1 DeltaNet + 1 attention), measures
512 and 2048 tokens once each and 16 decode tokens, and finishes in about 3
minutes on 2 idle cores (with 3 engines and 2 reps, about 7). The float dtype is float32 by default: mlx-lm's
fastest on the CPU backend (its quantized kernels run 10x+ slower with
bfloat16 activations there, which ``--dtype bfloat16`` shows; the 4-bit
weights are the same either way).

Outputs: ``bench_out/`` (git-ignored) by default: ``bench.json``, ``bench.png``
(a bar chart, skipped with a message when matplotlib is missing) and the
checkpoint folder ``bench_out/ckpt-<hash>`` (reused by later runs with the same
configuration). ``--json``/``--png`` choose other paths; committed results live
under ``scripts/results/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

REPO = Path(__file__).resolve().parent.parent

# Real Qwen3-Next-80B-A3B widths; fewer layers, experts and vocabulary.
DEFAULT_CONFIG = dict(
    model_type="qwen3_next",
    vocab_size=8192,
    hidden_size=2048,
    intermediate_size=5120,
    num_hidden_layers=4,
    full_attention_interval=4,
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=256,
    linear_num_value_heads=32,
    linear_num_key_heads=16,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_conv_kernel_dim=4,
    num_experts=64,
    num_experts_per_tok=10,
    moe_intermediate_size=512,
    shared_expert_intermediate_size=512,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    max_position_embeddings=262144,
    # mlx-lm 0.32 reads only these top-level keys (not ``rope_parameters``).
    rope_theta=10000000.0,
    partial_rotary_factor=0.25,
    tie_word_embeddings=False,
    attention_bias=False,
)

# Half the widths (head dims kept), one layer of each kind: about 1/8 of the
# default's FLOPs per token, so that both engines fit the --quick budget.
QUICK_CONFIG = dict(
    DEFAULT_CONFIG,
    vocab_size=4096,
    hidden_size=1024,
    num_hidden_layers=2,
    full_attention_interval=2,
    num_attention_heads=8,
    num_key_value_heads=1,
    linear_num_value_heads=16,
    linear_num_key_heads=8,
    num_experts=32,
    num_experts_per_tok=10,
    moe_intermediate_size=256,
    shared_expert_intermediate_size=256,
)

PREFILL_STEP = 2048  # mlx_lm.generate's default prefill_step_size
ENGINES = ("qnext_mlx", "qnext_mlx_1lane", "mlx_lm")
QNEXT_ENGINES = ("qnext_mlx", "qnext_mlx_1lane")
# Largest max |logit difference| between the engines, relative to the largest logit,
# that passes the parity check (float32 runs agree to about 1e-5).
PARITY_TOLERANCE = 1e-3
# With 16-bit activations: logits within 10% of their scale, the same top token at 90%
# of the positions (the demo model in bfloat16: 0.9% and 97% on 64 random tokens).
PARITY_TOLERANCE_16BIT = 0.1
PARITY_TOP1_16BIT = 0.9


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------- checkpoint
def write_checkpoint(
    cfg: dict, out: Path, dtype=mx.float32, bits: int = 4, group_size: int = 64, seed: int = 0
) -> Path:
    """Write one random, quantized MLX-layout checkpoint (``model.safetensors`` +
    ``config.json`` with its ``quantization`` section) that both engines load.

    The model is qnext_mlx's own (random parameters at their default init
    scales, DeltaNet decay rates spread as mlx-lm initialises them), quantized
    with ``nn.quantize`` and the model's ``quant_predicate``. Written to a
    temporary folder then renamed.
    """
    from qnext_mlx.model import Model
    from qnext_mlx.model.config import ModelConfig

    mx.random.seed(seed)
    model = Model(ModelConfig.from_dict(cfg))
    for layer in model.layers:
        if layer.is_linear:
            la = layer.linear_attn
            la.A_log = mx.log(mx.random.uniform(1.0, 16.0, la.A_log.shape))
            la.dt_bias = mx.random.uniform(-1.0, 1.0, la.dt_bias.shape)
    model.set_dtype(dtype)
    predicate = model.quant_predicate
    overrides = {}

    def class_predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        p = predicate(path, module)
        if isinstance(p, dict):
            overrides[path] = dict(p)
        return p

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=class_predicate)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    config = dict(cfg)
    config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine", **overrides}
    config["quantization_config"] = config["quantization"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def checkpoint_for(cfg: dict, out_dir: Path, dtype_name: str, seed: int) -> Path:
    """The checkpoint folder for this configuration, written if not there yet."""
    key = json.dumps({"cfg": cfg, "dtype": dtype_name, "seed": seed}, sort_keys=True)
    path = out_dir / f"ckpt-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        log(f"reusing checkpoint {path}")
        return path
    log(f"writing random checkpoint {path} ...")
    t = time.perf_counter()
    write_checkpoint(cfg, path, dtype=getattr(mx, dtype_name), seed=seed)
    log(f"  done in {time.perf_counter() - t:.0f} s")
    return path


def load_engines(path: Path) -> Dict[str, nn.Module]:
    from mlx_lm.utils import load_model as mlx_lm_load_model

    import qnext_mlx

    ours = qnext_mlx.load_model(path, lazy=False)
    theirs, _ = mlx_lm_load_model(Path(path), lazy=False)
    return {"qnext_mlx": ours, "qnext_mlx_1lane": ours, "mlx_lm": theirs}


def param_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# ------------------------------------------------------------------ timing
def cache_state(cache) -> list:
    return [c.state for c in cache]


def prefill(model, ids: mx.array, cache) -> mx.array:
    """Feed ``ids`` ``[1, L]`` in steps of PREFILL_STEP; returns the last logits ``[1, V]``.

    As both engines' generate loops do (mlx-lm's ``generate_step`` included): all
    but the last token go in chunks whose logits are never evaluated (so the LM
    head never runs on them), then the last token alone gives the logits. Each
    chunk's final hidden states are evaluated, though: a generate loop only
    evaluates the caches, which lets MLX skip the last layer's work past its
    cache update (its attention and MoE). That is 1 layer in 48 in the real
    model but a quarter or half of these shallow benchmark models, and it would
    also favour whichever engine happens to force less of it (qnext_mlx's
    grouped MoE reads the routing on the host, which forces the last layer's
    attention).
    """
    L = ids.shape[1]
    for s in range(0, L - 1, PREFILL_STEP):
        h = model.model(ids[:, s : min(s + PREFILL_STEP, L - 1)], cache)  # final hidden states
        mx.eval(h, cache_state(cache))
    last = model(ids[:, L - 1 :], cache=cache)[:, -1, :]
    mx.eval(last, cache_state(cache))
    return last


def decode(model, last_logits: mx.array, cache, n: int) -> List[int]:
    """Greedy ``n`` tokens from ``last_logits`` ``[1, V]``, one evaluation per token."""
    y = mx.argmax(last_logits, axis=-1)
    out = []
    for _ in range(n):
        logits = model(y[:, None], cache=cache)
        y = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(y)
        out.append(y.item())
    return out


class Clock:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w
        self.cpu = time.process_time() - self.c


def prompt(length: int, vocab: int, seed: int) -> mx.array:
    return mx.random.randint(0, vocab, (1, length), key=mx.random.key(seed))


def check_parity(models: Dict[str, nn.Module], vocab: int, length: int = 128) -> Dict:
    """Max |logit difference| between the engines on one prompt (no cache), how often
    they pick the same top token there, whether greedy decoding of a few tokens picks
    the same ones, and ``ok`` (see the module docstring for the rule per dtype)."""
    ids = prompt(length, vocab, seed=1)
    pair = {"qnext_mlx": models["qnext_mlx"], "mlx_lm": models["mlx_lm"]}
    logits = {name: m(ids) for name, m in pair.items()}
    mx.eval(logits)
    a, b = logits["qnext_mlx"].astype(mx.float32), logits["mlx_lm"].astype(mx.float32)
    diff = mx.abs(a - b).max().item()
    scale = mx.abs(b).max().item()
    toks = {}
    for name, m in pair.items():
        cache = m.make_cache()
        toks[name] = decode(m, prefill(m, ids[:, :64], cache), cache, 8)
    match = toks["qnext_mlx"] == toks["mlx_lm"]
    top1 = (a.argmax(axis=-1) == b.argmax(axis=-1)).astype(mx.float32).mean().item()
    exact = logits["qnext_mlx"].dtype == mx.float32
    if exact:
        ok = match and diff <= PARITY_TOLERANCE * max(scale, 1.0)
    else:
        ok = diff <= PARITY_TOLERANCE_16BIT * max(scale, 1.0) and top1 >= PARITY_TOP1_16BIT
    return {
        "prompt_tokens": length,
        "activations": str(logits["qnext_mlx"].dtype).rsplit(".", 1)[-1],
        "max_logit_diff": diff,
        "max_abs_logit": scale,
        "top1_agreement": top1,
        "greedy_tokens_match": match,
        "exact": bool(exact),
        "ok": bool(ok),
    }


def run(
    models: Dict[str, nn.Module],
    vocab: int,
    lengths: List[int],
    reps: int,
    decode_tokens: int,
    decode_prompt: int,
    lanes: Dict[str, int],
) -> Dict:
    """Prefill at each length (and decode after the ``decode_prompt``-token prefill),
    ``reps`` times, the engines' order reversed on every other rep; ``lanes``: the
    CPU lanes each qnext engine runs with. Returns every run's wall and CPU seconds,
    the decoded tokens and the memory peaks."""
    from qnext_mlx.kernels import lanes as qlanes

    res = {name: {"prefill": {}, "decode": [], "peak_extra_bytes": 0} for name in models}
    order = list(models)
    for L in sorted(set(lengths) | {decode_prompt}):
        ids = prompt(L, vocab, seed=L)
        for rep in range(reps):
            for name in order if rep % 2 == 0 else order[::-1]:
                m = models[name]
                if name in lanes:
                    qlanes.set_cpu_lanes(lanes[name])
                mx.clear_cache()
                base = mx.get_active_memory()
                mx.reset_peak_memory()
                cache = m.make_cache()
                with Clock() as c:
                    last = prefill(m, ids, cache)
                if L in lengths:
                    res[name]["prefill"].setdefault(str(L), []).append({"wall_s": c.wall, "cpu_s": c.cpu})
                    log(
                        f"  prefill {L:5d} {name:15s} rep {rep}: {L / c.wall:7.2f} tok/s "
                        f"({c.wall:6.1f} s wall, {c.cpu:6.1f} s cpu)"
                    )
                if L == decode_prompt:
                    with Clock() as d:
                        toks = decode(m, last, cache, decode_tokens)
                    res[name]["decode"].append({"wall_s": d.wall, "cpu_s": d.cpu})
                    res[name].setdefault("decode_ids", toks)
                    if toks != res[name]["decode_ids"]:
                        res[name]["decode_ids_vary"] = True
                    log(
                        f"  decode {decode_tokens} after {decode_prompt} {name:15s} rep {rep}: "
                        f"{decode_tokens / d.wall:6.2f} tok/s ({d.wall:5.1f} s wall, {d.cpu:5.1f} s cpu)"
                    )
                peak = mx.get_peak_memory() - base
                res[name]["peak_extra_bytes"] = max(res[name]["peak_extra_bytes"], peak)
                del cache, last
    return res


def summarize(samples: List[Dict[str, float]], tokens: int) -> Dict:
    """Best (and median) wall and CPU seconds of the runs of one measurement; tok/s by wall clock."""
    walls = sorted(x["wall_s"] for x in samples)
    cpus = sorted(x["cpu_s"] for x in samples)
    return {
        "wall_s": walls[0],
        "cpu_s": cpus[0],
        "median_wall_s": walls[len(walls) // 2],
        "median_cpu_s": cpus[len(cpus) // 2],
        "tok_s": tokens / walls[0],
        "runs": samples,
    }


def compare(timings: Dict[str, Dict]) -> Dict:
    """tok/s per engine and the ratios qnext / mlx-lm by wall clock and by CPU seconds."""
    ref = timings["mlx_lm"]
    out = {name: t["tok_s"] for name, t in timings.items()}
    for name, suffix in (("qnext_mlx", ""), ("qnext_mlx_1lane", "_1lane")):
        out[f"ratio{suffix}"] = ref["wall_s"] / timings[name]["wall_s"]
        out[f"ratio{suffix}_cpu"] = ref["cpu_s"] / timings[name]["cpu_s"]
    return out


def machine_info() -> Dict:
    import importlib.metadata as md

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": md.version("mlx"),
        "mlx_lm": md.version("mlx-lm"),
        "device": str(mx.default_device()),
    }
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


# ------------------------------------------------------------------ profile
def _in_dims(layer) -> int:
    if "scales" in layer:
        return layer["scales"].shape[-1] * layer.group_size
    return layer["weight"].shape[-1]


def profile(model, length: int, hidden: int, seed: int = 5) -> Dict[str, float]:
    """CPU seconds (process time, best of 2 after a 64-token warm-up) per
    component of one DeltaNet layer, one attention layer, one MoE block and
    the LM head, on random ``[1, length, dims]`` inputs without cache, each
    component evaluated on its own (a mixer's "rest" is the whole mixer minus
    its projections). Whole-model estimates multiply by the layer counts.
    Process time rather than wall time: on a shared machine it is the steadier
    measure of single-threaded work (run with one CPU lane)."""
    layers = model.model.layers
    dn = next(l for l in layers if l.is_linear)
    at = next((l for l in layers if not l.is_linear), None)
    la = dn.linear_attn
    inputs = {
        d: mx.random.normal((1, length, d), key=mx.random.key(seed + d))
        for d in {hidden, _in_dims(la.out_proj)} | ({_in_dims(at.self_attn.o_proj)} if at is not None else set())
    }
    mx.eval(inputs)
    x = inputs[hidden]
    out = {}

    def timed(name, fn, sub=()):
        mx.eval(fn(64))
        best = None
        for _ in range(2):
            t = time.process_time()
            mx.eval(fn(length))
            w = time.process_time() - t
            best = w if best is None else min(best, w)
        out[name] = max(0.0, best - sum(out[k] for k in sub))
        log(f"    {name:28s} {out[name]:8.2f} s")

    def inp(d, n):
        return inputs[d][:, :n]

    v_in = _in_dims(la.out_proj)
    timed("dn.in_proj", lambda n: [la.in_proj_qkvz(x[:, :n]), la.in_proj_ba(x[:, :n])])
    timed("dn.out_proj", lambda n: la.out_proj(inp(v_in, n)))
    timed("dn.conv+gated_delta+norm", lambda n: la(x[:, :n], None, None), sub=("dn.in_proj", "dn.out_proj"))
    if at is not None:
        sa = at.self_attn
        o_in = _in_dims(sa.o_proj)
        timed(
            "attn.projections",
            lambda n: [sa.q_proj(x[:, :n]), sa.k_proj(x[:, :n]), sa.v_proj(x[:, :n]), sa.o_proj(inp(o_in, n))],
        )
        timed("attn.sdpa+norms+rope", lambda n: sa(x[:, :n], mask="causal", cache=None), sub=("attn.projections",))
    moe = dn.mlp
    timed("moe.router", lambda n: moe.gate(x[:, :n]))
    timed("moe.shared_expert", lambda n: [moe.shared_expert(x[:, :n]), moe.shared_expert_gate(x[:, :n])])
    timed("moe.routed_experts", lambda n: moe(x[:, :n]), sub=("moe.router", "moe.shared_expert"))
    timed("lm_head", lambda n: model.lm_head(x[:, :n]))
    n_dn = sum(1 for l in layers if l.is_linear)
    n_at = len(layers) - n_dn
    total = {
        "projections": n_dn * (out["dn.in_proj"] + out["dn.out_proj"]) + n_at * out.get("attn.projections", 0.0),
        "conv+gated_delta": n_dn * out["dn.conv+gated_delta+norm"],
        "attention_core": n_at * out.get("attn.sdpa+norms+rope", 0.0),
        "moe_routed_experts": len(layers) * out["moe.routed_experts"],
        "moe_shared_expert": len(layers) * out["moe.shared_expert"],
        "moe_router": len(layers) * out["moe.router"],
        "lm_head": out["lm_head"],
    }
    return {"per_layer_s": out, "model_estimate_s": total, "tokens": length}


# -------------------------------------------------------------------- chart
def write_chart(result: Dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart (pip install matplotlib)")
        return None
    groups = [f"prefill {L}" for L in result["prefill"]] + ["decode"]
    rows = list(result["prefill"].values()) + [result["decode"]]
    fig, ax = plt.subplots(figsize=(max(2.4 * len(groups) + 2, 8.5), 4.8))
    width = 0.27
    bars = (("mlx_lm", "#9aa5b1", "mlx-lm"), ("qnext_mlx_1lane", "#8fb3e0", "qnext-mlx, 1 lane"))
    bars += (("qnext_mlx", "#2f6db5", "qnext-mlx"),)
    for i, (eng, color, label) in enumerate(bars):
        xs = [g + (i - 1) * width for g in range(len(groups))]
        ax.bar(xs, [r[eng] for r in rows], width, label=label, color=color)
    for g, r in enumerate(rows):
        top = max(r["qnext_mlx"], r["mlx_lm"], r["qnext_mlx_1lane"])
        text = f"{r['ratio']:.2f}x wall\n{r['ratio_cpu']:.2f}x CPU s\n1 lane {r['ratio_1lane']:.2f}x"
        ax.text(g, top * 1.02, text, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("tokens / s (higher is better)")
    cfg = result["config"]
    n_attn = cfg["num_hidden_layers"] // cfg["full_attention_interval"]
    m = result["machine"]
    ax.set_title(
        f"hidden {cfg['hidden_size']}, {cfg['num_hidden_layers'] - n_attn} DeltaNet + {n_attn} attention layers, "
        f"{cfg['num_experts']} experts (top-{cfg['num_experts_per_tok']}), {result['bits']}-bit, {result['dtype']}\n"
        f"MLX {m['mlx']} CPU backend, {m['cpus']} cores: qnext-mlx on {m['qnext_cpu_lanes']} CPU lanes and on 1, "
        f"mlx-lm {m['mlx_lm']} on one\nbest of {result['reps']} runs each, engine order alternating; "
        "ratios qnext / mlx-lm by wall clock and by CPU seconds",
        fontsize=9,
    )
    ax.legend()
    ax.margins(y=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_json(obj: Dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller model, 512 and 2048 tokens")
    p.add_argument("--json", type=Path, help="result JSON (default OUT_DIR/bench.json)")
    p.add_argument("--png", type=Path, help="bar chart (default next to the JSON)")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench_out", help="checkpoints and default outputs")
    p.add_argument("--lengths", type=int, nargs="+", help="prefill lengths (default 512 2048 8192; quick 512 2048)")
    p.add_argument("--reps", type=int, default=2, help="timed runs per measurement, at least 2 (default 2)")
    p.add_argument("--decode-tokens", type=int, help="greedy tokens timed (default 32; quick 16)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="float dtype of the checkpoint (scales and unquantized weights)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (JSON value), e.g. --set num_hidden_layers=8",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--lanes",
        type=int,
        default=None,
        help="CPU streams (threads) for qnext_mlx (default: the library's, QNEXT_CPU_LANES or one per core); "
        "qnext_mlx_1lane runs on one, as mlx-lm always does",
    )
    p.add_argument(
        "--profile",
        type=int,
        metavar="TOKENS",
        help="instead of the benchmark, time each component of both engines at this length",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--mtp" in argv:  # MTP speculative vs plain decoding: the options of scripts/bench_mtp.py
        argv.remove("--mtp")
        import bench_mtp

        return bench_mtp.main(argv)
    args = parse_args(argv)
    cfg = dict(QUICK_CONFIG if args.quick else DEFAULT_CONFIG)
    for kv in args.set:
        key, _, value = kv.partition("=")
        try:
            cfg[key] = json.loads(value)
        except json.JSONDecodeError:
            cfg[key] = value
    lengths = args.lengths or ([512, 2048] if args.quick else [512, 2048, 8192])
    reps = args.reps
    if reps < 2:
        log("error: --reps must be at least 2 (the engines take turns going first)")
        return 2
    decode_tokens = args.decode_tokens or (16 if args.quick else 32)
    json_path = args.json or args.out_dir / "bench.json"
    png_path = args.png or json_path.with_suffix(".png")

    from qnext_mlx.kernels import lanes as qlanes

    if args.lanes is not None:
        qlanes.set_cpu_lanes(args.lanes)
    t0 = time.perf_counter()
    machine = machine_info()
    machine["qnext_cpu_lanes"] = qlanes.cpu_lanes()
    ckpt = checkpoint_for(cfg, args.out_dir, args.dtype, args.seed)
    log("loading both engines ...")
    models = load_engines(ckpt)
    for m in models.values():
        mx.eval(m.parameters())
    parity = check_parity(models, cfg["vocab_size"])
    log(
        f"parity: max |logit diff| {parity['max_logit_diff']:.3g} (logits up to {parity['max_abs_logit']:.3g}), "
        f"greedy tokens match: {parity['greedy_tokens_match']}"
    )
    if not parity["ok"]:
        log("error: the engines disagree (parity check above): not timing them")
        return 1
    # Warm-up (compiled helpers, allocator) on a short prompt, every engine as it is timed.
    lanes = {"qnext_mlx": qlanes.cpu_lanes(), "qnext_mlx_1lane": 1}
    for name, m in models.items():
        if name in lanes:
            qlanes.set_cpu_lanes(lanes[name])
        c = m.make_cache()
        decode(m, prefill(m, prompt(64, cfg["vocab_size"], 3), c), c, 2)
    qlanes.set_cpu_lanes(lanes["qnext_mlx"])

    if args.profile:
        prof = {}
        for name in ("qnext_mlx", "mlx_lm"):
            log(f"profile {name}, {args.profile} tokens:")
            prof[name] = profile(models[name], args.profile, cfg["hidden_size"])
        result = {"config": cfg, "dtype": args.dtype, "machine": machine, "parity": parity, "profile": prof}
        write_json(result, json_path)
        print(f"{'model estimate (s)':24s}{'qnext_mlx':>11s}{'mlx-lm':>11s}{'ratio':>8s}")
        for k in prof["mlx_lm"]["model_estimate_s"]:
            a, b = prof["qnext_mlx"]["model_estimate_s"][k], prof["mlx_lm"]["model_estimate_s"][k]
            print(f"{k:24s}{a:11.2f}{b:11.2f}{b / a if a > 0 else float('nan'):7.2f}x")
        print(f"wrote {json_path}")
        return 0

    res = run(models, cfg["vocab_size"], lengths, reps, decode_tokens, decode_prompt=512, lanes=lanes)
    qlanes.set_cpu_lanes(lanes["qnext_mlx"])
    try:
        machine["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    ids = {name: res[name]["decode_ids"] for name in ENGINES}
    same_tokens = len({tuple(t) for t in ids.values()}) == 1 and not any(res[n].get("decode_ids_vary") for n in ENGINES)
    if parity["exact"] and not same_tokens:
        log(f"error: the engines decoded different tokens: {ids}")
        return 1
    timings = {
        name: {
            "prefill": {L: summarize(runs, int(L)) for L, runs in res[name]["prefill"].items()},
            "decode": summarize(res[name]["decode"], decode_tokens),
        }
        for name in ENGINES
    }

    result = {
        "config": cfg,
        "bits": 4,
        "group_size": 64,
        "dtype": args.dtype,
        "prefill_step": PREFILL_STEP,
        "reps": reps,
        "machine": machine,
        "parity": parity,
        "prefill": {L: compare({n: timings[n]["prefill"][L] for n in ENGINES}) for L in timings["mlx_lm"]["prefill"]},
        "decode": dict(
            compare({n: timings[n]["decode"] for n in ENGINES}),
            prompt_tokens=512,
            tokens=decode_tokens,
            same_tokens=same_tokens,
        ),
        "memory_gb": {
            name: {
                "weights": param_bytes(models[name]) / 1e9,
                "peak_extra": res[name]["peak_extra_bytes"] / 1e9,
                "peak": (param_bytes(models[name]) + res[name]["peak_extra_bytes"]) / 1e9,
            }
            for name in ENGINES
        },
        "timings": timings,
        "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "elapsed_s": time.perf_counter() - t0,
    }
    write_json(result, json_path)
    chart = write_chart(result, png_path)

    head = ("qnext_mlx", "1 lane", "mlx-lm", "wall", "CPU s", "1l wall", "1l CPU")
    print(f"{'tok/s, ratios':14s}" + "".join(f"{h:>10s}" for h in head))
    rows = [(f"prefill {L}", r) for L, r in result["prefill"].items()] + [("decode", result["decode"])]
    for label, r in rows:
        vals = [r["qnext_mlx"], r["qnext_mlx_1lane"], r["mlx_lm"]]
        ratios = [r["ratio"], r["ratio_cpu"], r["ratio_1lane"], r["ratio_1lane_cpu"]]
        print(f"{label:14s}" + "".join(f"{v:10.2f}" for v in vals) + "".join(f"{v:9.2f}x" for v in ratios))
    for name in ENGINES:
        m = result["memory_gb"][name]
        print(f"memory {name:15s} weights {m['weights']:.2f} GB, peak {m['peak']:.2f} GB")
    print(f"max |logit diff| {parity['max_logit_diff']:.3g}; wrote {json_path}" + (f" and {chart}" if chart else ""))
    log(f"total {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
