"""Tensor and pipeline parallel runs on 127.0.0.1 (MLX's ring backend, launched with
``mlx.launch`` or by hand): logits and greedy tokens against one process, per-rank
resident weights, a killed or frozen rank, mismatched ranks, and the command lines.

The workers are tests/dist_worker.py (model-level checks) and ``python -m
qnext_mlx.generate`` itself. Every run has a bounded time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "qnext_mlx" / "demo_model"
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
LAUNCH = shutil.which("mlx.launch")

pytestmark = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")

# widths that split over 2 and 4 ranks and quantize in groups of 32 after the split
QUANT_WIDTHS = dict(
    moe_intermediate_size=128,
    shared_expert_intermediate_size=128,
    intermediate_size=128,
    linear_value_head_dim=32,
    vocab_size=320,
)


def launch(n: int, args, timeout: float = 420, env=None) -> subprocess.CompletedProcess:
    cmd = [LAUNCH, "-n", str(n), "--backend", "ring", "--python", sys.executable, "--", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def checkpoints(hf_checkpoint, tmp_path_factory):
    """A float32 HF-layout tiny model with an MTP head, and an mlx-lm 4-bit conversion of
    another (group size 32), both with a tokenizer."""
    from mlx_lm import convert
    from tokenizer_fixture import write_tokenizer

    hf, _, _ = hf_checkpoint("dist-hf", seed=5, mtp=True, vocab_size=320, num_hidden_layers=6)
    if not (hf / "tokenizer.json").exists():
        write_tokenizer(hf, vocab_size=320)
    src, _, _ = hf_checkpoint("dist-q-src", seed=6, **QUANT_WIDTHS)
    if not (src / "tokenizer.json").exists():
        write_tokenizer(src, vocab_size=320)
    # mlx-lm 0.32 reads only the legacy top-level rope keys, not transformers 5's rope_parameters
    legacy = tmp_path_factory.mktemp("dist-q-legacy") / "src"
    shutil.copytree(src, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    cfg.update(rope_theta=10000.0, partial_rotary_factor=0.25)
    (legacy / "config.json").write_text(json.dumps(cfg))
    q4 = tmp_path_factory.mktemp("dist-q4") / "model"
    convert(str(legacy), str(q4), quantize=True, q_group_size=32, q_bits=4)
    return {"hf": hf, "q4": q4}


def run_worker(tmp_path, n, mode, paths, generate=False):
    out = tmp_path / f"{mode}{n}"
    args = [WORKER, out, mode, ",".join(map(str, paths))] + (["--generate"] if generate else [])
    r = launch(n, args)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in range(n)]
    return ranks


@pytest.mark.parametrize(("n", "mode"), [(2, "tensor"), (4, "tensor"), (2, "pipeline"), (3, "pipeline")])
def test_parallel_logits_equal_one_process(checkpoints, tmp_path, n, mode):
    paths = [checkpoints["hf"], checkpoints["q4"], DEMO]
    ranks = run_worker(tmp_path, n, mode, paths, generate=(n == 2))
    for r in ranks:
        for path, c in r["checkpoints"].items():
            assert c["logit_scale"] > 0.1, path  # the logits are not all zero
            # Pipeline: the same sums in the same order (exact). Tensor: the sums over ranks
            # round in another order: 1e-5, or one part in a million of the largest logit (the
            # demo's reach ~30), 2e-5 over 4 ranks (4-bit: 1.4e-5 measured at logits of ~2)
            tol = 0.0 if mode == "pipeline" else max(1e-5 if n == 2 else 2e-5, 1e-6 * c["logit_scale"])
            for key in ("full", "incremental") + (("mtp",) if "mtp" in c else ()):
                assert c[key] <= tol, (path, key, c[key], c["logit_scale"])
            if "greedy" in c:
                g = c["greedy"]
                assert len(g["single"]) == 100
                assert g["parallel"] == g["single"], path
                if "single_mtp" in g:
                    assert g["single_mtp"] == g["single"]
                    assert g["parallel_mtp"] == g["single"], path
    assert "mtp" in ranks[0]["checkpoints"][str(checkpoints["hf"])]
    assert all("greedy" in c for c in ranks[0]["checkpoints"].values()) == (n == 2)


def test_each_rank_holds_its_share(checkpoints, tmp_path):
    """Tensor parallel 2: each rank's weights are half the split tensors plus the
    replicated ones, and MLX holds no more than that after loading (no whole tensor
    kept alive by a view); pipeline 2: the layers split, the rest on both."""
    paths = [checkpoints["hf"], checkpoints["q4"]]
    for r in run_worker(tmp_path, 2, "tensor", paths):
        for path, c in r["checkpoints"].items():
            ref, own = c["reference"], c["resident"]
            assert own["replicated"] == ref["replicated"], path
            assert own["split"] == ref["split"] // 2, path
            assert c["active_after_load"] <= 1.05 * own["total"] + 2**20, (path, c["active_after_load"], own)
    ranks = run_worker(tmp_path, 2, "pipeline", paths)
    for path in ranks[0]["checkpoints"]:
        totals = [r["checkpoints"][path]["resident"]["total"] for r in ranks]
        ref = ranks[0]["checkpoints"][path]["reference"]["total"]
        assert max(totals) < 0.8 * ref, (path, totals, ref)
        for r in ranks:
            c = r["checkpoints"][path]
            assert c["active_after_load"] <= 1.05 * c["resident"]["total"] + 2**20


# ------------------------------------------------------------ command line
def generate_args(*extra):
    return ["-m", "qnext_mlx.generate", "--prompt", "Once upon a time", "--temp", "0", "--max-tokens", "40", *extra]


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_generate_command_under_mlx_launch(mode):
    single = subprocess.run([sys.executable, *generate_args("--mtp")], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)  # fmt: skip
    assert single.returncode == 0, single.stderr
    r = launch(2, generate_args("--mtp", "--parallel", mode), timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    # rank 0 prints the text once; the other rank prints nothing
    assert r.stdout.count("Generation:") == 0 and r.stderr.count("Generation:") == 1
    if mode == "pipeline":  # the same sums in the same order: bf16 text too is the same
        assert r.stdout.strip() == single.stdout.strip()
    else:
        assert len(r.stdout.strip()) > 20


def test_parallel_without_launch_is_one_error_line():
    r = subprocess.run([sys.executable, *generate_args("--parallel", "tensor")], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --parallel needs 2 or more ranks"), r.stderr
    assert "Traceback" not in r.stderr


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_ranks(tmp_path, args, n=2, extra_env=None, model_for=None):
    """Start ``n`` ranks by hand (what mlx.launch does on one machine), stderr to files."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    procs = []
    for rank in range(n):
        env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile), **(extra_env or {}))
        rank_args = list(args) + (["--model", str(model_for(rank))] if model_for else [])
        err = open(tmp_path / f"rank{rank}.err", "w")
        procs.append(subprocess.Popen([sys.executable, *rank_args], stdout=subprocess.PIPE, stderr=err, cwd=ROOT,
                                      env=env, text=True))  # fmt: skip
    return procs


