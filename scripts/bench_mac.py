#!/usr/bin/env python
"""qnext-mlx against mlx-lm on your Mac, on your converted model: a report to paste into an issue.

    python scripts/bench_mac.py --model ~/models/qwen3-next-4bit
    python scripts/bench_mac.py --model PATH --lengths 512 4096 --out my-mac   # shorter

Meant for Apple silicon Macs with Metal (64 GB or more for the 80B model). It runs on any
MLX backend, but elsewhere the figures say nothing about Metal: on Linux it exists to check
that the script works (``--quick`` runs it at tiny sizes; tests/test_bench_mac.py does).

Both engines load the same folder (written by ``python -m qnext_mlx.convert``, or by
``mlx_lm.convert``: then there is no MTP head and the MTP part is skipped). Before any
timing their logits on one prompt are compared (``scripts/bench.py``'s check: with
16-bit activations, as real models have, within 10% of the logits' scale and the same
top token at 90% of the positions): a mismatch stops the run with exit status 1. Then,
with the engines taking turns (order reversed every other rep, ``--reps`` >= 2, best
run kept, wall clock and process CPU seconds):

- prefill tok/s at 512, 4096 and 32768 tokens (``--lengths``): a fresh cache, steps of
  2048 tokens as ``mlx_lm.generate`` does;
- decode tok/s: ``--decode-tokens`` greedy tokens after a 512-token prompt;
- peak memory per engine (weights + the transient peak over its runs);
- qnext-mlx's MTP speculative decoding: plain and K = 1..3 drafts (``--ks``) on a real
  prompt, with acceptance rates (``scripts/bench_mtp.py``'s measurement, every path
  warmed up first); mlx-lm has no MTP;
- the kernel choices qnext-mlx made on this machine (``qnext_mlx.kernels.candidates``:
  per op and shape every candidate's error and time), as ``python -m qnext_mlx.doctor``
  shows them, and the MTP default it decided.

Outputs in ``--out`` (default ``bench_mac_out/``): ``bench_mac.json``, ``bench_mac.png``
(skipped with a message without matplotlib) and ``bench_mac.md``, a markdown summary to
paste into an issue (https://github.com/ : title "Speed on <your chip>").
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench  # noqa: E402  (scripts/bench.py: timing, parity check, JSON writing)
import bench_mtp  # noqa: E402

import qnext_mlx  # noqa: E402
from qnext_mlx.engine import speculative  # noqa: E402
from qnext_mlx.engine.text import format_prompt  # noqa: E402
from qnext_mlx.kernels import candidates  # noqa: E402

ENGINES = ("qnext_mlx", "mlx_lm")
QUICK = dict(lengths=[64, 128], decode_tokens=8, ks=[1], mtp_tokens=16, decode_prompt=64)
FULL = dict(lengths=[512, 4096, 32768], decode_tokens=128, ks=[1, 2, 3], mtp_tokens=256, decode_prompt=512)


def load_engines(path: Path) -> Dict:
    """Both engines from one folder. mlx-lm refuses the ``mtp.*`` tensors a qnext-mlx
    conversion keeps, so it loads non-strictly; the parity check then proves it got
    every weight it uses."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    ours, tokenizer = qnext_mlx.load(path, lazy=False)
    theirs, _ = mlx_lm_load_model(Path(path), lazy=False, strict=False)
    return {"qnext_mlx": ours, "mlx_lm": theirs}, tokenizer


def run_side_by_side(models: Dict, vocab: int, lengths: List[int], reps: int, decode_tokens: int, decode_prompt: int):
    """bench.run's alternating runs for the two engines (no lanes: off the CPU there are none)."""
    res = bench.run(models, vocab, lengths, reps, decode_tokens, decode_prompt, lanes={})
    timings = {
        name: {
            "prefill": {L: bench.summarize(runs, int(L)) for L, runs in res[name]["prefill"].items()},
            "decode": bench.summarize(res[name]["decode"], decode_tokens),
        }
        for name in ENGINES
    }

    def pair(a: Dict, b: Dict) -> Dict:
        return {
            "qnext_mlx": a["tok_s"],
            "mlx_lm": b["tok_s"],
            "ratio": b["wall_s"] / a["wall_s"],
            "ratio_cpu": b["cpu_s"] / a["cpu_s"],
        }

    same = res["qnext_mlx"]["decode_ids"] == res["mlx_lm"]["decode_ids"]
    return res, timings, pair, same


