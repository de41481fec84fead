"""The server decoding many requests at once: correctness under load, a soak with random
disconnects, memory, and ``GET /metrics``; a real server on 127.0.0.1 and the openai client."""

from __future__ import annotations

import gc
import random
import re
import threading
import time
import urllib.request

import mlx.core as mx
import pytest
from chat_helpers import ScriptedModel, chat_model_folder, last_user_text

import qnext_mlx
from qnext_mlx.serve.chat_session import ChatEngine
from qnext_mlx.serve.http import start_in_thread, stop_server

openai = pytest.importorskip("openai")
pytest.importorskip("torch")


def responder(prompt: str) -> str:
    """A reply that names its request and whose length depends on it."""
    user = last_user_text(prompt)
    n = int(re.search(r"#(\d+)", user).group(1)) if "#" in user else 0
    return f"Reply {n}:" + " word" * (3 + n % 17)


def expected(n: int) -> str:
    return f"Reply {n}:" + " word" * (3 + n % 17)


@pytest.fixture(scope="module")
def server(hf_checkpoint):
    folder = chat_model_folder(hf_checkpoint)

    def load_engine():
        model, tokenizer = qnext_mlx.load(folder)
        return ChatEngine(ScriptedModel(model, tokenizer, responder), tokenizer, max_context=4096, max_batch=16,
                          max_waiting=256)  # fmt: skip

    srv = start_in_thread(load_engine, "qnext-test", max_queue=256)
    yield srv
    stop_server(srv)


def url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def metrics(srv) -> dict:
    text = urllib.request.urlopen(url(srv)[:-3] + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_concurrent_requests_are_decoded_together_and_each_gets_its_own_reply(server):
    n = 8
    results, errors = {}, []
    gate = threading.Barrier(n)

    def ask(i):
        c = openai.OpenAI(base_url=url(server), api_key="EMPTY", max_retries=0, timeout=300)
        gate.wait()
        try:
            system = "You are terse. " * (1 + i % 3)  # mixed prompt lengths
            messages = [{"role": "system", "content": system}, {"role": "user", "content": f"question #{i}"}]
            stream = c.chat.completions.create(model="m", messages=messages, stream=True, temperature=0)
            results[i] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and results == {i: expected(i) for i in range(n)}
    m = metrics(server)
    # some steps decoded several sequences at once
    assert m['qnext_batch_size_bucket{le="1.0"}'] < m["qnext_batch_size_count"]
    # the gauges are set at the end of the engine step that handed out the last tokens
    for _ in range(200):
        if m["qnext_requests_running"] == 0 and m["qnext_requests_waiting"] == 0:
            break
        time.sleep(0.05)
        m = metrics(server)
    assert m["qnext_requests_running"] == 0 and m["qnext_requests_waiting"] == 0


def test_metrics_count_tokens_latencies_and_prefix_reuse(server):
    before = metrics(server)
    c = openai.OpenAI(base_url=url(server), api_key="EMPTY", max_retries=0, timeout=300)
    messages = [{"role": "system", "content": "A shared system prompt. " * 4}, {"role": "user", "content": "#5"}]
    first = c.chat.completions.create(model="m", messages=messages, temperature=0)
    messages[1]["content"] = "#6"
    second = c.chat.completions.create(model="m", messages=messages, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    after = metrics(server)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    generated = first.usage.completion_tokens + second.usage.completion_tokens
    assert delta("qnext_generation_tokens_total") == generated
    prompts = first.usage.prompt_tokens + second.usage.prompt_tokens
    assert delta("qnext_prompt_tokens_total") == prompts
    assert delta('qnext_requests_finished_total{finish_reason="stop"}') == 2
    assert delta("qnext_time_to_first_token_seconds_count") == 2
    assert delta("qnext_inter_token_latency_seconds_count") == generated - 2
    assert delta("qnext_prefix_cache_hits_total") >= 1
    assert delta("qnext_prefix_cache_reused_tokens_total") >= second.usage.prompt_tokens_details.cached_tokens


def test_soak_many_clients_random_disconnects_nothing_lost_memory_back(server):
    """200 requests from 16 threads, some hanging up mid-stream: every request that ran
    to the end got exactly its own reply, and MLX's active memory returns to where it was."""
    engine = server.app.engine
    gc.collect()
    start = mx.get_active_memory()
    n_requests, n_threads = 200, 16
    rng = random.Random(7)
    plan = [(i, rng.random() < 0.25, rng.randint(1, 4)) for i in range(n_requests)]  # (id, hang up?, after chunks)
    finished, hung_up, errors = {}, [], []

    def work(items):
        c = openai.OpenAI(base_url=url(server), api_key="EMPTY", max_retries=0, timeout=300)
        for i, hang_up, after in items:
            try:
                filler = " and more" * (i % 40)  # prompts of mixed lengths
                messages = [{"role": "user", "content": f"request #{i}{filler}"}]
                stream = c.chat.completions.create(model="m", messages=messages, stream=True, temperature=0)
                text, chunks = [], 0
                for ch in stream:
                    if ch.choices and ch.choices[0].delta.content:
                        text.append(ch.choices[0].delta.content)
                        chunks += 1
                        if hang_up and chunks >= after:
                            break
                stream.close()
                if hang_up and chunks >= after:
                    hung_up.append(i)
                else:
                    finished[i] = "".join(text)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append((i, repr(e)))

    threads = [threading.Thread(target=work, args=(plan[k::n_threads],)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1200)
    assert not any(t.is_alive() for t in threads) and not errors
    assert len(finished) + len(hung_up) == n_requests and hung_up  # none lost
    assert finished == {i: expected(i) for i in finished}  # every finished one correct, none mixed up
    # The engine is idle again; with the prefix cache emptied its memory is back where it started.
    for _ in range(600):
        if not server.app.worker.busy:
            break
        threading.Event().wait(0.1)
    assert not server.app.worker.busy
    engine.prefix_cache.clear()
    gc.collect()
    mx.clear_cache()
    assert mx.get_active_memory() <= start + (1 << 20), (start, mx.get_active_memory())
