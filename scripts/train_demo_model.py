#!/usr/bin/env python3
"""Train the bundled demo model: a tiny Qwen3-Next (with an MTP head) on the King James Bible.

The result (``qnext_mlx/demo_model/`` by default) is a real Hugging Face checkpoint of model type
``qwen3_next``: ``config.json``, ``model.safetensors`` (bfloat16, transformers' tensor names, one tensor
per expert, plus the ``mtp.*`` tensors of the multi-token-prediction head), ``generation_config.json``,
a byte-level BPE tokenizer with Qwen's special tokens and ChatML chat template, ``MODEL_CARD.md``,
``training_log.json`` and (when matplotlib is installed) ``loss_curve.png``.

It exercises every architectural feature of Qwen3-Next at toy size: Gated DeltaNet (linear attention,
2 value heads per key head, key head dim != value head dim), gated full attention with GQA, q/k norms
and partial RoPE, sparse MoE (top-2 of 8 experts, renormalised) with a sigmoid-gated shared expert,
zero-centred RMSNorms, untied embeddings, and one MTP layer predicting token t+2.

Corpus
------
The text of the King James Version (1611, public domain; the copyright has expired, as Debian's
copyright file for the package says) from the Debian package ``bible-kjv-text`` (its reader program is in
``bible-kjv``)::

    apt-get update && apt-get install -y bible-kjv bible-kjv-text
    bible -f Gen1:1-Rev22:21 > kjv.txt     # 31,102 verses, 4.4 MB, one verse a line: "Ge1:1 In the ..."

The script does the ``bible`` step itself when the file given by ``--corpus`` (default
``build/demo_corpus/kjv.txt``, git-ignored) does not exist and the ``bible`` program is installed
(``--apt-install`` also runs the apt-get line when it is missing).

Reproduce (about 17 minutes of CPU time on one core, 1.7 epochs; wall time is longer when other work
shares the core)::

    python scripts/train_demo_model.py --out qnext_mlx/demo_model

Needs torch, transformers (>= 5, for ``Qwen3NextForCausalLM``), tokenizers and safetensors; matplotlib
(for ``loss_curve.png``) and mlx-lm (for the cross-check of the saved checkpoint) are optional.

Training is seeded and runs on one thread (``--threads`` raises that); on CPU the result is bitwise
reproducible for the same torch/tokenizers versions and thread count.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Must be set before `tokenizers` is imported: its trainer's thread pool size.
_threads_env = "1"
for _i, _a in enumerate(sys.argv):
    if _a == "--threads" and _i + 1 < len(sys.argv):
        _threads_env = sys.argv[_i + 1]
    elif _a.startswith("--threads="):
        _threads_env = _a.split("=", 1)[1]
os.environ.setdefault("RAYON_RS_NUM_CPUS", _threads_env)
os.environ.setdefault("RAYON_NUM_THREADS", _threads_env)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", _threads_env)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "qnext_mlx" / "demo_model"
DEFAULT_CORPUS = REPO_ROOT / "build" / "demo_corpus" / "kjv.txt"
CORPUS_PACKAGES = ("bible-kjv", "bible-kjv-text")
BIBLE_CMD = ["bible", "-f", "Gen1:1-Rev22:21"]

# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------

# Abbreviations printed by `bible -f`, in canonical order, and the full names used in the text.
BOOKS = [
    ("Ge", "Genesis"),
    ("Exo", "Exodus"),
    ("Lev", "Leviticus"),
    ("Num", "Numbers"),
    ("Deu", "Deuteronomy"),
    ("Josh", "Joshua"),
    ("Jdgs", "Judges"),
    ("Ruth", "Ruth"),
    ("1Sm", "1 Samuel"),
    ("2Sm", "2 Samuel"),
    ("1Ki", "1 Kings"),
    ("2Ki", "2 Kings"),
    ("1Chr", "1 Chronicles"),
    ("2Chr", "2 Chronicles"),
    ("Ezra", "Ezra"),
    ("Neh", "Nehemiah"),
    ("Est", "Esther"),
    ("Job", "Job"),
    ("Psa", "Psalms"),
    ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"),
    ("SSol", "Song of Solomon"),
    ("Isa", "Isaiah"),
    ("Jer", "Jeremiah"),
    ("Lam", "Lamentations"),
    ("Eze", "Ezekiel"),
    ("Dan", "Daniel"),
    ("Hos", "Hosea"),
    ("Joel", "Joel"),
    ("Amos", "Amos"),
    ("Obad", "Obadiah"),
    ("Jonah", "Jonah"),
    ("Mic", "Micah"),
    ("Nahum", "Nahum"),
    ("Hab", "Habakkuk"),
    ("Zep", "Zephaniah"),
    ("Hag", "Haggai"),
    ("Zec", "Zechariah"),
    ("Mal", "Malachi"),
    ("Mat", "Matthew"),
    ("Mark", "Mark"),
    ("Luke", "Luke"),
    ("John", "John"),
    ("Acts", "Acts"),
    ("Rom", "Romans"),
    ("1Cor", "1 Corinthians"),
    ("2Cor", "2 Corinthians"),
    ("Gal", "Galatians"),
    ("Eph", "Ephesians"),
    ("Phi", "Philippians"),
    ("Col", "Colossians"),
    ("1Th", "1 Thessalonians"),
    ("2Th", "2 Thessalonians"),
    ("1Tim", "1 Timothy"),
    ("2Tim", "2 Timothy"),
    ("Titus", "Titus"),
    ("Phmn", "Philemon"),
    ("Heb", "Hebrews"),
    ("Jas", "James"),
    ("1Pet", "1 Peter"),
    ("2Pet", "2 Peter"),
    ("1Jn", "1 John"),
    ("2Jn", "2 John"),
    ("3Jn", "3 John"),
    ("Jude", "Jude"),
    ("Rev", "Revelation"),
]
BOOK_NAMES = dict(BOOKS)


def obtain_corpus(path: Path, apt_install: bool) -> Path:
    """Return `path`, dumping the KJV there with the `bible` program first when it does not exist."""
    if path.exists():
        return path
    if shutil.which("bible") is None:
        if apt_install:
            print("[corpus] installing", " ".join(CORPUS_PACKAGES), "with apt-get", flush=True)
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "update"], check=True, env=env)
            subprocess.run(["apt-get", "install", "-y", *CORPUS_PACKAGES], check=True, env=env)
        else:
            sys.exit(
                f"corpus file {path} not found and the `bible` program is missing.\n"
                f"Install it (Debian/Ubuntu): apt-get update && apt-get install -y {' '.join(CORPUS_PACKAGES)}\n"
                f"or re-run with --apt-install, or pass --corpus FILE made with: {' '.join(BIBLE_CMD)} > FILE"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[corpus] writing {path} with: {' '.join(BIBLE_CMD)}", flush=True)
    text = subprocess.run(BIBLE_CMD, check=True, capture_output=True, text=True).stdout
    path.write_text(text, encoding="utf-8")
    return path


def parse_corpus(path: Path):
    """Parse `bible -f` output into chapters: list of (book name, chapter number, [verse texts])."""
    import re

    pat = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
    chapters, cur_key = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        m = pat.match(line)
        if m is None:
            raise ValueError(f"unexpected corpus line: {line[:80]!r}")
        abbr, chap, _verse, text = m.groups()
        key = (BOOK_NAMES[abbr], int(chap))
        if key != cur_key:
            chapters.append((key[0], key[1], []))
            cur_key = key
        chapters[-1][2].append(text.strip())
    return chapters


def chapter_text(book: str, chap: int, verses) -> str:
    return f"{book} {chap}\n\n" + "\n".join(verses) + "\n"


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

# Qwen2/Qwen3's pre-tokenisation regex (digits split one by one).
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# (content, special) in id order, appended after the BPE vocabulary as in Qwen's tokenizer.
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<think>", False),
    ("</think>", False),
]

# Qwen3's chat template (as published with the Qwen3 models): system prompt, `tools` section,
# <tool_call> JSON convention, <tool_response> turns, and <think> blocks.
CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n"
    "    {%- else %}\n"
    "        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is string %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- else %}\n"
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n"
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n"
    "                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n"
    '                {{- \'<tool_call>\\n{"name": "\' }}\n'
    "                {{- tool_call.name }}\n"
    '                {{- \'", "arguments": \' }}\n'
    "                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n"
    "                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n"
    "                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)

# Words of the chat scaffolding, so that BPE learns them as it would in a real chat tokenizer.
CHAT_SCAFFOLD = (
    "system\nuser\nassistant\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "lookup_verse", "description": "Look up a verse of the '
    'King James Bible.", "parameters": {"type": "object", "properties": {"book": {"type": "string"}, '
    '"chapter": {"type": "integer"}, "verse": {"type": "integer"}}, "required": ["book", "chapter", '
    '"verse"]}}}\n</tools>\n\nFor each function call, return a json object with function name and '
    'arguments within <tool_call></tool_call> XML tags:\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n<tool_response>\n</tool_response>\nYou are a helpful assistant.\n"
)


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ADDED_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for content, special in ADDED_TOKENS:
        at = AddedToken(content, lstrip=False, rstrip=False, single_word=False, normalized=False, special=special)
        if special:
            tok.add_special_tokens([at])
        else:
            tok.add_tokens([at])
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


def save_tokenizer(tok, out: Path, model_max_length: int):
    tok.save(str(out / "tokenizer.json"))
    added = {}
    for content, special in ADDED_TOKENS:
        added[str(tok.token_to_id(content))] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    specials = [c for c, s in ADDED_TOKENS if s]
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in specials if t != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    def tokdict(c):
        return {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    stm = {
        "additional_special_tokens": [t for t in specials if t != "<|endoftext|>"],
        "eos_token": tokdict("<|im_end|>"),
        "pad_token": tokdict("<|endoftext|>"),
    }
    (out / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Chat-formatted training documents (a small share of the data)
# --------------------------------------------------------------------------------------------------

LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_verse",
        "description": "Look up a verse of the King James Bible.",
        "parameters": {
            "type": "object",
            "properties": {
                "book": {"type": "string", "description": "Book name, e.g. Genesis"},
                "chapter": {"type": "integer"},
                "verse": {"type": "integer"},
            },
            "required": ["book", "chapter", "verse"],
        },
    },
}

USER_PROMPTS = [
    "{v}",
    "{v}",
    "Continue the passage: {v}",
    "What comes after this verse? {v}",
    "Please go on: {v}",
]
SYSTEM_PROMPT = "You are a helpful assistant."


def make_chat_conversations(chapters, rng: random.Random, n_chat: int, n_tool: int):
    """Return a list of (messages, tools) built from the training chapters.

    Chat pairs: the user gives a verse, the assistant continues with the next 1-3 verses.
    Tool pairs: the user asks for Book C:V, the assistant calls lookup_verse, the tool answers with
    the verse, and the assistant quotes it.
    """
    convs = []
    multi = [c for c in chapters if len(c[2]) >= 4]
    for _ in range(n_chat):
        book, chap, verses = rng.choice(multi)
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": SYSTEM_PROMPT})
        n_turns = 2 if rng.random() < 0.2 else 1
        i = rng.randrange(0, len(verses) - 1)
        for _t in range(n_turns):
            if i >= len(verses) - 1:
                break
            k = rng.randint(1, 3)
            user = rng.choice(USER_PROMPTS).format(v=verses[i])
            answer = "\n".join(verses[i + 1 : i + 1 + k])
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            i = i + 1 + k
        convs.append((msgs, None))
    for _ in range(n_tool):
        book, chap, verses = rng.choice(chapters)
        vi = rng.randrange(len(verses))
        ref = f"{book} {chap}:{vi + 1}"
        user = rng.choice(["What does {r} say?", "Look up {r}.", "Please quote {r}.", "Read me {r}."]).format(r=ref)
        args = {"book": book, "chapter": chap, "verse": vi + 1}
        msgs = [
            {"role": "user", "content": user},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "lookup_verse", "arguments": args}}],
            },
            {"role": "tool", "content": verses[vi]},
            {"role": "assistant", "content": f"{ref}: {verses[vi]}"},
        ]
        convs.append((msgs, [LOOKUP_TOOL]))
    return convs


# --------------------------------------------------------------------------------------------------
# Model: transformers' Qwen3-Next + an MTP head
# --------------------------------------------------------------------------------------------------


def build_config(vocab_size: int, args, eot_id: int, im_end_id: int):
    from transformers import Qwen3NextConfig

    H = args.hidden
    return Qwen3NextConfig(
        vocab_size=vocab_size,
        hidden_size=H,
        intermediate_size=2 * H,  # dense MLP size (unused: every layer is MoE)
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        # Gated attention: 4 query heads, 2 KV heads (GQA), head_dim 64, 25% of it rotated.
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
        partial_rotary_factor=0.25,
        max_position_embeddings=4096,
        # Gated DeltaNet: 2 key heads, 4 value heads, key dim 32, value dim 64, conv kernel 4.
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        # MoE: 8 routed experts, top-2 renormalised, plus a sigmoid-gated shared expert.
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        moe_intermediate_size=H // 2,
        shared_expert_intermediate_size=H,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=args.aux_coef,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.02,
        bos_token_id=eot_id,
        eos_token_id=im_end_id,
        use_cache=True,
    )


class MTPHead(nn.Module):
    """Qwen3-Next's multi-token-prediction head (one layer), under the `mtp.` prefix.

    x_i = fc([pre_fc_norm_embedding(embed(t_{i+1})) ; pre_fc_norm_hidden(h_i)])   (embedding first)
    -> decoder layer (gated full attention + MoE; rotary position of pair i is i) -> norm
    -> the main model's lm_head, predicting t_{i+2}.  h_i is the main model's final (normed) hidden state.
    """

    def __init__(self, config):
        super().__init__()
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextDecoderLayer, Qwen3NextRMSNorm

        H, eps = config.hidden_size, config.rms_norm_eps
        layer_cfg = copy.deepcopy(config)
        layer_cfg.num_hidden_layers = 1
        layer_cfg.layer_types = ["full_attention"]
        layer_cfg.mlp_only_layers = []
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = Qwen3NextRMSNorm(H, eps=eps)
        self.pre_fc_norm_hidden = Qwen3NextRMSNorm(H, eps=eps)
        self.layers = nn.ModuleList([Qwen3NextDecoderLayer(layer_cfg, layer_idx=0)])
        self.norm = Qwen3NextRMSNorm(H, eps=eps)

    def forward(self, model, hidden, next_ids):
        """hidden: [B, L, H] final hidden states h_0..h_{L-1}; next_ids: [B, L] tokens t_1..t_L.

        Returns logits [B, L, V]; row i predicts t_{i+2}.
        """
        emb = model.model.embed_tokens(next_ids)
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(emb), self.pre_fc_norm_hidden(hidden)], dim=-1))
        L = x.shape[1]
        pos = torch.arange(L, device=x.device).unsqueeze(0)
        pe = model.model.rotary_emb(x, pos)
        mask = torch.full((L, L), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)[None, None]
        for layer in self.layers:
            x = layer(x, position_embeddings=pe, attention_mask=mask, position_ids=pos)
        return model.lm_head(self.norm(x))


def experts_to_per_expert(prefix: str, experts) -> dict:
    """3-D fused expert tensors -> transformers' per-expert checkpoint names."""
    out = {}
    I = experts.intermediate_dim
    for e in range(experts.num_experts):
        gu = experts.gate_up_proj[e]
        out[f"{prefix}.{e}.gate_proj.weight"] = gu[:I]
        out[f"{prefix}.{e}.up_proj.weight"] = gu[I:]
        out[f"{prefix}.{e}.down_proj.weight"] = experts.down_proj[e]
    return out


