#!/usr/bin/env python3
"""Distributed benchmark: one process, our tensor and pipeline parallel over 2 ranks, and
mlx-lm's own pipeline mode over the same 2 ranks, on identical weights.

    python scripts/bench_distributed.py                      # the default run (JSON + PNG)
    python scripts/bench_distributed.py --layers 2 --experts 8 --prompt-tokens 32 \\
        --decode-tokens 8 --reps 1 --out /tmp/bd-smoke       # a smoke run, about 2 minutes

The checkpoint is ``scripts/bench.py``'s random 4-bit mlx-lm-format one (``write_checkpoint``,
4-bit affine, group 64, router and shared-expert gates at 8 bits) at the real
Qwen3-Next-80B-A3B layer widths: hidden 2048, DeltaNet 32 value / 16 key heads of 128,
attention 16 query / 2 KV heads of 256, experts of 512 and a 512 shared expert, top-10
routing; with ``--layers`` layers (default 4: 3 DeltaNet + 1 attention, one attention layer
every 4), ``--experts`` experts (default 64, so it fits in RAM) and the demo model's
4,096-token tokenizer (as ``scripts/bench_serving.py``'s "wide" checkpoint). It is written
once under ``--work`` (default ``bench_out/distributed``, git-ignored) and reused.

Configurations (``--configs``), each a fresh set of processes:

- ``qnext-1``: one process, ``qnext_mlx.load(path)``;
- ``qnext-tensor-2`` / ``qnext-pipeline-2``: ``mlx.launch -n 2 --backend ring`` on 127.0.0.1,
  each rank ``qnext_mlx.load(path, parallel="tensor" | "pipeline")`` in the group
  ``mx.distributed.init()``;
- ``mlx_lm-1``: one process, ``mlx_lm.load(path)``;
- ``mlx_lm-pipeline-2``: the same ``mlx.launch`` line, each rank
  ``mlx_lm.utils.sharded_load(path, pipeline_group=group)`` (what ``mlx_lm.benchmark
  --pipeline`` and ``mlx_lm.chat --pipeline`` do: ``model.model.pipeline(group)`` gives
  each rank a contiguous range of layers, rank 0 the last ones; hidden states go stage to
  stage by send/recv and an all_gather hands the last stage's to every rank).

This script is its own worker (``bench_distributed.py worker ...``): every rank loads the
model, runs one untimed warm-up generation, then ``--reps`` (default 2) timed ones of a fixed
``--prompt-tokens``-token prompt (default 512) and ``--decode-tokens`` greedy tokens (default
64), each on a fresh cache after a barrier: ours with ``qnext_mlx.engine.decode.generate_tokens``,
mlx-lm's with ``mlx_lm.generate.generate_step`` (both prefill in steps of 2048 tokens and
pipeline decoding one step ahead). Rank 0 times them: prefill tok/s is the prompt tokens over
the time to the first token (the prompt's last token and the first sample included, as
mlx-lm's ``prompt_tps``), decode tok/s the remaining tokens over the time from the first
token to the last. It writes one JSON (every run, the generated tokens, each rank's
parameter and peak memory). The best run per configuration is reported, and the ratios:
ours tensor 2 / mlx-lm pipeline 2 (decode and prefill), and each configuration against one
process of the same engine and against ``qnext-1``.

What this machine (a 2-core Linux box, MLX's CPU backend) can and cannot show:

- 2 ranks on 2 cores: each rank gets one core (ours runs ``QNEXT_CPU_LANES`` = cores / ranks
  per rank, ``--lanes`` to change; one process of ours spreads its work over both cores,
  mlx-lm runs every op on one thread, so ``mlx_lm-1`` uses one core).
- The ring backend runs over loopback TCP, tens of microseconds a hop, not a Thunderbolt or
  Ethernet link between Macs (hundreds of microseconds over TCP): the communication cost
  measured here is a lower bound of a real group's.
- The CPU backend is compute bound: tensor parallel halves each rank's work per token but
  pays one all-sum after every token mixer and every MoE (2 per layer); pipeline splits the
  layers, but a token walks both stages in turn, so it cannot decode faster than one
  process, and prefill chunks do not overlap between stages either.
- A Mac's decode is memory-bandwidth bound, which a CPU box does not reproduce: for Macs,
  ``python -m qnext_mlx.plan --model PATH --ranks 2 --parallel tensor`` (and ``pipeline``)
  predicts the decode rate and memory per rank (docs/distributed.md); run this script on
  the Macs themselves for measured figures (this script starts both ranks on this machine;
  it takes no hostfile).
- The machine may be shared: the load average before and after is recorded.

Results: ``OUT.json`` and ``OUT.png`` (default ``scripts/results/bench-distributed``), both
written to a temporary name and renamed; ``OUT.partial.json`` while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(REPO / "scripts"))

RANKS = 2
PREFILL_STEP = 2048  # both engines' default prefill_step_size
VOCAB = 4096  # the demo tokenizer's
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "tokenizer.json")
# name -> (engine, parallel mode or None, ranks)
CONFIGS: Dict[str, tuple] = {
    "qnext-1": ("qnext", None, 1),
    "qnext-tensor-2": ("qnext", "tensor", RANKS),
    "qnext-pipeline-2": ("qnext", "pipeline", RANKS),
    "mlx_lm-1": ("mlx_lm", None, 1),
    "mlx_lm-pipeline-2": ("mlx_lm", "pipeline", RANKS),
}
COLORS = {"qnext": "#2f6db5", "mlx_lm": "#9aa5b1"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ===================================================================== worker
def fixed_prompt(n: int, vocab: int) -> List[int]:
    """The same ``n`` token ids for every configuration."""
    return [(7919 * i + 13) % vocab for i in range(n)]


def barrier(group) -> None:
    import mlx.core as mx

    if group is not None and group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def timed_generation(tokens_of, prompt: List[int], n: int, group) -> dict:
    """One generation: ``tokens_of(prompt, n)`` yields ``n`` token ids; times on this rank."""
    barrier(group)
    c0, t0 = time.process_time(), time.perf_counter()
    tokens, times = [], []
    for tok in tokens_of(prompt, n):
        times.append(time.perf_counter())
        tokens.append(int(tok))
    cpu = time.process_time() - c0
    prefill_s = times[0] - t0
    decode_s = times[-1] - times[0]
    return {
        "prefill_s": prefill_s,
        "prefill_tok_s": len(prompt) / prefill_s,
        "decode_s": decode_s,
        "decode_tok_s": (len(times) - 1) / decode_s if len(times) > 1 and decode_s > 0 else None,
        "cpu_s": cpu,
        "tokens": tokens,
    }


def load_engine(engine: str, path: str, parallel: Optional[str], group):
    """``(model, tokens_of, info)``: ``tokens_of(prompt, n)`` yields ``n`` greedy token ids."""
    import mlx.core as mx

    if engine == "qnext":
        import qnext_mlx
        from qnext_mlx.engine.decode import generate_tokens
        from qnext_mlx.kernels.lanes import cpu_lanes

        model, _ = qnext_mlx.load(path, lazy=False, parallel=parallel, group=group)

        def tokens_of(prompt, n):
            cache = model.make_cache()
            for tok, _ in generate_tokens(model, cache, prompt, max_tokens=n, prefill_step_size=PREFILL_STEP,
                                          progress=False):  # fmt: skip
                yield tok

        return model, tokens_of, {"cpu_lanes": cpu_lanes()}

    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    if parallel is None:
        from mlx_lm import load

        model, _ = load(path)  # lazy=False: parameters evaluated
    elif parallel == "pipeline":
        from mlx_lm.utils import sharded_load

        model, _ = sharded_load(path, pipeline_group=group)
    else:
        raise ValueError(f"mlx-lm parallel mode {parallel!r} is not benchmarked")

    def tokens_of(prompt, n):
        cache = make_prompt_cache(model)
        for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=cache,
                                    prefill_step_size=PREFILL_STEP):  # fmt: skip
            yield tok

    return model, tokens_of, {"cpu_lanes": 1}


def worker(argv) -> int:
    """One rank's work (run by the driver, directly or under ``mlx.launch``)."""
    p = argparse.ArgumentParser(prog="bench_distributed.py worker")
    p.add_argument("--engine", choices=("qnext", "mlx_lm"), required=True)
    p.add_argument("--parallel", choices=("tensor", "pipeline"))
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=int, required=True)
    p.add_argument("--decode-tokens", type=int, required=True)
    p.add_argument("--reps", type=int, required=True)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    import mlx.core as mx
    from mlx.utils import tree_flatten

    group = mx.distributed.init() if args.parallel else None
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    t = time.perf_counter()
    model, tokens_of, info = load_engine(args.engine, args.model, args.parallel, group)
    barrier(group)
    load_s = time.perf_counter() - t
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    prompt = fixed_prompt(args.prompt_tokens, vocab)
    mx.reset_peak_memory()
    timed_generation(tokens_of, prompt[: min(16, len(prompt))], 2, group)  # warm-up, untimed
    runs = [timed_generation(tokens_of, prompt, args.decode_tokens, group) for _ in range(args.reps)]
    mine = [sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 2**20, mx.get_peak_memory() / 2**20]
    if group is not None and size > 1:
        every = mx.distributed.all_gather(mx.array(mine, dtype=mx.float32), group=group, stream=mx.cpu)
        every = every.reshape(size, 2).tolist()
    else:
        every = [mine]
    if rank == 0:
        result = {
            "engine": args.engine, "parallel": args.parallel, "ranks": size, "load_s": load_s, **info,
            "per_rank": [{"rank": r, "param_mib": a, "peak_mib": b} for r, (a, b) in enumerate(every)],
            "runs": runs,
        }  # fmt: skip
        write_json(result, args.json)
    barrier(group)
    return 0


