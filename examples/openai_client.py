"""The openai client against qnext-mlx's server: a streamed reply, then a request with a tool.

Start the server first (it serves the bundled demo model by default):

    python -m qnext_mlx.server --port 8000
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1
"""

import argparse

from openai import OpenAI

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
args = parser.parse_args()

client = OpenAI(base_url=args.base_url, api_key="EMPTY")
model = client.models.list().data[0].id

# 1. Streaming: the text arrives piece by piece; reasoning (if any) as reasoning_content.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Tell me of the flood."}],
    max_tokens=40,
    temperature=0.7,
    seed=1,
    stream=True,
)
for chunk in stream:
    delta = chunk.choices[0].delta if chunk.choices else None
    if delta and delta.content:
        print(delta.content, end="", flush=True)
print()

# 2. A function tool (the demo model was taught to call lookup_verse for "Book C:V"): a call
# comes back as tool_calls, its result goes back as a role "tool" message, and the model
# answers with it.
tools = [
    {
        "type": "function",
        "function": {
            "name": "lookup_verse",
            "description": "Look up a verse of the King James Bible.",
            "parameters": {
                "type": "object",
                "properties": {
                    "book": {"type": "string"},
                    "chapter": {"type": "integer"},
                    "verse": {"type": "integer"},
                },
                "required": ["book", "chapter", "verse"],
            },
        },
    }
]
messages = [{"role": "user", "content": "Genesis 1:3"}]
reply = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=60, temperature=0)
message = reply.choices[0].message
if message.tool_calls:
    call = message.tool_calls[0]
    print(f"tool call: {call.function.name}({call.function.arguments})")
    verse = "And God said, Let there be light: and there was light."
    messages += [message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": verse}]
    reply = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=60, temperature=0)
    message = reply.choices[0].message
print(f"answer ({reply.choices[0].finish_reason}): {message.content}")