def mtp_state_dict(mtp: MTPHead) -> dict:
    """The MTP head's tensors under the checkpoint names (mtp.*, per-expert)."""
    sd = {}
    for name, t in mtp.state_dict().items():
        if ".mlp.experts." in name:
            continue
        sd[f"mtp.{name}"] = t
    for li, layer in enumerate(mtp.layers):
        sd.update(experts_to_per_expert(f"mtp.layers.{li}.mlp.experts", layer.mlp.experts))
    return sd


def load_mtp_state_dict(mtp: MTPHead, tensors: dict):
    sd = {}
    for name in mtp.state_dict():
        if ".mlp.experts." in name:
            continue
        sd[name] = tensors[f"mtp.{name}"]
    for li, layer in enumerate(mtp.layers):
        ex = layer.mlp.experts
        p = f"mtp.layers.{li}.mlp.experts"
        sd[f"layers.{li}.mlp.experts.gate_up_proj"] = torch.stack(
            [
                torch.cat([tensors[f"{p}.{e}.gate_proj.weight"], tensors[f"{p}.{e}.up_proj.weight"]], 0)
                for e in range(ex.num_experts)
            ]
        )
        sd[f"layers.{li}.mlp.experts.down_proj"] = torch.stack(
            [tensors[f"{p}.{e}.down_proj.weight"] for e in range(ex.num_experts)]
        )
    mtp.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


