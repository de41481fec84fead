"""Convert a checkpoint to 4-bit MLX, then chat with the result.

    python examples/convert_then_chat.py [--hf-path PATH_OR_REPO] [--out FOLDER]

By default it converts the bundled demo model into a temporary folder, the same as
``python -m qnext_mlx.convert --hf-path PATH --mlx-path OUT --q-bits 4`` followed by
``python -m qnext_mlx.chat --model OUT``.
"""

import argparse
import tempfile
from pathlib import Path

from qnext_mlx.checkpoint.convert import convert
from qnext_mlx.checkpoint.paths import DEMO_MODEL_DIR
from qnext_mlx.serve.chat_session import ChatSession, ReplyStats, SamplingSettings, load_chat_engine

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--hf-path", default=str(DEMO_MODEL_DIR), help="source folder or Hugging Face repo id")
parser.add_argument("--out", help="output folder (default: a temporary one)")
args = parser.parse_args()

with tempfile.TemporaryDirectory() as tmp:
    out = Path(args.out or Path(tmp) / "model-4bit")
    result = convert(args.hf_path, out, q_bits=4, progress=False)
    print(f"converted: {result.total_bytes / 2**20:.1f} MiB, {result.bits_per_weight:.2f} bits/weight -> {out}")

    engine, name = load_chat_engine(str(out), quiet=True)
    session = ChatSession(engine, system="You are a scribe.", settings=SamplingSettings(temp=0.0, max_tokens=30))
    for question in ("Who made the heavens?", "And the earth?"):
        print(f">>> {question}")
        for item in session.send(question):
            if isinstance(item, ReplyStats):
                print(f"\n[{item.generation_tokens} tokens; prompt {item.prompt_tokens}, {item.cached_tokens} cached]")
            elif item.kind == "content":
                print(item.text, end="", flush=True)
