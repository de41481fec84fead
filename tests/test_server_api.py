"""The API agents expect, against a real server process on 127.0.0.1 and the openai client.

On the bundled demo model (its own logits), started as ``python -m qnext_mlx.server
--api-key ...``: structured outputs (``json_schema`` over 20 seeds at temperature 0.7,
``json_object``, forced and named tool calls, ``parallel_tool_calls: false``), logprobs
checked against a direct forward of the same weights, ``n``, ``logit_bias``,
``frequency_penalty``, ``seed``, the Responses API (streamed and not, function tools,
``previous_response_id``), and the key (401). On a scripted model in-process: a thinking
prompt's reasoning stays free while its answer follows the schema, and a fuzz test of
malformed bodies (always a 4xx in OpenAI's shape, never a 500).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading

import jsonschema
import mlx.core as mx
import pytest
from chat_helpers import (
    THINKING_TEMPLATE,
    ScriptedModel,
    chat_model_folder,
    demo_weights_present,
    folder_with_template,
    last_user_text,
)

import qnext_mlx
from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR
from qnext_mlx.serve.chat_session import ChatEngine, render_prompt
from qnext_mlx.serve.http import start_in_thread, stop_server

openai = pytest.importorskip("openai")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KEY = "sk-qnext-test-key"
SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"enum": ["yes", "no", "maybe"]},
        "sure": {"type": "boolean"},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "detail": {
            "type": "object",
            "properties": {"level": {"type": "integer", "minimum": 1, "maximum": 3}, "ok": {"type": "boolean"}},
            "required": ["level", "ok"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
    },
    "required": ["verdict", "sure", "score", "detail", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "Is the earth round? Answer in JSON."}]

pytestmark = pytest.mark.skipif(not demo_weights_present(), reason="no demo model weights")


# ----------------------------------------------------------------- the process
@pytest.fixture(scope="module")
def demo_server():
    proc = subprocess.Popen(
        [sys.executable, "-m", "qnext_mlx.server", "--port", "0", "--api-key", KEY, "--log-level", "warning"],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    url = None
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("serving "):
            url = line.split(" at ", 1)[1].split()[0]
            break
    # keep reading its log: an unread pipe would block the server
    threading.Thread(target=lambda: [lines.append(x) for x in proc.stderr], daemon=True).start()
    assert url, "".join(lines)
    yield url
    proc.send_signal(2)
    assert proc.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def demo_model():
    return qnext_mlx.load(DEMO_MODEL_DIR)


# ------------------------------------------------------------ structured outputs
def test_json_schema_outputs_validate_over_20_seeds(client):
    for seed in range(20):
        fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
        r = client.chat.completions.create(model="demo", messages=ASK, temperature=0.7, seed=seed, max_tokens=200,
                                           response_format=fmt)  # fmt: skip
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_json_object_outputs_parse(client):
    for seed in range(3):
        r = client.chat.completions.create(model="demo", messages=ASK, temperature=0.7, seed=seed, max_tokens=400,
                                           response_format={"type": "json_object"})  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def _check_calls(calls, allowed):
    assert calls
    for call in calls:
        assert call.function.name in allowed and call.id.startswith("call_")
        schema = TOOLS[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_forced_tool_calls_validate_against_their_tool(client):
    messages = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]
    tools = [WEATHER, ADD]
    for seed in range(4):
        r = client.chat.completions.create(model="demo", messages=messages, tools=tools, tool_choice="required",
                                           temperature=0.7, seed=seed, max_tokens=300)  # fmt: skip
        assert r.choices[0].finish_reason == "tool_calls"
        _check_calls(r.choices[0].message.tool_calls, {"get_weather", "add"})
    named = {"type": "function", "function": {"name": "add"}}
    r = client.chat.completions.create(model="demo", messages=messages, tools=tools, tool_choice=named,
                                       temperature=0.7, seed=1, max_tokens=300)  # fmt: skip
    _check_calls(r.choices[0].message.tool_calls, {"add"})
    r = client.chat.completions.create(model="demo", messages=messages, tools=tools, tool_choice="required",
                                       parallel_tool_calls=False, temperature=0.7, seed=2, max_tokens=300)  # fmt: skip
    assert len(r.choices[0].message.tool_calls) == 1
    _check_calls(r.choices[0].message.tool_calls, {"get_weather", "add"})


def test_forced_tool_call_streamed(client):
    stream = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "weather in Rome"}], tools=[WEATHER],
        tool_choice="required", temperature=0.7, seed=3, max_tokens=300, stream=True,
    )  # fmt: skip
    calls, finish = {}, None
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls
    for entry in calls.values():
        assert entry["name"] == "get_weather"
        jsonschema.validate(json.loads(entry["arguments"]), WEATHER["function"]["parameters"])


def test_a_schema_the_grammar_engine_refuses_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="demo", messages=ASK,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        )  # fmt: skip
    assert info.value.body["param"] == "response_format" and info.value.body["code"] == "invalid_schema"


# ----------------------------------------------------------------- logprobs, n
def test_logprobs_equal_the_models_log_softmax(client, demo_model):
    model, tokenizer = demo_model
    messages = [{"role": "user", "content": "And God said"}]
    r = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=12,
                                       logprobs=True, top_logprobs=3)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    prompt_ids = tokenizer.encode(render_prompt(tokenizer, messages), add_special_tokens=False)
    # the greedy tokens, re-derived from the direct forward (each the argmax)
    tokens, direct = [], []
    cache = model.make_cache()
    logits = model(mx.array([prompt_ids]), cache=cache)[:, -1, :]
    for entry in content:
        lp = (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).astype(mx.float32)[0]
        t = int(mx.argmax(lp).item())
        tokens.append(t)
        direct.append(lp)
        logits = model(mx.array([[t]]), cache=cache)[:, -1, :]
    for entry, t, lp in zip(content, tokens, direct):
        assert entry.token == tokenizer.decode([t])
        assert entry.logprob == pytest.approx(lp[t].item(), abs=2e-3)
        tops = [x.logprob for x in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.bytes == list(entry.token.encode())
    # legacy completions: logprobs with alternatives as token -> logprob maps
    c = client.completions.create(model="demo", prompt="In the beginning", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0
    for top, value in zip(lp.top_logprobs, lp.token_logprobs):
        assert len(top) == 2 and max(top.values()) == pytest.approx(value)  # greedy: the chosen one is the best


def test_n_gives_several_choices(client):
    r = client.chat.completions.create(model="demo", messages=ASK, n=2, temperature=1.0, seed=5, max_tokens=16)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    if all(c.finish_reason == "length" for c in r.choices):
        assert r.usage.completion_tokens == 2 * 16  # counted over both choices
    seen = {}
    for chunk in client.chat.completions.create(model="demo", messages=ASK, n=2, temperature=1.0, seed=5,
                                                max_tokens=16, stream=True):  # fmt: skip
        for c in chunk.choices:
            seen.setdefault(c.index, []).append(c.delta.content or "")
    assert sorted(seen) == [0, 1]
    assert ["".join(seen[i]) for i in (0, 1)] == [c.message.content for c in r.choices]  # same seed, same choices


def test_sampling_extras(client, demo_model):
    _, tokenizer = demo_model
    target = tokenizer.encode(" Moses", add_special_tokens=False)[0]
    r = client.completions.create(model="demo", prompt="In the beginning", max_tokens=4, temperature=0,
                                  logit_bias={str(target): 100})  # fmt: skip
    assert r.choices[0].text == " Moses" * 4
    plain = client.completions.create(model="demo", prompt="And the", max_tokens=40, temperature=0)
    penalised = client.completions.create(model="demo", prompt="And the", max_tokens=40, temperature=0,
                                          frequency_penalty=2.0)  # fmt: skip
    words = plain.choices[0].text.split()
    assert len(set(words)) < len(words)  # the model repeats itself ...
    assert penalised.choices[0].text != plain.choices[0].text  # ... and the penalty changes that
    a, b = (client.completions.create(model="demo", prompt="And the", max_tokens=12, temperature=1.0, seed=9)
            for _ in range(2))  # fmt: skip
    assert a.choices[0].text == b.choices[0].text
    r = client.completions.create(model="demo", prompt="And the", max_tokens=30, temperature=0,
                                  stop=["zzz", "yyy", "xxx", " the"])  # fmt: skip
    assert " the" not in r.choices[0].text and r.choices[0].finish_reason == "stop"


def test_models_list_their_context_length(client):
    (card,) = client.models.list().data
    assert card.context_length == card.max_model_len == 4096


# ------------------------------------------------------------------ responses
def test_responses_api(client):
    r = client.responses.create(model="demo", input="Who created the heaven and the earth?", max_output_tokens=20,
                                temperature=0)  # fmt: skip
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert client.responses.retrieve(r.id).output_text == r.output_text
    # continuing it: the stored conversation, with its state reused from the prefix cache
    r2 = client.responses.create(model="demo", input="And then?", previous_response_id=r.id, max_output_tokens=10,
                                 temperature=0)  # fmt: skip
    assert r2.previous_response_id == r.id
    assert r2.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens - 2
    # at least the first prompt up to its last token (what the reply's text renders to may
    # differ from the tokens generated: a detokenized, re-tokenized reply)
    assert r2.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens - 1
    # streamed: the same text as events
    events = list(client.responses.create(model="demo", input="Who created the heaven and the earth?",
                                          max_output_tokens=20, temperature=0, stream=True))  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == r.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="demo", input="x", previous_response_id="resp_nope")


def test_responses_function_tools(client):
    tool = {"type": "function", "name": "add", "description": "Add two numbers",
            "parameters": ADD["function"]["parameters"]}  # fmt: skip
    r = client.responses.create(model="demo", input="What is 2 + 3?", tools=[tool], tool_choice="required",
                                temperature=0.7, max_output_tokens=200)  # fmt: skip
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and all(c.name == "add" for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), ADD["function"]["parameters"])
    # the tool's result goes back as a function_call_output item
    r2 = client.responses.create(
        model="demo", previous_response_id=r.id, tools=[tool], max_output_tokens=10, temperature=0,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "5"}],
    )  # fmt: skip
    assert r2.status in ("completed", "incomplete")
    assert r2.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens - 1


# ------------------------------------------------------------------------ key
def test_a_wrong_or_missing_key_gets_401(demo_server):
    bad = openai.OpenAI(base_url=demo_server, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    host, port = demo_server.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": ASK}))
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200  # probes need no key
    conn.close()


# ------------------------------------------------- thinking, fuzz (scripted model)
JSON_ANSWER = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
               "additionalProperties": False}  # fmt: skip


def responder(prompt: str) -> str:
    """Replies as the scripted model writes them after the assistant header (the
    thinking template's prompt already holds their opening ``<think>\n``)."""
    user = last_user_text(prompt)
    if user.startswith("json"):
        return '<think>\nLet me weigh it.\n</think>\n\n{"answer": 42}'
    return "<think>\nHello there."


@pytest.fixture(scope="module")
def thinking_server(hf_checkpoint, tmp_path_factory):
    folder = folder_with_template(chat_model_folder(hf_checkpoint), tmp_path_factory.mktemp("thinking"),
                                  THINKING_TEMPLATE)  # fmt: skip

    def load_engine():
        model, tokenizer = qnext_mlx.load(folder)
        return ChatEngine(ScriptedModel(model, tokenizer, responder), tokenizer, max_context=512)

    server = start_in_thread(load_engine, "qnext-test", max_request_bytes=64 * 1024)
    yield server
    stop_server(server)


def test_thinking_reasoning_stays_free_and_the_answer_follows_the_schema(thinking_server):
    url = f"http://127.0.0.1:{thinking_server.server_address[1]}/v1"
    c = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=60)
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": JSON_ANSWER}}
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "json please"}],
                                  response_format=fmt, temperature=0)  # fmt: skip
    msg = r.choices[0].message
    assert msg.reasoning_content == "Let me weigh it."  # the scripted reasoning, untouched by the grammar
    assert json.loads(msg.content) == {"answer": 42}
    # the scripted answer is not JSON: the grammar turns it into some
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}], response_format=fmt,
                                  temperature=0, max_tokens=60)  # fmt: skip
    # (no </think> in this reply: the grammar never starts, the reasoning is all there is)
    assert r.choices[0].message.reasoning_content == "Hello there." and not r.choices[0].message.content


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "messages", "prompt", "input", "temperature", "top_p", "top_k", "max_tokens", "n", "stop",
          "stream", "tools", "tool_choice", "response_format", "logprobs", "top_logprobs", "logit_bias", "seed",
          "frequency_penalty", "stream_options", "previous_response_id", "text", "max_output_tokens"]  # fmt: skip