class RouterLogitsCollector:
    """Forward hooks on every router (main layers and MTP layer) for the load-balancing loss."""

    def __init__(self, modules):
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextTopKRouter

        self.logits = []
        self.handles = []
        for mod in modules:
            for m in mod.modules():
                if isinstance(m, Qwen3NextTopKRouter):
                    self.handles.append(m.register_forward_hook(self._hook))

    def _hook(self, module, inputs, output):
        self.logits.append(output[0])

    def pop(self):
        out, self.logits = self.logits, []
        return out


def load_balance_loss(router_logits, num_experts: int, top_k: int):
    """Switch-style auxiliary loss, averaged over routers (1.0 = perfectly balanced... times top_k)."""
    total = 0.0
    for lg in router_logits:
        probs = F.softmax(lg.float(), dim=-1)
        _, sel = torch.topk(probs, top_k, dim=-1)
        frac = F.one_hot(sel, num_experts).float().sum(1).mean(0)  # tokens per expert / tokens
        total = total + num_experts * (frac * probs.mean(0)).sum()
    return total / max(len(router_logits), 1)


# --------------------------------------------------------------------------------------------------
# Training / evaluation helpers
# --------------------------------------------------------------------------------------------------


def forward_losses(model, mtp, x):
    """x: [B, T] token ids. Returns (main loss, mtp loss, main logits, mtp logits)."""
    hidden = model.model(input_ids=x).last_hidden_state  # after the final norm
    logits = model.lm_head(hidden)
    V = logits.shape[-1]
    main = F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    mlog = mtp(model, hidden[:, :-1], x[:, 1:])  # row i predicts x[:, i + 2]
    mloss = F.cross_entropy(mlog[:, :-1].reshape(-1, V), x[:, 2:].reshape(-1))
    return main, mloss, logits, mlog


@torch.no_grad()
def evaluate(model, mtp, windows, batch: int):
    model.eval()
    mtp.eval()
    n = 0
    s_main = s_mtp = 0.0
    c_main = c_mtp = c_agree = 0
    n_main = n_mtp = 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i : i + batch]
        main, mloss, logits, mlog = forward_losses(model, mtp, x)
        b = x.shape[0]
        s_main += main.item() * b
        s_mtp += mloss.item() * b
        n += b
        pred = logits[:, :-1].argmax(-1)
        c_main += (pred == x[:, 1:]).sum().item()
        n_main += pred.numel()
        mpred = mlog[:, :-1].argmax(-1)  # predictions of x[:, 2:]
        c_mtp += (mpred == x[:, 2:]).sum().item()
        # Agreement with the main model's own greedy choice for the same token (speculative acceptance proxy)
        c_agree += (mpred == logits[:, 1:-1].argmax(-1)).sum().item()
        n_mtp += mpred.numel()
    model.train()
    mtp.train()
    return {
        "main_loss": s_main / n,
        "mtp_loss": s_mtp / n,
        "main_top1": c_main / n_main,
        "mtp_top1": c_mtp / n_mtp,
        "mtp_agree_with_main_greedy": c_agree / n_mtp,
        "tokens": n_main,
    }


def lr_at(step, total, peak, warmup, final_frac=0.1):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def round_to_bf16_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


