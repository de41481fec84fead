"""The OpenAI-compatible server, driven by the real ``openai`` client (and Qwen-Agent) on 127.0.0.1.

Most tests use a server whose model is :class:`ScriptedModel` (the real model with
its next-token choice forced to a scripted reply), so tool calls, thinking and
exact cache counts are deterministic while the chat template, tokenizer, cache,
``stream_generate``, parsing and HTTP all run for real. Plain completions and the
CLI test use the model's own logits.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
from chat_helpers import ChunkGate, ScriptedModel, chat_model_folder, last_user_text

openai = pytest.importorskip("openai")

import qnext_mlx  # noqa: E402
from qnext_mlx.serve.chat_session import ChatEngine, render_prompt  # noqa: E402
from qnext_mlx.serve.http import start_in_thread, stop_server  # noqa: E402
from qnext_mlx.serve.protocol import ApiError, parse_chat_request  # noqa: E402
from qnext_mlx.serve.reply import ReplyParser, parse_tool_call  # noqa: E402
from qnext_mlx.server import build_parser  # noqa: E402

MAX_CONTEXT = 512
MAX_REQUEST_BYTES = 64 * 1024
THINK_REPLY = "<think>\nLet me think about it.\n</think>\n\nThe answer is 42."
TOOL_REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER_ANSWER = "It is sunny in Paris, 22 degrees."
DEFAULT_REPLY = "Hello! How can I help you today?"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def responder(prompt: str) -> str:
    """The scripted replies, chosen by the last user turn."""
    user = last_user_text(prompt)
    if "<tool_response>" in user:
        return WEATHER_ANSWER
    if "weather" in user:
        return TOOL_REPLY
    if "think" in user:
        return THINK_REPLY
    if user.startswith("long"):
        return "word " * 2000
    if user.startswith("echo:"):
        return f"You said {user[5:]}."
    return DEFAULT_REPLY


def _start(model_dir, wrap=None, engine_kwargs=None, **kwargs):
    """A server on a scripted model; ``wrap(model)`` may put a proxy around it."""
    holder = {}

    def load_engine():
        model, tokenizer = qnext_mlx.load(model_dir)
        holder["scripted"] = ScriptedModel(model, tokenizer, responder)
        holder["tokenizer"] = tokenizer
        served_model = wrap(holder["scripted"]) if wrap else holder["scripted"]
        return ChatEngine(served_model, tokenizer, max_context=MAX_CONTEXT, **(engine_kwargs or {}))

    server = start_in_thread(load_engine, "qnext-test", max_request_bytes=MAX_REQUEST_BYTES, **kwargs)
    return server, holder


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint):
    return chat_model_folder(hf_checkpoint)


@pytest.fixture(scope="module")
def served(model_dir):
    server, holder = _start(model_dir)
    holder["server"] = server
    holder["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield holder
    stop_server(server)


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served["url"], api_key="EMPTY", max_retries=0, timeout=60)


def _tokens(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def _raw(served, method, path, body=b"", headers=None):
    """A raw HTTP request (for bodies the openai client would never send)."""
    conn = http.client.HTTPConnection("127.0.0.1", served["server"].server_address[1], timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


# ------------------------------------------------------------------ basics
def test_listens_on_localhost_by_default():
    args = build_parser().parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 8000)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["qnext-test"]
    assert client.models.retrieve("qnext-test").id == "qnext-test"


def test_chat_separates_reasoning_from_content(client, served):
    messages = [{"role": "user", "content": "think first, then answer"}]
    r = client.chat.completions.create(model="qnext-test", messages=messages)
    msg = r.choices[0].message
    assert msg.content == "The answer is 42."
    assert msg.reasoning_content == "Let me think about it."
    assert r.choices[0].finish_reason == "stop"
    tok = served["tokenizer"]
    assert r.usage.prompt_tokens == len(_tokens(tok, render_prompt(tok, messages)))
    assert r.usage.completion_tokens == len(_tokens(tok, THINK_REPLY)) + 1  # + the EOS token


def test_chat_stream_with_usage_chunk(client, served):
    stream = client.chat.completions.create(
        model="qnext-test",
        messages=[{"role": "user", "content": "think, and stream it"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert (content, reasoning) == ("The answer is 42.", "Let me think about it.")
    assert len([d for d in deltas if d.content]) > 1  # really streamed, piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_follow_up_only_prefills_the_new_part(client, served):
    tok = served["tokenizer"]
    first = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "echo:follow-up test"}]
    r1 = client.chat.completions.create(model="qnext-test", messages=first)
    assert r1.choices[0].message.content == "You said follow-up test."
    second = first + [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "echo:and more"},
    ]
    r2 = client.chat.completions.create(model="qnext-test", messages=second)
    assert r2.choices[0].message.content == "You said and more."
    # The cache holds turn 1's prompt, its reply and the EOS token: all of that is reused.
    held = len(_tokens(tok, render_prompt(tok, first))) + len(_tokens(tok, r1.choices[0].message.content)) + 1
    assert r2.usage.prompt_tokens_details.cached_tokens == held
    ids2 = _tokens(tok, render_prompt(tok, second))
    assert r2.usage.prompt_tokens == len(ids2)
    # only the new user turn is prefilled
    assert tok.decode(ids2[held:]) == "\n<|im_start|>user\necho:and more<|im_end|>\n<|im_start|>assistant\n"


def test_tool_call_round_trip(client, served):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="qnext-test", messages=messages, tools=[WEATHER_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert served["scripted"].prompts[-1].count('"name": "get_weather"') == 1  # the tools are in the prompt

    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"weather": "sunny", "temp_c": 22}'},
    ]
    r2 = client.chat.completions.create(model="qnext-test", messages=messages, tools=[WEATHER_TOOL])
    assert r2.choices[0].message.content == WEATHER_ANSWER
    assert r2.choices[0].finish_reason == "stop"
    assert '<tool_response>\n{"weather": "sunny", "temp_c": 22}\n</tool_response>' in served["scripted"].prompts[-1]
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens


def test_tool_call_streamed_as_deltas(client):
    stream = client.chat.completions.create(
        model="qnext-test",
        messages=[{"role": "user", "content": "weather in Paris, streamed"}],
        tools=[WEATHER_TOOL],
        stream=True,
    )
    calls, finish = {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        for tc in choice.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        assert not choice.delta.content
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_tool_choice_none_leaves_the_text(client):
    r = client.chat.completions.create(
        model="qnext-test",
        tools=[WEATHER_TOOL],
        tool_choice="none",
        messages=[{"role": "user", "content": "weather please"}],
    )
    assert r.choices[0].message.content == TOOL_REPLY and not r.choices[0].message.tool_calls


def test_stop_strings_and_max_tokens(client, served):
    r = client.chat.completions.create(
        model="qnext-test", stop=["help"], messages=[{"role": "user", "content": "hi there"}]
    )
    assert r.choices[0].message.content == "Hello! How can I " and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(
        model="qnext-test", max_tokens=3, messages=[{"role": "user", "content": "hi again"}]
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    expected = served["tokenizer"].decode(_tokens(served["tokenizer"], DEFAULT_REPLY)[:3])
    assert r.choices[0].message.content == expected


def test_completions_with_sampling_and_seed(client):
    kwargs = dict(
        model="qnext-test",
        prompt="In the beginning",
        max_tokens=6,
        temperature=1.0,
        top_p=0.9,
        presence_penalty=0.5,
        seed=11,
        extra_body={"top_k": 50, "min_p": 0.05},
    )
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert a.choices[0].text == b.choices[0].text  # same seed, same sample
    assert a.choices[0].finish_reason == "length" and a.usage.completion_tokens == 6
    pieces = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in pieces if c.choices) == a.choices[0].text
    assert pieces[-1].usage.completion_tokens == 6


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "body, status, param, code",
    [
        (b"{not json", 400, None, "invalid_json"),
        (b"\xff\xfe", 400, None, "invalid_json"),
        (b"[1, 2]", 400, None, None),
        (
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}).encode(),
            400,
            "frobnicate",
            "unknown_parameter",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(),
            400,
            "temperature",
            None,
        ),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}).encode(), 400, "top_p", None),
        (
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(),
            400,
            "max_tokens",
            None,
        ),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}).encode(), 400, "stream", None),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 17}).encode(), 400, "n", None),
        (json.dumps({"messages": []}).encode(), 400, "messages", None),
        (json.dumps({"model": "x"}).encode(), 400, "messages", None),
        (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400, "messages[0].role", None),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "messages[0].content", None),
        (
            json.dumps(
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
            ).encode(),
            400,
            "messages[0].content[0]",
            "unsupported_content",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}).encode(),
            400,
            "tool_choice",
            None,
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}).encode(),
            400,
            "tools[0].function",
            None,
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}).encode(),
            400,
            "stop",
            None,
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "word " * 2000}]}).encode(),
            400,
            "messages",
            "context_length_exceeded",
        ),
    ],
)
def test_bad_chat_requests_get_openai_errors(served, body, status, param, code):
    got, reply = _raw(served, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert got == status
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert (err["param"], err["code"]) == (param, code)


def test_bad_completion_requests(served):
    for body, param in [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
    ]:
        status, reply = _raw(served, "POST", "/v1/completions", json.dumps(body).encode())
        assert status == 400 and reply["error"]["param"] == param, body


def test_http_level_errors(served):
    assert _raw(served, "GET", "/v1/nothing")[0] == 404
    assert _raw(served, "POST", "/v1/embeddings", b"{}")[0] == 404
    assert _raw(served, "DELETE", "/v1/models")[0] == 405
    assert _raw(served, "GET", "/v1/models/other-model")[1]["error"]["code"] == "model_not_found"
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * MAX_REQUEST_BYTES + b'"}]}'
    status, reply = _raw(served, "POST", "/v1/chat/completions", big)
    assert status == 413 and reply["error"]["code"] == "request_too_large"
    # No Content-Length at all (http.client adds one; write the request by hand).
    port = served["server"].server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(200).startswith(b"HTTP/1.1 411 ")
    assert _raw(served, "GET", "/health")[1]["status"] == "ok"


def test_openai_client_sees_error_details(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="qnext-test", messages=[{"role": "user", "content": "hi"}], extra_body={"frobnicate": True}
        )
    assert info.value.status_code == 400
    assert info.value.body["param"] == "frobnicate" and "unknown field" in info.value.body["message"]


# ---------------------------------------------------------- disconnect, load
def _wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_stops_generation(client, served):
    worker = served["server"].app.worker
    done_before = worker.completed
    stream = client.chat.completions.create(
        model="qnext-test", stream=True, messages=[{"role": "user", "content": "long story please"}]
    )
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got == 3:
            break
    stream.close()  # hang up mid-stream
    assert _wait_for(lambda: worker.completed > done_before and not worker.busy)
    stats = worker.last_stats
    assert stats.finish_reason == "cancelled"
    assert stats.generation_tokens < MAX_CONTEXT - stats.prompt_tokens  # stopped well before the end
    r = client.chat.completions.create(model="qnext-test", messages=[{"role": "user", "content": "echo:still here"}])
    assert r.choices[0].message.content == "You said still here."


def test_client_disconnect_during_prefill_frees_the_worker(model_dir):
    step = 8
    first_chunk = threading.Event()
    gate = {}

    def on_chunk(n):
        if n == 1:  # the first chunk waits here until the server has noticed the client left
            first_chunk.set()
            (job,) = server.app.worker.in_flight
            assert job.reply.handle.wait_cancelled(30)

    def wrap(model):
        gate["model"] = ChunkGate(model, on_chunk)
        return gate["model"]

    server, _ = _start(model_dir, wrap=wrap, engine_kwargs={"prefill_step_size": step})
    try:
        worker = server.app.worker
        c = openai.OpenAI(
            base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="EMPTY", max_retries=0, timeout=60
        )
        long_prompt = "long " + "the quick brown fox jumps over the lazy dog " * 12
        stream = c.chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": long_prompt}])
        assert first_chunk.wait(30)
        stream.close()  # hang up while the prompt is being prefilled
        # The worker ends the job (a generous wait, not a timing claim: the gate shows no chunk ran after it).
        assert _wait_for(lambda: worker.completed == 1 and not worker.busy, timeout=120)
        stats = worker.last_stats
        needed = -(-(stats.prompt_tokens - 1) // step)
        assert stats.finish_reason == "cancelled" and stats.generation_tokens == 0
        assert gate["model"].chunks == 1 and needed > 10  # no chunk ran after the cancel
        assert stats.context_tokens == step  # the cache holds exactly the processed prefix
        # The worker is free: the next request is served, with the right reply.
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "echo:still here"}])
        assert r.choices[0].message.content == "You said still here."
        # ... and the same long prompt again goes on from the prefix the cancelled one left.
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": long_prompt}], max_tokens=5)
        assert r.usage.prompt_tokens_details.cached_tokens == step
        assert r.choices[0].message.content.startswith("word word") and r.choices[0].finish_reason == "length"
    finally:
        stop_server(server)


def test_full_queue_answers_503(model_dir):
    # One reply decodes at a time (a batch of one), one may wait: a third is refused.
    server, _ = _start(model_dir, max_queue=1, engine_kwargs={"max_batch": 1})
    port = server.server_address[1]
    socks = []
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "long"}], "stream": True}).encode()
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        for _ in range(2):  # one runs, one waits in the queue
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(request)
            assert s.recv(15).startswith(b"HTTP/1.1 200")
            socks.append(s)
            assert _wait_for(lambda: server.app.worker.busy)  # the first one has left the queue
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503 and info.value.body["code"] == "server_busy"
    finally:
        for s in socks:
            s.close()
        # Both streams are cancelled once their clients are gone; the server stops promptly.
        assert _wait_for(lambda: server.app.worker.waiting == 0 and not server.app.worker.busy)
        stop_server(server)


def test_load_many_concurrent_requests_none_lost(client, served):
    n_requests, n_threads = 48, 8
    results, errors = {}, []

    def work(ids):
        c = openai.OpenAI(base_url=served["url"], api_key="EMPTY", max_retries=0, timeout=120)
        for i in ids:
            try:
                messages = [{"role": "user", "content": f"echo:request {i}"}]
                if i % 2:
                    stream = c.chat.completions.create(model="m", messages=messages, stream=True)
                    results[i] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
                else:
                    results[i] = c.chat.completions.create(model="m", messages=messages).choices[0].message.content
            except Exception as e:  # noqa: BLE001 - counted below
                errors.append((i, repr(e)))

    order = list(range(n_requests))
    random.Random(0).shuffle(order)
    threads = [threading.Thread(target=work, args=(order[k::n_threads],)) for k in range(n_threads)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "a client thread is still waiting"
    assert not errors
    assert results == {i: f"You said request {i}." for i in range(n_requests)}  # none lost, none mixed up
    print(
        f"\nload test: {n_requests} requests from {n_threads} threads in {elapsed:.1f} s "
        f"({n_requests / elapsed:.1f} requests/s)"
    )


# --------------------------------------------------------------- Qwen-Agent
@pytest.mark.parametrize("use_raw_api", [False, True], ids=["prompted-tools", "native-tools"])
def test_qwen_agent_assistant_with_a_function_tool(served, use_raw_api):
    pytest.importorskip("qwen_agent")
    from qwen_agent.agents import Assistant
    from qwen_agent.tools.base import BaseTool, register_tool

    calls = []

    @register_tool("get_weather", allow_overwrite=True)
    class GetWeather(BaseTool):
        description = "Get the current weather in a city"
        parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

        def call(self, params, **kwargs):
            calls.append(json.loads(params))
            return json.dumps({"city": "Paris", "weather": "sunny", "temp_c": 22})

    bot = Assistant(
        llm={
            "model": "qnext-test",
            "model_server": served["url"],
            "api_key": "EMPTY",
            "generate_cfg": {"use_raw_api": use_raw_api},
        },
        function_list=["get_weather"],
    )
    out = []
    for out in bot.run(messages=[{"role": "user", "content": "What is the weather in Paris?"}]):
        pass
    assert calls == [{"city": "Paris"}]
    assert out[0]["function_call"]["name"] == "get_weather"
    assert out[1]["role"] == "function" and "sunny" in out[1]["content"]
    assert out[-1]["role"] == "assistant" and out[-1]["content"] == WEATHER_ANSWER


# -------------------------------------------------------------- unit level
def test_reply_parser_any_split():
    text = (
        "<think>\nweigh it\n</think>\n\nLet me check.\n"
        + TOOL_REPLY
        + "\n"
        + TOOL_REPLY.replace("Paris", "Rome")
        + "\n<tool_call>\n{broken}\n</tool_call>"
    )
    rng = random.Random(1)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), 12))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        parser = ReplyParser(parse_tools=True)
        deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
        reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
        content = "".join(d.text for d in deltas if d.kind == "content")
        calls = [(d.tool_call.name, json.loads(d.tool_call.arguments)) for d in deltas if d.kind == "tool_call"]
        assert reasoning == "weigh it"
        assert content == "Let me check.<tool_call>\n{broken}\n</tool_call>"
        assert calls == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]


def test_reply_parser_open_think_and_unfinished_spans():
    p = ReplyParser(in_think=True)
    assert [(d.kind, d.text) for d in p.feed("still thinking") + p.finish()] == [("reasoning", "still thinking")]
    p = ReplyParser(parse_tools=True)
    out = p.feed('Sure. <tool_call>\n{"name": "f", "argu') + p.finish()
    assert "".join(d.text for d in out) == 'Sure.<tool_call>\n{"name": "f", "argu'
    assert parse_tool_call('{"name": "f", "arguments": "{\\"a\\": 1}"}').arguments == '{"a": 1}'
    assert parse_tool_call('{"arguments": {}}') is None and parse_tool_call("[1]") is None


def test_protocol_defaults_and_aliases():
    req = parse_chat_request(
        {
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "be"}, {"type": "text", "text": " nice"}]},
                {"role": "user", "content": "hi", "extra": {"ignored": 1}},
            ],
            "max_completion_tokens": 7,
            "top_k": -1,
            "stop": "x",
            "temperature": None,
        }
    )
    assert req.messages[0] == {"role": "developer", "content": "be nice"}
    assert (req.settings.max_tokens, req.settings.top_k, req.settings.stop) == (7, 0, ["x"])
    with pytest.raises(ApiError) as info:
        parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}})
    assert info.value.param == "stream_options"


# --------------------------------------------------------------------- CLI
def test_cli_serves_the_model_and_stops_on_ctrl_c(model_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "qnext_mlx.server", "--model", str(model_dir), "--port", "0", "--log-level", "warning"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        for line in proc.stderr:
            if line.startswith("serving "):
                url = line.split(" at ", 1)[1].split()[0]
                break
        assert url and url.startswith("http://127.0.0.1:")
        c = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
        assert r.usage.completion_tokens <= 4 and r.choices[0].finish_reason in ("stop", "length")
        proc.send_signal(2)  # SIGINT
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_errors_are_one_line(capsys):
    from qnext_mlx.server import main

    r = subprocess.run(
        [sys.executable, "-m", "qnext_mlx.server", "--model", "/nonexistent/model/folder"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "/nonexistent/model/folder" in lines[-1]
    assert not any("Traceback" in line for line in lines)
    for args, fragment in [
        (["--port", "-3"], "error: argument --port"),
        (["--max-queue", "0"], "error: argument --max-queue"),
        (["--temp", "warm"], "error: argument --temp"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
        # (other lines may come from the module's server threads logging meanwhile)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(err) == 1 and err[0].startswith(fragment)