# ===================================================================== driver
def checkpoint(layers: int, experts: int, work: Path) -> Path:
    """bench.py's random 4-bit checkpoint at the real widths, with the demo tokenizer and a
    ``model.safetensors.index.json`` (mlx-lm's ``sharded_load`` reads the index to pick
    each pipeline stage's files)."""
    import bench

    from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR
    from qnext_mlx.checkpoint.reader import read_safetensors_header

    cfg = dict(bench.DEFAULT_CONFIG, vocab_size=VOCAB, num_hidden_layers=layers,
               full_attention_interval=min(4, layers), num_experts=experts,
               num_experts_per_tok=min(10, experts))  # fmt: skip
    path = bench.checkpoint_for(cfg, work, "float32", seed=0)
    index = path / "model.safetensors.index.json"
    if not index.exists():
        names = read_safetensors_header(path / "model.safetensors")
        write_json({"metadata": {}, "weight_map": {k: "model.safetensors" for k in sorted(names)}}, index)
    if not (path / "tokenizer.json").exists():
        for name in TOKENIZER_FILES:  # tokenizer.json last: its presence marks the copy complete
            shutil.copy(DEMO_MODEL_DIR / name, path / name)
    return path


def free_ports(n: int) -> int:
    """A port ``p`` with ``p .. p + n - 1`` free on 127.0.0.1 (the ring backend's ports)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n > 65535:
            continue
        try:
            socks = []
            for q in range(p, p + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range for the ring backend")


def run_config(name: str, path: Path, args, out_json: Path) -> dict:
    engine, parallel, ranks = CONFIGS[name]
    cmd = [str(SCRIPT), "worker", "--engine", engine, "--model", str(path), "--prompt-tokens",
           str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens), "--reps", str(args.reps),
           "--json", str(out_json)]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if parallel is not None:
        cmd += ["--parallel", parallel]
    if ranks > 1:
        lanes = args.lanes or max(1, (os.cpu_count() or 1) // ranks)
        env["QNEXT_CPU_LANES"] = str(lanes)
        launch = shutil.which("mlx.launch")
        if launch is None:
            raise RuntimeError("mlx.launch is not installed")
        cmd = [launch, "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_ports(ranks)),
               "--env", f"QNEXT_CPU_LANES={lanes}", "--python", sys.executable, "--", *cmd]  # fmt: skip
    else:
        if args.lanes:
            env["QNEXT_CPU_LANES"] = str(args.lanes)
        cmd = [sys.executable, *cmd]
    out_json.unlink(missing_ok=True)
    t = time.perf_counter()
    # its own session, so that a timeout ends mlx.launch and the ranks it started together
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"{name} ran past --timeout {args.timeout:.0f} s") from None
    if proc.returncode != 0 or not out_json.exists():
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}")
    result = json.loads(out_json.read_text())
    result["wall_s"] = time.perf_counter() - t
    result["command"] = cmd
    runs = result["runs"]
    result["best"] = {
        "prefill_tok_s": max(r["prefill_tok_s"] for r in runs),
        "decode_tok_s": max((r["decode_tok_s"] or 0.0) for r in runs),
    }
    return result


def ratios(configs: Dict[str, dict]) -> dict:
    def ratio(a: str, b: str, key: str) -> Optional[float]:
        if a in configs and b in configs and configs[b]["best"][key]:
            return configs[a]["best"][key] / configs[b]["best"][key]
        return None

    out = {
        "qnext_tensor2_vs_mlx_lm_pipeline2_decode": ratio("qnext-tensor-2", "mlx_lm-pipeline-2", "decode_tok_s"),
        "qnext_tensor2_vs_mlx_lm_pipeline2_prefill": ratio("qnext-tensor-2", "mlx_lm-pipeline-2", "prefill_tok_s"),
        "qnext_pipeline2_vs_mlx_lm_pipeline2_decode": ratio("qnext-pipeline-2", "mlx_lm-pipeline-2", "decode_tok_s"),
        "vs_same_engine_1": {},
        "vs_qnext_1": {},
    }
    for name, (engine, _, _) in CONFIGS.items():
        if name not in configs:
            continue
        one = f"{engine}-1"
        out["vs_same_engine_1"][name] = {k: ratio(name, one, f"{k}_tok_s") for k in ("prefill", "decode")}
        out["vs_qnext_1"][name] = {k: ratio(name, "qnext-1", f"{k}_tok_s") for k in ("prefill", "decode")}
    return out


def write_json(obj: dict, path: Path) -> None:
    """Write ``obj`` as JSON through a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def plot(result: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart (pip install matplotlib)")
        return None
    configs = result["configs"]
    names = list(configs)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.2 * len(names) + 3), 4.8))
    for ax, key, title in ((axes[0], "prefill", "prefill"), (axes[1], "decode", "decode")):
        values = [configs[n]["best"][f"{key}_tok_s"] for n in names]
        ax.bar(range(len(names)), values, color=[COLORS[configs[n]["engine"]] for n in names])
        for i, n in enumerate(names):
            r = result["ratios"]["vs_same_engine_1"][n][key]
            label = f"{values[i]:.1f}" + (f"\n{r:.2f}x 1 proc" if r is not None and configs[n]["ranks"] > 1 else "")
            ax.text(i, values[i] * 1.02, label, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_ylabel("tokens / s (higher is better)")
        s = result["settings"]
        ax.set_title(f"{title}: {s['prompt_tokens']}-token prompt" if key == "prefill"
                     else f"{title}: {s['decode_tokens']} greedy tokens", fontsize=9)  # fmt: skip
        ax.margins(y=0.25)
    cfg, m, s = result["config"], result["machine"], result["settings"]
    n_attn = cfg["num_hidden_layers"] // cfg["full_attention_interval"]
    tr = result["ratios"]["qnext_tensor2_vs_mlx_lm_pipeline2_decode"]
    fig.suptitle(
        f"hidden {cfg['hidden_size']}, {cfg['num_hidden_layers'] - n_attn} DeltaNet + {n_attn} attention layers, "
        f"{cfg['num_experts']} experts (top-{cfg['num_experts_per_tok']}), 4-bit; best of {s['reps']}\n"
        f"MLX {m['mlx']} CPU backend, {m['cpus']} cores, 2 ranks over loopback TCP (ring); mlx-lm {m['mlx_lm']}"
        + (f"; decode ours tensor 2 / mlx-lm pipeline 2 = {tr:.2f}x" if tr is not None else ""),
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="decoder layers, one attention layer every 4 (default 4)")
    p.add_argument("--experts", type=int, default=64, help="routed experts per layer (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2, help="timed runs per configuration; the best is kept (default 2)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--lanes", type=int, help="QNEXT_CPU_LANES per rank (default: cores / ranks; one process: all)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration (default 3600)")
    p.add_argument("--work", type=Path, default=REPO / "bench_out" / "distributed", help="checkpoint folder")
    p.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "bench-distributed")
    args = p.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    if args.layers < RANKS:
        p.error(f"--layers must be at least {RANKS} (one per pipeline stage)")
    if args.experts < 1 or args.prompt_tokens < 2 or args.decode_tokens < 2 or args.reps < 1:
        p.error("--experts >= 1, --prompt-tokens >= 2, --decode-tokens >= 2 and --reps >= 1")
    import bench

    machine = bench.machine_info()
    machine["loadavg_start"] = list(os.getloadavg())
    path = checkpoint(args.layers, args.experts, args.work)
    result = {
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "checkpoint": str(path),
        "config": json.loads((path / "config.json").read_text()),
        "configs": {},
    }
    partial = args.out.with_name(args.out.name + ".partial.json")
    for name in names:
        log(f"{name}: {' '.join(map(str, CONFIGS[name][1:]))} ...")
        try:
            entry = run_config(name, path, args, args.work / f"run-{name}.json")
        except RuntimeError as e:  # a rank failed or hung: what is done so far is in the partial JSON
            log(f"error: {e}")
            return 1
        result["configs"][name] = entry
        log(f"  prefill {entry['best']['prefill_tok_s']:.1f} tok/s, decode {entry['best']['decode_tok_s']:.2f} tok/s "
            f"(load {entry['load_s']:.1f} s, {entry['wall_s']:.0f} s in all)")  # fmt: skip
        write_json(result, partial)  # what is done survives a later failure
    reference = result["configs"].get("qnext-1", next(iter(result["configs"].values())))["runs"][0]["tokens"]
    result["tokens_match_qnext_1"] = {n: e["runs"][0]["tokens"] == reference for n, e in result["configs"].items()}
    result["ratios"] = ratios(result["configs"])
    machine["loadavg_end"] = list(os.getloadavg())
    json_path, png_path = args.out.with_name(args.out.name + ".json"), args.out.with_name(args.out.name + ".png")
    write_json(result, json_path)
    partial.unlink(missing_ok=True)
    chart = plot(result, png_path)
    print(f"\n{'configuration':<20}{'prefill tok/s':>15}{'decode tok/s':>14}{'vs 1 proc (p/d)':>18}  tokens = qnext-1")
    for name, e in result["configs"].items():
        vs = result["ratios"]["vs_same_engine_1"][name]
        fmt = "/".join(f"{v:.2f}" if v is not None else "-" for v in (vs["prefill"], vs["decode"]))
        print(f"{name:<20}{e['best']['prefill_tok_s']:15.2f}{e['best']['decode_tok_s']:14.2f}{fmt:>18}  "
              f"{result['tokens_match_qnext_1'][name]}")  # fmt: skip
    tr = result["ratios"]["qnext_tensor2_vs_mlx_lm_pipeline2_decode"]
    if tr is not None:
        print(f"decode: ours tensor 2 / mlx-lm pipeline 2 = {tr:.2f}x")
    print(f"load average {machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}")
    print(f"\nwrote {json_path}" + (f" and {chart}" if chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
