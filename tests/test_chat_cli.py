"""The terminal chat, driven through a pseudo-terminal like a person at a keyboard."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import sys
import time

import pytest
from chat_helpers import ROOT, chat_model_folder

pty = pytest.importorskip("pty")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# Runs the chat on a ScriptedModel (see chat_helpers): deterministic replies, thinking included.
SCRIPTED_CHAT = """
import sys
sys.path.insert(0, {tests!r})
import qnext_mlx
from chat_helpers import ScriptedModel, last_user_text
from qnext_mlx import chat
from qnext_mlx.serve.chat_session import ChatEngine

def responder(prompt):
    user = last_user_text(prompt)
    if user.startswith("think"):
        return "<think>\\nLet me think about it.\\n</think>\\n\\nThe answer is 42."
    if user.startswith("long"):
        return "word " * 3000
    return "You said " + user + "."

model, tokenizer = qnext_mlx.load({model!r})
engine = ChatEngine(ScriptedModel(model, tokenizer, responder), tokenizer, max_context=4096)
sys.exit(chat.main(sys.argv[1:], engine=engine))
"""


# A scripted chat prefilling in 8-token chunks whose first chunk says "[prefilling]" and
# then waits until Ctrl-C was pressed (chat's Ctrl-C catcher has set its flag), so the
# Ctrl-C lands mid-prefill every time.
SLOW_PREFILL_CHAT = """
import signal, sys, time
sys.path.insert(0, {tests!r})
import qnext_mlx
from chat_helpers import ChunkGate, ScriptedModel, last_user_text
from qnext_mlx import chat
from qnext_mlx.serve.chat_session import ChatEngine

def ctrl_c_pressed():
    catcher = getattr(signal.getsignal(signal.SIGINT), "__self__", None)
    return catcher is not None and catcher.flag.is_set()

def on_chunk(n):
    if n == 1:
        print("[prefilling]", flush=True)
        end = time.monotonic() + 30
        while not ctrl_c_pressed() and time.monotonic() < end:
            time.sleep(0.01)

