"""The desktop chat app: its core without a display, its window under Xvfb.

The window tests need ``Xvfb`` (and ``xdotool`` to type like a user); the test
command (``scripts/test.sh``, via ``scripts/install-test-deps.sh``) installs them where
it can, and without them those tests are skipped with the reason. Tests never install
anything themselves. Set ``QNEXT_MLX_SCREENSHOT=PATH``
to also write the end-to-end test's screenshot there (the README's
``docs/screenshots/app.png`` is made that way).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
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

THINK = "<think>\nLet me think about it.\n</think>\n\nThe answer is 42."


def responder(prompt: str) -> str:
    user = last_user_text(prompt)
    if user.startswith("long"):
        return "word " * 3000
    if user.startswith("think"):
        return THINK
    return f"You said {user}."


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint):
    return chat_model_folder(hf_checkpoint)


@pytest.fixture
def scripted_loader(model_dir):
    def load_engine(model_arg):
        model, tokenizer = qnext_mlx.load(model_dir)
        return ChatEngine(
            ScriptedModel(model, tokenizer, responder), tokenizer, cache_size=3, max_context=8192
        ), "scripted"

    return load_engine


# ------------------------------------------------------------- no display
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
        ["Xvfb", f":{n}", "-screen", "0", "1000x660x24", "-nolisten", "tcp"],
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
                or (app._stream_state is None and not worker.generating.is_set() and "42" in app.transcript_text())
            ),
        )
        text = app.transcript_text()
        assert "You\nthink about life\nAssistant\n▾ Thinking\nLet me think about it.\nThe answer is 42." in text
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
        _pump(root, lambda: not worker.generating.is_set() and app._stream_state is None)
        assert "[stopped]" in app.transcript_text()
        assert str(app.stop_button.cget("state")) == "disabled"

        # A new conversation, then back to the first one from the list.
        first = app.session.id
        app.new_conversation()
        assert app.transcript_text() == "" and app.conv_list.size() == 2
        app.conv_list.selection_clear(0, "end")
        app.conv_list.selection_set(app._list_ids.index(first))
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

        shot = ImageGrab.grab(xdisplay=xdisplay).convert("RGB").crop((0, 0, 980, 640))
        assert ImageStat.Stat(shot).stddev[0] > 5  # a drawn window, not a blank screen
        out = tmp_path / "app.png"
        shot.quantize(colors=64).save(out, optimize=True)
        assert out.stat().st_size < 200_000
        assert Image.open(out).size == (980, 640)
        if os.environ.get("QNEXT_MLX_SCREENSHOT"):
            shutil.copy(out, os.environ["QNEXT_MLX_SCREENSHOT"])
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
