"""Long context with YaRN: stretch the model's window and read a prompt longer than it.

    python examples/long_context_yarn.py [--model PATH_OR_REPO] [--max-context N]

The demo model is trained on 4,096 positions; ``--max-context 6000`` picks the smallest YaRN
factor that covers 6,000 tokens (1.5) and the prompt here is longer than the native window.
For the 80B the same goes to about 1M tokens (``--max-context 1M``, see docs/long-context.md).
"""

import argparse
from types import SimpleNamespace

import qnext_mlx
from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR
from qnext_mlx.model.rope import apply_rope_options, context_window, native_context

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=str(DEMO_MODEL_DIR))
parser.add_argument("--max-context", type=int, default=6000)
args = parser.parse_args()

model, tokenizer = qnext_mlx.load(args.model)
native = native_context(model.config)
# What --max-context does on every entry point: the smallest adequate YaRN factor, applied in place.
config = apply_rope_options(SimpleNamespace(max_context=args.max_context), model)
print(f"native window {native:,} tokens -> YaRN window {context_window(config):,} tokens")

verse = tokenizer.encode("And God said, Let there be light: and there was light. ")
length = min(args.max_context, context_window(config)) - 64
ids = (verse * (length // len(verse) + 1))[:length]
assert len(ids) > native, "the prompt should be longer than the native window"
cache = model.make_cache()  # at long context on a Mac add kv_bits=8 (or 4): a half (a quarter) of the KV memory
for r in qnext_mlx.stream_generate(
    model, tokenizer, ids, max_tokens=24, temp=0.0, prompt_cache=cache, prefill_step_size=1024
):
    print(r.text, end="", flush=True)
print(f"\n[prompt {r.prompt_tokens:,} tokens at {r.prompt_tps:.0f} tok/s; cache holds {cache.offset:,} tokens]")