def write_chart(result: Dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        bench.log("matplotlib is not installed: no chart (pip install matplotlib)")
        return None
    rows = [(f"prefill {L}", r) for L, r in result["prefill"].items()] + [("decode", result["decode"])]
    panels = 2 if result.get("mtp") else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 + 4 * (panels - 1), 4.4), squeeze=False)
    ax = axes[0][0]
    width = 0.38
    for i, (eng, color, label) in enumerate((("mlx_lm", "#9aa5b1", "mlx-lm"), ("qnext_mlx", "#2f6db5", "qnext-mlx"))):
        xs = [g + (i - 0.5) * width for g in range(len(rows))]
        ax.bar(xs, [r[eng] for _, r in rows], width, label=label, color=color)
    for g, (_, r) in enumerate(rows):
        ax.text(g, max(r["qnext_mlx"], r["mlx_lm"]) * 1.02, f"{r['ratio']:.2f}x", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(rows)), [label for label, _ in rows])
    ax.set_ylabel("tokens / s (higher is better)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"{result['machine']['chip']}, {result['model']['name']}", fontsize=9)
    if panels == 2:
        ax2 = axes[0][1]
        m = result["mtp"]
        labels = ["plain"] + [f"K={k}" for k in m["mtp"]]
        vals = [m["plain"]["tok_s"]] + [r["tok_s"] for r in m["mtp"].values()]
        ax2.bar(range(len(vals)), vals, color="#2f6db5")
        for i, k in enumerate(m["mtp"]):
            r = m["mtp"][k]
            label = f"{r['speedup']:.2f}x\n{100 * r['acceptance_rate']:.0f}%"
            ax2.text(i + 1, vals[i + 1] * 1.02, label, ha="center", fontsize=8)
        ax2.set_xticks(range(len(vals)), labels)
        ax2.set_title("qnext-mlx decode with MTP drafts", fontsize=9)
        ax2.margins(y=0.2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def markdown(result: Dict) -> str:
    """The summary to paste into an issue."""
    m, mod = result["machine"], result["model"]
    lines = [
        f"## qnext-mlx vs mlx-lm on {m['chip']}",
        "",
        f"`python scripts/bench_mac.py {' '.join(result['argv'])}`: {mod['name']} "
        f"({mod['weights_gb']:.2f} GB of weights), "
        f"OS {m['os']}, MLX {m['mlx']}, mlx-lm {m['mlx_lm']}, qnext-mlx {m['qnext_mlx']}, "
        f"default device {m['device']}. Best of {result['reps']} runs each, engines alternating.",
        "",
        f"Parity ({result['parity']['activations']} activations): max |logit difference| "
        f"{result['parity']['max_logit_diff']:.2g} (logits up to {result['parity']['max_abs_logit']:.3g}), "
        f"same top token at {100 * result['parity']['top1_agreement']:.0f}% of the positions; "
        f"greedy decode tokens {'identical' if result['decode'].get('same_tokens', True) else 'not identical'}.",
        "",
        "| | qnext-mlx tok/s | mlx-lm tok/s | ratio (wall) | ratio (CPU s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    rows = [(f"prefill {L}", r) for L, r in result["prefill"].items()] + [("decode", result["decode"])]
    for label, r in rows:
        cells = f"{r['qnext_mlx']:.1f} | {r['mlx_lm']:.1f} | {r['ratio']:.2f}x | {r['ratio_cpu']:.2f}x"
        lines.append(f"| {label} | {cells} |")
    mem = result["memory_gb"]
    lines += [
        "",
        f"Peak memory: qnext-mlx {mem['qnext_mlx']['peak']:.2f} GB, mlx-lm {mem['mlx_lm']['peak']:.2f} GB "
        f"(weights {mem['qnext_mlx']['weights']:.2f} GB).",
    ]
    if result.get("mtp"):
        t = result["mtp"]
        lines += [
            "",
            f"MTP speculative decoding (qnext-mlx, {t['max_tokens']} tokens, greedy):",
            "",
            "| | tok/s | speedup | drafts accepted | tokens per step |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| plain | {t['plain']['tok_s']:.1f} | 1.00x | | |",
        ]
        for k, r in t["mtp"].items():
            lines.append(
                f"| K={k} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {100 * r['acceptance_rate']:.0f}% "
                f"| {r['mean_accepted_length']:.2f} |"
            )
    else:
        lines += ["", f"MTP: {result.get('mtp_skipped', 'not measured')}."]
    lines += ["", "Kernel choices (per op and shape: every candidate's status, error and time):", ""]
    lines += ["| op | shape | choice | candidates |", "| --- | --- | --- | --- |"]
    for d in result["kernel_choices"]:
        parts = []
        for t in d["trials"]:
            bits = [t["status"]]
            if t["max_error"] is not None:
                bits.append(f"err {t['max_error']:.1e}")
            if t["time_us"] is not None:
                bits.append(f"{t['time_us']:.0f} us")
            parts.append(f"{t['candidate']}: {', '.join(bits)}")
        lines.append(f"| {d['op']} | {d['config']} | {d['choice']} ({d['how']}) | {'; '.join(parts)} |")
    if not result["kernel_choices"]:
        lines.append("| | | none: this backend has no kernel candidates (not Metal) | |")
    if not result["metal"]:
        lines += ["", "**Not a Metal run**: these figures say nothing about speed on a Mac."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="a converted model folder (qnext_mlx.convert or mlx_lm)")
    p.add_argument("--lengths", type=int, nargs="+", help="prefill lengths (default 512 4096 32768)")
    p.add_argument("--decode-tokens", type=int, help="greedy tokens timed (default 128)")
    p.add_argument("--ks", type=int, nargs="+", help="MTP draft counts (default 1 2 3)")
    p.add_argument("--mtp-tokens", type=int, help="tokens per MTP run (default 256)")
    p.add_argument("--reps", type=int, default=2, help="runs per measurement, at least 2 (default 2)")
    p.add_argument("--no-mtp", action="store_true", help="skip the MTP measurement")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script (not a benchmark)")
    p.add_argument("--out", type=Path, default=REPO / "bench_mac_out", help="output folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.reps < 2:
        bench.log("error: --reps must be at least 2 (the engines take turns going first)")
        return 2
    if not (args.model / "config.json").exists():
        bench.log(f"error: {args.model} is not a model folder (no config.json)")
        return 2
    sizes = dict(QUICK if args.quick else FULL)
    for key in ("lengths", "decode_tokens", "ks", "mtp_tokens"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    metal = candidates.METAL.available()
    if not metal:
        bench.log("note: no Metal here: this checks the script; the figures say nothing about a Mac")
    t0 = time.perf_counter()
    models, tokenizer = load_engines(args.model)
    for mdl in models.values():
        mx.eval(mdl.parameters())
    vocab = models["qnext_mlx"].config.vocab_size
    parity = bench.check_parity(models, vocab, length=min(128, max(sizes["lengths"])))
    bench.log(
        f"parity: max |logit diff| {parity['max_logit_diff']:.3g}, greedy tokens: {parity['greedy_tokens_match']}"
    )
    if not parity["ok"]:
        bench.log("error: the engines disagree (parity check above): not timing them")
        return 1
    for mdl in models.values():  # warm-up: kernels compiled and chosen before any timing
        c = mdl.make_cache()
        bench.decode(mdl, bench.prefill(mdl, bench.prompt(64, vocab, 3), c), c, 2)
    res, timings, pair, same = run_side_by_side(
        models, vocab, sizes["lengths"], args.reps, sizes["decode_tokens"], sizes["decode_prompt"]
    )
    if parity["exact"] and not same:
        bench.log("error: the engines decoded different tokens")
        return 1
    machine = candidates.machine()
    info = bench.machine_info()
    machine.update(mlx_lm=info["mlx_lm"], device=info["device"], platform=platform.platform())
    weights = bench.param_bytes(models["qnext_mlx"])
    shown = [args.model.name if a == str(args.model) else a for a in argv]  # no home folder in the report
    result = {
        "argv": shown,
        "metal": metal,
        "machine": machine,
        "model": {"name": args.model.name, "weights_gb": weights / 1e9},
        "reps": args.reps,
        "sizes": sizes,
        "parity": parity,
        "prefill": {L: pair(timings["qnext_mlx"]["prefill"][L], t) for L, t in timings["mlx_lm"]["prefill"].items()},
        "decode": dict(
            pair(timings["qnext_mlx"]["decode"], timings["mlx_lm"]["decode"]),
            prompt_tokens=sizes["decode_prompt"],
            tokens=sizes["decode_tokens"],
            same_tokens=same,
        ),
        "memory_gb": {
            name: {
                "weights": bench.param_bytes(models[name]) / 1e9,
                "peak": (bench.param_bytes(models[name]) + res[name]["peak_extra_bytes"]) / 1e9,
            }
            for name in ENGINES
        },
        "timings": timings,
    }
    ours = models["qnext_mlx"]
    if args.no_mtp or not ours.has_mtp:
        result["mtp_skipped"] = "--no-mtp" if args.no_mtp else "the checkpoint has no MTP head (converted without it)"
    else:
        text = bench_mtp.DEFAULT_PROMPT
        text = format_prompt(tokenizer, text) if getattr(tokenizer, "chat_template", None) else text
        ids = tokenizer.encode(text)
        result["mtp"] = bench_mtp.bench_mtp(ours, ids, sizes["ks"], sizes["mtp_tokens"], args.reps, log=bench.log)
    result["mtp_default"] = bool(speculative.mtp_default(ours))
    result["kernel_choices"] = [d.to_json() for d in candidates.decisions() if d.op != speculative.MTP_TRIAL_OP]
    result["elapsed_s"] = time.perf_counter() - t0
    out = args.out
    bench.write_json(result, out / "bench_mac.json")
    chart = write_chart(result, out / "bench_mac.png")
    md = markdown(result)
    (out / "bench_mac.md.tmp").write_text(md)
    (out / "bench_mac.md.tmp").replace(out / "bench_mac.md")
    print(md)
    bench.log(f"wrote {out / 'bench_mac.json'}, {out / 'bench_mac.md'}" + (f" and {chart}" if chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
