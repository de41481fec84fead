"""The desktop chat app: its core without a display, its window under Xvfb.

The window tests need ``Xvfb`` (and ``xdotool`` to type like a user); the test
command (``scripts/test.sh``, via ``scripts/install-test-deps.sh``) installs them where
it can, and without them those tests are skipped with the reason. Tests never install
anything themselves. Set ``QNEXT_MLX_SCREENSHOTS=DIR`` to also write the window tests'
screenshots there (``app.png``: the end-to-end test on the model; ``markdown.png``: a
markdown reply; ``models.png``: the model picker); the README's ``docs/screenshots``
are made that way.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from chat_helpers import ChunkGate, ScriptedModel, chat_model_folder, last_user_text

import qnext_mlx
from qnext_mlx.errors import ModelNotFoundError
from qnext_mlx.serve.chat_session import ChatEngine, ChatError, ChatSession, ReplyStats, SamplingSettings
from qnext_mlx.ui.catalog import format_size, hf_repo_of, list_models, models_in_folder, models_in_hf_cache
from qnext_mlx.ui.desktop import (
    AppSettings,
    ConversationStore,
    GenerationWorker,
    app_data_dir,
    format_indicators,
)
from qnext_mlx.ui.markdown import MarkdownStream, Span, display_width, render_markdown
from qnext_mlx.ui.store import conversation_markdown, export_file_name

THINK = "<think>\nLet me think about it.\n</think>\n\nThe answer is 42."
CODE = 'from pathlib import Path\n\ntext = Path("notes.md").read_text(encoding="utf-8")\nprint(len(text))\n'
# A reply with every markdown element the app renders (the window tests stream it
# through the scripted model, so it takes the same path as a real reply).
MARKDOWN_REPLY = (
    "## Reading a file in Python\n\n"
    "Use **`pathlib`**: it is *simpler* than `open()`, and ~~os.path~~ is not needed.\n\n"
    "1. Build a `Path`\n"
    "2. Call **read_text**\n"
    "   - it decodes the bytes\n"
    "   - it closes the file\n\n"
    '> Tip: pass `encoding="utf-8"` so the result does not depend on the platform.\n\n'
    "| method | returns | lazy |\n"
    "| :--- | :--- | ---: |\n"
    "| `read_text` | str | no |\n"
    "| `open` | file object | yes |\n\n"
    f"```python\n{CODE}```\n\n"
    "See [the pathlib docs](https://docs.python.org/3/library/pathlib.html).\n\n"
    "---\n"
    "That is all you need."
)
MARKDOWN_THINKING = "The user wants to **read a file**; `pathlib` is the simplest answer."


def responder(prompt: str) -> str:
    user = last_user_text(prompt)
    if user.startswith("long"):
        return "word " * 3000
    if user.startswith("think"):
        return THINK
    if user.startswith("markdown"):
        return f"<think>\n{MARKDOWN_THINKING}\n</think>\n\n{MARKDOWN_REPLY}"
    return f"You said {user}."


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint):
    return chat_model_folder(hf_checkpoint)


@pytest.fixture
def scripted_loader(model_dir):
    def load_engine(model_arg):
        model, tokenizer = qnext_mlx.load(model_dir)
        return ChatEngine(ScriptedModel(model, tokenizer, responder), tokenizer, max_context=8192), "scripted"

    return load_engine


# ------------------------------------------------------------- no display
def chars(spans):
    """Spans as one (character, tags, action) per character: renders compare exactly,
    whatever the runs' boundaries."""
    return [(c, s.tags, s.action) for s in spans for c in s.text]


def texts_with(spans, tag):
    """The texts of the runs of consecutive characters that carry ``tag``."""
    out, current = [], ""
    for c, tags, _ in chars(spans):
        if tag in tags:
            current += c
        elif current:
            out.append(current)
            current = ""
    return out + ([current] if current else [])


def lines_starting_with(spans, tag):
    """The lines whose first character carries ``tag`` (line-level tags: Tk reads them there)."""
    out, line, first = [], "", None
    for c, tags, _ in chars(spans):
        if first is None:
            first = tag in tags
        if c == "\n":
            if first:
                out.append(line)
            line, first = "", None
        else:
            line += c
    return out


def test_markdown_renders_each_element_with_its_tags():
    spans = render_markdown(MARKDOWN_REPLY)
    text = "".join(s.text for s in spans)
    assert texts_with(spans, "md_h2") == ["Reading a file in Python\n"]
    assert texts_with(spans, "md_strong") == ["pathlib", "read_text"]
    assert texts_with(spans, "md_em") == ["simpler"]
    assert texts_with(spans, "md_code") == ["pathlib", "open()", "Path", 'encoding="utf-8"', "read_text", "open"]
    assert texts_with(spans, "md_strike") == ["os.path"]
    # lists: numbers and bullets, then a tab to the item's text; the nested list one level in
    assert [t for t in texts_with(spans, "md_bullet")] == ["1.\t", "2.\t", "◦\t", "◦\t"]
    assert "".join(texts_with(spans, "md_item1")) == "1.\tBuild a Path\n2.\tCall read_text\n"
    assert "".join(texts_with(spans, "md_item2")) == "◦\tit decodes the bytes\n◦\tit closes the file\n"
    assert texts_with(spans, "md_quote") == [
        'Tip: pass encoding="utf-8" so the result does not depend on the platform.\n'
    ]
    assert texts_with(spans, "md_indent1") == texts_with(spans, "md_quote")
    # the table: cells padded to their column, "lazy" right-aligned, the header row bold
    table = "".join(texts_with(spans, "md_table")).splitlines()
    assert table == [
        " method    │ returns     │ lazy ",
        "───────────┼─────────────┼──────",
        " read_text │ str         │   no ",
        " open      │ file object │  yes ",
    ]
    assert texts_with(spans, "md_th") == [table[0] + "\n"]
    assert texts_with(spans, "md_codeblock") == [CODE]
    assert texts_with(spans, "md_code_lang")[0].strip() == "python"
    copy = [s for s in spans if "md_copy" in s.tags]
    assert [(s.text.strip(), s.action) for s in copy] == [("Copy", ("copy", CODE))]
    link = [s for s in spans if "md_link" in s.tags]
    assert [(s.text, s.action) for s in link] == [
        ("the pathlib docs", ("link", "https://docs.python.org/3/library/pathlib.html"))
    ]
    assert texts_with(spans, "md_hr") == ["─" * 32 + "\n"]
    assert text.endswith("That is all you need.\n")
    # every block starts with space above it; the items of a tight list sit close together
    assert lines_starting_with(spans, "md_gap") == [
        "Reading a file in Python",
        "Use pathlib: it is simpler than open(), and os.path is not needed.",
        "1.\tBuild a Path",
        'Tip: pass encoding="utf-8" so the result does not depend on the platform.',
        table[0],
        " python   Copy ",
        "See the pathlib docs.",
        "─" * 32,
        "That is all you need.",
    ]


