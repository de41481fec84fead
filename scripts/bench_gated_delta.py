#!/usr/bin/env python
"""Micro-benchmark of the gated delta rule at Qwen3-Next's DeltaNet layer shapes.

Times, on MLX's default device (the CPU backend on Linux):

- ``recurrent``: :func:`qnext_mlx.kernels.gated_delta_recurrent` (token-by-token MLX ops);
- ``mlx_lm``: ``mlx_lm.models.gated_delta.gated_delta_update`` (takes raw
  ``a, b, A_log, dt_bias``; off Metal it runs its compiled per-token ops);
- ``chunked``: :func:`qnext_mlx.kernels.gated_delta_chunked` on one CPU stream
  (``lanes=1``, directly comparable with the two above, which are single-threaded);
- ``chunked_lanes``: the same with ``lanes`` = one per available core (heads
  split across CPU streams/threads; opt-in in the library), when that is more
  than one.

Every timed call includes the decay/beta computation from the raw projections
(as ``gated_delta_update`` does), and ends with ``mx.eval`` of the outputs and
final state. Each method is warmed up first. Reported: best wall time over the
repetitions and tok/s from it, plus the process CPU time of that run (useful on
a shared machine: for the single-stream methods CPU time ~ wall time when the
machine is idle).

Usage:
    python scripts/bench_gated_delta.py --quick
    python scripts/bench_gated_delta.py --json bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import mlx.core as mx

from qnext_mlx.kernels import compute_decay_beta, gated_delta_chunked, gated_delta_recurrent
from qnext_mlx.kernels.lanes import default_lanes

B, HK, HV, DK, DV = 1, 16, 32, 128, 128


def make_inputs(T: int, dtype, seed: int = 0):
    mx.random.seed(seed)
    q = mx.random.normal((B, T, HK, DK))
    k = mx.random.normal((B, T, HK, DK))
    q = q * mx.rsqrt((q * q).sum(-1, keepdims=True) + 1e-6) * DK**-0.5
    k = k * mx.rsqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    v = mx.random.normal((B, T, HV, DV))
    a = mx.random.normal((B, T, HV))
    b = mx.random.normal((B, T, HV))
    A_log = mx.random.uniform(-2.0, 1.0, (HV,))
    dt_bias = mx.random.uniform(-1.0, 1.0, (HV,))
    state = 0.1 * mx.random.normal((B, HV, DV, DK))
    arrs = [x.astype(dtype) for x in (q, k, v, a, b)] + [A_log, dt_bias, state]
    mx.eval(arrs)
    return arrs


def method_fns(chunk: int, lanes: int):
    from mlx_lm.models.gated_delta import gated_delta_update

    def recurrent(q, k, v, a, b, A_log, dt_bias, state):
        g, beta = compute_decay_beta(a, b, A_log, dt_bias)
        return gated_delta_recurrent(q, k, v, g, beta, state)

    def mlx_lm(q, k, v, a, b, A_log, dt_bias, state):
        return gated_delta_update(q, k, v, a, b, A_log, dt_bias, state)

    def chunked(q, k, v, a, b, A_log, dt_bias, state):
        g, beta = compute_decay_beta(a, b, A_log, dt_bias)
        return gated_delta_chunked(q, k, v, g, beta, state, chunk_size=chunk, lanes=1)

    def chunked_lanes(q, k, v, a, b, A_log, dt_bias, state):
        g, beta = compute_decay_beta(a, b, A_log, dt_bias)
        return gated_delta_chunked(q, k, v, g, beta, state, chunk_size=chunk, lanes=lanes)

    fns = {"recurrent": recurrent, "mlx_lm": mlx_lm, "chunked": chunked}
    if lanes > 1:
        fns["chunked_lanes"] = chunked_lanes
    return fns


def time_call(fn, args, reps: int):
    best = None
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn(*args)
        mx.eval(out)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if best is None or wall < best[0]:
            best = (wall, cpu)
    return best, out


def rel_err(a, b) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T=512 only")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default 512 2048)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset of: recurrent mlx_lm chunked chunked_lanes")  # fmt: skip
    p.add_argument("--chunk", type=int, default=16, help="chunk size for the chunked path (16: CPU default)")
    p.add_argument("--lanes", type=int, default=None, help="lanes for chunked_lanes (default: one per core)")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions per case (best is kept)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    args = p.parse_args(argv)

    lengths = args.lengths or ([512] if args.quick else [512, 2048])
    lanes = args.lanes if args.lanes is not None else default_lanes()
    fns = method_fns(args.chunk, lanes)
    if args.methods:
        fns = {m: fns[m] for m in args.methods if m in fns}

    print(f"device={mx.default_device()} mlx={mx.__version__} B={B} Hk={HK} Hv={HV} Dk={DK} Dv={DV} "
          f"chunk={args.chunk} lanes(chunked_lanes)={lanes}")  # fmt: skip
    results = []
    for dtype_name in args.dtypes:
        dtype = getattr(mx, dtype_name)
        for T in lengths:
            inputs = make_inputs(T, dtype)
            warm = make_inputs(64, dtype, seed=1)
            outs = {}
            for name, fn in fns.items():
                # Warm-up: compile caches and allocator; the token-by-token
                # methods are linear in T, a short warm-up suffices for them.
                mx.eval(fn(*(inputs if name.startswith("chunked") else warm)))
                (wall, cpu), out = time_call(fn, inputs, args.reps)
                outs[name] = out
                results.append({"dtype": dtype_name, "T": T, "method": name, "wall_s": wall,
                                "cpu_s": cpu, "tok_per_s": T / wall, "tok_per_cpu_s": T / cpu})  # fmt: skip
                print(f"{dtype_name:9s} T={T:5d} {name:14s} {wall * 1e3:9.1f} ms  {T / wall:8.0f} tok/s"
                      f"   (cpu {cpu * 1e3:8.1f} ms, {T / cpu:8.0f} tok/cpu-s)", flush=True)  # fmt: skip
            base = next(
                (r for r in results if r["dtype"] == dtype_name and r["T"] == T and r["method"] == "mlx_lm"), None
            )
            for r in results:
                if base and r["dtype"] == dtype_name and r["T"] == T and r["method"].startswith("chunked"):
                    r["speedup_vs_mlx_lm"] = base["wall_s"] / r["wall_s"]
                    r["cpu_speedup_vs_mlx_lm"] = base["cpu_s"] / r["cpu_s"]
                    print(f"{'':9s} {'':7s} ratio {r['method']} / mlx_lm: {r['speedup_vs_mlx_lm']:.2f}x tok/s "
                          f"({r['cpu_speedup_vs_mlx_lm']:.2f}x per cpu-s)")  # fmt: skip
            if "chunked" in outs and "mlx_lm" in outs:
                ey, es = rel_err(outs["chunked"][0], outs["mlx_lm"][0]), rel_err(outs["chunked"][1], outs["mlx_lm"][1])
                print(f"{'':9s} {'':7s} rel err chunked vs mlx_lm: y {ey:.2e}  state {es:.2e}")
                for r in results:
                    if r["dtype"] == dtype_name and r["T"] == T and r["method"] == "chunked":
                        r["rel_err_y_vs_mlx_lm"], r["rel_err_state_vs_mlx_lm"] = ey, es

    if args.json:
        meta = {"device": str(mx.default_device()), "mlx": mx.__version__, "machine": platform.machine(),
                "shapes": {"B": B, "Hk": HK, "Hv": HV, "Dk": DK, "Dv": DV}, "chunk": args.chunk,
                "lanes": lanes, "reps": args.reps}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
