"""A tiny byte-level BPE tokenizer with Qwen's ChatML special tokens, for tests.

``write_tokenizer(folder, vocab_size)`` writes ``tokenizer.json``,
``tokenizer_config.json`` (with a ChatML chat template, EOS ``<|im_end|>``) and
``generation_config.json`` (EOS ids of ``<|im_end|>`` and ``<|endoftext|>``)
next to a tiny checkpoint, so ``qnext_mlx.load`` can open it like a real model.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen's ChatML layout (system/user/assistant turns, generation prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, how are you today?",
    "Qwen3-Next mixes Gated DeltaNet layers with gated attention and a sparse mixture of experts.",
    "Why is the sky blue? Because air scatters short wavelengths of sunlight more than long ones.",
    "1 2 3 4 5 6 7 8 9 10: counting numbers, adding them, and writing the answer in a box.",
]


def write_tokenizer(folder: Path, vocab_size: int = 320) -> None:
    """Write the tokenizer files into ``folder``; the vocabulary has exactly ``vocab_size`` ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 8, trainer)
    extra = vocab_size - tok.get_vocab_size()
    if extra < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer")
    tok.add_tokens([AddedToken(f"<|extra_{i}|>", special=True) for i in range(extra)])
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": 4096,
            },
            indent=2,
        )
    )
    (folder / "generation_config.json").write_text(
        json.dumps(
            {
                "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                "temperature": 0.7,
                "top_p": 0.8,
                "top_k": 20,
            },
            indent=2,
        )
    )
