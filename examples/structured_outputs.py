"""Structured outputs, forced tool calls, log-probabilities and the Responses API with the openai client.

Start the server first (it serves the bundled demo model by default):

    python -m qnext_mlx.server --port 8000
    python examples/structured_outputs.py --base-url http://127.0.0.1:8000/v1
"""

import argparse
import json

from openai import OpenAI

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
parser.add_argument("--api-key", default="EMPTY", help="the server's --api-key, if it has one")
args = parser.parse_args()

client = OpenAI(base_url=args.base_url, api_key=args.api_key)
model = client.models.list().data[0].id

# 1. A reply that must be a JSON document of this schema: the server enforces it token by token.
schema = {
    "type": "object",
    "properties": {
        "book": {"enum": ["Genesis", "Exodus", "Psalms"]},
        "chapter": {"type": "integer", "minimum": 1, "maximum": 150},
        "about_light": {"type": "boolean"},
    },
    "required": ["book", "chapter", "about_light"],
    "additionalProperties": False,
}
reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Where is light created? Answer as JSON."}],
    response_format={"type": "json_schema", "json_schema": {"name": "reference", "schema": schema}},
    temperature=0.7,
    seed=4,
    max_tokens=100,
)
print("json_schema:", json.dumps(json.loads(reply.choices[0].message.content)))

# 2. A forced call of a named tool: its arguments always match the tool's parameter schema.
tools = [
    {
        "type": "function",
        "function": {
            "name": "lookup_verse",
            "description": "Look up a verse of the King James Bible.",
            "parameters": {
                "type": "object",
                "properties": {
                    "book": {"type": "string", "maxLength": 20},
                    "chapter": {"type": "integer", "minimum": 1},
                    "verse": {"type": "integer", "minimum": 1},
                },
                "required": ["book", "chapter", "verse"],
                "additionalProperties": False,
            },
        },
    }
]
reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Find me a verse about light."}],
    tools=tools,
    tool_choice={"type": "function", "function": {"name": "lookup_verse"}},
    parallel_tool_calls=False,
    temperature=0.7,
    seed=1,
    max_tokens=100,
)
call = reply.choices[0].message.tool_calls[0]
print(f"forced tool call: {call.function.name}({call.function.arguments})")

# 3. Log-probabilities of each token, with the two best alternatives.
reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "And God said"}],
    logprobs=True,
    top_logprobs=2,
    temperature=0,
    max_tokens=5,
)
for entry in reply.choices[0].logprobs.content:
    alternatives = ", ".join(f"{a.token!r} {a.logprob:.2f}" for a in entry.top_logprobs)
    print(f"logprob {entry.token!r}: {entry.logprob:.3f}  (best: {alternatives})")

# 4. The Responses API: a stored response, then a follow-up that continues it.
first = client.responses.create(model=model, input="Who divided the light from the darkness?", max_output_tokens=30)
print("response:", first.output_text)
follow = client.responses.create(model=model, input="And then?", previous_response_id=first.id, max_output_tokens=30)
cached = follow.usage.input_tokens_details.cached_tokens
print(f"follow-up: {follow.output_text} [{cached} of {follow.usage.input_tokens} input tokens reused]")