def wait_all(procs, timeout):
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        if p.poll() is None:
            p.kill()
    return codes


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_lost_rank_ends_the_others_with_one_error(tmp_path, how):
    """A rank killed (its sockets close) or frozen (SIGSTOP: a link that goes silent):
    the other exits non-zero within 60 s with one error line, never hangs."""
    args = [
        "-m",
        "qnext_mlx.generate",
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "100000",
        "--temp",
        "0",
        "--no-chat-template",
        "--parallel",
        "tensor",
    ]  # fmt: skip  (greedy: it runs to max-tokens)
    procs = start_ranks(tmp_path, args, extra_env={"QNEXT_HEARTBEAT_TIMEOUT": "10"})
    try:
        first = procs[0].stdout.read(1)  # rank 0 is generating (the printer flushes each piece)
        assert first, (tmp_path / "rank0.err").read_text()
        victim = procs[1]
        victim.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        tic = time.monotonic()
        code = wait_all([procs[0]], timeout=60)[0]
        elapsed = time.monotonic() - tic
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
    assert code not in (None, 0), "rank 0 did not stop"
    assert elapsed < 60
    err = (tmp_path / "rank0.err").read_text()
    assert "error: rank 1 stopped" in err, err[-2000:]


def test_ranks_with_different_model_files_refuse_to_start(tmp_path):
    other = tmp_path / "other"
    shutil.copytree(DEMO, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    args = ["-m", "qnext_mlx.generate", "--prompt", "hi", "--max-tokens", "5", "--parallel", "tensor"]
    procs = start_ranks(tmp_path, args, model_for=lambda rank: DEMO if rank == 0 else other)
    codes = wait_all(procs, timeout=120)
    assert codes == [2, 2], codes
    for rank in range(2):
        err = (tmp_path / f"rank{rank}.err").read_text()
        assert "error: rank(s) 1 have other model files or package versions than rank 0" in err, err[-2000:]


# ------------------------------------------------------------------ server
def serve(cmd, port, tmp_path, name):
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    deadline = time.monotonic() + 180
    while True:
        try:
            client.models.list()
            return proc, client
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError((tmp_path / f"{name}.log").read_text()[-3000:]) from None
            time.sleep(0.5)


def conversation(client):
    """Three concurrent greedy chats, a stream dropped mid-way, then a second turn of the
    first chat (its prefix reused): the texts and the cached-token counts."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(messages, max_tokens=24):
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

    first = [[{"role": "user", "content": f"Story number {i}, please."}] for i in range(3)]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(ask, first))
        stream = client.chat.completions.create(model="m", messages=first[0], max_tokens=500, temperature=0,
                                                stream=True)  # fmt: skip
        for k, _ in enumerate(stream):
            if k == 5:
                break
        stream.close()  # the client goes away: its sequence is cancelled on every rank
    second = first[0] + [{"role": "assistant", "content": replies[0][0]}, {"role": "user", "content": "More."}]
    again = ask(second)
    return [r[0] for r in replies], again


def test_server_under_tensor_parallel_answers_as_one_process(checkpoints, tmp_path):
    model = str(checkpoints["hf"])
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", "qnext_mlx.server", "--model", model, "--port", str(port)]
    proc, client = serve(cmd, port, tmp_path, "single")
    try:
        single = conversation(client)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    (port,) = free_ports(1)
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, "--", "-m", "qnext_mlx.server",
           "--model", model, "--port", str(port), "--parallel", "tensor"]  # fmt: skip
    proc, client = serve(cmd, port, tmp_path, "tensor")
    try:
        parallel = conversation(client)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    assert parallel == single
    texts, (text, cached) = single
    assert all(len(t) > 5 for t in texts) and len(text) > 5
    assert cached > 20  # the second turn reused the first turn's prompt and reply


def test_terminal_chat_under_pipeline_parallel_says_what_one_process_says():
    """Rank 0 reads the terminal; the other rank's engine follows it step by step (the
    second turn reuses the first one's prefix on both ranks)."""
    lines = "Hello there\nTell me more\n/quit\n"
    args = ["-m", "qnext_mlx.chat", "--temp", "0", "--max-tokens", "20", "--color", "never"]
    single = subprocess.run([sys.executable, *args], input=lines, capture_output=True, text=True, timeout=120,
                            cwd=ROOT)  # fmt: skip
    assert single.returncode == 0, single.stderr
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, "--", *args, "--parallel", "pipeline"]
    r = subprocess.run(cmd, input=lines, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]

    def replies(out):  # the reply lines, without the timings
        return [ln for ln in out.splitlines() if ln.startswith(">>> ") and len(ln) > 4]

    assert replies(r.stdout) == replies(single.stdout)
    assert len(replies(single.stdout)) == 2
    assert "(11 cached)" in r.stdout and "(11 cached)" in single.stdout