def test_markdown_details():
    assert display_width("a中b") == 4 and display_width("e\u0301") == 1
    # a single newline is a line break (chat replies mean it so), html is text, images show their alt text
    assert "".join(s.text for s in render_markdown("one\ntwo <b>x</b>")) == "one\ntwo <b>x</b>\n"
    image = [s for s in render_markdown("![a cat](http://x/cat.png)") if "md_image" in s.tags]
    assert image == [Span("[image: a cat]", ("md_p", "md_image", "md_gap"), ("link", "http://x/cat.png"))]
    ordered = render_markdown("3. three\n4. four\n\n- a\n\n- b\n")
    assert texts_with(ordered, "md_bullet") == ["3.\t", "4.\t", "•\t", "•\t"]
    # a loose list (blank lines between items): each item's paragraph gets its space above
    assert lines_starting_with(ordered, "md_gap") == ["3.\tthree", "•\ta", "•\tb"]
    assert "".join(s.text for s in render_markdown("a\r\nb\r\n")) == "a\nb\n"
    unclosed = render_markdown("```\nstill typing")  # a fence still streaming: code so far
    assert texts_with(unclosed, "md_codeblock") == ["still typing\n"]


STREAM_DOCS = [
    MARKDOWN_REPLY,
    MARKDOWN_THINKING,
    "Title\n=====\n\ntext that\ncontinues lazily\n> quote\nlazy quote line\n\nSub\n---\n",
    "para before a table\n| a | b |\n|---|---|\n| 1 | 2 |\nafter\n\n"
    "* x\n\n  second paragraph of x\n\n      code in x\n* y\n",
    "```md\n# not a heading\n\n- not a list\n```\n\n    indented code\n\n    more\n\ntail",
    "1. a\n   1. b\n      - c\n\n        deep para\n2. d\n\n***\n#not heading\n# heading #\n",
    "line\r\nwith crlf\r\n\r\n- item\r\n",
    "```python\nunclosed = True\n",
]


def _stream(text, sizes):
    """Feed ``text`` in pieces of the given sizes, committing after each; returns the stream
    and the longest tail it ever had to render."""
    st, pos, longest, committed = MarkdownStream(), 0, 0, []
    for n in sizes:
        if pos >= len(text):
            break
        st.feed(text[pos : pos + n])
        pos += n
        committed += st.commit()
        st.tail()
        longest = max(longest, len(st.text) - st.done)
    assert pos >= len(text)
    return st, committed, longest


@pytest.mark.parametrize("doc", range(len(STREAM_DOCS)))
def test_markdown_streamed_block_by_block_equals_rendering_at_once(doc):
    text = STREAM_DOCS[doc]
    full = chars(render_markdown(text))
    rng = random.Random(doc)
    for sizes in ([1] * len(text), [rng.randint(1, 12) for _ in range(len(text))], [len(text)]):
        st, committed, _ = _stream(text, sizes)
        assert chars(st.spans) == chars(committed)
        assert chars(st.spans) == full[: len(chars(st.spans))]  # what was committed never changes
        assert chars(st.spans_now()) == full and st.finish()


def test_markdown_stream_renders_only_the_last_block_again():
    text = "\n\n".join([MARKDOWN_REPLY] * 6)  # about 3,000 characters, 70 blocks
    st, _, longest = _stream(text, [1] * len(text))
    assert chars(st.spans_now()) == chars(render_markdown(text))
    # every update rendered again at most the longest block (the code block) and the line being written
    longest_line = max(len(line) + 1 for line in text.splitlines())
    assert longest <= len(f"```python\n{CODE}```\n\n") + longest_line and longest < len(text) / 10
    assert st.done > len(text) - 40  # all but the last line was rendered for good before the end


def test_markdown_stream_says_when_a_late_reference_changes_an_earlier_block():
    text = "See [the docs].\n\nMore text.\n\n[the docs]: https://example.com\n"
    st, _, _ = _stream(text, [1] * len(text))
    assert not st.finish()  # the caller renders the whole text again
    assert [s.action for s in render_markdown(text) if "md_link" in s.tags] == [("link", "https://example.com")]


def test_chat_session_truncate():
    s = ChatSession()
    s.messages = [{"role": "user", "content": str(i)} for i in range(4)]
    s.last_stats = ReplyStats("stop")
    assert s.truncate(1) == [{"role": "user", "content": str(i)} for i in range(1, 4)]
    assert s.messages == [{"role": "user", "content": "0"}] and s.last_stats is None
    assert s.truncate(1) == [] and s.truncate(0) == [{"role": "user", "content": "0"}] and s.messages == []
    for bad in (-1, 1, "0"):
        with pytest.raises(ChatError, match="cannot truncate"):
            s.truncate(bad)


def test_app_settings_remember_folders_and_window(tmp_path):
    store = ConversationStore(tmp_path)
    settings = AppSettings(model_folders=["/models", "/more"], window_geometry="900x600+10+20", sidebar_width=240)
    store.save_settings(settings)
    assert store.load_settings() == settings
    bad = {"model_folders": "x", "window_geometry": "huge; rm -rf", "sidebar_width": -3}
    assert AppSettings.from_dict(bad) == AppSettings()
    assert AppSettings.from_dict({"model_folders": ["/a", 3, ""], "sidebar_width": True}).model_folders == ["/a"]


def test_search_and_markdown_export(tmp_path):
    store = ConversationStore(tmp_path)
    a = ChatSession(title="Cooking", system="Be brief.")
    a.messages = [
        {"role": "user", "content": "How long do I boil an egg?"},
        {"role": "assistant", "content": "**Nine** minutes.", "reasoning_content": "Hard-boiled, probably."},
    ]
    b = ChatSession(title="Python")
    b.messages = [{"role": "user", "content": "What is pathlib?"}, {"role": "assistant", "content": "A module."}]
    store.save(a)
    store.save(b)
    assert store.search("EGG") == [(a.id, "Cooking")]
    assert store.search("hard-boiled nine") == [(a.id, "Cooking")]  # every word, thinking included
    assert store.search("module") == [(b.id, "Python")] and store.search("egg module") == []
    b.messages.append({"role": "user", "content": "and eggs?"})
    time.sleep(0.01)
    store.save(b)  # the search sees the file change
    assert [i for i, _ in store.search("egg")] == [b.id, a.id]

    md = conversation_markdown(a, model="demo", when=0)
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(0))
    assert md == (
        f"# Cooking\n\n*Exported from qnext-mlx on {stamp}, model demo*\n\n**System:** Be brief.\n\n"
        "## You\n\nHow long do I boil an egg?\n\n## Assistant\n\n"
        "<details><summary>Thinking</summary>\n\nHard-boiled, probably.\n\n</details>\n\n**Nine** minutes.\n"
    )
    assert export_file_name(ChatSession(title="What's 2/3 of π?")) == "Whats-23-of-π.md"
    assert export_file_name(ChatSession()) == "conversation.md"