BASES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "/v1/completions": {"prompt": "hi", "max_tokens": 4},
    "/v1/responses": {"input": "hi", "max_output_tokens": 4},
}


@st.composite
def bodies(draw):
    path = draw(st.sampled_from(sorted(BASES)))
    kind = draw(st.sampled_from(["any", "field", "drop", "nested"]))
    if kind == "any":
        return path, draw(JSON_VALUES)
    body = json.loads(json.dumps(BASES[path]))
    if kind == "field":
        body[draw(st.sampled_from(FIELDS))] = draw(JSON_VALUES)
    elif kind == "drop":
        body.pop(draw(st.sampled_from(sorted(body))))
    else:
        body["messages" if "messages" in body else "input"] = [
            {"role": draw(st.sampled_from(["user", "tool", "x"])), "content": draw(JSON_VALUES)}
        ]
    return path, body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bodies())
def test_malformed_bodies_get_a_4xx_never_a_500(thinking_server, case):
    path, body = case
    conn = http.client.HTTPConnection("127.0.0.1", thinking_server.server_address[1], timeout=120)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    assert resp.status < 500, data
    if resp.status >= 400:
        err = json.loads(data)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_the_server_serves_on_after_the_fuzz(thinking_server):
    url = f"http://127.0.0.1:{thinking_server.server_address[1]}/v1"
    c = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
    assert r.choices[0].message.reasoning_content == "Hello there."
