"""Desktop chat app (Tkinter, which ships with Python on macOS: no new dependency);
its command line is :mod:`qnext_mlx.app`.

A window with a conversation list, streaming replies, a Stop button, the model's
thinking in a collapsible section, model and sampling settings, and tokens/s and
context-used indicators. Conversations are saved as JSON in the platform's
application-data folder (:func:`app_data_dir`: ``~/Library/Application
Support/qnext-mlx`` on a Mac).

The parts below the UI work without a display (and are tested that way):
:func:`app_data_dir`, :class:`AppSettings`, :class:`ConversationStore` and
:class:`GenerationWorker`, the thread that owns the model. The model never runs
on the UI thread: the worker loads it and generates replies, and the window
polls the worker's event queue, so it never freezes.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import QnextError
from ..serve.chat_session import (
    ChatEngine,
    ChatError,
    ChatSession,
    ReplyStats,
    SamplingSettings,
    atomic_write_text,
    end_mlx_thread,
)
from ..serve.reply import Delta

APP_NAME = "qnext-mlx"
WINDOW_TITLE = "qnext-mlx chat"


# ------------------------------------------------------------------ storage
def app_data_dir(
    platform: Optional[str] = None, env: Optional[Dict[str, str]] = None, home: Optional[Path] = None
) -> Path:
    """Where the app keeps its conversations and settings.

    ``QNEXT_MLX_APP_DIR`` overrides it; otherwise ``~/Library/Application Support/qnext-mlx``
    on macOS, ``%APPDATA%\\qnext-mlx`` on Windows, ``$XDG_DATA_HOME/qnext-mlx`` (default
    ``~/.local/share/qnext-mlx``) elsewhere.
    """
    platform = platform or sys.platform
    env = os.environ if env is None else env
    home = home or Path.home()
    if env.get("QNEXT_MLX_APP_DIR"):
        return Path(env["QNEXT_MLX_APP_DIR"])
    if platform == "darwin":
        return home / "Library" / "Application Support" / APP_NAME
    if platform.startswith("win"):
        return Path(env.get("APPDATA") or home / "AppData" / "Roaming") / APP_NAME
    return Path(env.get("XDG_DATA_HOME") or home / ".local" / "share") / APP_NAME


@dataclass
class AppSettings:
    """What the settings dialog edits (saved in ``settings.json``)."""

    model: Optional[str] = None  # None: the bundled demo model
    system: str = ""
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    thinking_expanded: bool = True

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "system": self.system,
            "sampling": self.sampling.to_dict(),
            "thinking_expanded": self.thinking_expanded,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "AppSettings":
        """Settings from a dict; a bad or missing value falls back to its default."""
        out = cls()
        if not isinstance(data, dict):
            return out
        if isinstance(data.get("model"), str) and data["model"].strip():
            out.model = data["model"].strip()
        if isinstance(data.get("system"), str):
            out.system = data["system"]
        try:
            out.sampling = SamplingSettings.from_dict(data.get("sampling") or {})
        except (TypeError, ValueError):
            pass
        out.thinking_expanded = bool(data.get("thinking_expanded", True))
        return out


class ConversationStore:
    """Conversations as ``<root>/conversations/<id>.json`` (:meth:`ChatSession.to_dict`),
    settings as ``<root>/settings.json``; every file is written atomically."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.folder = self.root / "conversations"

    def _ensure(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ChatError(f"cannot create the app folder {self.folder}: {e.strerror or e}") from None

    def path(self, conv_id: str) -> Path:
        if not conv_id or any(c in conv_id for c in "/\\."):
            raise ChatError(f"bad conversation id {conv_id!r}")
        return self.folder / f"{conv_id}.json"

    def list(self) -> List[Tuple[str, str]]:
        """``[(id, title)]``, most recently changed first (unreadable files are skipped)."""
        if not self.folder.is_dir():
            return []
        items = []
        for p in self.folder.glob("*.json"):
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
                items.append((p.stat().st_mtime, p.stem, str(data.get("title") or "New conversation")))
            except (OSError, ValueError, AttributeError):
                continue
        return [(i, t) for _, i, t in sorted(items, reverse=True)]

    def save(self, session: ChatSession) -> None:
        self._ensure()
        atomic_write_text(self.path(session.id), json.dumps(session.to_dict(), ensure_ascii=False, indent=1))

    def load(self, conv_id: str) -> ChatSession:
        session = ChatSession(id=conv_id)
        session.load(self.path(conv_id))
        return session

    def delete(self, conv_id: str) -> None:
        try:
            self.path(conv_id).unlink()
        except FileNotFoundError:
            pass

    def load_settings(self) -> AppSettings:
        try:
            return AppSettings.from_dict(json.loads((self.root / "settings.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return AppSettings()

    def save_settings(self, settings: AppSettings) -> None:
        self._ensure()
        atomic_write_text(self.root / "settings.json", json.dumps(settings.to_dict(), indent=1))


# ------------------------------------------------------------------- worker
class GenerationWorker(threading.Thread):
    """The thread that owns the model: it loads models and generates replies.

    Commands go in through :meth:`load` / :meth:`reply` / :meth:`stop_reply` /
    :meth:`shutdown`; what happens comes out on :attr:`events` as tuples, which the
    UI polls:

    ``("loading", name)``, ``("loaded", name, max_context)``, ``("load_error", message)``,
    ``("delta", conv_id, Delta)``, ``("done", conv_id, ReplyStats)``, ``("error", conv_id, message)``.

    ``load_engine(model_arg) -> (ChatEngine, name)`` builds the engine (on this thread:
    MLX arrays belong to the thread that made them).
    """

    def __init__(self, load_engine: Callable[[Optional[str]], Tuple[ChatEngine, str]]):
        super().__init__(name="qnext-mlx-generation", daemon=True)
        self._load_engine = load_engine
        self._commands: "queue.Queue[tuple]" = queue.Queue()
        self.events: "queue.Queue[tuple]" = queue.Queue()
        self.engine: Optional[ChatEngine] = None
        self._cancel = threading.Event()
        self.generating = threading.Event()

    def load(self, model: Optional[str]) -> None:
        self._commands.put(("load", model))

    def reply(self, session: ChatSession, text: str) -> None:
        """Generate ``session``'s reply to ``text`` (the session gets the engine and the turn)."""
        self.generating.set()
        self._commands.put(("reply", session, text))

    def stop_reply(self) -> None:
        self._cancel.set()

    def shutdown(self, timeout: Optional[float] = 30.0) -> None:
        self._cancel.set()
        self._commands.put(("quit",))
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        try:
            while True:
                cmd = self._commands.get()
                if cmd[0] == "quit":
                    return
                if cmd[0] == "load":
                    self._do_load(cmd[1])
                elif cmd[0] == "reply":
                    self._do_reply(cmd[1], cmd[2])
        finally:
            end_mlx_thread()

    def _do_load(self, model: Optional[str]) -> None:
        self.events.put(("loading", model or "demo model"))
        try:
            engine, name = self._load_engine(model)
        except QnextError as e:
            self.events.put(("load_error", str(e)))
            return
        except Exception as e:  # noqa: BLE001 - shown in the window, the app keeps running
            self.events.put(("load_error", f"{type(e).__name__}: {e}"))
            return
        self.engine = engine
        self.events.put(("loaded", name, engine.max_context))

    def _do_reply(self, session: ChatSession, text: str) -> None:
        self._cancel.clear()
        try:
            if self.engine is None:
                raise ChatError("no model is loaded (see Settings)")
            session.engine = self.engine
            for item in session.send(text, cancel=self._cancel.is_set):
                if isinstance(item, ReplyStats):
                    self.events.put(("done", session.id, item))
                else:
                    self.events.put(("delta", session.id, item))
        except Exception as e:  # noqa: BLE001 - a reply failure must not end the worker
            self.events.put(("error", session.id, str(e) if isinstance(e, QnextError) else f"{type(e).__name__}: {e}"))
        finally:
            self.generating.clear()


# ------------------------------------------------------------------------ UI
def format_indicators(stats: Optional[ReplyStats], max_context: int) -> str:
    """The status line: speed of the last reply and the context used."""
    if stats is None:
        return f"context 0 / {max_context:,}" if max_context else ""
    pct = 100.0 * stats.context_tokens / max_context if max_context else 0.0
    return (
        f"{stats.generation_tps:.1f} tok/s  |  prompt {stats.prompt_tokens} ({stats.cached_tokens} cached)  |  "
        f"context {stats.context_tokens:,} / {max_context:,} ({pct:.1f}%)"
    )


class ChatApp:
    """The window. ``worker`` is a started :class:`GenerationWorker`; ``store`` keeps the conversations."""

    POLL_MS = 30

    def __init__(self, root, worker: GenerationWorker, store: ConversationStore, settings: AppSettings):
        import tkinter as tk
        from tkinter import ttk

        self.tk, self.ttk = tk, ttk
        self.root = root
        self.worker = worker
        self.store = store
        self.settings = settings
        self.session: Optional[ChatSession] = None
        self.sessions: Dict[str, ChatSession] = {}
        self.model_name = ""
        self.max_context = 0
        self.model_ready = False
        self._think_blocks = 0
        self._stream_state: Optional[dict] = None  # the reply being streamed into the transcript

        root.title(WINDOW_TITLE)
        root.geometry("980x640")
        root.minsize(640, 400)
        self._build()
        self._refresh_list()
        if not self.store.list():
            self.new_conversation()
        else:
            self.open_conversation(self.store.list()[0][0])
        root.protocol("WM_DELETE_WINDOW", self.close)
        quit_key = "<Command-q>" if sys.platform == "darwin" else "<Control-q>"
        root.bind_all(quit_key, lambda e: self.close())
        root.bind_all("<Control-n>" if sys.platform != "darwin" else "<Command-n>", lambda e: self.new_conversation())
        root.after(self.POLL_MS, self._poll)

    # ......................................................... layout
    def _build(self) -> None:
        tk, ttk = self.tk, self.ttk
        paned = ttk.PanedWindow(self.root, orient="horizontal")
        paned.pack(fill="both", expand=True)

        left = ttk.Frame(paned, padding=6)
        ttk.Label(left, text="Conversations").pack(anchor="w")
        self.conv_list = tk.Listbox(left, activestyle="none", exportselection=False, width=28)
        self.conv_list.pack(fill="both", expand=True, pady=4)
        self.conv_list.bind("<<ListboxSelect>>", self._on_select)
        buttons = ttk.Frame(left)
        buttons.pack(fill="x")
        ttk.Button(buttons, text="New", command=self.new_conversation).pack(side="left", expand=True, fill="x")
        ttk.Button(buttons, text="Delete", command=self.delete_conversation).pack(side="left", expand=True, fill="x")
        paned.add(left, weight=1)

        right = ttk.Frame(paned, padding=6)
        # The bottom rows are packed first so that they keep their height when the
        # window is small; the transcript takes what is left.
        status = ttk.Frame(right)
        status.pack(side="bottom", fill="x", pady=(6, 0))
        self.status = ttk.Label(status, text="")
        self.status.pack(side="left")
        self.context_bar = ttk.Progressbar(status, length=160, maximum=100.0)
        self.context_bar.pack(side="right")
        ttk.Label(status, text="context used").pack(side="right", padx=6)

        entry_row = ttk.Frame(right)
        entry_row.pack(side="bottom", fill="x")
        self.entry = tk.Text(entry_row, height=3, width=20, wrap="word", font=("Helvetica", 12), undo=True)
        self.entry.pack(side="left", fill="x", expand=True)
        self.entry.bind("<Return>", self._on_return)
        col = ttk.Frame(entry_row)
        col.pack(side="left", padx=(6, 0))
        self.send_button = ttk.Button(col, text="Send", command=self.send)
        self.send_button.pack(fill="x")
        self.stop_button = ttk.Button(col, text="Stop", command=self.stop, state="disabled")
        self.stop_button.pack(fill="x", pady=(4, 0))

        top = ttk.Frame(right)
        top.pack(side="top", fill="x")
        self.model_label = ttk.Label(top, text="loading the model ...")
        self.model_label.pack(side="left")
        ttk.Button(top, text="Settings…", command=self.open_settings).pack(side="right")

        body = ttk.Frame(right)
        body.pack(side="top", fill="both", expand=True, pady=6)
        self.transcript = tk.Text(
            body,
            wrap="word",
            state="disabled",
            padx=8,
            pady=6,
            relief="flat",
            height=10,
            font=("Helvetica", 12),
            spacing1=2,
            spacing3=2,
            cursor="arrow",
        )
        scroll = ttk.Scrollbar(body, command=self.transcript.yview)
        self.transcript.configure(yscrollcommand=scroll.set)
        scroll.pack(side="right", fill="y")
        self.transcript.pack(side="left", fill="both", expand=True)
        t = self.transcript
        t.tag_configure("user_label", font=("Helvetica", 11, "bold"), foreground="#1f5fbf", spacing1=10)
        t.tag_configure("user", lmargin1=12, lmargin2=12)
        t.tag_configure("assistant_label", font=("Helvetica", 11, "bold"), foreground="#2e7d32", spacing1=10)
        t.tag_configure("assistant", lmargin1=12, lmargin2=12)
        t.tag_configure("think_header", foreground="#7a7a7a", font=("Helvetica", 10, "italic"), lmargin1=12)
        t.tag_configure("thinking", foreground="#8a8a8a", font=("Helvetica", 11, "italic"), lmargin1=24, lmargin2=24)
        t.tag_configure("error", foreground="#b00020", lmargin1=12)
        t.tag_configure("meta", foreground="#9a9a9a", font=("Helvetica", 9), lmargin1=12)

        paned.add(right, weight=4)
        self.entry.focus_set()  # typing goes to the message box

    # .................................................. conversations
    def _refresh_list(self) -> None:
        stored = self.store.list()
        titles = dict(stored)
        self._list_ids = [i for i, _ in stored]
        if self.session is not None and self.session.id not in self._list_ids:
            self._list_ids.insert(0, self.session.id)  # new, not saved yet
        self.conv_list.delete(0, "end")
        for conv_id in self._list_ids:
            s = self.sessions.get(conv_id)
            title = (s.title if s else titles.get(conv_id)) or "New conversation"
            self.conv_list.insert("end", title)
        if self.session is not None and self.session.id in self._list_ids:
            i = self._list_ids.index(self.session.id)
            self.conv_list.selection_clear(0, "end")
            self.conv_list.selection_set(i)

    def new_conversation(self) -> None:
        if self.worker.generating.is_set():
            return
        s = self.settings
        self.session = ChatSession(system=s.system or None, settings=SamplingSettings.from_dict(s.sampling.to_dict()))
        self.sessions[self.session.id] = self.session
        self._render()
        self._refresh_list()
        self._update_status(None)

    def open_conversation(self, conv_id: str) -> None:
        if self.worker.generating.is_set() or (self.session and self.session.id == conv_id):
            return
        try:
            session = self.sessions.get(conv_id) or self.store.load(conv_id)
        except QnextError as e:
            self._show_error(str(e))
            return
        self.sessions[conv_id] = session
        self.session = session
        self._render()
        self._refresh_list()
        self._update_status(session.last_stats)

    def delete_conversation(self) -> None:
        if self.worker.generating.is_set() or self.session is None:
            return
        self.store.delete(self.session.id)
        self.sessions.pop(self.session.id, None)
        self.session = None
        remaining = self.store.list()
        if remaining:
            self.open_conversation(remaining[0][0])
        else:
            self.new_conversation()
        self._refresh_list()

    def _on_select(self, event=None) -> None:
        sel = self.conv_list.curselection()
        if sel and sel[0] < len(self._list_ids):
            self.open_conversation(self._list_ids[sel[0]])

    # ...................................................... transcript
    def _insert(self, text: str, *tags) -> None:
        self.transcript.configure(state="normal")
        self.transcript.insert("end", text, tags)
        self.transcript.configure(state="disabled")
        self.transcript.see("end")

    def _render(self) -> None:
        self.transcript.configure(state="normal")
        self.transcript.delete("1.0", "end")
        self.transcript.configure(state="disabled")
        self._stream_state = None
        if self.session is None:
            return
        if self.session.system:
            self._insert(f"System: {self.session.system}\n", "meta")
        for m in self.session.messages:
            if m["role"] == "user":
                self._insert("You\n", "user_label")
                self._insert(m.get("content", "") + "\n", "user")
            elif m["role"] == "assistant":
                self._insert("Assistant\n", "assistant_label")
                if m.get("reasoning_content"):
                    tag = self._begin_thinking()
                    self._insert(m["reasoning_content"], "thinking", tag)
                    self._insert("\n", "thinking", tag)
                    self._set_thinking(tag, self.settings.thinking_expanded)
                self._insert((m.get("content") or "") + "\n", "assistant")

    def _begin_thinking(self) -> str:
        """Insert a clickable "Thinking" header; returns the tag of the body that follows."""
        self._think_blocks += 1
        tag = f"think{self._think_blocks}"
        header = f"{tag}_header"
        if self.transcript.get("end-2c") != "\n":  # thinking that starts mid-reply: own line
            self._insert("\n", "assistant")
        self._insert("▾ Thinking\n", "think_header", header)
        self.transcript.tag_bind(header, "<Button-1>", lambda e, t=tag: self.toggle_thinking(t))
        self.transcript.tag_bind(header, "<Enter>", lambda e: self.transcript.configure(cursor="hand2"))
        self.transcript.tag_bind(header, "<Leave>", lambda e: self.transcript.configure(cursor="arrow"))
        return tag

    def _set_thinking(self, tag: str, expanded: bool) -> None:
        self.transcript.tag_configure(tag, elide=not expanded)
        ranges = self.transcript.tag_ranges(f"{tag}_header")
        if ranges:
            self.transcript.configure(state="normal")
            self.transcript.delete(ranges[0], f"{ranges[0]}+1c")
            self.transcript.insert(ranges[0], "▾" if expanded else "▸", ("think_header", f"{tag}_header"))
            self.transcript.configure(state="disabled")

    def toggle_thinking(self, tag: str) -> None:
        """Show or hide one thinking section."""
        hidden = str(self.transcript.tag_cget(tag, "elide")) in ("1", "true")
        self._set_thinking(tag, hidden)

    def transcript_text(self, visible_only: bool = False) -> str:
        """The transcript's text (``visible_only``: without collapsed thinking)."""
        if not visible_only:
            return self.transcript.get("1.0", "end-1c")
        out = []
        index = "1.0"
        end = self.transcript.index("end-1c")
        while self.transcript.compare(index, "<", end):
            tags = self.transcript.tag_names(index)
            if not any(str(self.transcript.tag_cget(t, "elide")) in ("1", "true") for t in tags):
                out.append(self.transcript.get(index))
            index = self.transcript.index(f"{index}+1c")
        return "".join(out)

    # ......................................................... actions
    def _on_return(self, event):
        if event.state & 0x0001:  # Shift+Return: a new line
            return None
        self.send()
        return "break"

    def send(self) -> None:
        text = self.entry.get("1.0", "end-1c").strip()
        if not text or self.session is None or self.worker.generating.is_set():
            return
        # Sent before the model is loaded, the reply simply waits for it (the
        # worker runs its commands in order).
        self.entry.delete("1.0", "end")
        if not self.session.messages and not self.session.title:
            self.session.title = " ".join(text.split())[:60]
        self._insert("You\n", "user_label")
        self._insert(text + "\n", "user")
        self._insert("Assistant\n", "assistant_label")
        self._stream_state = {"conv": self.session.id, "think": None, "content": False}
        self.send_button.configure(state="disabled")
        self.stop_button.configure(state="normal")
        self.status.configure(text="generating ...")
        self.worker.reply(self.session, text)
        self._refresh_list()

    def stop(self) -> None:
        self.worker.stop_reply()

    def _show_error(self, message: str) -> None:
        self._insert(f"error: {message}\n", "error")

    def _update_status(self, stats: Optional[ReplyStats]) -> None:
        self.status.configure(text=format_indicators(stats, self.max_context))
        used = stats.context_tokens if stats else 0
        self.context_bar.configure(value=100.0 * used / self.max_context if self.max_context else 0)

    # ......................................................... events
    def _poll(self) -> None:
        try:
            while True:
                self._handle(self.worker.events.get_nowait())
        except queue.Empty:
            pass
        if self.root.winfo_exists():
            self.root.after(self.POLL_MS, self._poll)

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "loading":
            self.model_ready = False
            self.model_label.configure(text=f"loading {event[1]} ...")
        elif kind == "loaded":
            self.model_name, self.max_context, self.model_ready = event[1], event[2], True
            self.model_label.configure(text=f"Model: {self.model_name}")
            self._update_status(self.session.last_stats if self.session else None)
        elif kind == "load_error":
            self.model_label.configure(text="no model loaded")
            self._show_error(event[1])
        elif kind == "delta":
            self._on_delta(event[1], event[2])
        elif kind in ("done", "error"):
            conv = self.sessions.get(event[1])
            if kind == "done":
                self._on_delta(event[1], None)
                if conv is not None and conv is self.session:
                    self._update_status(event[2])
                if event[2].finish_reason == "cancelled" and conv is self.session:
                    self._insert("[stopped]\n", "meta")
            elif conv is self.session:
                self._show_error(event[2])
            if conv is not None and conv.messages:
                try:
                    self.store.save(conv)
                except QnextError as e:
                    self._show_error(str(e))
            self._stream_state = None
            self.send_button.configure(state="normal")
            self.stop_button.configure(state="disabled")
            self._refresh_list()

    def _on_delta(self, conv_id: str, delta: Optional[Delta]) -> None:
        st = self._stream_state
        if st is None or st["conv"] != conv_id or self.session is None or self.session.id != conv_id:
            return
        if delta is None:  # the reply ended
            self._insert("\n", "assistant")
            return
        if delta.kind == "reasoning":
            if st["think"] is None:
                st["think"] = self._begin_thinking()
            self._insert(delta.text, "thinking", st["think"])
        elif delta.kind == "content":
            if st["think"] is not None and not st["content"]:
                self._insert("\n", "thinking", st["think"])
                self._set_thinking(st["think"], self.settings.thinking_expanded)
            st["content"] = True
            self._insert(delta.text, "assistant")

    # ........................................................ settings
    def open_settings(self) -> None:
        SettingsDialog(self)

    def apply_settings(self, new: AppSettings) -> None:
        old_model = self.settings.model
        self.settings = new
        try:
            self.store.save_settings(new)
        except QnextError as e:
            self._show_error(str(e))
        if self.session is not None:
            self.session.settings = SamplingSettings.from_dict(new.sampling.to_dict())
            if not self.session.messages:
                self.session.system = new.system or None
                self._render()
        if new.model != old_model:
            self.worker.load(new.model)

    def close(self) -> None:
        self.worker.shutdown(timeout=10)
        self.root.destroy()


class SettingsDialog:
    """Model and sampling settings (a modal window)."""

    FIELDS = [
        ("temp", "Temperature", float),
        ("top_p", "Top p", float),
        ("top_k", "Top k", int),
        ("min_p", "Min p", float),
        ("presence_penalty", "Presence penalty", float),
        ("max_tokens", "Max tokens per reply", int),
    ]

    def __init__(self, app: ChatApp):
        tk, ttk = app.tk, app.ttk
        self.app = app
        self.win = win = tk.Toplevel(app.root)
        win.title("Settings")
        win.transient(app.root)
        frame = ttk.Frame(win, padding=12)
        frame.pack(fill="both", expand=True)
        s = app.settings
        self.vars = {}
        ttk.Label(frame, text="Model (folder or Hugging Face repo; empty: demo model)").grid(
            row=0, column=0, columnspan=2, sticky="w"
        )
        self.model_var = tk.StringVar(value=s.model or "")
        ttk.Entry(frame, textvariable=self.model_var, width=48).grid(
            row=1, column=0, columnspan=2, sticky="we", pady=(0, 8)
        )
        ttk.Label(frame, text="System message (new conversations)").grid(row=2, column=0, columnspan=2, sticky="w")
        self.system_text = tk.Text(frame, height=3, width=48, wrap="word")
        self.system_text.insert("1.0", s.system)
        self.system_text.grid(row=3, column=0, columnspan=2, sticky="we", pady=(0, 8))
        for i, (name, label, _) in enumerate(self.FIELDS, start=4):
            ttk.Label(frame, text=label).grid(row=i, column=0, sticky="w")
            var = tk.StringVar(value=str(getattr(s.sampling, name)))
            ttk.Entry(frame, textvariable=var, width=12).grid(row=i, column=1, sticky="w")
            self.vars[name] = var
        row = 4 + len(self.FIELDS)
        self.expanded_var = tk.BooleanVar(value=s.thinking_expanded)
        ttk.Checkbutton(frame, text="Show thinking expanded", variable=self.expanded_var).grid(
            row=row, column=0, columnspan=2, sticky="w", pady=4
        )
        self.error = ttk.Label(frame, text="", foreground="#b00020")
        self.error.grid(row=row + 1, column=0, columnspan=2, sticky="w")
        buttons = ttk.Frame(frame)
        buttons.grid(row=row + 2, column=0, columnspan=2, sticky="e", pady=(8, 0))
        ttk.Button(buttons, text="Cancel", command=win.destroy).pack(side="right")
        ttk.Button(buttons, text="Apply", command=self.apply).pack(side="right", padx=6)

    def apply(self) -> None:
        values = {}
        for name, label, kind in self.FIELDS:
            try:
                values[name] = kind(self.vars[name].get().strip())
            except ValueError:
                self.error.configure(text=f"{label}: not a number")
                return
        base = self.app.settings.sampling.to_dict()
        base.update(values)
        try:
            sampling = SamplingSettings.from_dict(base)
        except (TypeError, ValueError) as e:
            self.error.configure(text=str(e))
            return
        model = self.model_var.get().strip() or None
        self.app.apply_settings(
            AppSettings(
                model=model,
                system=self.system_text.get("1.0", "end-1c").strip(),
                sampling=sampling,
                thinking_expanded=self.expanded_var.get(),
            )
        )
        self.win.destroy()


# ------------------------------------------------------------------ running
def run_app(
    store: ConversationStore, settings: AppSettings, load_engine: Callable[[Optional[str]], Tuple[ChatEngine, str]]
) -> int:
    """Open the window on ``store`` with ``settings`` and run it until it is closed.

    ``load_engine(model)`` loads a model (None: the bundled demo model) on the
    generation thread and returns ``(engine, name)``. Raises :class:`QnextError`
    when this Python has no Tkinter or there is no display.
    """
    try:
        import tkinter as tk
    except ImportError:
        raise QnextError(
            "this Python has no Tkinter (python.org and Homebrew's python-tk builds have it); "
            "use python -m qnext_mlx.chat instead"
        ) from None
    try:
        root = tk.Tk(className="qnext-mlx")
    except tk.TclError as e:
        raise QnextError(f"cannot open a window ({e}); is there a display?") from None
    worker = GenerationWorker(load_engine)
    worker.start()
    worker.load(settings.model)
    app = ChatApp(root, worker, store, settings)
    try:
        root.mainloop()
    except KeyboardInterrupt:
        app.close()
    return 0