# ------------------------------------------------------------ model catalog
def _blob_name(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_hf_cache(root: Path, repos) -> Path:
    """A Hugging Face hub cache in ``root`` laid out as huggingface_hub writes it
    (``models--org--name/{blobs,refs/main,snapshots/<commit>/...}``, files linked to their
    blobs), holding a copy of each ``repo id -> model folder`` of ``repos``."""
    for repo, src in repos.items():
        kind, _, name = repo.rpartition(":")
        base = root / f"{kind or 'models'}--{name.replace('/', '--')}"
        commit = hashlib.sha1(repo.encode()).hexdigest()
        snapshot = base / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (base / "blobs").mkdir()
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text(commit)
        for f in sorted(Path(src).iterdir()):
            if f.is_file():
                blob = base / "blobs" / _blob_name(f)
                shutil.copyfile(f, blob)
                (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return root


def _write_model(folder: Path, config: dict, tensors) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: np.zeros(shape, np.float16) for k, shape in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def test_model_catalog_reads_the_hf_cache_and_added_folders(tmp_path, hf_checkpoint):
    hf_model, _, _ = hf_checkpoint("catalog", seed=1, mtp=True)
    llama = _write_model(tmp_path / "src-llama", {"model_type": "llama"}, {"w": (4, 4)})
    cache = fake_hf_cache(
        tmp_path / "hub", {"acme/Qwen3-Next-tiny": hf_model, "acme/llama": llama, "datasets:acme/data": llama}
    )
    mine = tmp_path / "mine"
    base = {"model_type": "qwen3_next"}
    q4 = _write_model(mine / "q4", {**base, "quantization": {"bits": 4, "group_size": 64}}, {"a": (64, 8)})
    mixed_q = {"bits": 4, "group_size": 64, "model.layers.0.mlp.gate": {"bits": 8, "group_size": 64}}
    _write_model(mine / "mixed", {**base, "quantization": mixed_q, "dtype": "bfloat16"}, {"mtp.fc.weight": (8, 8)})
    broken = _write_model(mine / "broken", {**base, "dtype": "bfloat16"}, {"a": (2, 2)})
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    (mine / "notes").mkdir()

    found = models_in_hf_cache(cache)
    assert [i.name for i in found] == ["acme/Qwen3-Next-tiny"]  # not the llama, not the dataset
    info = found[0]
    assert hf_repo_of(info.path) == "acme/Qwen3-Next-tiny" and Path(info.model_arg) == info.path
    assert info.size_bytes == sum(f.stat().st_size for f in hf_model.glob("*.safetensors"))
    assert (info.quantization, info.has_mtp, info.error, info.source) == ("fp32", True, None, "Hugging Face cache")

    added = {i.name: i for i in models_in_folder(mine)}
    assert sorted(added) == ["broken", "mixed", "q4"]
    assert (added["q4"].quantization, added["q4"].has_mtp) == ("4-bit", False)
    assert added["q4"].size_bytes == (q4 / "model.safetensors").stat().st_size
    assert (added["mixed"].quantization, added["mixed"].has_mtp) == ("mixed 4/8-bit", True)
    assert "gone.safetensors" in added["broken"].error and added["broken"].added == str(mine)
    assert [i.name for i in models_in_folder(q4)] == ["q4"]  # a model folder added itself
    assert models_in_folder(tmp_path / "nowhere") == [] and models_in_hf_cache(tmp_path / "no-cache") == []

    everything = list_models([str(mine), str(q4)], cache_dir=cache)  # q4 found twice: listed once
    assert [(i.name, i.source) for i in everything] == [
        ("demo model", "bundled"),
        ("acme/Qwen3-Next-tiny", "Hugging Face cache"),
        ("broken", "added folder"),
        ("mixed", "added folder"),
        ("q4", "added folder"),
    ]
    demo = everything[0]
    assert demo.model_arg is None and demo.has_mtp and demo.quantization == "bf16" and demo.size_bytes > 1e6
    assert (format_size(41_800_000_000), format_size(5_900_000), format_size(12)) == ("41.8 GB", "5.9 MB", "12 B")


def test_app_data_folder_per_platform(tmp_path):
    home = tmp_path
    assert app_data_dir("darwin", {}, home) == home / "Library" / "Application Support" / "qnext-mlx"
    assert app_data_dir("linux", {}, home) == home / ".local" / "share" / "qnext-mlx"
    assert app_data_dir("linux", {"XDG_DATA_HOME": "/x/data"}, home) == Path("/x/data/qnext-mlx")
    assert app_data_dir("win32", {"APPDATA": "C:/Users/a/AppData/Roaming"}, home) == Path(
        "C:/Users/a/AppData/Roaming/qnext-mlx"
    )
    assert app_data_dir("darwin", {"QNEXT_MLX_APP_DIR": "/custom"}, home) == Path("/custom")


def test_conversation_store_round_trip(tmp_path):
    store = ConversationStore(tmp_path / "app")
    assert store.list() == []
    s = ChatSession(system="Be brief.", settings=SamplingSettings(temp=0.3, max_tokens=99), title="Greetings")
    s.messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "a greeting"},
    ]
    store.save(s)
    other = ChatSession(title="Second")
    other.messages = [{"role": "user", "content": "x"}]
    time.sleep(0.01)
    store.save(other)
    assert [t for _, t in store.list()] == ["Second", "Greetings"]  # most recent first
    back = store.load(s.id)
    assert (back.id, back.title, back.system, back.messages) == (s.id, "Greetings", "Be brief.", s.messages)
    assert (back.settings.temp, back.settings.max_tokens) == (0.3, 99)
    assert not list((tmp_path / "app" / "conversations").glob(".*"))  # no temp files left
    (tmp_path / "app" / "conversations" / "broken.json").write_text("{not json")
    assert len(store.list()) == 2
    with pytest.raises(ChatError):
        store.load("broken")
    with pytest.raises(ChatError):
        store.path("../escape")
    store.delete(s.id)
    assert [t for _, t in store.list()] == ["Second"]

    settings = AppSettings(model="/models/x", system="sys", sampling=SamplingSettings(top_k=5), thinking_expanded=False)
    store.save_settings(settings)
    assert store.load_settings().to_dict() == settings.to_dict()
    (tmp_path / "app" / "settings.json").write_text(json.dumps({"model": 3, "sampling": {"temp": -1}}))
    assert store.load_settings().to_dict() == AppSettings().to_dict()  # bad values: defaults


def test_status_indicators():
    stats = ReplyStats(
        "stop",
        prompt_tokens=100,
        cached_tokens=80,
        generation_tokens=20,
        generation_tps=31.25,
        context_tokens=120,
        max_context=1000,
    )
    assert format_indicators(stats, 1000) == "31.2 tok/s  |  prompt 100 (80 cached)  |  context 120 / 1,000 (12.0%)"


def _events_until(worker, kinds, timeout=60):
    got = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            ev = worker.events.get(timeout=0.1)
        except Exception:
            continue
        got.append(ev)
        if ev[0] in kinds:
            return got
    raise AssertionError(f"no {kinds} event; got {[e[0] for e in got]}")


def test_generation_worker_streams_stops_and_reports_errors(scripted_loader):
    worker = GenerationWorker(scripted_loader)
    worker.start()
    try:
        session = ChatSession(title="t")
        worker.reply(session, "too early")  # no model yet: an error event, the worker lives on
        assert _events_until(worker, {"error"})[-1][2].startswith("no model is loaded")
        worker.load(None)
        assert _events_until(worker, {"loaded", "load_error"})[-1] == ("loaded", "scripted", 8192)

        main_thread = threading.current_thread()
        worker.reply(session, "think about it")
        events = _events_until(worker, {"done"})
        deltas = [e[2] for e in events if e[0] == "delta"]
        assert "".join(d.text for d in deltas if d.kind == "reasoning") == "Let me think about it."
        assert "".join(d.text for d in deltas if d.kind == "content") == "The answer is 42."
        assert events[-1][2].finish_reason == "stop" and not worker.generating.is_set()
        assert session.messages[-1]["content"] == "The answer is 42."
        assert threading.current_thread() is main_thread

        worker.reply(session, "long story")
        _events_until(worker, {"delta"})
        worker.stop_reply()
        done = _events_until(worker, {"done"})[-1][2]
        assert done.finish_reason == "cancelled" and 0 < done.generation_tokens < 3000
        assert session.messages[-1]["content"].startswith("word")
    finally:
        worker.shutdown()
    assert not worker.is_alive()


