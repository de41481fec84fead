#!/usr/bin/env python3
"""Benchmark the streaming converter: conversion time and peak memory against input size.

    python scripts/bench_convert.py [--layers 2 7] [--set key=value ...] [--max-shard-size 500MB]
                                    [--q-bits 4] [--workdir DIR] [--keep]

For each ``--layers`` value it writes a synthetic Hugging Face checkpoint (random
bf16 data under the real tensor names and shapes: per-expert tensors, torch
conv1d layout, ``mtp.*``; several input shards), converts it in a fresh process
with the converter's CLI (float, and quantized), and prints one row per run:
input size, shards in/out, time, and the converter process's peak RSS (as the
child reports it: VmHWM on Linux). A streaming converter's peak stays flat while
the input grows. Synthetic checkpoints are deleted afterwards unless ``--keep``.

Importable: :func:`hf_tensor_specs` (names and shapes of a config's HF
checkpoint) and :func:`write_synthetic_checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Tuple

from make_tiny_checkpoint import _parse_value  # the same --set KEY=VALUE parsing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# A scaled-down Qwen3-Next whose layers are big enough for memory to show:
# 128 experts x 3 x 512 x 1024 in bf16 is ~400 MB per MoE layer.
BENCH = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2048,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=128,
    linear_num_key_heads=8,
    linear_num_value_heads=16,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=512,
    shared_expert_intermediate_size=512,
)


def hf_tensor_specs(config) -> Dict[str, Tuple[int, ...]]:
    """``{name: shape}`` of the Hugging Face checkpoint of ``config`` (a ModelConfig).

    Derived from our own module tree by undoing :meth:`Model.sanitize`'s
    renames: stacked ``switch_mlp`` experts become ``experts.{e}.*`` and conv1d
    goes back to torch's ``[C, 1, K]``. Nothing is allocated (shapes only).
    """
    from mlx.utils import tree_flatten

    from qnext_mlx.model import Model

    specs: Dict[str, Tuple[int, ...]] = {}
    for name, arr in tree_flatten(Model(config).parameters()):
        shape = tuple(arr.shape)
        if ".switch_mlp." in name:
            prefix, proj = name.split(".switch_mlp.")
            for e in range(shape[0]):
                specs[f"{prefix}.experts.{e}.{proj}"] = shape[1:]
        elif name.endswith("conv1d.weight"):
            specs[name] = (shape[0], shape[2], shape[1])
        else:
            specs[name] = shape
    return dict(sorted(specs.items()))


def write_synthetic_checkpoint(
    out: Path, overrides: dict, shard_bytes: int = 500 * 10**6, mtp: bool = True, seed: int = 0
) -> Tuple[int, int]:
    """Write a random bf16 HF-format checkpoint to ``out``; returns ``(bytes, shards)``.

    Tensors are generated and written one shard at a time, so memory stays at
    about one shard whatever the checkpoint's size.
    """
    import make_tiny_checkpoint as mtc
    import mlx.core as mx
    import numpy as np

    from qnext_mlx.model.config import ModelConfig

    cfg = dict(mtc.TINY, **overrides)
    cfg.update(model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], dtype="bfloat16")
    if mtp:
        cfg["num_nextn_predict_layers"] = 1
    config = ModelConfig.from_dict(cfg)
    config.num_mtp_layers = 1 if mtp else 0
    specs = hf_tensor_specs(config)

    shards, size = [], 0
    for name, shape in specs.items():
        n = 2
        for s in shape:
            n *= s
        if not shards or size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = specs[name]
            # norms, A_log, dt_bias: small values; matrices: ~1/sqrt(fan_in)
            scale = 0.1 if len(shape) == 1 else shape[-1] ** -0.5
            x = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
            # bf16 = the top 16 bits of float32 (numpy has no bf16; MLX reinterprets the bits)
            tensors[name] = mx.array((x.view(np.uint32) >> 16).astype(np.uint16)).view(mx.bfloat16)
        mx.eval(tensors)
        mx.save_safetensors(str(out / file_name), tensors, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({k: file_name for k in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total, len(shards)


def run_convert(args) -> Tuple[float, int, int]:
    """Run the converter CLI in a child process; returns ``(seconds, peak_rss_bytes, exit_code)``.

    The child reports its own peak (``peak_rss_bytes``: VmHWM on Linux): the
    ``ru_maxrss`` that ``wait4`` gives would include this (large) parent's
    image, inherited at fork.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = (
        "import sys; from qnext_mlx.convert import main; from qnext_mlx.checkpoint.convert import peak_rss_bytes; "
        "rc = main(sys.argv[1:]); "
        "print(f'PEAK_RSS {peak_rss_bytes()}'); sys.exit(rc)"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", child, *args, "--quiet"], env=env, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    peak = next((int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS ")), 0)
    return seconds, peak, proc.returncode


def folder_stats(path: Path) -> Tuple[int, int]:
    files = list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files), len(files)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 7], help="num_hidden_layers of each checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a BENCH config value")
    p.add_argument("--input-shard-size", default="500MB", help="shard size of the synthetic input")
    p.add_argument("--max-shard-size", nargs="+", default=["500MB"], help="converter output shard size(s)")
    p.add_argument(
        "--q-bits", type=int, nargs="*", default=[4], help="quantized runs (a float bf16 run is always done)"
    )
    p.add_argument("--workdir", type=Path, default=None, help="where checkpoints go (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and outputs")
    args = p.parse_args(argv)

    from qnext_mlx.checkpoint.convert import human_size, parse_size

    overrides = dict(BENCH)
    for item in args.set:
        k, v = item.split("=", 1)
        overrides[k] = _parse_value(v)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    header = (
        f"{'layers':>6} {'input':>9} {'in shards':>9} {'mode':>6} {'shard max':>9} {'output':>9} "
        f"{'out shards':>10} {'time s':>7} {'peak RSS':>9} {'RSS/input':>9}"
    )
    try:
        for n_layers in args.layers:
            src = work / f"synthetic-{n_layers}l"
            t0 = time.perf_counter()
            in_bytes, in_shards = write_synthetic_checkpoint(
                src, dict(overrides, num_hidden_layers=n_layers), parse_size(args.input_shard_size)
            )
            print(
                f"wrote {src}: {human_size(in_bytes)} in {in_shards} shards in {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            for shard in args.max_shard_size:
                for bits in [None, *args.q_bits]:
                    dst = work / f"out-{n_layers}l-{bits or 'bf16'}-{shard}"
                    cli = ["--hf-path", str(src), "--mlx-path", str(dst), "--max-shard-size", shard, "--force"]
                    if bits:
                        cli += ["--q-bits", str(bits)]
                    seconds, peak, code = run_convert(cli)
                    if code != 0:
                        print(f"conversion failed (exit {code})", file=sys.stderr)
                        return 1
                    out_bytes, out_shards = folder_stats(dst)
                    rows.append(
                        f"{n_layers:>6} {human_size(in_bytes):>9} {in_shards:>9} "
                        f"{('q' + str(bits)) if bits else 'bf16':>6} {shard:>9} {human_size(out_bytes):>9} "
                        f"{out_shards:>10} {seconds:>7.1f} {human_size(peak):>9} {peak / in_bytes:>9.2f}"
                    )
                    print(rows[-1], file=sys.stderr, flush=True)
                    if not args.keep:
                        shutil.rmtree(dst)
            if not args.keep:
                shutil.rmtree(src)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(header)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
