"""Test helpers for the chat surfaces (server, terminal chat, desktop app).

* :func:`chat_model_folder`: the bundled demo model when its weights are there,
  else a tiny random Qwen3-Next with the demo model's tokenizer (its Qwen3 chat
  template with tools and thinking) next to it;
* :class:`ScriptedModel`: a real model whose logits are overridden so that the
  reply to a prompt is exactly the text a ``responder(prompt_text)`` returns. Only
  the last position's logits change: the cache, the chat template, tokenization,
  stream_generate, detokenization and parsing all run for real. Test-only.
* :class:`ChunkGate`: a model proxy that counts prefill chunks and lets a test act
  (cancel, wait) while a long prompt is being prefilled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "qnext_mlx" / "demo_model"
DEMO_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ASSISTANT_HEADER = "<|im_start|>assistant\n"


def demo_weights_present() -> bool:
    return (DEMO_DIR / "config.json").exists() and any(DEMO_DIR.glob("*.safetensors"))


def chat_model_folder(hf_checkpoint) -> Path:
    """A loadable model folder with the demo tokenizer (see the module docstring);
    ``QNEXT_MLX_CHAT_TEST_MODEL=FOLDER`` picks another one (e.g. a real model)."""
    if os.environ.get("QNEXT_MLX_CHAT_TEST_MODEL"):
        return Path(os.environ["QNEXT_MLX_CHAT_TEST_MODEL"])
    if demo_weights_present():
        return DEMO_DIR
    folder, _, _ = hf_checkpoint("chat_surfaces", seed=7, mtp=True, vocab_size=4096)
    if not (folder / "tokenizer.json").exists():
        for name in DEMO_TOKENIZER_FILES:
            if (DEMO_DIR / name).exists():
                shutil.copy(DEMO_DIR / name, folder / name)
        vocab = json.loads((folder / "tokenizer.json").read_text())
        ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
        (folder / "generation_config.json").write_text(
            json.dumps({"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]})
        )
    return folder


class ScriptedModel:
    """``model`` with its next-token choice forced: the reply to a prompt (everything
    up to the last ``<|im_start|>assistant\\n``) is ``responder(prompt_text)``, then EOS.

    Everything else (``make_cache``, ``config``, the cache updates themselves) is the
    real model's, so generation through it exercises the real code paths.
    """

    def __init__(self, model, tokenizer, responder: Callable[[str], str]):
        self._model = model
        self._tokenizer = tokenizer
        self.responder = responder
        self._header = list(tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False))
        # Chat replies end with <|im_end|>, as a trained model ends them.
        im_end = tokenizer.encode("<|im_end|>", add_special_tokens=False)
        self._eos = im_end[0] if im_end and im_end[0] in tokenizer.eos_token_ids else sorted(tokenizer.eos_token_ids)[0]
        self._replies: Dict[Tuple[int, ...], List[int]] = {}
        self.prompts: List[str] = []  # the prompt texts seen, in order

    def __getattr__(self, name):
        return getattr(self._model, name)

    def reply_tokens(self, prompt_ids: List[int]) -> List[int]:
        """The scripted reply's tokens (EOS included) for a prompt ending at an assistant header."""
        h = len(self._header)
        start = max(i + h for i in range(len(prompt_ids) - h + 1) if prompt_ids[i : i + h] == self._header)
        return self._reply(tuple(prompt_ids[:start]))

    def forget(self) -> None:
        """Ask the responder again for prompts already answered (a regenerated reply)."""
        self._replies.clear()

    def _reply(self, prefix: Tuple[int, ...]) -> List[int]:
        if prefix not in self._replies:
            text = self._tokenizer.decode(list(prefix))
            self.prompts.append(text)
            ids = list(self._tokenizer.encode(self.responder(text), add_special_tokens=False))
            self._replies[prefix] = ids + [self._eos]
        return self._replies[prefix]

    def __call__(self, ids, cache=None, **kwargs):
        out = self._model(ids, cache=cache, **kwargs)
        logits = out[0] if isinstance(out, tuple) else out  # (logits, hidden) with return_hidden
        if hasattr(cache, "tokens"):  # a one-row ModelCache: it records what it has seen
            rows = [cache.tokens]
        else:  # the batch engine's BatchCache: each row's tokens so far, plus this call's
            new = ids.tolist()
            rows = [list(fed) + row for fed, row in zip(cache.fed, new)]
        forced = [self._force(tokens, logits[b : b + 1]) for b, tokens in enumerate(rows)]
        if all(f is None for f in forced):
            return out
        stacked = mx.concatenate([f if f is not None else logits[b : b + 1] for b, f in enumerate(forced)])
        return (stacked,) + tuple(out[1:]) if isinstance(out, tuple) else stacked

    def _force(self, tokens: List[int], logits):
        """``logits [1, L, vocab]`` of the last ``L`` of ``tokens`` with the scripted reply forced,
        or None when ``tokens`` is not a chat prompt (the model's own logits stay)."""
        h = len(self._header)
        start = None
        for i in range(len(tokens) - h, -1, -1):
            if tokens[i : i + h] == self._header:
                start = i + h
                break
        if start is None:
            return None
        reply = self._reply(tuple(tokens[:start]))
        # Position j of this call predicts token p + 1 (p: its index in the record); force
        # every position at or after the reply's start, so a multi-token verify pass
        # (speculative decoding) is scripted too.
        L, vocab = logits.shape[1], logits.shape[-1]
        first = len(tokens) - L
        rows = []
        for j in range(L):
            k = first + j + 1 - start  # reply tokens before the one predicted here
            if k < 0:
                rows.append(logits[:, j, :])
                continue
            target = reply[k] if k < len(reply) else self._eos
            rows.append(mx.where(mx.arange(vocab) == target, 0.0, -1e9).astype(logits.dtype)[None])
        return mx.stack(rows, axis=1)


