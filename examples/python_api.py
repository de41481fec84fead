"""The Python API: load a model, stream a reply, and reuse the prompt cache for a follow-up.

    python examples/python_api.py [--model PATH_OR_REPO]

Runs offline on the bundled demo model (the default).
"""

import argparse

import qnext_mlx
from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR
from qnext_mlx.engine.text import ThinkFilter, format_prompt, prompt_opens_think, static_prefix_len

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=str(DEMO_MODEL_DIR), help="model folder or Hugging Face repo id")
parser.add_argument("--max-tokens", type=int, default=40)
args = parser.parse_args()

model, tokenizer = qnext_mlx.load(args.model)
cache = model.make_cache()  # one cache per conversation: DeltaNet states + attention KV

prompt = format_prompt(tokenizer, "In the beginning", system="You are a scribe.")
think = ThinkFilter(inside=prompt_opens_think(prompt))  # the reply without its <think> reasoning
system_end = static_prefix_len(tokenizer, "In the beginning", "You are a scribe.")
for response in qnext_mlx.stream_generate(
    model, tokenizer, prompt, max_tokens=args.max_tokens, temp=0.0, prompt_cache=cache, checkpoint_at=[system_end]
):
    print(think.feed(response.text), end="", flush=True)
print(think.flush(), end="")
print(f"\n[{response.generation_tokens} tokens at {response.generation_tps:.0f} tok/s]")

# The same system prompt again: the cache kept a checkpoint at the end of the shared system
# message (checkpoint_at), so only the new user turn is prefilled.
system_end = static_prefix_len(tokenizer, "And the earth", "You are a scribe.")
follow_up = format_prompt(tokenizer, "And the earth", system="You are a scribe.")
*_, last = qnext_mlx.stream_generate(
    model, tokenizer, follow_up, max_tokens=args.max_tokens, temp=0.0, prompt_cache=cache, checkpoint_at=[system_end]
)
print(f"[follow-up: prompt {last.prompt_tokens} tokens, {last.cached_tokens} reused from the cache]")

# qnext_mlx.generate collects the text of the same stream.
text = qnext_mlx.generate(model, tokenizer, follow_up, max_tokens=args.max_tokens, temp=0.0)
think = ThinkFilter(inside=prompt_opens_think(follow_up))
print(think.feed(text) + think.flush())