model, tokenizer = qnext_mlx.load({model!r})
scripted = ScriptedModel(model, tokenizer, lambda p: "You said " + last_user_text(p)[:20] + ".")
engine = ChatEngine(ChunkGate(scripted, on_chunk), tokenizer, max_context=4096, prefill_step_size=8)
sys.exit(chat.main(sys.argv[1:], engine=engine))
"""


class Terminal:
    """A child process on a pseudo-terminal (it is the controlling terminal, so
    Ctrl-C typed as ``\\x03`` becomes SIGINT, as in a real shell)."""

    def __init__(self, argv, env=None):
        env = dict(os.environ if env is None else env, TERM="dumb", COLUMNS="120", LINES="40")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            try:
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        self.text = ""  # everything read so far, escape sequences included
        self.mark = 0

    def read_until(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """Wait for ``pattern`` (regex) in the output after the last match."""
        end = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.text, self.mark)
            if m:
                self.mark = m.end()
                return m
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; output:\n{self.text[-3000:]}")
            r, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if r:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    if rx.search(self.text, self.mark) is None:
                        raise AssertionError(f"the program ended before {pattern!r}; output:\n{self.text[-3000:]}")
                    continue
                self.text += data.decode("utf-8", "replace")

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\r").encode())

    def press(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self, timeout: float = 60.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:  # keep the terminal drained so the child never blocks on output
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.text += os.read(self.fd, 65536).decode("utf-8", "replace")
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        raise AssertionError("the program did not exit")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint):
    return chat_model_folder(hf_checkpoint)


def _stats(term: Terminal):
    """Wait for the stats line after a reply; returns (generated, tok/s, prompt, cached)."""
    m = term.read_until(r"\[(\d+) tokens, ([\d.]+) tok/s \| prompt (\d+) tokens \((\d+) cached\)")
    return tuple(float(g) if "." in g else int(g) for g in m.groups())


def test_scripted_chat_session_through_a_terminal(model_dir, tmp_path):
    code = SCRIPTED_CHAT.format(tests=str(ROOT / "tests"), model=str(model_dir))
    term = Terminal([sys.executable, "-c", code, "--system", "You are terse."])
    try:
        term.read_until(r"/help for commands")
        term.read_until(r">>> ")

        term.type("first question")
        term.read_until(r"You said first question\.")
        gen, tps, prompt, cached = _stats(term)
        assert gen > 0 and tps > 0 and cached == 0

        # A follow-up reuses the cache: turn 1 (prompt + reply) is not prefilled again.
        # Thinking is shown dimmed, then the answer, then the stats line with tokens/s.
        term.type("think about life")
        term.read_until(r"\x1b\[2mLet me think about it\.\x1b\[0m\s+The answer is 42\.")
        gen, tps, prompt2, cached2 = _stats(term)
        assert cached2 > prompt and prompt2 - cached2 < 40

        # The template drops earlier turns' thinking, so after a thinking reply the
        # reuse stops at the end of the previous prompt.
        term.type("second question")
        term.read_until(r"You said second question\.")
        _, _, prompt3, cached3 = _stats(term)
        assert cached3 >= prompt2 - 1

        conv = tmp_path / "conv.json"
        term.type(f"/save {conv}")
        term.read_until(r"saved 6 messages to")
        saved = json.loads(conv.read_text())
        assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 3
        assert saved["messages"][3] == {
            "role": "assistant",
            "content": "The answer is 42.",
            "reasoning_content": "Let me think about it.",
        }
        assert saved["system"] == "You are terse."
        assert (tmp_path / "conv.json.cache.safetensors").exists()

        term.type("/system Answer in French.")
        term.read_until(r"system message set")
        term.type("/system")
        term.read_until(r"system message: 'Answer in French\.'")

        term.type("/reset")
        term.read_until(r"new conversation")
        term.type("fresh start")
        term.read_until(r"You said fresh start\.")
        _, _, prompt3, cached3 = _stats(term)
        assert cached3 == 0  # new system message, new conversation: nothing to reuse

        # /load brings back the saved conversation and its cache: the next turn only prefills itself.
        term.type(f"/load {conv}")
        term.read_until(r"loaded 6 messages from")
        term.type("third question")
        term.read_until(r"You said third question\.")
        _, _, prompt4, cached4 = _stats(term)
        assert cached4 > prompt3 and prompt4 - cached4 < 40

        # Ctrl-C stops a long reply; the chat goes on.
        term.type("long story")
        term.read_until(r"word word word")
        term.press("\x03")
        term.read_until(r"\| stopped\]")
        term.type("/nonsense")
        term.read_until(r"unknown command /nonsense")
        term.type(f"/load {tmp_path / 'missing.json'}")
        term.read_until(r"error: .*missing\.json does not exist")

        term.press("\x04")  # Ctrl-D leaves
        assert term.wait() == 0
    finally:
        term.close()


def test_ctrl_c_during_a_long_prompt_stops_the_prefill(model_dir):
    code = SLOW_PREFILL_CHAT.format(tests=str(ROOT / "tests"), model=str(model_dir))
    term = Terminal([sys.executable, "-c", code, "--color", "never"])
    try:
        term.read_until(r">>> ")
        term.type("hello " + "the quick brown fox jumps over the lazy dog " * 12)
        term.read_until(r"\[prefilling\]")
        term.press("\x03")
        m = term.read_until(
            r"\[(\d+) tokens, [\d.]+ tok/s \| prompt (\d+) tokens \((\d+) cached\)"
            r".*\| context (\d+)/4096 \| stopped\]"
        )
        generated, prompt, cached, context = map(int, m.groups())
        # Stopped right after the first 8-token chunk of a prompt of more than 10; nothing generated.
        assert (generated, cached, context) == (0, 0, 8) and prompt > 10 * 8
        # The chat goes on: the next reply is right, and reuses the part already processed.
        term.type("next")
        term.read_until(r"You said next\.")
        _, _, _, cached2 = _stats(term)
        assert cached2 == context
        term.type("/quit")
        assert term.wait() == 0
    finally:
        term.close()


def test_chat_on_the_model_with_plain_output(model_dir):
    term = Terminal(
        [
            sys.executable,
            "-m",
            "qnext_mlx.chat",
            "--model",
            str(model_dir),
            "--max-tokens",
            "6",
            "--temp",
            "0",
            "--color",
            "never",
        ]
    )
    try:
        term.read_until(r">>> ")
        term.type("Hello there")
        gen, tps, prompt, cached = _stats(term)
        assert 1 <= gen <= 6 and cached == 0
        assert "\x1b[2m" not in term.text
        term.type("/quit")
        assert term.wait() == 0
    finally:
        term.close()


def test_cli_errors_are_one_line(capsys):
    import subprocess

    from qnext_mlx import chat

    r = subprocess.run(
        [sys.executable, "-m", "qnext_mlx.chat", "--model", "/nonexistent/model"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert [line for line in r.stderr.splitlines() if line.startswith("error: ")] == r.stderr.strip().splitlines()[-1:]
    with pytest.raises(SystemExit) as info:
        chat.main(["--temp", "-1"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --temp")


def test_repl_without_a_terminal(model_dir):
    """The loop itself, fed lines directly (no model call for commands)."""
    import io

    from qnext_mlx.serve.chat_session import ChatSession
    from qnext_mlx.ui.terminal import ChatREPL

    lines = iter(["/help", "/system", "/save", "/bogus", "/quit"])
    out = io.StringIO()
    assert ChatREPL(ChatSession(None), out, input_fn=lambda prompt: next(lines)).run() == 0
    text = ANSI.sub("", out.getvalue())
    assert "/reset" in text and "no system message" in text and "usage: /save FILE" in text
    assert "unknown command /bogus" in text


# ------------------------------------------------- the shared session logic
@pytest.fixture(scope="module")
def scripted_engine(model_dir):
    from chat_helpers import ScriptedModel, last_user_text

    import qnext_mlx
    from qnext_mlx.serve.chat_session import ChatEngine

    model, tokenizer = qnext_mlx.load(model_dir)
    scripted = ScriptedModel(model, tokenizer, lambda p: f"You said {last_user_text(p)}.")
    return ChatEngine(scripted, tokenizer, max_context=4096)


def _reply(session, text):
    from qnext_mlx.serve.chat_session import ReplyStats

    items = list(session.send(text))
    assert isinstance(items[-1], ReplyStats)
    return items[-1]


def test_cache_pool_keeps_two_conversations_apart(scripted_engine):
    from qnext_mlx.serve.chat_session import ChatSession

    a, b = ChatSession(scripted_engine, system="A"), ChatSession(scripted_engine, system="B")
    _reply(a, "alpha one")
    _reply(b, "beta one")
    sa, sb = _reply(a, "alpha two"), _reply(b, "beta two")
    # Each follow-up found its own conversation in the pool: turn 1's prompt, its reply
    # and the EOS token were all reused.
    tok = scripted_engine.tokenizer
    for session, stats in ((a, sa), (b, sb)):
        first = scripted_engine.prepare(session.chat_messages()[:2]).ids
        reply = tok.encode(session.messages[1]["content"], add_special_tokens=False)
        assert stats.cached_tokens == len(first) + len(reply) + 1
    assert a.messages[-1]["content"] == "You said alpha two." and b.messages[-1]["content"] == "You said beta two."


def test_session_save_load_and_failed_turns(scripted_engine, tmp_path):
    from qnext_mlx.serve.chat_session import ChatError, ChatSession, SamplingSettings, cache_file_for

    s = ChatSession(scripted_engine, system="Sys", settings=SamplingSettings(temp=0.0, max_tokens=50))
    _reply(s, "one")
    path = tmp_path / "c.json"
    s.save(path, with_cache=True)
    assert cache_file_for(path).exists()

    t = ChatSession(scripted_engine)
    assert t.load(path, with_cache=True) is None
    assert (t.system, t.messages, t.settings.max_tokens) == ("Sys", s.messages, 50)
    stats = _reply(t, "two")
    assert stats.prompt_tokens - stats.cached_tokens < 30  # the saved cache was used

    # A turn that cannot even start leaves the history untouched.
    n = len(t.messages)
    t.settings.temp = -1.0
    with pytest.raises(ValueError):
        list(t.send("three"))
    t.settings.temp = 0.0
    with pytest.raises(ChatError, match="context"):
        list(t.send("x" * 20000))
    assert len(t.messages) == n

    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ChatError, match="not a qnext-mlx conversation"):
        t.load(tmp_path / "bad.json")
    cache_file_for(tmp_path / "d.json").write_bytes(b"garbage")
    (tmp_path / "d.json").write_text(path.read_text())
    note = ChatSession(scripted_engine).load(tmp_path / "d.json", with_cache=True)
    assert note and note.startswith("prompt cache not used")