def test_stop_during_a_long_prompt_stops_its_prefill(model_dir):
    step = 8
    in_prefill, pressed = threading.Event(), threading.Event()
    gate = {}

    def on_chunk(n):
        if n == 1:  # the first chunk waits here until Stop was pressed
            in_prefill.set()
            assert pressed.wait(30)

    def load_engine(model_arg):
        model, tokenizer = qnext_mlx.load(model_dir)
        gate["model"] = ChunkGate(ScriptedModel(model, tokenizer, responder), on_chunk)
        return ChatEngine(gate["model"], tokenizer, max_context=8192, prefill_step_size=step), "scripted"

    worker = GenerationWorker(load_engine)
    worker.start()
    try:
        worker.load(None)
        assert _events_until(worker, {"loaded", "load_error"})[-1][0] == "loaded"
        session = ChatSession(title="t")
        long_text = "summarize: " + "the quick brown fox jumps over the lazy dog " * 12
        worker.reply(session, long_text)
        assert in_prefill.wait(30)
        worker.stop_reply()  # what the Stop button does
        pressed.set()
        events = _events_until(worker, {"done", "error"})
        assert [e[0] for e in events] == ["done"]  # no delta: stopped before the first token
        done = events[0][2]
        assert done.finish_reason == "cancelled" and done.generation_tokens == 0
        assert gate["model"].chunks == 1 and done.prompt_tokens > 10 * step  # no chunk ran after Stop
        assert done.context_tokens == step and not worker.generating.is_set()
        assert session.messages[0] == {"role": "user", "content": long_text}

        # The conversation goes on; the next turn reuses the prefix the stopped one processed.
        worker.reply(session, "hello")
        events = _events_until(worker, {"done", "error"})
        assert "".join(e[2].text for e in events if e[0] == "delta") == "You said hello."
        assert events[-1][2].finish_reason == "stop" and events[-1][2].cached_tokens == step
    finally:
        worker.shutdown()
    assert not worker.is_alive()


def test_missing_model_is_reported_not_fatal(tmp_path):
    from qnext_mlx.serve.chat_session import load_chat_engine

    worker = GenerationWorker(lambda m: load_chat_engine(m, quiet=True))
    worker.start()
    try:
        worker.load(str(tmp_path / "no-model-here"))
        ev = _events_until(worker, {"loaded", "load_error"})[-1]
        assert ev[0] == "load_error" and "no-model-here" in ev[1]
    finally:
        worker.shutdown()


def named_loader(model_dir, gates=None, calls=None):
    """A loader whose models say who they are ("<name> says <message>."), named by the
    Hugging Face repo of the folder asked for (or "demo"); a name in ``gates`` waits
    for that event before it returns (a slow load, to cancel)."""

    def load_engine(model_arg):
        name = (hf_repo_of(model_arg) if model_arg else None) or model_arg or "demo"
        if calls is not None:
            calls.append(name)
        if gates and name in gates:
            assert gates[name].wait(60)
        if model_arg and os.path.isabs(model_arg) and not os.path.isdir(model_arg):
            raise ModelNotFoundError(f"model folder {model_arg} does not exist")
        model, tokenizer = qnext_mlx.load(model_arg if model_arg and os.path.isdir(model_arg) else model_dir)

        def says(prompt):
            user = last_user_text(prompt)
            return "word " * 3000 if user.startswith("long") else f"{name} says {user}."

        return ChatEngine(ScriptedModel(model, tokenizer, says), tokenizer, max_context=8192), name

    return load_engine


def _reply_text(worker, session, text, **kwargs):
    worker.reply(session, text, **kwargs)
    events = _events_until(worker, {"done", "error"})
    if events[-1][0] == "error":
        return events[-1]
    return "".join(e[2].text for e in events if e[0] == "delta" and e[2].kind == "content")


def test_worker_cancels_a_load_and_keeps_the_previous_model(model_dir):
    gates, calls = {"slow": threading.Event()}, []
    worker = GenerationWorker(named_loader(model_dir, gates, calls))
    worker.start()
    try:
        worker.load(None)
        assert _events_until(worker, {"loaded", "load_error"})[-1] == ("loaded", "demo", 8192)
        first = worker.engine
        session = ChatSession()
        assert _reply_text(worker, session, "hi") == "demo says hi."

        worker.load("slow")
        assert _events_until(worker, {"loading"})[-1] == ("loading", "slow")
        worker.load("queued")  # waits behind the slow one
        worker.cancel_load()  # while "slow" is loading: both are cancelled
        gates["slow"].set()  # the slow load finishes; its model is dropped
        events = _events_until(worker, {"load_cancelled"}) + _events_until(worker, {"load_cancelled"})
        assert [e for e in events if e[0] != "loading"] == [("load_cancelled", "slow"), ("load_cancelled", "queued")]
        assert worker.engine is first and calls == ["demo", "slow"]  # the queued load never ran
        assert _reply_text(worker, session, "still there?") == "demo says still there?."

        worker.load("after")  # a load asked after the cancel runs
        assert _events_until(worker, {"loaded", "load_cancelled"})[-1] == ("loaded", "after", 8192)
        assert worker.engine is not first and session.engine is None  # the old model is let go
        assert _reply_text(worker, session, "and now?") == "after says and now?."
    finally:
        gates["slow"].set()
        worker.shutdown()
    assert not worker.is_alive()


def test_worker_edit_and_regenerate_truncate_and_undo_a_failure(model_dir):
    worker = GenerationWorker(named_loader(model_dir))
    worker.start()
    try:
        worker.load(None)
        _events_until(worker, {"loaded"})
        session = ChatSession()
        _reply_text(worker, session, "one")
        _reply_text(worker, session, "two")
        before = [dict(m) for m in session.messages]
        assert len(before) == 4
        # Edit the second message: what came after it goes, the new turn takes its place.
        assert _reply_text(worker, session, "deux", truncate_to=2) == "demo says deux."
        assert [m["content"] for m in session.messages] == ["one", "demo says one.", "deux", "demo says deux."]
        # An edit that cannot be answered (too long for the context) leaves the conversation as it was.
        kept = [dict(m) for m in session.messages]
        ev = _reply_text(worker, session, "x " * 9000, truncate_to=0)
        assert ev[0] == "error" and "context" in ev[2]
        assert session.messages == kept
    finally:
        worker.shutdown()


# ------------------------------------------------------------ with a display
def _missing_x_tools():
    missing = [t for t in ("Xvfb", "xdotool") if shutil.which(t) is None]
    return f"{' and '.join(missing)} not installed (scripts/install-test-deps.sh installs them)" if missing else None


