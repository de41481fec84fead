"""Shared fixtures: random tiny Qwen3-Next checkpoints built with transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: ``hf_checkpoint(name, seed=0, mtp=False, dtype="float32", **config)``
    -> ``(folder, torch_model, torch_mtp_or_None)``; cached per argument set."""
    pytest.importorskip("torch")
    import make_tiny_checkpoint as mtc

    made = {}

    def make(name, seed=0, mtp=False, dtype="float32", **overrides):
        key = (name, seed, mtp, dtype, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(name)
            model, head = mtc.build(mtc.tiny_config(**overrides), seed=seed, mtp=mtp)
            mtc.save(model, head, out, dtype=dtype)
            model.float()
            made[key] = (out, model, head)
        return made[key]

    return make


@pytest.fixture(scope="session")
def chat_model_dir(hf_checkpoint):
    """A tiny random checkpoint (3 DeltaNet layers + 1 attention layer, MTP head)
    with a byte-level ChatML tokenizer next to it: loadable with ``qnext_mlx.load``."""
    from tokenizer_fixture import write_tokenizer

    folder, _, _ = hf_checkpoint("chat", seed=3, mtp=True, vocab_size=320)
    if not (folder / "tokenizer.json").exists():
        write_tokenizer(folder, vocab_size=320)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _private_decision_cache(tmp_path_factory):
    """Kernel and MTP decisions (qnext_mlx.kernels.candidates) go to a folder of the test
    session, never to the user's cache; subprocesses inherit it."""
    import os

    folder = tmp_path_factory.mktemp("qnext-cache")
    old = os.environ.get("QNEXT_CACHE_DIR")
    os.environ["QNEXT_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("QNEXT_CACHE_DIR", None)
    else:
        os.environ["QNEXT_CACHE_DIR"] = old