def last_user_text(prompt_text: str) -> str:
    """The content of the last user turn of a ChatML prompt."""
    turn = prompt_text.rsplit("<|im_start|>user\n", 1)[-1]
    return turn.split("<|im_end|>", 1)[0]


class ChunkGate:
    """``model`` (any callable model, e.g. a :class:`ScriptedModel`) with its prefill
    chunks counted: ``chunks`` counts the calls with more than one token (decode steps
    feed one), and ``on_chunk(n)``, when given, runs before the n-th such call does
    (counted over the proxy's lifetime), so a test can cancel or wait mid-prefill.
    """

    def __init__(self, model, on_chunk: Optional[Callable[[int], None]] = None):
        self._model = model
        self.on_chunk = on_chunk
        self.chunks = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, ids, cache=None, **kwargs):
        if ids.shape[1] > 1:
            self.chunks += 1
            if self.on_chunk is not None:
                self.on_chunk(self.chunks)
        return self._model(ids, cache=cache, **kwargs)


# Test templates that behave like the real Qwen3-Next ones (see DEVELOPERS.md): Instruct's
# generation prompt is "<|im_start|>assistant\n"; Thinking's is "<|im_start|>assistant\n<think>\n"
# (the reply holds only "</think>"), and it re-renders the assistant turns before the last
# user query without their reasoning.
INSTRUCT_TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
THINKING_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set content = m.content %}"
    "{%- set reasoning = m.reasoning_content or '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)


def folder_with_template(model_folder: Path, out: Path, template: str) -> Path:
    """A copy of ``model_folder`` (weights linked, not copied) whose tokenizer has ``template``."""
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(model_folder).iterdir():
        if f.is_file() and not (out / f.name).exists():
            if f.name == "tokenizer_config.json":
                cfg = json.loads(f.read_text())
                cfg["chat_template"] = template
                (out / f.name).write_text(json.dumps(cfg))
            else:
                (out / f.name).symlink_to(f.resolve())
    return out
