"""A Qwen-Agent assistant with a function tool, served by qnext-mlx.

python -m qnext_mlx.server --port 8000
python examples/qwen_agent_assistant.py --base-url http://127.0.0.1:8000/v1
"""

import argparse
import json

from qwen_agent.agents import Assistant
from qwen_agent.tools.base import BaseTool, register_tool

VERSES = {("Genesis", 1, 3): "And God said, Let there be light: and there was light."}


@register_tool("lookup_verse")
class LookupVerse(BaseTool):
    """The tool the demo model was taught to call for "Book C:V"."""

    description = "Look up a verse of the King James Bible."
    parameters = [
        {"name": "book", "type": "string", "description": "the book, e.g. Genesis", "required": True},
        {"name": "chapter", "type": "integer", "description": "chapter number", "required": True},
        {"name": "verse", "type": "integer", "description": "verse number", "required": True},
    ]

    def call(self, params: str, **kwargs) -> str:
        p = json.loads(params)
        return VERSES.get((p.get("book"), p.get("chapter"), p.get("verse")), "(no such verse in this example)")


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
parser.add_argument("--model", default="qnext-mlx-demo", help="the model id the server reports")
args = parser.parse_args()

bot = Assistant(
    llm={
        "model": args.model,
        "model_server": args.base_url,
        "api_key": "EMPTY",
        "generate_cfg": {"max_tokens": 60, "temperature": 0},
    },
    function_list=["lookup_verse"],
    system_message="You are a helpful assistant.",
)
messages = [{"role": "user", "content": "Genesis 1:3"}]
responses = []
for responses in bot.run(messages=messages):  # streamed: each step holds the messages so far
    pass
for message in responses:
    if message.get("function_call"):
        print(f"[calls {message['function_call']['name']}({message['function_call']['arguments']})]")
    elif message["role"] == "function":
        print(f"[{message['name']} returned {message['content']}]")
    else:
        print(message.get("content", ""))