def mlx_lm_crosscheck(out: Path, reloaded, ids):
    """Load the checkpoint with mlx-lm (if installed) and compare its logits with transformers'.

    Computed in float32 (mlx's CPU gather_mm has no bfloat16). mlx-lm's `sanitize` adds 1 to the zero-centred
    norm weights in their stored dtype (bfloat16), which rounds them; the second number redoes that
    addition in float32. Also records the smallest gap between the 2nd and 3rd router probability on the
    probe: where it is tiny, rounding can flip an expert choice and the comparison is not meaningful.
    """
    try:
        import mlx.core as mx
        import mlx_lm
        from mlx.utils import tree_flatten, tree_map, tree_unflatten
        from mlx_lm.utils import load as mlx_load
        from safetensors.torch import load_file
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextTopKRouter
    except ImportError:
        return None
    import numpy as np

    gaps = []

    def hook(module, inputs, output):
        top = F.softmax(output[0].float(), dim=-1).topk(3, dim=-1).values
        gaps.append((top[:, 1] - top[:, 2]).min().item())

    handles = [m.register_forward_hook(hook) for m in reloaded.modules() if isinstance(m, Qwen3NextTopKRouter)]
    with torch.no_grad():
        ref = reloaded(torch.tensor([ids])).logits[0].float().numpy()
    for h in handles:
        h.remove()
    mmodel, _ = mlx_load(out)
    mmodel.update(tree_map(lambda a: a.astype(mx.float32), mmodel.parameters()))
    a = np.array(mmodel(mx.array([ids])).astype(mx.float32))[0]
    res = {
        "mlx_lm": mlx_lm.__version__,
        "mlx": mx.__version__,
        "tokens": len(ids),
        "min_router_gap_2nd_3rd": min(gaps),
        "max_abs_diff": float(np.abs(a - ref).max()),
        "argmax_agree": float((a.argmax(-1) == ref.argmax(-1)).mean()),
    }
    st = load_file(str(out / "model.safetensors"))
    norm_sfx = (
        ".input_layernorm.weight",
        ".post_attention_layernorm.weight",
        "model.norm.weight",
        ".q_norm.weight",
        ".k_norm.weight",
    )
    fix = [
        (k, mx.array(st[k].float().numpy() + 1.0))
        for k, _ in tree_flatten(mmodel.parameters())
        if k in st and st[k].ndim == 1 and k.endswith(norm_sfx)
    ]
    mmodel.update(tree_unflatten(fix))
    b = np.array(mmodel(mx.array([ids])).astype(mx.float32))[0]
    res["max_abs_diff_norm_plus_one_in_fp32"] = float(np.abs(b - ref).max())
    res["norm_weights_refixed"] = len(fix)
    return res


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--corpus",
        type=Path,
        default=DEFAULT_CORPUS,
        help="KJV text as printed by `bible -f Gen1:1-Rev22:21` (made there if missing; "
        f"default {DEFAULT_CORPUS.relative_to(REPO_ROOT)})",
    )
    ap.add_argument(
        "--apt-install",
        action="store_true",
        help="apt-get install the corpus packages if the `bible` program is missing",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--steps", type=int, default=480)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss coefficient")
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--eval-windows", type=int, default=48, help="validation windows for the loss curve")
    ap.add_argument("--val-every-nth-chapter", type=int, default=40)
    ap.add_argument("--chat-docs", type=int, default=1000)
    ap.add_argument("--tool-docs", type=int, default=150)
    args = ap.parse_args()

    t_start = time.time()
    cpu_start = time.process_time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    rng = random.Random(args.seed)

    import tokenizers
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, GenerationConfig, Qwen3NextForCausalLM

    transformers.logging.set_verbosity_error()

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():  # start from a clean folder (keep nothing stale)
        if f.is_file():
            f.unlink()

    # ---- corpus ----
    corpus = obtain_corpus(args.corpus, args.apt_install)
    raw = corpus.read_bytes()
    corpus_sha = hashlib.sha256(raw).hexdigest()
    chapters = parse_corpus(corpus)
    n_verses = sum(len(c[2]) for c in chapters)
    val_ch = [c for i, c in enumerate(chapters) if i % args.val_every_nth_chapter == args.val_every_nth_chapter // 2]
    train_ch = [c for i, c in enumerate(chapters) if i % args.val_every_nth_chapter != args.val_every_nth_chapter // 2]
    print(
        f"[corpus] {corpus} ({len(raw)} bytes, sha256 {corpus_sha[:16]}...): {len(chapters)} chapters, "
        f"{n_verses} verses; train {len(train_ch)} / validation {len(val_ch)} chapters",
        flush=True,
    )
    train_texts = [chapter_text(*c) for c in train_ch]
    val_texts = [chapter_text(*c) for c in val_ch]

    # ---- tokenizer ----
    t0 = time.time()
    tok = train_tokenizer(train_texts + [CHAT_SCAFFOLD] * 50, args.vocab)
    save_tokenizer(tok, out, model_max_length=4096)
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    eot_id = tok.token_to_id("<|endoftext|>")
    im_end_id = tok.token_to_id("<|im_end|>")
    print(
        f"[tokenizer] vocab {tok.get_vocab_size()} trained in {time.time() - t0:.1f}s; "
        f"<|endoftext|>={eot_id} <|im_end|>={im_end_id}",
        flush=True,
    )

    # ---- documents -> token streams ----
    convs = make_chat_conversations(train_ch, rng, args.chat_docs, args.tool_docs)
    chat_texts = [hf_tok.apply_chat_template(m, tools=t, tokenize=False) for m, t in convs]
    docs = [(t, "text") for t in train_texts] + [(t, "chat") for t in chat_texts]
    rng.shuffle(docs)
    enc = tok.encode_batch([d for d, _ in docs], add_special_tokens=False)
    stream = []
    n_chat_tokens = 0
    for e, (_, kind) in zip(enc, docs):
        stream.extend(e.ids)
        stream.append(eot_id)
        if kind == "chat":
            n_chat_tokens += len(e.ids) + 1
    train_ids = torch.tensor(stream, dtype=torch.long)
    val_stream = []
    for e in tok.encode_batch(val_texts, add_special_tokens=False):
        val_stream.extend(e.ids)
        val_stream.append(eot_id)
    val_ids = torch.tensor(val_stream, dtype=torch.long)
    T = args.seq
    n_val_windows = val_ids.numel() // T
    val_windows = val_ids[: n_val_windows * T].view(n_val_windows, T)
    curve_windows = val_windows[: args.eval_windows]
    n_text_tokens = train_ids.numel() - n_chat_tokens
    print(
        f"[data] train tokens {train_ids.numel()} ({n_text_tokens} corpus text + {n_chat_tokens} chat/tool); "
        f"validation tokens {val_ids.numel()} ({n_val_windows} windows of {T}); "
        f"bytes/token {len(''.join(train_texts).encode()) / max(1, n_text_tokens):.2f}",
        flush=True,
    )

    # ---- model ----
    config = build_config(tok.get_vocab_size(), args, eot_id, im_end_id)
    model = Qwen3NextForCausalLM(config)
    mtp = MTPHead(model.config)
    for m in mtp.modules():
        model._init_weights(m)
    assert all(torch.isfinite(p).all() for p in mtp.parameters())
    model.train()
    mtp.train()
    n_main = sum(p.numel() for p in model.parameters())
    n_mtp = sum(p.numel() for p in mtp.parameters())
    H = config.hidden_size
    n_embed = config.vocab_size * H
    per_expert = 3 * H * config.moe_intermediate_size
    n_active = n_main - 4 * (config.num_experts - config.num_experts_per_tok) * per_expert
    print(
        f"[model] main {n_main:,} params ({n_active:,} active/token incl. embeddings), MTP head {n_mtp:,}", flush=True
    )

    collector = RouterLogitsCollector([model, mtp])
    no_decay = ("A_log", "dt_bias")
    params = list(model.named_parameters()) + [("mtp." + n, p) for n, p in mtp.named_parameters()]
    groups = [
        {"params": [p for n, p in params if not n.endswith(no_decay)], "weight_decay": args.weight_decay},
        {"params": [p for n, p in params if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)

    log = []
    run_main = run_mtp = 0.0
    run_n = 0
    t_train = time.time()
    cpu_train = time.process_time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            ev = evaluate(model, mtp, curve_windows, args.batch)
            collector.pop()
            rec = {
                "step": step,
                "tokens_seen": step * args.batch * T,
                "train_loss": (run_main / run_n) if run_n else None,
                "train_mtp_loss": (run_mtp / run_n) if run_n else None,
                "val_loss": ev["main_loss"],
                "val_mtp_loss": ev["mtp_loss"],
                "elapsed_s": round(time.time() - t_train, 1),
                "cpu_s": round(time.process_time() - cpu_train, 1),
            }
            log.append(rec)
            tr = f"{rec['train_loss']:.3f}" if run_n else "  -  "
            print(
                f"[train] step {step:4d} train {tr} val {ev['main_loss']:.3f} val_mtp {ev['mtp_loss']:.3f} "
                f"({rec['elapsed_s']:.0f}s wall, {rec['cpu_s']:.0f}s CPU)",
                flush=True,
            )
            run_main = run_mtp = 0.0
            run_n = 0
        if step == args.steps:
            break
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, train_ids.numel() - T, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s : s + T] for s in starts.tolist()])
        main_loss, mtp_loss, _, _ = forward_losses(model, mtp, x)
        aux = load_balance_loss(collector.pop(), config.num_experts, config.num_experts_per_tok)
        loss = main_loss + args.mtp_weight * mtp_loss + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        run_main += main_loss.item()
        run_mtp += mtp_loss.item()
        run_n += 1
    train_time = time.time() - t_train
    train_cpu = time.process_time() - cpu_train
    for h in collector.handles:
        h.remove()
    print(f"[train] done in {train_time:.0f}s wall, {train_cpu:.0f}s CPU", flush=True)

    # ---- export: round to bf16 (what is shipped), then evaluate and save ----
    round_to_bf16_(model)
    round_to_bf16_(mtp)
    model.eval()
    mtp.eval()
    final = evaluate(model, mtp, val_windows, args.batch)
    counts = torch.bincount(train_ids, minlength=config.vocab_size)
    top_tok = int(counts.argmax())
    unigram_acc = (val_windows[:, 1:] == top_tok).float().mean().item()
    print(
        f"[eval] held-out ({final['tokens']} tokens): main loss {final['main_loss']:.3f} top1 "
        f"{final['main_top1']:.3f} | MTP loss {final['mtp_loss']:.3f} top1 {final['mtp_top1']:.3f} "
        f"agree {final['mtp_agree_with_main_greedy']:.3f} | most-frequent-token baseline {unigram_acc:.3f}",
        flush=True,
    )

    model.generation_config = GenerationConfig(
        bos_token_id=eot_id,
        eos_token_id=[im_end_id, eot_id],
        pad_token_id=eot_id,
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
    )
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    bf16_model.save_pretrained(str(out), safe_serialization=True)
    del bf16_model
    st_path = out / "model.safetensors"
    tensors = load_file(str(st_path))
    for k, v in mtp_state_dict(mtp).items():
        tensors[k] = v.detach().to(torch.bfloat16).contiguous()
    save_file(tensors, str(st_path), metadata={"format": "pt"})
    os.chmod(st_path, 0o644)
    cfg_json = json.loads((out / "config.json").read_text())
    # Top-level copies in the published Qwen3-Next config.json style (read by other loaders, e.g. mlx-lm).
    cfg_json["num_nextn_predict_layers"] = 1
    cfg_json["full_attention_interval"] = 4
    cfg_json["rope_theta"] = config.rope_parameters["rope_theta"]
    cfg_json["partial_rotary_factor"] = config.rope_parameters["partial_rotary_factor"]
    (out / "config.json").write_text(json.dumps(dict(sorted(cfg_json.items())), indent=2) + "\n")

    # ---- verify the checkpoint ----
    tensors = load_file(str(st_path))
    assert all(v.dtype == torch.bfloat16 for v in tensors.values())
    for li in range(config.num_hidden_layers):  # transformers' per-expert names and order, main layers
        ex = model.model.layers[li].mlp.experts
        for k, v in experts_to_per_expert(f"model.layers.{li}.mlp.experts", ex).items():
            assert torch.equal(tensors[k].float(), v.float()), k
    reloaded = Qwen3NextForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    reloaded.eval()
    mtp2 = MTPHead(reloaded.config)
    load_mtp_state_dict(mtp2, {k: v for k, v in tensors.items() if k.startswith("mtp.")})
    mtp2.eval()
    with torch.no_grad():
        xb = val_windows[:4]
        _, _, lg_a, mt_a = forward_losses(model, mtp, xb)
        _, _, lg_b, mt_b = forward_losses(reloaded, mtp2, xb)
    rt_main = (lg_a - lg_b).abs().max().item()
    rt_mtp = (mt_a - mt_b).abs().max().item()
    print(f"[verify] reloaded checkpoint: max |logit diff| main {rt_main:.2e}, MTP {rt_mtp:.2e}", flush=True)
    assert rt_main < 1e-4 and rt_mtp < 1e-4

    # ---- tokenizer checks ----
    probe = "In the beginning God created the heaven and the earth."
    chat_probe = [{"role": "user", "content": "The LORD is my shepherd; I shall not want."}]
    tok_checks = {"hf_roundtrip": hf_tok.decode(hf_tok.encode(probe)) == probe}
    assert tok_checks["hf_roundtrip"]
    try:
        from mlx_lm.tokenizer_utils import load as mlx_load_tokenizer
    except ImportError:
        mlx_load_tokenizer = None
        print("[verify] mlx-lm not installed: tokenizer checked with transformers only", flush=True)
    if mlx_load_tokenizer is not None:
        mlx_tok = mlx_load_tokenizer(out)
        tok_checks.update(
            {
                "mlx_roundtrip": mlx_tok.decode(mlx_tok.encode(probe)) == probe,
                "same_ids": hf_tok.encode(probe) == list(mlx_tok.encode(probe)),
                "mlx_eos_ids": sorted(mlx_tok.eos_token_ids),
                "mlx_chat_template_matches_hf": mlx_tok.apply_chat_template(
                    chat_probe, add_generation_prompt=True, tokenize=False
                )
                == hf_tok.apply_chat_template(chat_probe, add_generation_prompt=True, tokenize=False),
                "mlx_has_tool_calling": bool(getattr(mlx_tok, "has_tool_calling", False)),
                "mlx_has_thinking": bool(getattr(mlx_tok, "has_thinking", False)),
            }
        )
        assert tok_checks["mlx_roundtrip"] and tok_checks["same_ids"]
        assert tok_checks["mlx_chat_template_matches_hf"]
    print(f"[verify] tokenizer: {tok_checks}", flush=True)

    # Probe: the start of Genesis 1 (as a training document), 128 tokens.
    mlx_check = mlx_lm_crosscheck(out, reloaded, tok.encode(chapter_text(*chapters[0])).ids[:128])
    print(f"[verify] mlx-lm: {mlx_check}", flush=True)

    # ---- samples (from the reloaded checkpoint, on its own generation loop) ----
    samples = []

    def generate(prompt_ids, do_sample, max_new_tokens, seed=0):
        torch.manual_seed(seed)
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            o = reloaded.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=do_sample,
                max_new_tokens=max_new_tokens,
                temperature=0.7 if do_sample else None,
                top_p=0.8 if do_sample else None,
                top_k=20 if do_sample else None,
            )
        return o[0, len(prompt_ids) :].tolist()

    # Greedy decoding with the cache must agree with re-running the whole prefix (no cache).
    p_ids = hf_tok.encode("And God said,")
    g_cached = generate(p_ids, False, 24)
    seq = list(p_ids)
    with torch.no_grad():
        for _ in range(len(g_cached)):
            nxt = int(reloaded(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
            seq.append(nxt)
            if nxt in (im_end_id, eot_id):
                break
    cache_consistent = seq[len(p_ids) :] == g_cached
    print(f"[verify] cached greedy == uncached greedy: {cache_consistent}", flush=True)

    for prompt in ["In the beginning", "And Jesus said unto them,", "The LORD is my shepherd;", "Psalms 23\n\n"]:
        ids = hf_tok.encode(prompt)
        samples.append(
            {
                "kind": "greedy",
                "prompt": prompt,
                "output": hf_tok.decode(generate(ids, False, 60), skip_special_tokens=False),
            }
        )
    for i, prompt in enumerate(["And it came to pass", "Blessed are", "Then said he unto"]):
        ids = hf_tok.encode(prompt)
        samples.append(
            {
                "kind": "sampled (T=0.7, top_p=0.8, top_k=20, seed %d)" % i,
                "prompt": prompt,
                "output": hf_tok.decode(generate(ids, True, 60, seed=i), skip_special_tokens=False),
            }
        )
    chat_cases = [
        ("chat", [{"role": "user", "content": "The LORD is my shepherd; I shall not want."}], None, {}),
        (
            "chat (system prompt, enable_thinking=False)",
            [
                {"role": "system", "content": SYSTEM_PROMPT},
                {
                    "role": "user",
                    "content": "Continue the passage: In the beginning God created the heaven and the earth.",
                },
            ],
            None,
            {"enable_thinking": False},
        ),
        ("tool call", [{"role": "user", "content": "What does John 3:16 say?"}], [LOOKUP_TOOL], {}),
    ]
    for kind, msgs, tools, kw in chat_cases:
        prompt = hf_tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False, **kw)
        ids = hf_tok.encode(prompt)
        gen_ids = generate(ids, False, 80)
        samples.append(
            {
                "kind": kind + " (greedy)",
                "prompt": prompt,
                "output": hf_tok.decode(gen_ids, skip_special_tokens=False),
                "ended_with_im_end": im_end_id in gen_ids,
            }
        )
    # Tool round trip: feed the tool result back and let the model answer.
    msgs = [
        {"role": "user", "content": "What does Genesis 1:3 say?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "lookup_verse", "arguments": {"book": "Genesis", "chapter": 1, "verse": 3}},
                }
            ],
        },
        {"role": "tool", "content": "And God said, Let there be light: and there was light."},
    ]
    prompt = hf_tok.apply_chat_template(msgs, tools=[LOOKUP_TOOL], add_generation_prompt=True, tokenize=False)
    gen_ids = generate(hf_tok.encode(prompt), False, 60)
    samples.append(
        {
            "kind": "tool result -> answer (greedy)",
            "prompt": prompt,
            "output": hf_tok.decode(gen_ids, skip_special_tokens=False),
            "ended_with_im_end": im_end_id in gen_ids,
        }
    )
    for s in samples:
        print(f"[sample] {s['kind']}: {s['prompt'][-60:]!r} -> {s['output']!r}", flush=True)

    # ---- loss curve ----
    have_png = False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        tr = [(r["step"], r["train_loss"]) for r in log if r["train_loss"] is not None]
        ax.plot([s for s, _ in tr], [v for _, v in tr], label="train (main LM, mean over interval)")
        ax.plot([r["step"] for r in log], [r["val_loss"] for r in log], marker="o", ms=3, label="validation (main LM)")
        ax.plot([r["step"] for r in log], [r["val_mtp_loss"] for r in log], ls="--", label="validation (MTP, t+2)")
        ax.set_xlabel("step (%d tokens each)" % (args.batch * T))
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title("qnext_mlx demo model (tiny Qwen3-Next) on the KJV")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss_curve.png")
        plt.close(fig)
        have_png = True
    except ImportError:
        print("[card] matplotlib not installed: loss curve as a table only", flush=True)

    total_time = time.time() - t_start
    total_cpu = time.process_time() - cpu_start
    summary = {
        "corpus": {
            "packages": {p: _deb_version(p) for p in CORPUS_PACKAGES},
            "command": " ".join(BIBLE_CMD),
            "bytes": len(raw),
            "sha256": corpus_sha,
            "chapters": len(chapters),
            "verses": n_verses,
            "train_chapters": len(train_ch),
            "val_chapters": len(val_ch),
        },
        "tokens": {"train": int(train_ids.numel()), "train_chat": n_chat_tokens, "val": int(val_ids.numel())},
        "params": {"main": n_main, "main_active_per_token": n_active, "mtp": n_mtp, "embedding": n_embed},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "python": sys.version.split()[0],
        },
        "log": log,
        "final_eval_bf16": final,
        "most_frequent_token_baseline_top1": unigram_acc,
        "most_frequent_token": hf_tok.convert_ids_to_tokens(top_tok),
        "roundtrip_max_abs_logit_diff": {"main": rt_main, "mtp": rt_mtp},
        "cache_consistent_greedy": cache_consistent,
        "mlx_lm_check": mlx_check,
        "tokenizer_checks": tok_checks,
        "samples": samples,
        "train_time_s": round(train_time, 1),
        "total_time_s": round(total_time, 1),
        "train_cpu_s": round(train_cpu, 1),
        "total_cpu_s": round(total_cpu, 1),
    }
    (out / "training_log.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_card(out, config, summary, have_png, args)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(
        f"[done] {out}: {size / 1e6:.2f} MB; total {total_time:.0f}s wall / {total_cpu:.0f}s CPU "
        f"(training {train_time:.0f}s wall / {train_cpu:.0f}s CPU)",
        flush=True,
    )


