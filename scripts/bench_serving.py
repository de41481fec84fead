#!/usr/bin/env python3
"""Serving benchmark: our server and ``mlx_lm.server`` on identical weights, side by side.

    python scripts/bench_serving.py                # the demo model, 1..16 clients, and the admission run
    python scripts/bench_serving.py --models demo,wide --out scripts/results/bench-serving

For each checkpoint (``demo``: the bundled demo model converted by ``mlx_lm.convert -q``;
``wide``: a random 4-bit mlx-lm-format checkpoint at the real Qwen3-Next layer widths with
4 layers, 64 experts and the demo tokenizer's 4,096-token vocabulary) both servers are
started as real processes on 127.0.0.1, one after the other, and driven through the
``openai`` client by 1, 2, 4, 8 and 16 concurrent streaming clients. Each client sends
``--requests`` completions one after another, prompts of mixed lengths (log-uniform in
``--min-prompt``..``--max-prompt`` tokens, the same prompts for both servers), temperature 0,
``--output-tokens`` tokens each. Per engine and client count: aggregate generated tok/s
(all completion tokens over the wall time of the run), time to first token p50/p95 and
inter-token latency p50/p95 (between streamed pieces); and our/mlx-lm ratios.

The admission run: 4 streams decode long replies; once they are steady a
``--admission-prompt``-token prompt arrives; their inter-token latency p95 while it is
admitted (from its arrival to its first token) against their steady p95 before it.

``--baseline-repo PATH`` also runs ``qnext_mlx.server`` from another checkout (e.g. the
commit before the batch engine) at one client: the "one client loses nothing" check.

Results: ``OUT.json`` and ``OUT.png`` (default ``scripts/results/bench-serving``). On a
2-core CPU machine everything competes for the same two cores (clients and server
included); figures are for comparing the two engines in one run, not absolute speeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

TEXT = (
    "And I saw a new heaven and a new earth: for the first heaven and the first earth were passed away; and "
    "there was no more sea. And I John saw the holy city, new Jerusalem, coming down from God out of heaven, "
    "prepared as a bride adorned for her husband. And I heard a great voice out of heaven saying, Behold, the "
    "tabernacle of God is with men, and he will dwell with them, and they shall be his people, and God himself "
    "shall be with them, and be their God. And God shall wipe away all tears from their eyes; and there shall "
    "be no more death, neither sorrow, nor crying, neither shall there be any more pain: for the former things "
    "are passed away. "
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(xs: List[float], q: float) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ------------------------------------------------------------- checkpoints
def demo_4bit(work: Path) -> Path:
    """The demo model converted by mlx-lm (``mlx_lm.convert -q``): both engines read it as is."""
    from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR

    out = work / "demo-4bit"
    if not (out / "config.json").exists():
        log(f"converting the demo model with mlx_lm.convert -q -> {out}")
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(DEMO_MODEL_DIR),
                        "--mlx-path", str(out), "-q"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return out


def wide_4bit(work: Path) -> Path:
    """Random 4-bit weights at the real layer widths (see bench.py), with the demo tokenizer."""
    import bench

    from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR

    out = work / "wide-4bit"
    if not (out / "tokenizer.json").exists():
        cfg = dict(bench.DEFAULT_CONFIG, vocab_size=4096)
        log(f"writing random wide checkpoint {out}")
        bench.write_checkpoint(cfg, out)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            shutil.copy(DEMO_MODEL_DIR / name, out / name)
    return out


# -------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1 (``engine``: "qnext", "mlx_lm" or "baseline")."""

    def __init__(self, engine: str, model: Path, max_tokens: int, baseline_repo: Optional[Path] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if engine == "mlx_lm":
            # its /v1/models scans the Hugging Face cache and fails when that folder is missing
            cache = Path(env.get("HF_HUB_CACHE") or Path.home() / ".cache" / "huggingface" / "hub")
            cache.mkdir(parents=True, exist_ok=True)
            env["HF_HUB_CACHE"] = str(cache)
            cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port", str(self.port),
                   "--max-tokens", str(max_tokens), "--log-level", "WARNING"]  # fmt: skip
        else:
            cmd = [sys.executable, "-m", "qnext_mlx.server", "--model", str(model), "--port", str(self.port),
                   "--max-tokens", str(max_tokens), "--temp", "0", "--log-level", "warning"]  # fmt: skip
            if engine == "baseline":
                env["PYTHONPATH"] = str(baseline_repo)
        # The server's log goes to a file: an unread pipe fills up and blocks the server.
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-serving-{engine}-{self.port}.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self.log_file, text=True,
                                     cwd=str(baseline_repo or REPO))  # fmt: skip
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{engine} server exited: {self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/models", timeout=5).read()
                self.model_id = json.loads(urllib.request.urlopen(self.url + "/models").read())["data"][0]["id"]
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        raise RuntimeError(f"{engine} server did not start")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log_file.close()


# -------------------------------------------------------------------- clients
def make_prompts(tokenizer, n: int, lo: int, hi: int, seed: int) -> List[str]:
    """``n`` prompts of log-uniform lengths in [lo, hi] tokens (the same for both engines)."""
    rng = random.Random(seed)
    words = TEXT.split()
    out = []
    for _ in range(n):
        target = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        start = rng.randrange(len(words))
        text = " ".join(words[(start + i) % len(words)] for i in range(target))
        ids = tokenizer.encode(text)[:target]
        out.append(tokenizer.decode(ids))
    return out


def stream_once(client, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: send time, piece arrival times, completion tokens."""
    t0 = time.perf_counter()
    times, tokens = [], None
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                       stream=True, stream_options={"include_usage": True})  # fmt: skip
    pieces = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
            pieces += 1
        if getattr(chunk, "usage", None) is not None and chunk.usage.completion_tokens:
            tokens = chunk.usage.completion_tokens
    return {"start": t0, "times": times, "tokens": tokens if tokens is not None else pieces}


def concurrently(url: str, clients: int, requests: int, one: Callable[[object, int, int], dict]):
    """``clients`` threads started together, each with its own ``openai`` client, calling
    ``one(client, k, r)`` for its ``requests`` requests in turn; returns ``(results, wall_s)``."""
    from openai import OpenAI

    results: List[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def work(k: int) -> None:
        client = OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=3600)
        barrier.wait()
        for r in range(requests):
            out = one(client, k, r)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def run_clients(url: str, model: str, prompts: List[str], clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads, each sending ``requests`` streamed completions in turn."""

    def one(client, k: int, r: int) -> dict:
        return stream_once(client, model, prompts[(k * requests + r) % len(prompts)], max_tokens)

    results, wall = concurrently(url, clients, requests, one)
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients, "requests": len(results), "generated_tokens": tokens, "wall_s": wall,
        "tok_s": tokens / wall, "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
        "itl_p50": percentile(itl, 0.5), "itl_p95": percentile(itl, 0.95),
    }  # fmt: skip


def admission_run(url: str, model: str, tokenizer, prompt_tokens: int, streams: int = 4) -> dict:
    """``streams`` long replies decode; a ``prompt_tokens`` prompt arrives once they are
    steady. Their ITL p95 before it (steady) and while it is admitted (until its first token)."""
    from openai import OpenAI

    short = make_prompts(tokenizer, streams, 32, 64, seed=11)
    (long_prompt,) = make_prompts(tokenizer, 1, prompt_tokens, prompt_tokens, seed=12)
    records: List[List[float]] = [[] for _ in range(streams)]
    steady = threading.Event()
    marks: Dict[str, float] = {}

    def decode(k: int) -> None:
        client = OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=3600)
        stream = client.completions.create(model=model, prompt=short[k], max_tokens=100000, temperature=0.0,
                                           stream=True)  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                records[k].append(time.perf_counter())
                if all(len(r) >= 20 for r in records):
                    steady.set()
            if "first" in marks and time.perf_counter() > marks["first"] + marks.get("tail", 0):
                break
        stream.close()

    threads = [threading.Thread(target=decode, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    steady.wait(timeout=1800)
    time.sleep(1.0)
    client = OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=3600)
    marks["arrive"] = time.perf_counter()
    stream = client.completions.create(model=model, prompt=long_prompt, max_tokens=4, temperature=0.0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            marks["first"] = time.perf_counter()
            break
    stream.close()
    marks["tail"] = 1.0
    for t in threads:
        t.join(timeout=600)

    def gaps(lo: float, hi: float) -> List[float]:
        return [b - a for r in records for a, b in zip(r, r[1:]) if lo <= a and b <= hi]

    before = gaps(marks["arrive"] - 5.0, marks["arrive"])
    during = gaps(marks["arrive"], marks["first"])
    p_before, p_during = percentile(before, 0.95), percentile(during, 0.95)
    return {
        "prompt_tokens": prompt_tokens, "streams": streams, "admission_s": marks["first"] - marks["arrive"],
        "steady_itl_p95": p_before, "admission_itl_p95": p_during, "steady_gaps": len(before),
        "admission_gaps": len(during), "ratio": (p_during / p_before) if p_before and p_during else None,
    }  # fmt: skip


# --------------------------------------------------------------------- report
def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    colors = {"qnext": "#2f6db5", "mlx_lm": "#9aa5b1", "baseline": "#d08c2f"}
    for row, name in enumerate(models):
        m = result["models"][name]
        for eng, runs in m["engines"].items():
            xs = [r["clients"] for r in runs]
            axes[row][0].plot(xs, [r["tok_s"] for r in runs], "o-", color=colors.get(eng), label=eng)
            axes[row][1].plot(xs, [1000 * (r["itl_p95"] or 0) for r in runs], "o-", color=colors.get(eng), label=eng)
        axes[row][0].set_title(f"{name}: aggregate generated tok/s")
        axes[row][1].set_title(f"{name}: inter-token latency p95 (ms)")
        for ax in axes[row]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.legend()
            ax.grid(alpha=0.3)
    mach = result["machine"]
    fig.suptitle(f"qnext-mlx vs mlx_lm.server, identical 4-bit weights; {mach['cpus']} CPU cores, MLX {mach['mlx']}",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def save(result: dict, path: Path) -> None:
    """Write ``result`` as JSON through a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="demo", help="comma list of demo, wide (default demo)")
    p.add_argument("--clients", default="1,2,4,8,16")
    p.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    p.add_argument("--output-tokens", type=int, default=48)
    p.add_argument("--min-prompt", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=2048)
    p.add_argument("--admission-prompt", type=int, default=4000, help="the admission run's prompt (0: skip)")
    p.add_argument("--engines", default="qnext,mlx_lm")
    p.add_argument("--baseline-repo", type=Path, help="also run qnext_mlx.server from this checkout (1 client)")
    p.add_argument("--work", type=Path, default=REPO / "bench_out" / "serving")
    p.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "bench-serving")
    args = p.parse_args(argv)
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    clients = [int(c) for c in args.clients.split(",")]
    engines = args.engines.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "mlx": mx.__version__,
                    "loadavg_start": list(os.getloadavg())},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {},
    }  # fmt: skip
    for name in args.models.split(","):
        path = {"demo": demo_4bit, "wide": wide_4bit}[name](args.work)
        tokenizer = load_tokenizer(path)
        prompts = make_prompts(tokenizer, max(clients) * args.requests, args.min_prompt, args.max_prompt, seed=1)
        entry = {"checkpoint": str(path), "config": json.loads((path / "config.json").read_text()), "engines": {}}
        for eng in engines + (["baseline"] if args.baseline_repo else []):
            server = Server(eng, path, args.output_tokens, args.baseline_repo)
            try:
                runs = []
                for c in clients if eng != "baseline" else [1]:
                    log(f"{name} {eng}: {c} client(s)")
                    runs.append(run_clients(server.url, server.model_id, prompts, c, args.requests,
                                            args.output_tokens))  # fmt: skip
                    log(f"  {runs[-1]['tok_s']:.1f} tok/s, ttft p50 {runs[-1]['ttft_p50']:.2f} s")
                entry["engines"][eng] = runs
                if args.admission_prompt and eng != "baseline":
                    log(f"{name} {eng}: admission of a {args.admission_prompt}-token prompt")
                    entry.setdefault("admission", {})[eng] = admission_run(server.url, server.model_id, tokenizer,
                                                                           args.admission_prompt)  # fmt: skip
            finally:
                server.close()
            result["models"][name] = entry
            save(result, args.out.with_suffix(".partial.json"))  # what is done survives a later failure
        if "qnext" in entry["engines"] and "mlx_lm" in entry["engines"]:
            entry["ratios"] = {
                str(a["clients"]): a["tok_s"] / b["tok_s"]
                for a, b in zip(entry["engines"]["qnext"], entry["engines"]["mlx_lm"])
            }
        if "baseline" in entry["engines"] and "qnext" in entry["engines"]:
            entry["one_client_vs_baseline"] = (
                entry["engines"]["qnext"][0]["tok_s"] / entry["engines"]["baseline"][0]["tok_s"]
            )
        result["models"][name] = entry
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    save(result, args.out.with_suffix(".json"))
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    plot(result, args.out.with_suffix(".png"))
    for name, entry in result["models"].items():
        print(f"\n{name}: aggregate tok/s")
        print(f"{'clients':>8}" + "".join(f"{e:>12}" for e in entry["engines"]) + f"{'ratio':>8}")
        for i, c in enumerate(clients):
            row = [entry["engines"][e][i]["tok_s"] if i < len(entry["engines"][e]) else float("nan")
                   for e in entry["engines"]]  # fmt: skip
            ratio = entry.get("ratios", {}).get(str(c))
            print(f"{c:>8}" + "".join(f"{v:12.1f}" for v in row) + (f"{ratio:8.2f}" if ratio else ""))
        for eng, adm in entry.get("admission", {}).items():
            print(f"admission {eng}: steady ITL p95 {adm['steady_itl_p95']}, during {adm['admission_itl_p95']}, "
                  f"ratio {adm['ratio']}")  # fmt: skip
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