@pytest.fixture(scope="module")
def xdisplay():
    pytest.importorskip("tkinter", reason="this Python has no Tkinter")
    reason = _missing_x_tools()
    if reason:
        pytest.skip(reason)
    n = next(
        n
        for n in range(91, 400)
        if not os.path.exists(f"/tmp/.X11-unix/X{n}") and not os.path.exists(f"/tmp/.X{n}-lock")
    )
    proc = subprocess.Popen(
        ["Xvfb", f":{n}", "-screen", "0", "1280x900x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 20
    while not os.path.exists(f"/tmp/.X11-unix/X{n}"):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.skip("Xvfb did not start")
        time.sleep(0.05)
    yield f":{n}"
    proc.terminate()
    proc.wait(timeout=10)


def _pump(root, cond, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        root.update()
        if cond():
            return True
        time.sleep(0.01)
    raise AssertionError("the window did not get there in time")


def _styled(t):
    """The transcript as (character, tags) pairs; numbered tags (act7, think2) lose their number."""
    text = t.get("1.0", "end-1c")
    tags = [set() for _ in text]
    for tag in t.tag_names():
        if tag == "sel":
            continue
        name = re.sub(r"^(act|think)\d+", r"\1#", tag)
        r = t.tag_ranges(tag)
        for a, b in zip(r[::2], r[1::2]):
            i = int(t.count("1.0", a, "chars")[0]) if t.compare(a, ">", "1.0") else 0
            j = int(t.count("1.0", b, "chars")[0])
            for k in range(i, min(j, len(text))):
                tags[k].add(name)
    return [(c, frozenset(x)) for c, x in zip(text, tags)]


def _runs(styled, tag, within=None):
    """Texts of the runs of characters tagged ``tag`` (and ``within``, when given)."""
    return texts_with([Span(c, tuple(x)) for c, x in styled if within is None or within in x], tag)


def _index_of(t, text, start="1.0"):
    index = t.search(text, start, stopindex="end")
    assert index, f"{text!r} is not in the transcript"
    return index


def _x(xdisplay, *args):
    subprocess.run(["xdotool", *args], env=dict(os.environ, DISPLAY=xdisplay), check=True, timeout=30)


def _settle(root, seconds=0.15):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        root.update()
        time.sleep(0.01)


def _click(root, xdisplay, widget, index=None, double=False):
    """Click like a user: move the pointer onto ``widget`` (at text ``index`` of a Text or
    Treeview row) and press the button, with xdotool."""
    root.update()
    if index is not None:
        widget.see(index)
        root.update()
        x, y, w, h = widget.bbox(index)
    else:
        x, y, w, h = 0, 0, widget.winfo_width(), widget.winfo_height()
    X, Y = widget.winfo_rootx() + x + max(1, w // 2), widget.winfo_rooty() + y + h // 2
    _x(xdisplay, "mousemove", "--sync", str(X), str(Y))
    _settle(root, 0.05)
    _x(xdisplay, "click", *(["--repeat", "2", "--delay", "60"] if double else []), "1")
    _settle(root)


def _press(root, xdisplay, widget, keys):
    """Press ``keys`` (xdotool's names, e.g. ``ctrl+Return``) with the keyboard focus on ``widget``."""
    root.focus_force()
    widget.focus_set()
    _pump(root, lambda: root.focus_get() is widget, 10)
    _x(xdisplay, "key", keys)
    _settle(root)


def _action(t, tag, nth=0):
    """The index of the middle-ish of the ``nth`` text carrying ``tag``."""
    r = t.tag_ranges(tag)
    assert len(r) > 2 * nth, f"no {tag} #{nth} in the transcript"
    return t.index(f"{r[2 * nth]}+1c")


def _screenshot(root, xdisplay, name, tmp_path):
    """A screenshot of the window (and what is on top of it); ``QNEXT_MLX_SCREENSHOTS=DIR``
    also copies it there (the README's docs/screenshots are made that way)."""
    from PIL import ImageGrab, ImageStat

    _settle(root, 0.4)
    w, h = root.winfo_rootx() + root.winfo_width(), root.winfo_rooty() + root.winfo_height()
    shot = ImageGrab.grab(xdisplay=xdisplay).convert("RGB").crop((0, 0, w, h))
    assert ImageStat.Stat(shot).stddev[0] > 5  # a drawn window, not a blank screen
    out = tmp_path / name
    shot.quantize(colors=128).save(out, optimize=True)
    assert out.stat().st_size < 300_000
    if os.environ.get("QNEXT_MLX_SCREENSHOTS"):
        shutil.copy(out, Path(os.environ["QNEXT_MLX_SCREENSHOTS"]) / name)
    return out


def _font_of(t, index):
    import tkinter.font as tkfont

    names = [n for n in t.tag_names(index) if n.startswith("font_")]
    assert len(names) == 1, t.tag_names(index)
    return tkfont.Font(root=t, font=t.tag_cget(names[0], "font")).actual()


def test_window_renders_a_streamed_markdown_reply(xdisplay, scripted_loader, tmp_path):
    """The demo model's window streams a scripted markdown reply: each element has its tags,
    fonts and layout, the streamed render equals the render at once, and the code block's
    Copy, the link, Raw and Copy reply work when clicked."""
    import tkinter as tk

    from qnext_mlx.ui.desktop import ChatApp

    store = ConversationStore(tmp_path / "data")
    worker = GenerationWorker(scripted_loader)
    worker.start()
    worker.load(None)
    root = tk.Tk(screenName=xdisplay)
    app = ChatApp(root, worker, store, AppSettings(window_geometry="980x860+0+0"))
    opened = []
    app.open_url = opened.append
    t = app.transcript
    try:
        _pump(root, lambda: app.model_ready)
        assert app.theme == ("aqua" if sys.platform == "darwin" else "clam")
        app.entry.insert("1.0", "markdown, please")
        app.send_button.invoke()
        partial = []
        _pump(
            root,
            lambda: partial.append(app.transcript_text()) or (not app.streaming and not worker.generating.is_set()),
        )
        # it was shown while it streamed, already rendered (an emphasis still open shows its
        # "**" until it closes, as in any markdown renderer; a heading never shows its "##")
        shown = [p for p in partial if "Reading a file in Python" in p and "That is all you need." not in p]
        assert shown and not any("## Reading" in p for p in partial)
        assert app.view.renders >= 2 and app.view.full_rerenders == 0

        styled = _styled(t)
        assert _runs(styled, "md_h2") == ["Reading a file in Python\n"]
        assert _runs(styled, "md_strong", "assistant") == ["pathlib", "read_text"]
        assert _runs(styled, "md_em") == ["simpler"]
        assert _runs(styled, "md_strike") == ["os.path"]
        assert _runs(styled, "md_code", "assistant") == [
            "pathlib",
            "open()",
            "Path",
            'encoding="utf-8"',
            "read_text",
            "open",
        ]
        assert _runs(styled, "md_bullet") == ["1.\t", "2.\t", "◦\t", "◦\t"]
        assert _runs(styled, "md_quote") == [
            'Tip: pass encoding="utf-8" so the result does not depend on the platform.\n'
        ]
        table = "".join(_runs(styled, "md_table")).splitlines()
        assert table[0] == " method    │ returns     │ lazy " and table[2] == " read_text │ str         │   no "
        assert _runs(styled, "md_th") == [table[0] + "\n"]
        assert _runs(styled, "md_codeblock") == [CODE]
        assert _runs(styled, "md_link") == ["the pathlib docs"]
        assert _runs(styled, "md_hr") == ["─" * 32 + "\n"]
        # the reasoning is rendered the same way, inside its foldable section
        assert _runs(styled, "think#") == ["The user wants to read a file; pathlib is the simplest answer.\n"]
        assert _runs(styled, "md_strong", "think#") == ["read a file"]
        assert _runs(styled, "md_code", "think#") == ["pathlib"]

        # fonts: monospace code, a larger bold heading, bold, italic
        code_font = _font_of(t, _index_of(t, "from pathlib import Path"))
        assert code_font["family"] == app.fonts.mono
        heading = _font_of(t, _index_of(t, "Reading a file"))
        assert heading["weight"] == "bold" and heading["size"] > app.fonts.size
        assert _font_of(t, _index_of(t, "read_text\n"))["weight"] == "bold"
        assert _font_of(t, _index_of(t, "simpler"))["slant"] == "italic"
        # layout on screen: nested items further in than their parents; table columns line up
        x_of = lambda text: t.bbox(_index_of(t, text))[0]  # noqa: E731
        t.see(_index_of(t, "it decodes"))
        root.update()
        assert x_of("it decodes") > x_of("Call ") > app.view.text.bbox(_index_of(t, "Use "))[0] - 1
        bars = [t.bbox(_index_of(t, "│", _index_of(t, row.strip()[:6])))[0] for row in (table[0], table[2], table[3])]
        assert len(set(bars)) == 1

        # the streamed render is exactly the render of the whole reply at once
        app._render()
        assert _styled(t) == styled

        t.yview_moveto(0)
        _screenshot(root, xdisplay, "markdown.png", tmp_path)

        # click the code block's Copy, the link, then Raw / Rendered and the reply's Copy
        _click(root, xdisplay, t, _action(t, "md_copy"))
        assert root.clipboard_get() == CODE and app.note.cget("text") == "code copied"
        _click(root, xdisplay, t, _action(t, "md_link"))
        assert opened == ["https://docs.python.org/3/library/pathlib.html"]
        _click(root, xdisplay, t, _action(t, "action_raw"))
        raw = app.transcript_text()
        assert "## Reading a file in Python" in raw and "| method | returns | lazy |" in raw and "```python" in raw
        assert not t.tag_ranges("md_h2") and "Rendered" in raw
        _click(root, xdisplay, t, _action(t, "action_raw"))
        assert _styled(t) == styled
        _click(root, xdisplay, t, _action(t, "action_copy"))
        assert root.clipboard_get() == MARKDOWN_REPLY and app.note.cget("text") == "reply copied"
        # fold the thinking by clicking its header
        _click(root, xdisplay, t, _action(t, "think_header"))
        assert "read a file" not in app.transcript_text(visible_only=True)
        assert "▸ Thinking" in app.transcript_text()
    finally:
        worker.shutdown()
        root.destroy()


def test_window_streams_a_reply_collapses_thinking_and_stops(xdisplay, scripted_loader, tmp_path):
    import tkinter as tk

    from qnext_mlx.ui.desktop import ChatApp

    store = ConversationStore(tmp_path / "data")
    worker = GenerationWorker(scripted_loader)
    worker.start()
    worker.load(None)
    root = tk.Tk(screenName=xdisplay)
    app = ChatApp(root, worker, store, AppSettings())
    try:
        _pump(root, lambda: app.model_ready)
        assert app.model_label.cget("text") == "Model: scripted"

        # Write in the message box and click Send (typing with the keyboard is the
        # end-to-end test's part: key events need the X input focus).
        app.entry.insert("1.0", "think about life")
        app.send_button.invoke()
        seen_partial = []
        _pump(
            root,
            lambda: (
                seen_partial.append(app.transcript_text())
                or (not app.streaming and not worker.generating.is_set() and "42" in app.transcript_text())
            ),
        )
        text = app.transcript_text()
        # (the user label carries its Edit action; the reply ends with its action line)
        assert (
            "You   Edit\nthink about life\nAssistant\n▾ Thinking\nLet me think about it.\nThe answer is 42.\n"
            "Copy  ·  Raw  ·  Regenerate\n" in text
        )
        assert app.entry.get("1.0", "end-1c") == ""
        assert "tok/s" in app.status.cget("text") and "context" in app.status.cget("text")
        assert float(app.context_bar.cget("value")) > 0

        app.toggle_thinking("think1")  # collapse: the reasoning is hidden, the answer stays
        visible = app.transcript_text(visible_only=True)
        assert "Let me think about it." not in visible and "The answer is 42." in visible and "▸ Thinking" in visible
        app.toggle_thinking("think1")
        assert "Let me think about it." in app.transcript_text(visible_only=True)

        saved = store.load(app.session.id)
        assert saved.title == "think about life" and saved.messages[-1]["content"] == "The answer is 42."
        assert app.conv_list.get(0) == "think about life"

        # The Stop button ends a long reply; the window stayed responsive all along.
        app.entry.insert("1.0", "long story")
        app.send_button.invoke()
        _pump(root, lambda: "word word word" in app.transcript_text())
        assert str(app.stop_button.cget("state")) == "normal"
        app.stop_button.invoke()
        _pump(root, lambda: not worker.generating.is_set() and not app.streaming)
        assert "[stopped]" in app.transcript_text()
        assert str(app.stop_button.cget("state")) == "disabled"

        # A new conversation, then back to the first one from the list.
        first = app.session.id
        app.new_conversation()
        assert app.transcript_text() == "" and app.conv_list.size() == 2
        app.conv_list.selection_clear(0, "end")
        app.conv_list.selection_set(app.conversation_ids.index(first))
        app.conv_list.event_generate("<<ListboxSelect>>")
        _pump(root, lambda: app.session.id == first)
        assert "The answer is 42." in app.transcript_text()

        # Settings: a bad value is refused in the dialog, a good one is saved.
        from qnext_mlx.ui.desktop import SettingsDialog

        dialog = SettingsDialog(app)
        dialog.vars["temp"].set("hot")
        dialog.apply()
        assert "not a number" in dialog.error.cget("text")
        dialog.vars["temp"].set("0.25")
        dialog.apply()
        assert store.load_settings().sampling.temp == 0.25 and app.session.settings.temp == 0.25
    finally:
        worker.shutdown()
        root.destroy()


def _window(xdisplay, load_engine, store, settings=None):
    import tkinter as tk

    from qnext_mlx.ui.desktop import ChatApp

    worker = GenerationWorker(load_engine)
    worker.start()
    worker.load(None)
    root = tk.Tk(screenName=xdisplay)
    app = ChatApp(root, worker, store, settings or AppSettings())
    _pump(root, lambda: app.model_ready)
    return root, worker, app


def _wait_reply(root, app, worker):
    _pump(root, lambda: not app.streaming and not worker.generating.is_set())


def test_window_edit_regenerate_and_stop_by_mouse_and_keyboard(xdisplay, model_dir, tmp_path):
    takes = []

    def load_engine(model_arg):
        model, tokenizer = qnext_mlx.load(model_dir)

        def respond(prompt):
            user = last_user_text(prompt)
            if user.startswith("long"):
                return "word " * 3000
            takes.append(user)
            return f"Take {len(takes)}: you said {user}."

        scripted["model"] = ScriptedModel(model, tokenizer, respond)
        return ChatEngine(scripted["model"], tokenizer, max_context=8192), "scripted"

    scripted = {}
    store = ConversationStore(tmp_path / "data")
    root, worker, app = _window(xdisplay, load_engine, store)
    t = app.transcript
    try:
        app.entry.insert("1.0", "hello")
        _press(root, xdisplay, app.entry, "ctrl+Return")  # Ctrl+Return (⌘Return on a Mac) sends
        _wait_reply(root, app, worker)
        app.entry.insert("1.0", "and then?")
        app.send_button.invoke()
        _wait_reply(root, app, worker)
        assert [m["content"] for m in app.session.messages] == [
            "hello",
            "Take 1: you said hello.",
            "and then?",
            "Take 2: you said and then?.",
        ]
        assert len(t.tag_ranges("action_regenerate")) == 2  # on the last reply only

        # Edit the first message (click its Edit), change it, send with the keyboard:
        # what followed it goes, and the reply is generated again from there.
        _click(root, xdisplay, t, _action(t, "action_edit", 0))
        assert app.editing == 0 and app.entry.get("1.0", "end-1c") == "hello"
        assert app.edit_banner.winfo_manager() == "pack"
        app.entry.delete("1.0", "end")
        app.entry.insert("1.0", "goodbye")
        _press(root, xdisplay, app.entry, "ctrl+Return")
        _wait_reply(root, app, worker)
        assert [m["content"] for m in app.session.messages] == ["goodbye", "Take 3: you said goodbye."]
        assert app.session.title == "goodbye" and app.editing is None and not app.edit_banner.winfo_manager()
        text = app.transcript_text()
        assert "hello" not in text and "and then?" not in text and "Take 3: you said goodbye." in text
        assert store.load(app.session.id).messages == app.session.messages

        # Regenerate the last reply (click it): a new take replaces it.
        scripted["model"].forget()
        _click(root, xdisplay, t, _action(t, "action_regenerate"))
        _wait_reply(root, app, worker)
        assert [m["content"] for m in app.session.messages] == ["goodbye", "Take 4: you said goodbye."]
        assert "Take 3" not in app.transcript_text() and "Take 4: you said goodbye." in app.transcript_text()
        assert app.session.last_stats.cached_tokens > 0  # the prompt was reused from the cache
        assert len(t.tag_ranges("action_regenerate")) == 2

        # Editing can be cancelled with Esc; Esc also stops a reply.
        _click(root, xdisplay, t, _action(t, "action_edit", 0))
        assert app.editing == 0
        _press(root, xdisplay, app.entry, "Escape")
        assert app.editing is None and app.entry.get("1.0", "end-1c") == ""
        app.entry.insert("1.0", "long story")
        app.send_button.invoke()
        _pump(root, lambda: "word word word" in app.transcript_text())
        _press(root, xdisplay, app.entry, "Escape")
        _wait_reply(root, app, worker)
        assert "[stopped]" in app.transcript_text() and app.session.last_stats.finish_reason == "cancelled"
        # Ctrl+R regenerates the last reply (here the stopped one): the conversation keeps its length
        n = len(app.session.messages)
        _press(root, xdisplay, app.entry, "ctrl+r")
        _pump(root, lambda: "word word word" in app.transcript_text())
        app.stop_button.invoke()
        _wait_reply(root, app, worker)
        assert len(app.session.messages) == n
    finally:
        worker.shutdown()
        root.destroy()


def test_window_model_picker_switches_in_the_background_and_cancels(xdisplay, model_dir, tmp_path, monkeypatch):
    cache = fake_hf_cache(tmp_path / "hub", {"acme/Qwen3-Next-chat": model_dir, "acme/Qwen3-Next-slow": model_dir})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    gates = {"acme/Qwen3-Next-chat": threading.Event(), "acme/Qwen3-Next-slow": threading.Event()}
    mine = tmp_path / "models"  # a folder added earlier, with a 4-bit model (headers only: listed, not loaded)
    q4 = {"model_type": "qwen3_next", "quantization": {"bits": 4, "group_size": 64}}
    _write_model(mine / "qwen3-next-4bit", q4, {"model.embed_tokens.weight": (512, 64)})
    store = ConversationStore(tmp_path / "data")
    root, worker, app = _window(xdisplay, named_loader(model_dir, gates), store, AppSettings(model_folders=[str(mine)]))
    try:
        assert app.model_label.cget("text") == "Model: demo"
        app.models_button.invoke()
        picker = app.picker
        _pump(root, lambda: picker.scanned)
        rows = {picker.infos[i].name: (i, picker.tree.item(i)) for i in picker.tree.get_children()}
        assert list(rows) == ["demo model", "acme/Qwen3-Next-chat", "acme/Qwen3-Next-slow", "qwen3-next-4bit"]
        q4_size = format_size((mine / "qwen3-next-4bit" / "model.safetensors").stat().st_size)
        assert rows["qwen3-next-4bit"][1]["values"] == ["added folder", q4_size, "4-bit", "no"]
        size = format_size(sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")))
        assert rows["acme/Qwen3-Next-chat"][1]["values"] == ["Hugging Face cache", size, "bf16", "yes"]
        assert rows["demo model"][1]["text"].startswith("●")  # the model in use
        assert rows["demo model"][1]["values"] == ["bundled", size, "bf16", "yes"]
        _screenshot(root, xdisplay, "models.png", tmp_path)

        # Double-click a model: it loads in the background, with a progress bar; the window
        # stays responsive while it does.
        iid = rows["acme/Qwen3-Next-chat"][0]
        picker.tree.see(iid)
        root.update()
        _click(root, xdisplay, picker.tree, iid, double=True)
        assert not picker.win.winfo_exists()
        _pump(root, lambda: app.loading and app.model_label.cget("text") == "Loading acme/Qwen3-Next-chat …")
        assert str(app.load_progress.cget("mode")) == "indeterminate" and app.cancel_load_button.winfo_manager()
        gates["acme/Qwen3-Next-chat"].set()
        _pump(root, lambda: app.model_ready)
        assert app.model_label.cget("text") == "Model: acme/Qwen3-Next-chat" and not app.loading
        chat_path = picker.infos[iid].model_arg
        assert store.load_settings().model == chat_path  # remembered for the next start
        app.entry.insert("1.0", "hello")
        app.send_button.invoke()
        _wait_reply(root, app, worker)
        assert app.session.messages[-1]["content"] == "acme/Qwen3-Next-chat says hello."
        engine = worker.engine

        # Load the slow one and cancel: the model we had stays, at once.
        picker = app.open_model_picker()
        _pump(root, lambda: picker.scanned)
        iid = next(i for i, info in picker.infos.items() if info.name == "acme/Qwen3-Next-slow")
        assert picker.tree.item(next(i for i, info in picker.infos.items() if info.name == "acme/Qwen3-Next-chat"))[
            "text"
        ].startswith("●")
        picker.tree.selection_set(iid)
        _settle(root)
        picker.load_button.invoke()
        _pump(root, lambda: app.loading and "slow" in app.model_label.cget("text"))
        _click(root, xdisplay, app.cancel_load_button)
        assert not app.loading and app.model_ready and app.model_label.cget("text") == "Model: acme/Qwen3-Next-chat"
        gates["acme/Qwen3-Next-slow"].set()  # the load ends on the worker; its model is dropped
        _pump(root, lambda: app.pending_loads == 0)
        assert worker.engine is engine and app.model_label.cget("text") == "Model: acme/Qwen3-Next-chat"
        assert store.load_settings().model == chat_path
        app.entry.insert("1.0", "still you?")
        app.send_button.invoke()
        _wait_reply(root, app, worker)
        assert app.session.messages[-1]["content"] == "acme/Qwen3-Next-chat says still you?."

        # A folder that is not a model: loading it fails, the model in use stays.
        picker = app.open_model_picker()
        picker.typed_var.set(str(tmp_path / "no-model-here"))
        picker.load_typed()
        _pump(root, lambda: app.pending_loads == 0)
        error = [line for line in app.transcript_text().splitlines() if line.startswith("error:")]
        missing = tmp_path / "no-model-here"
        assert error == [f"error: could not load {missing}: model folder {missing} does not exist"]
        assert not app.loading and app.model_ready
        assert worker.engine is engine and app.model_label.cget("text") == "Model: acme/Qwen3-Next-chat"
    finally:
        for g in gates.values():
            g.set()
        worker.shutdown()
        root.destroy()


def test_window_adds_a_model_folder_exports_searches_and_remembers_its_size(xdisplay, scripted_loader, tmp_path):
    import tkinter as tk

    from qnext_mlx.ui.desktop import ChatApp

    store = ConversationStore(tmp_path / "data")
    cooking = ChatSession(title="Cooking")
    cooking.messages = [
        {"role": "user", "content": "How long do I boil an egg?"},
        {"role": "assistant", "content": "Boil it for **nine** minutes."},
    ]
    store.save(cooking)
    time.sleep(0.01)
    python = ChatSession(title="Python")
    python.messages = [{"role": "user", "content": "What is pathlib?"}, {"role": "assistant", "content": "A module."}]
    store.save(python)
    root, worker, app = _window(xdisplay, scripted_loader, store)
    closed = False
    try:
        assert app.session.id == python.id and app.conv_list.size() == 2

        # Search: type into the search box; the list keeps what matches; the matches are marked.
        _press(root, xdisplay, app.search_entry, "ctrl+a")
        _x(xdisplay, "type", "--delay", "30", "boil")
        _pump(root, lambda: app.search_query == "boil")
        assert [app.conv_list.get(i) for i in range(app.conv_list.size())] == ["Cooking"]
        _click(root, xdisplay, app.conv_list, "0")
        _pump(root, lambda: app.session.id == cooking.id)
        hits = app.transcript.tag_ranges("search_hit")
        assert [app.transcript.get(a, b) for a, b in zip(hits[::2], hits[1::2])] == ["boil", "Boil"]
        app.search_var.set("")
        assert app.conv_list.size() == 2 and not app.transcript.tag_ranges("search_hit")

        # Export (the save dialog answers with a path): the conversation as markdown.
        asked = []
        app.ask_export_path = lambda name: asked.append(name) or str(tmp_path / "out" / name)
        (tmp_path / "out").mkdir()
        out = app.export_conversation()
        assert asked == ["Cooking.md"] and out == tmp_path / "out" / "Cooking.md"
        body = re.sub(r"\*Exported from qnext-mlx on [^*]*\*", "*Exported*", out.read_text())
        assert (
            body == "# Cooking\n\n*Exported*\n\n## You\n\nHow long do I boil an egg?\n\n## Assistant\n\n"
            "Boil it for **nine** minutes.\n"
        )
        assert "scripted" in out.read_text()  # the model's name
        app.ask_export_path = lambda name: str(tmp_path / "missing-folder" / name)
        assert app.export_conversation() is None and "error: cannot write" in app.transcript_text()

        # Add a folder of models in the picker (the folder dialog answers with a path).
        mine = tmp_path / "mine"
        _write_model(
            mine / "q4", {"model_type": "qwen3_next", "quantization": {"bits": 4, "group_size": 64}}, {"a": (8, 8)}
        )
        app.ask_folder = lambda: str(mine)
        picker = app.open_model_picker()
        _pump(root, lambda: picker.scanned)
        picker.add_folder()
        _pump(root, lambda: picker.scanned and any(i.name == "q4" for i in picker.infos.values()))
        q4 = next(i for i, info in picker.infos.items() if info.name == "q4")
        assert picker.tree.item(q4)["values"][1:] == [
            format_size((mine / "q4" / "model.safetensors").stat().st_size),
            "4-bit",
            "no",
        ]
        assert store.load_settings().model_folders == [str(mine)]
        picker.tree.selection_set(q4)
        _settle(root)
        picker.remove_folder()
        _pump(root, lambda: picker.scanned)
        assert not any(i.name == "q4" for i in picker.infos.values()) and store.load_settings().model_folders == []
        picker.close()

        # Ctrl+N: a new conversation.
        _press(root, xdisplay, app.entry, "ctrl+n")
        assert app.transcript_text() == "" and app.conv_list.size() == 3

        # The window's size and the list's width are remembered.
        root.geometry("900x600+20+30")
        _settle(root, 0.3)
        app.paned.sashpos(0, 260)
        _settle(root)
        app.close()  # what closing the window does
        closed = True
        saved = store.load_settings()
        assert saved.window_geometry == "900x600+20+30" and abs(saved.sidebar_width - 260) <= 2
    finally:
        worker.shutdown()
        if not closed:
            root.destroy()
    worker = GenerationWorker(scripted_loader)
    worker.start()
    root = tk.Tk(screenName=xdisplay)
    try:
        app = ChatApp(root, worker, store, store.load_settings())
        _settle(root, 0.5)
        assert root.geometry() == "900x600+20+30" and abs(app.paned.sashpos(0) - 260) <= 2
    finally:
        worker.shutdown()
        root.destroy()


def test_app_end_to_end_typing_into_the_window_with_screenshot(xdisplay, model_dir, tmp_path):
    """``python -m qnext_mlx.app`` on the model: type a message with the keyboard (xdotool),
    wait for the streamed reply to be saved, take a screenshot."""
    from PIL import Image, ImageGrab, ImageStat

    data = tmp_path / "data"
    env = dict(os.environ, DISPLAY=xdisplay)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qnext_mlx.app",
            "--model",
            str(model_dir),
            "--data-dir",
            str(data),
            "--max-tokens",
            "120",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        found = subprocess.run(
            ["xdotool", "search", "--sync", "--onlyvisible", "--name", "qnext-mlx chat"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        window = found.stdout.split()[0]
        subprocess.run(["xdotool", "windowmove", "--sync", window, "0", "0"], env=env, timeout=30)
        subprocess.run(["xdotool", "windowfocus", "--sync", window], env=env, timeout=30)
        time.sleep(1.0)  # the window's first layout
        subprocess.run(["xdotool", "type", "--delay", "20", "Who made the heaven and the earth?"], env=env, timeout=60)
        subprocess.run(["xdotool", "key", "Return"], env=env, timeout=30)

        end = time.monotonic() + 120
        reply = None
        while time.monotonic() < end and reply is None:
            for f in (data / "conversations").glob("*.json"):
                conv = json.loads(f.read_text())
                if conv["messages"] and conv["messages"][-1]["role"] == "assistant":
                    reply = conv["messages"]
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        assert reply is not None, "no reply was saved"
        assert reply[0] == {"role": "user", "content": "Who made the heaven and the earth?"}
        assert reply[1]["content"] or reply[1].get("reasoning_content")
        time.sleep(0.5)  # let the last piece and the stats line paint

        geometry = subprocess.run(
            ["xdotool", "getwindowgeometry", "--shell", window], env=env, capture_output=True, text=True, timeout=30
        ).stdout
        size = dict(line.split("=", 1) for line in geometry.split())
        width, height = int(size["WIDTH"]), int(size["HEIGHT"])
        assert width == 980 and 640 <= height <= 700  # 980x640 and the menu bar
        shot = ImageGrab.grab(xdisplay=xdisplay).convert("RGB").crop((0, 0, width, height))
        assert ImageStat.Stat(shot).stddev[0] > 5  # a drawn window, not a blank screen
        out = tmp_path / "app.png"
        shot.quantize(colors=128).save(out, optimize=True)
        assert out.stat().st_size < 300_000
        assert Image.open(out).size == (width, height)
        if os.environ.get("QNEXT_MLX_SCREENSHOTS"):
            shutil.copy(out, Path(os.environ["QNEXT_MLX_SCREENSHOTS"]) / "app.png")
        subprocess.run(["xdotool", "key", "ctrl+q"], env=env, timeout=30)  # quit as a user would
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_app_cli_errors_are_one_line(capsys):
    from qnext_mlx.app import main

    with pytest.raises(SystemExit) as info:
        main(["--max-tokens", "lots"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --max-tokens")
    env = dict(os.environ)
    env.pop("DISPLAY", None)
    r = subprocess.run(
        [sys.executable, "-m", "qnext_mlx.app", "--data-dir", "/tmp/qnext-no-display"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: cannot open a window") and "display" in r.stderr