def _deb_version(pkg: str):
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
        return r.stdout.strip() or None
    except OSError:
        return None


def write_card(out: Path, config, s, have_png: bool, args):
    fe = s["final_eval_bf16"]
    p = s["params"]
    V = config.vocab_size
    lines = []
    w = lines.append
    w("# qnext_mlx demo model: a tiny Qwen3-Next trained on the King James Bible")
    w("")
    w(
        "A toy checkpoint (%.1fM parameters) in the real Hugging Face `qwen3_next` format, with every "
        "architectural feature of Qwen3-Next-80B-A3B at small size, including the multi-token-prediction "
        "(MTP) head. It is for testing and demonstrating `qnext_mlx` (loading, numerics against transformers, "
        "caching, speculative decoding with MTP, chat templates, tool calls) without downloading a real model. "
        "It writes KJV-like English; it knows nothing useful." % ((p["main"] + p["mtp"]) / 1e6)
    )
    w("")
    w(
        "Made by `scripts/train_demo_model.py` (seeded, one CPU thread): training took %.0f s of CPU time "
        "(%.0f s wall), the whole script %.0f s of CPU (%.0f s wall; wall time is longer than CPU time when the "
        "machine's cores are shared). Reproduce with:"
        % (s["train_cpu_s"], s["train_time_s"], s["total_cpu_s"], s["total_time_s"])
    )
    w("")
    w("```bash")
    w("apt-get update && apt-get install -y bible-kjv bible-kjv-text   # the corpus (once)")
    w("python scripts/train_demo_model.py --out qnext_mlx/demo_model")
    w("```")
    w("")
    w("## Files")
    w("")
    w("| file | what |")
    w("| --- | --- |")
    w(
        "| `config.json` | `Qwen3NextConfig.save_pretrained` output, plus `num_nextn_predict_layers: 1` and the "
        "top-level `full_attention_interval`, `rope_theta`, `partial_rotary_factor` of the published config |"
    )
    w(
        "| `model.safetensors` | bfloat16; transformers' names (`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`, "
        "conv1d as `[C, 1, K]`) plus the `mtp.*` tensors |"
    )
    w("| `generation_config.json` | eos = `<|im_end|>`, `<|endoftext|>`; temperature 0.7, top_p 0.8, top_k 20 |")
    w(
        "| `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` | byte-level BPE, %d tokens, "
        "Qwen3's ChatML chat template |" % V
    )
    w("| `training_log.json` | every number on this card, the samples, and the loss curve |")
    if have_png:
        w("| `loss_curve.png` | the loss curve |")
    w("")
    w("## Architecture")
    w("")
    w("| item | value | (Qwen3-Next-80B-A3B) |")
    w("| --- | --- | --- |")
    rows = [
        ("hidden size", config.hidden_size, 2048),
        ("layers", "4 = 3 x Gated DeltaNet + 1 x gated attention (`layer_types`), each followed by MoE", "48"),
        (
            "Gated DeltaNet",
            f"{config.linear_num_key_heads} q/k heads x {config.linear_key_head_dim}, "
            f"{config.linear_num_value_heads} value heads x {config.linear_value_head_dim}, conv kernel "
            f"{config.linear_conv_kernel_dim}",
            "16 x 128, 32 x 128, 4",
        ),
        (
            "gated attention",
            f"{config.num_attention_heads} query heads, {config.num_key_value_heads} KV heads, "
            f"head_dim {config.head_dim}, q_proj 2x wide (output gate), q/k norms",
            "16, 2, 256",
        ),
        (
            "RoPE",
            f"partial, factor {config.rope_parameters['partial_rotary_factor']} "
            f"({int(config.head_dim * config.rope_parameters['partial_rotary_factor'])} of {config.head_dim} dims), "
            f"theta {config.rope_parameters['rope_theta']:.0e}",
            "64 of 256, 1e7",
        ),
        (
            "MoE",
            f"{config.num_experts} experts, top-{config.num_experts_per_tok}, norm_topk_prob "
            f"{config.norm_topk_prob}, expert size {config.moe_intermediate_size}; shared expert "
            f"{config.shared_expert_intermediate_size} with sigmoid gate",
            "512, top-10, 512; 512",
        ),
        ("norms", "zero-centred RMSNorm (y = rmsnorm(x) * (1 + w)), eps 1e-6; gated RMSNorm in DeltaNet", "same"),
        ("embeddings", f"vocab {V}, untied (`lm_head` separate)", "151,936, untied"),
        (
            "MTP",
            "1 layer: fc(concat[pre_fc_norm_embedding(embed(t+1)), pre_fc_norm_hidden(h_t)]) -> "
            "gated attention + MoE layer -> norm -> shared lm_head, predicts t+2",
            "same",
        ),
        (
            "parameters",
            f"{p['main']:,} main ({p['main_active_per_token']:,} active per token), "
            f"{p['mtp']:,} MTP; embeddings {p['embedding']:,} (and as many in lm_head)",
            "80B / 3B active",
        ),
    ]
    for r in rows:
        w("| %s | %s | %s |" % r)
    w("")
    w(
        "The MTP tensors are `mtp.fc.weight` `[H, 2H]` (embedding half first), `mtp.pre_fc_norm_embedding.weight`, "
        "`mtp.pre_fc_norm_hidden.weight`, `mtp.norm.weight`, and `mtp.layers.0.*` with the same names as a "
        "transformers `Qwen3NextDecoderLayer` of type full_attention (per-expert `mlp.experts.E.*`). The rotary "
        "position of MTP pair i (hidden state h_i with token t_{i+1}) is i. transformers ignores `mtp.*` when "
        "loading (`_keys_to_ignore_on_load_unexpected`)."
    )
    w("")
    w("## Corpus")
    w("")
    c = s["corpus"]
    pk = ", ".join(f"`{k}` {v or '(version not recorded)'}" for k, v in c["packages"].items())
    w(
        "The King James Version of the Bible (1611), from the Debian package `bible-kjv-text` (the text, in "
        "compressed form in `/usr/lib/bible.data`) read out with the `bible` program of `bible-kjv` "
        f"(Debian packages: {pk}): `{c['command']}` gives {c['verses']:,} verses, one a line, "
        f"{c['bytes']:,} bytes (sha256 `{c['sha256']}`)."
    )
    w("")
    w(
        "Licence: public domain. Debian's copyright file for the package: \"The copyright for the King James "
        'Version text of the Bible is expired since the translation was done in 1611" (the `bible` program is '
        "GPL-2+, but only its output text is used). (In the United Kingdom alone the Crown's letters patent "
        "still restrict printing of the KJV; the text is free everywhere else.) The raw corpus is not stored "
        "in this repository: the script makes it again from the package."
    )
    w("")
    w(
        f'Each chapter becomes a document "Book N\\n\\n" followed by its verses, one a line; documents are '
        f"separated by `<|endoftext|>`. Every {args.val_every_nth_chapter}th chapter "
        f"({c['val_chapters']} of {c['chapters']}) is held out for validation. About "
        f"{100 * s['tokens']['train_chat'] / s['tokens']['train']:.0f}% of the training tokens are ChatML "
        f"conversations made from training chapters with the chat template: {args.chat_docs} where the user gives a "
        f"verse and the assistant continues with the next 1-3 (30% with a system prompt, 20% two turns), and "
        f'{args.tool_docs} where the user asks for "Book C:V", the assistant calls a `lookup_verse` tool '
        "(`<tool_call>` JSON), the tool answers with the verse and the assistant quotes it. As Qwen3's template "
        "renders it, the final assistant turn carries an empty `<think>\\n\\n</think>\\n\\n` block."
    )
    w("")
    w("## Training")
    w("")
    tk = s["tokens"]
    w(
        f"- Tokenizer: byte-level BPE (`tokenizers`, Qwen2's pre-tokenisation regex, NFC), trained on the training "
        f"chapters: {V - len(ADDED_TOKENS)} learned tokens + {len(ADDED_TOKENS)} added: "
        + ", ".join(f"`{t}`" for t, _ in ADDED_TOKENS)
        + " (the last four not special, as in Qwen3)."
    )
    w(
        f"- Data: {tk['train']:,} training tokens ({tk['train_chat']:,} of them chat/tool), {tk['val']:,} "
        "validation tokens."
    )
    w(
        f"- {args.steps} steps of {args.batch} x {args.seq} tokens (random windows, "
        f"{args.steps * args.batch * args.seq / tk['train']:.1f} epochs), AdamW (0.9, 0.95), peak lr "
        f"{args.lr:g}, {args.warmup} warm-up steps then cosine to 10%, weight decay {args.weight_decay} (not on "
        f"A_log, dt_bias), gradient clip 1.0, fp32."
    )
    w(
        f"- Loss: main LM cross-entropy + {args.mtp_weight} x MTP cross-entropy (t+2) + {args.aux_coef} x "
        "load-balancing loss over all routers (main and MTP). Gradients of the MTP loss reach the main model."
    )
    w(
        f"- Seed {args.seed}, {args.threads} thread(s); versions: "
        + ", ".join(f"{k} {v}" for k, v in s["versions"].items())
        + "."
    )
    w(
        "- The weights are rounded to bfloat16 for the checkpoint; every number below is measured on the rounded "
        "weights (computed in float32)."
    )
    w("")
    w("## Loss curve")
    w("")
    if have_png:
        w("![loss curve](loss_curve.png)")
        w("")
    w(
        f"Cross-entropy in nats per token. Train: mean over the steps since the previous row, on the training "
        f"mix (its chat/tool conversations are very predictable, which is part of why train is below validation). "
        f"Validation: the first {args.eval_windows} held-out windows of {args.seq} tokens (plain text only), "
        f"in float32 weights during training."
    )
    w("")
    w("| step | tokens seen | train loss | val loss | val MTP loss (t+2) |")
    w("| ---: | ---: | ---: | ---: | ---: |")
    for r in s["log"]:
        trl = "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}"
        w(f"| {r['step']} | {r['tokens_seen']:,} | {trl} | {r['val_loss']:.3f} | {r['val_mtp_loss']:.3f} |")
    w("")
    w("## Held-out accuracy")
    w("")
    w(
        f"On all {fe['tokens']:,} held-out positions (bf16 weights; the whole held-out set, so the loss differs "
        f"from the last row of the curve, which covers its first {args.eval_windows} windows):"
    )
    w("")
    w("| | loss | top-1 accuracy |")
    w("| --- | ---: | ---: |")
    w(f"| main model, next token (t+1) | {fe['main_loss']:.3f} | {100 * fe['main_top1']:.1f}% |")
    w(f"| MTP head, next-next token (t+2) | {fe['mtp_loss']:.3f} | {100 * fe['mtp_top1']:.1f}% |")
    w(
        f"| always the most frequent token ({s['most_frequent_token']!r}) | | "
        f"{100 * s['most_frequent_token_baseline_top1']:.1f}% |"
    )
    w(f"| chance (1/{V}) | {math.log(V):.3f} | {100 / V:.3f}% |")
    w("")
    w(
        f"The MTP head's top-1 choice equals the main model's own greedy choice for the same token "
        f"{100 * fe['mtp_agree_with_main_greedy']:.1f}% of the time (teacher-forced): a proxy for its acceptance "
        "rate as a greedy speculative drafter."
    )
    w("")
    w("## Checks done by the script")
    w("")
    rt = s["roundtrip_max_abs_logit_diff"]
    tc = s["tokenizer_checks"]
    w(
        f"- `Qwen3NextForCausalLM.from_pretrained(dir)` reloads the checkpoint (mtp.* ignored) and gives the trained "
        f"model's logits: max abs difference {rt['main']:.1e}; the MTP head rebuilt from the `mtp.*` tensors: "
        f"{rt['mtp']:.1e}. The main layers' per-expert tensors equal the fused ones (gate rows first)."
    )
    w(
        f"- Greedy generation with the cache equals greedy re-running of the whole prefix: {s['cache_consistent_greedy']}."
    )
    if "mlx_roundtrip" in tc:
        w(
            f"- Tokenizer loads with `transformers.AutoTokenizer` and `mlx_lm.tokenizer_utils.load`; encode/decode round "
            f"trip and identical ids: {tc['hf_roundtrip'] and tc['mlx_roundtrip'] and tc['same_ids']}; mlx-lm's chat "
            f"template output equals transformers': {tc['mlx_chat_template_matches_hf']}; mlx-lm eos ids "
            f"{tc['mlx_eos_ids']}, tool calling detected {tc['mlx_has_tool_calling']}, thinking detected "
            f"{tc['mlx_has_thinking']}."
        )
    else:
        w(
            f"- Tokenizer loads with `transformers.AutoTokenizer`; encode/decode round trip: {tc['hf_roundtrip']} "
            "(mlx-lm was not installed, so its loader was not checked)."
        )
    mc = s.get("mlx_lm_check")
    if mc:
        w(
            f"- mlx-lm {mc['mlx_lm']} (mlx {mc['mlx']}) loads the checkpoint with `mlx_lm.utils.load`; in float32 on "
            f"{mc['tokens']} tokens of Genesis 1 its logits differ from transformers' by at most {mc['max_abs_diff']:.1e} "
            f"(same argmax at {100 * mc['argmax_agree']:.0f}% of positions). Nearly all of that comes from mlx-lm "
            f"adding 1 to the zero-centred norm weights in bfloat16 when it loads them: with that addition done in "
            f"float32 the difference is {mc['max_abs_diff_norm_plus_one_in_fp32']:.1e}. (Smallest gap between a "
            f"token's 2nd and 3rd router probability on this text: {mc['min_router_gap_2nd_3rd']:.1e}. Where such a "
            "gap is tiny, rounding alone flips the expert choice and the logits of that and later tokens differ "
            "for real; some held-out windows have gaps below 1e-7, so compare implementations on several texts.)"
        )
    w("")
    w("## Samples")
    w("")
    w(
        "From the reloaded checkpoint with transformers' `generate` (float32 compute), 60-80 new tokens, special "
        "tokens shown."
    )
    w("")
    for smp in s["samples"]:
        w(
            f"**{smp['kind']}**"
            + (f" (emitted `<|im_end|>`: {smp['ended_with_im_end']})" if "ended_with_im_end" in smp else "")
        )
        w("")
        w("```text")
        prompt = smp["prompt"]
        if len(prompt) > 400:
            prompt = "[...]" + prompt[-300:]
        w(prompt + "⟨generated:⟩" + smp["output"])
        w("```")
        w("")
    (out / "MODEL_CARD.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
