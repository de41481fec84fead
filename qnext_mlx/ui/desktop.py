"""Desktop chat app (Tkinter, which ships with Python on macOS: nothing to install);
its command line is :mod:`qnext_mlx.app`.

A window with a searchable conversation list, replies rendered as markdown while they
stream (:mod:`~qnext_mlx.ui.transcript`), the model's thinking in sections that fold,
a model picker (:mod:`~qnext_mlx.ui.picker`) that loads in the background and can be
cancelled, editing a message and regenerating from there, regenerating the last
reply, Stop, copying a reply or a code block, export to markdown, and the speed,
context used and prompt-cache reuse under the conversation.

The parts below the window work without a display (and are tested that way):
:mod:`~qnext_mlx.ui.store` (app folder, settings, conversations, export),
:mod:`~qnext_mlx.ui.worker` (the thread that owns the model),
:mod:`~qnext_mlx.ui.catalog` (the models on disk) and :mod:`~qnext_mlx.ui.markdown`.
"""

from __future__ import annotations

import queue
import re
import sys
import time
import webbrowser
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import QnextError
from ..serve.chat_session import ChatSession, ReplyStats, SamplingSettings, atomic_write_text
from .picker import ModelPicker
from .store import (
    APP_NAME,
    AppSettings,
    ConversationStore,
    app_data_dir,
    conversation_markdown,
    export_file_name,
)
from .transcript import Fonts, TranscriptView
from .worker import GenerationWorker, LoadEngine

__all__ = [
    "APP_NAME",
    "AppSettings",
    "ChatApp",
    "ConversationStore",
    "GenerationWorker",
    "SettingsDialog",
    "WINDOW_TITLE",
    "app_data_dir",
    "apply_theme",
    "format_indicators",
    "run_app",
]

WINDOW_TITLE = "qnext-mlx chat"
DEFAULT_GEOMETRY = "980x640"
MAC = sys.platform == "darwin"
MOD = "Command" if MAC else "Control"  # the shortcut modifier: ⌘ on a Mac, Ctrl elsewhere
MOD_LABEL = "⌘" if MAC else "Ctrl+"


def format_indicators(stats: Optional[ReplyStats], max_context: int) -> str:
    """The status line: speed of the last reply, prompt-cache reuse and the context used."""
    if stats is None:
        return f"context 0 / {max_context:,}" if max_context else ""
    pct = 100.0 * stats.context_tokens / max_context if max_context else 0.0
    return (
        f"{stats.generation_tps:.1f} tok/s  |  prompt {stats.prompt_tokens} ({stats.cached_tokens} cached)  |  "
        f"context {stats.context_tokens:,} / {max_context:,} ({pct:.1f}%)"
    )


def apply_theme(root) -> str:
    """The platform's native ttk theme: aqua on macOS, vista on Windows, clam elsewhere
    (Tk's "default" looks dated); returns the theme in use."""
    from tkinter import ttk

    style = ttk.Style(root)
    wanted = "aqua" if MAC else "vista" if sys.platform.startswith("win") else "clam"
    if wanted in style.theme_names():
        style.theme_use(wanted)
    return style.theme_use()


def _title_of(text: str) -> str:
    return " ".join(text.split())[:60]


class ChatApp:
    """The window. ``worker`` is a started :class:`GenerationWorker`; ``store`` keeps the
    conversations; ``settings`` are saved in it when they change and when the window closes.

    Dialogs that ask the user something go through :attr:`ask_export_path`,
    :attr:`ask_folder` and :attr:`open_url`, which a test may replace.
    """

    POLL_MS = 30
    RENDER_MS = 50  # the streamed reply's last block is rendered again at most this often

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
        self.conversation_ids: List[str] = []  # the list's rows
        self.model_name = ""
        self.max_context = 0
        self.model_ready = False
        self.current_model_arg: Optional[str] = settings.model  # what the loaded model was loaded from
        self.editing: Optional[int] = None  # the index of the message being edited
        self.raw: set = set()  # (conversation id, message index) of replies shown as written
        self.search_query = ""
        self.picker: Optional[ModelPicker] = None
        # Every load ends with one loaded / load_error / load_cancelled event, in the order
        # asked: the n-th such event answers the worker's load number n.
        self._load_requests: Dict[int, Tuple[Optional[str], str]] = {}
        self._loads_answered = 0
        self._cancelled_through = 0  # loads up to this number were cancelled here
        self._last_flush = 0.0
        self._note_job = None
        self.ask_export_path = self._ask_export_path
        self.ask_folder = self._ask_folder
        self.open_url = webbrowser.open
        self.theme = apply_theme(root)

        root.title(WINDOW_TITLE)
        root.geometry(self._initial_geometry())
        root.minsize(640, 400)
        self.fonts = Fonts(root)
        self._build()
        self._refresh_list()
        stored = self.store.list()
        if stored:
            self.open_conversation(stored[0][0])
        else:
            self.new_conversation()
        self._bind_keys()
        root.protocol("WM_DELETE_WINDOW", self.close)
        if MAC:
            root.createcommand("tk::mac::Quit", self.close)  # the application menu's Quit
        self._sidebar_job = root.after(50, lambda: self._restore_sidebar(settings.sidebar_width))
        self._poll_job = root.after(self.POLL_MS, self._poll)

    # ......................................................... layout
    def _initial_geometry(self) -> str:
        """The remembered size, and position when it is on this screen (a display may be gone)."""
        m = re.match(r"^(\d+x\d+)(?:\+(\d+)\+(\d+))?", self.settings.window_geometry)
        if not m:
            return DEFAULT_GEOMETRY
        if m.group(2) is None:
            return m.group(1)
        x, y = int(m.group(2)), int(m.group(3))
        if x < self.root.winfo_screenwidth() - 80 and y < self.root.winfo_screenheight() - 80:
            return m.group(0)
        return m.group(1)

    def _restore_sidebar(self, width: int) -> None:
        self._sidebar_job = None
        if width:
            try:
                self.paned.sashpos(0, width)
            except self.tk.TclError:
                pass

    def _build(self) -> None:
        tk, ttk = self.tk, self.ttk
        self._build_menu()
        self.paned = paned = ttk.PanedWindow(self.root, orient="horizontal")
        paned.pack(fill="both", expand=True)

        left = ttk.Frame(paned, padding=6)
        ttk.Label(left, text="Conversations").pack(anchor="w")
        self.search_var = tk.StringVar()
        self.search_entry = ttk.Entry(left, textvariable=self.search_var)
        self.search_entry.pack(fill="x", pady=(4, 0))
        self.search_var.trace_add("write", lambda *a: self._on_search())
        self.conv_list = tk.Listbox(left, activestyle="none", exportselection=False, width=28, relief="flat")
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
        # packed first, kept whole when the row is short: the bar and its label
        self.context_bar = ttk.Progressbar(status, length=140, maximum=100.0)
        self.context_bar.pack(side="right")
        ttk.Label(status, text="context").pack(side="right", padx=6)
        self.status = ttk.Label(status, text="")
        self.status.pack(side="left")
        self.note = ttk.Label(status, text="", foreground="#59636e")
        self.note.pack(side="left", padx=12)

        self.entry_row = entry_row = ttk.Frame(right)
        entry_row.pack(side="bottom", fill="x")
        self.entry = tk.Text(entry_row, height=3, width=20, wrap="word", font=self.fonts.get(), undo=True)
        self.entry.pack(side="left", fill="x", expand=True)
        self.entry.bind("<Return>", self._on_return)
        self.entry.bind(f"<{MOD}-Return>", lambda e: self._send_key())
        col = ttk.Frame(entry_row)
        col.pack(side="left", padx=(6, 0))
        self.send_button = ttk.Button(col, text="Send", command=self.send)
        self.send_button.pack(fill="x")
        self.stop_button = ttk.Button(col, text="Stop", command=self.stop, state="disabled")
        self.stop_button.pack(fill="x", pady=(4, 0))

        self.edit_banner = ttk.Frame(right)
        ttk.Label(
            self.edit_banner, text="Editing a message: Send replaces it and regenerates from there (Esc cancels)"
        ).pack(side="left")
        ttk.Button(self.edit_banner, text="Cancel", command=self.cancel_edit).pack(side="right")

        self.top_bar = top = ttk.Frame(right)
        top.pack(side="top", fill="x")
        ttk.Button(top, text="Settings…", command=self.open_settings).pack(side="right")
        ttk.Button(top, text="Export…", command=self.export_conversation).pack(side="right", padx=6)
        self.models_button = ttk.Button(top, text="Models…", command=self.open_model_picker)
        self.models_button.pack(side="right", padx=(0, 6))
        self.model_label = ttk.Label(top, text="loading the model ...")
        self.model_label.pack(side="left")
        # shown under the top bar while a model loads
        self.load_row = ttk.Frame(right)
        self.load_progress = ttk.Progressbar(self.load_row, mode="indeterminate", length=240)
        self.load_progress.pack(side="left")
        self.cancel_load_button = ttk.Button(self.load_row, text="Cancel", command=self.cancel_load)
        self.cancel_load_button.pack(side="left", padx=(8, 0))

        self.body = body = ttk.Frame(right)
        body.pack(side="top", fill="both", expand=True, pady=6)
        self.transcript = tk.Text(
            body,
            wrap="word",
            state="disabled",
            padx=10,
            pady=6,
            relief="flat",
            height=10,
            spacing1=1,
            spacing3=1,
            cursor="arrow",
            background="white",
            highlightthickness=0,
        )
        scroll = ttk.Scrollbar(body, command=self.transcript.yview)
        self.transcript.configure(yscrollcommand=scroll.set)
        scroll.pack(side="right", fill="y")
        self.transcript.pack(side="left", fill="both", expand=True)
        self.view = TranscriptView(self.transcript, self.fonts, self._on_action)

        paned.add(right, weight=4)
        self.entry.focus_set()  # typing goes to the message box

    def _build_menu(self) -> None:
        tk = self.tk
        bar = tk.Menu(self.root)
        file = tk.Menu(bar, tearoff=False)
        file.add_command(label="New Conversation", accelerator=f"{MOD_LABEL}N", command=self.new_conversation)
        file.add_command(label="Export as Markdown…", accelerator=f"{MOD_LABEL}E", command=self.export_conversation)
        file.add_command(label="Find Conversations", accelerator=f"{MOD_LABEL}F", command=self.focus_search)
        if not MAC:  # the application menu has Quit on a Mac
            file.add_separator()
            file.add_command(label="Quit", accelerator=f"{MOD_LABEL}Q", command=self.close)
        bar.add_cascade(label="File", menu=file)
        chat = tk.Menu(bar, tearoff=False)
        chat.add_command(label="Send", accelerator=f"{MOD_LABEL}Return", command=self.send)
        chat.add_command(label="Stop", accelerator="Esc", command=self.stop)
        chat.add_command(label="Regenerate Last Reply", accelerator=f"{MOD_LABEL}R", command=self.regenerate_last)
        chat.add_command(label="Edit Last Message", command=self.edit_last)
        bar.add_cascade(label="Chat", menu=chat)
        model = tk.Menu(bar, tearoff=False)
        model.add_command(label="Choose Model…", command=self.open_model_picker)
        model.add_command(label="Settings…", accelerator=f"{MOD_LABEL}," if MAC else "", command=self.open_settings)
        bar.add_cascade(label="Model", menu=model)
        self.root.configure(menu=bar)
        self.menu = bar

    def _bind_keys(self) -> None:
        r = self.root
        r.bind_all(f"<{MOD}-q>", lambda e: self.close())
        r.bind_all(f"<{MOD}-n>", lambda e: self.new_conversation())
        r.bind_all(f"<{MOD}-f>", lambda e: self.focus_search())
        r.bind_all(f"<{MOD}-e>", lambda e: self.export_conversation())
        r.bind_all(f"<{MOD}-r>", lambda e: self.regenerate_last())
        r.bind_all("<Escape>", lambda e: self.escape())
        if MAC:
            r.bind_all("<Command-comma>", lambda e: self.open_settings())

    # .................................................. conversations
    def _refresh_list(self) -> None:
        query = self.search_query
        stored = self.store.search(query) if query else self.store.list()
        titles = dict(stored)
        self.conversation_ids = [i for i, _ in stored]
        if self.session is not None and self.session.id not in titles and not query:
            self.conversation_ids.insert(0, self.session.id)  # new, not saved yet
        self.conv_list.delete(0, "end")
        for conv_id in self.conversation_ids:
            s = self.sessions.get(conv_id)
            title = (s.title if s else titles.get(conv_id)) or "New conversation"
            self.conv_list.insert("end", title)
        if self.session is not None and self.session.id in self.conversation_ids:
            i = self.conversation_ids.index(self.session.id)
            self.conv_list.selection_clear(0, "end")
            self.conv_list.selection_set(i)

    def new_conversation(self) -> None:
        if self.worker.generating.is_set():
            return
        s = self.settings
        self.session = ChatSession(system=s.system or None, settings=SamplingSettings.from_dict(s.sampling.to_dict()))
        self.sessions[self.session.id] = self.session
        self.cancel_edit()
        self._render()
        self._refresh_list()
        self._update_status(None)
        self.entry.focus_set()

    def open_conversation(self, conv_id: str) -> None:
        if self.worker.generating.is_set() or (self.session and self.session.id == conv_id):
            return
        try:
            session = self.sessions.get(conv_id) or self.store.load(conv_id)
        except QnextError as e:
            self.view.show_error(str(e))
            return
        self.sessions[conv_id] = session
        self.session = session
        self.cancel_edit()
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
        if sel and sel[0] < len(self.conversation_ids):
            self.open_conversation(self.conversation_ids[sel[0]])

    def _on_search(self) -> None:
        self.search_query = self.search_var.get().strip()
        self._refresh_list()
        self.view.highlight(self.search_query)

    def focus_search(self) -> None:
        self.search_entry.focus_set()
        self.search_entry.select_range(0, "end")

    # ...................................................... transcript
    @property
    def streaming(self) -> bool:
        """A reply is being streamed into the transcript."""
        return self.view.stream is not None

    def _render(self, upto: Optional[int] = None, keep_view: bool = False) -> None:
        """Show the conversation (its first ``upto`` messages)."""
        y = self.transcript.yview()[0]
        self.view.clear()
        if self.session is None:
            return
        if self.session.system:
            self.view.add_system(self.session.system)
        messages = self.session.messages[:upto] if upto is not None else self.session.messages
        for i, m in enumerate(messages):
            if m["role"] == "user":
                self.view.add_user(i, str(m.get("content") or ""))
            elif m["role"] == "assistant":
                raw = (self.session.id, i) in self.raw
                last = i == len(messages) - 1
                self.view.add_assistant(i, m, raw=raw, expanded=self.settings.thinking_expanded, last=last)
        if self.search_query:
            self.view.highlight(self.search_query)
        if keep_view:
            self.transcript.yview_moveto(y)
        else:
            self.view.see_end()

    def toggle_thinking(self, tag: str) -> None:
        """Show or hide one thinking section."""
        self.view.toggle_thinking(tag)

    def transcript_text(self, visible_only: bool = False) -> str:
        """The transcript's text (``visible_only``: without collapsed thinking)."""
        return self.view.text_of(visible_only)

    def _on_action(self, kind: str, arg) -> None:
        if kind == "copy_code":
            self.copy_to_clipboard(str(arg), "code copied")
        elif kind == "link":
            if arg:
                self.open_url(str(arg))
        elif kind == "copy":
            self.copy_reply(int(arg))
        elif kind == "raw":
            self.toggle_raw(int(arg))
        elif kind == "edit":
            self.begin_edit(int(arg))
        elif kind == "regenerate":
            self.regenerate(int(arg))

    # ......................................................... actions
    def _on_return(self, event):
        if event.state & 0x0001:  # Shift+Return: a new line
            return None
        self.send()
        return "break"

    def _send_key(self):
        self.send()
        return "break"

    def send(self) -> None:
        """Send the message box's text (when editing a message: replace it and regenerate from there)."""
        text = self.entry.get("1.0", "end-1c").strip()
        if not text or self.session is None or self.worker.generating.is_set():
            return
        # Sent before the model is loaded, the reply simply waits for it (the worker
        # runs its commands in order).
        truncate_to = self.editing
        if truncate_to is not None and truncate_to > len(self.session.messages):
            truncate_to = None
        self.cancel_edit()
        self.entry.delete("1.0", "end")
        self._start_reply(text, truncate_to)

    def _start_reply(self, text: str, truncate_to: Optional[int]) -> None:
        s = self.session
        if truncate_to is not None:
            if truncate_to == 0 and s.messages and s.title == _title_of(str(s.messages[0].get("content") or "")):
                s.title = _title_of(text)  # the title came from the message being replaced
            self.raw = {(c, i) for c, i in self.raw if c != s.id or i < truncate_to}
            self._render(upto=truncate_to)
            index = truncate_to
        else:
            index = len(s.messages)
        if not s.messages and not s.title:
            s.title = _title_of(text)
        self.view.add_user(index, text)
        self.view.begin_reply(self.settings.thinking_expanded)
        self.view.see_end()
        self.send_button.configure(state="disabled")
        self.stop_button.configure(state="normal")
        self.status.configure(text="generating ...")
        self.worker.reply(s, text, truncate_to)
        self._refresh_list()

    def stop(self) -> None:
        self.worker.stop_reply()

    def escape(self) -> None:
        """Esc: stop the reply; else stop editing; else cancel the model being loaded."""
        if self.worker.generating.is_set():
            self.stop()
        elif self.editing is not None:
            self.cancel_edit()
        elif self.loading:
            self.cancel_load()

    def _last_index(self, role: str) -> Optional[int]:
        if self.session is None:
            return None
        for i in range(len(self.session.messages) - 1, -1, -1):
            if self.session.messages[i].get("role") == role:
                return i
        return None

    def regenerate(self, index: int) -> None:
        """Generate the reply at ``index`` again (the messages after it go)."""
        if self.session is None or self.worker.generating.is_set():
            return
        msgs = self.session.messages
        user = next((i for i in range(min(index, len(msgs)) - 1, -1, -1) if msgs[i].get("role") == "user"), None)
        if user is None:
            return
        self.cancel_edit()
        self._start_reply(str(msgs[user].get("content") or ""), user)

    def regenerate_last(self) -> None:
        last = self._last_index("assistant")
        if last is not None and last == len(self.session.messages) - 1:
            self.regenerate(last)

    def begin_edit(self, index: int) -> None:
        """Put message ``index`` in the message box; Send replaces it and regenerates from there."""
        if self.session is None or self.worker.generating.is_set() or index >= len(self.session.messages):
            return
        self.editing = index
        self.entry.delete("1.0", "end")
        self.entry.insert("1.0", str(self.session.messages[index].get("content") or ""))
        self.edit_banner.pack(side="bottom", fill="x", pady=(0, 4), after=self.entry_row)
        self.entry.focus_set()

    def edit_last(self) -> None:
        last = self._last_index("user")
        if last is not None:
            self.begin_edit(last)

    def cancel_edit(self) -> None:
        if self.editing is not None:
            self.editing = None
            self.entry.delete("1.0", "end")
        self.edit_banner.pack_forget()

    def copy_to_clipboard(self, text: str, note: str) -> None:
        self.root.clipboard_clear()
        self.root.clipboard_append(text)
        self.show_note(note)

    def copy_reply(self, index: int) -> None:
        """Copy reply ``index`` as written (markdown)."""
        if self.session is not None and index < len(self.session.messages):
            self.copy_to_clipboard(str(self.session.messages[index].get("content") or ""), "reply copied")

    def toggle_raw(self, index: int) -> None:
        """Show reply ``index`` as written, or rendered again."""
        if self.session is None or self.worker.generating.is_set():
            return
        key = (self.session.id, index)
        self.raw.symmetric_difference_update({key})
        self._render(keep_view=True)

    def export_conversation(self, path: Optional[str] = None) -> Optional[Path]:
        """Write the conversation as markdown to ``path`` (None: ask where); returns the file."""
        if self.session is None or not self.session.messages:
            self.show_note("nothing to export yet")
            return None
        path = path or self.ask_export_path(export_file_name(self.session))
        if not path:
            return None
        try:
            atomic_write_text(path, conversation_markdown(self.session, self.model_name))
        except QnextError as e:
            self.view.show_error(str(e))
            return None
        self.show_note(f"exported to {Path(path).name}")
        return Path(path)

    def _ask_export_path(self, name: str) -> str:
        from tkinter import filedialog

        return filedialog.asksaveasfilename(
            parent=self.root,
            title="Export conversation",
            initialfile=name,
            defaultextension=".md",
            filetypes=[("Markdown", "*.md"), ("All files", "*")],
        )

    def _ask_folder(self) -> str:
        from tkinter import filedialog

        return filedialog.askdirectory(parent=self.root, title="Add a folder of models", mustexist=True)

    def show_note(self, text: str, ms: int = 4000) -> None:
        """A passing message in the status row (copied, exported, ...)."""
        self.note.configure(text=text)
        if self._note_job is not None:
            self.root.after_cancel(self._note_job)
        self._note_job = self.root.after(ms, lambda: self.note.configure(text=""))

    def _update_status(self, stats: Optional[ReplyStats]) -> None:
        self.status.configure(text=format_indicators(stats, self.max_context))
        used = stats.context_tokens if stats else 0
        self.context_bar.configure(value=100.0 * used / self.max_context if self.max_context else 0)

    # ........................................................... models
    def open_model_picker(self) -> ModelPicker:
        if self.picker is not None and self.picker.win.winfo_exists():
            self.picker.win.lift()
            return self.picker
        self.picker = ModelPicker(self)
        return self.picker

    def switch_model(self, model_arg: Optional[str], name: str) -> None:
        """Load ``model_arg`` (None: the demo model) on the generation thread; the current
        model answers until it is loaded, and stays when the load fails or is cancelled."""
        n = self.worker.load(model_arg)
        self._load_requests[n] = (model_arg, name)
        self._show_loading(name)

    def cancel_load(self) -> None:
        """Cancel the model being loaded: the one loaded before stays."""
        self._cancelled_through = self.worker.loads_requested
        self.worker.cancel_load()
        self._hide_loading()
        if self.worker.engine is not None:
            self.model_ready = True
            self.model_label.configure(text=f"Model: {self.model_name}")
        else:
            self.model_label.configure(text="no model loaded")
        self.show_note("loading cancelled")

    @property
    def pending_loads(self) -> int:
        """Loads asked for in this window that the generation thread has not answered yet."""
        return len(self._load_requests)

    @property
    def loading(self) -> bool:
        """The loading bar is showing."""
        return bool(self.load_row.winfo_manager())

    def _show_loading(self, name: str) -> None:
        self.model_ready = False
        self.model_label.configure(text=f"Loading {name} …")
        if not self.loading:
            self.load_row.pack(side="top", fill="x", pady=(6, 0), after=self.top_bar)
            self.load_progress.start(15)

    def _hide_loading(self) -> None:
        self.load_progress.stop()
        self.load_row.pack_forget()

    def _load_answered(self) -> Optional[Tuple[Optional[str], str]]:
        self._loads_answered += 1
        return self._load_requests.pop(self._loads_answered, None)

    def save_settings(self) -> None:
        try:
            self.store.save_settings(self.settings)
        except QnextError as e:
            self.view.show_error(str(e))

    # ......................................................... events
    def _poll(self) -> None:
        try:
            while True:
                self._handle(self.worker.events.get_nowait())
        except queue.Empty:
            pass
        now = time.monotonic()
        if self.view.stream is not None and now - self._last_flush >= self.RENDER_MS / 1000:
            self._last_flush = now
            at_end = self.transcript.yview()[1] >= 0.999
            self.view.flush()
            if at_end:
                self.view.see_end()
        if self.root.winfo_exists():
            self._poll_job = self.root.after(self.POLL_MS, self._poll)

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "loading":
            n = self._loads_answered + 1  # the load starting now
            if n <= self._cancelled_through:
                return  # cancelled in the window already; it ends with load_cancelled
            pending = self._load_requests.get(n)
            self._show_loading(pending[1] if pending else event[1])
        elif kind == "loaded":
            request = self._load_answered()
            self.model_name, self.max_context, self.model_ready = (request[1] if request else event[1]), event[2], True
            if request is not None:
                self.current_model_arg = self.settings.model = request[0]
                self.save_settings()
            if not self._load_requests:
                self._hide_loading()
            self.model_label.configure(text=f"Model: {self.model_name}")
            self._update_status(self.session.last_stats if self.session else None)
        elif kind in ("load_error", "load_cancelled"):
            request = self._load_answered()
            if kind == "load_error":
                what = f"could not load {request[1]}: " if request else ""
                self.view.show_error(what + event[1])
            if self._load_requests:
                return  # another load is on its way
            self._hide_loading()
            if self.worker.engine is not None:  # the model loaded before stays
                self.model_ready = True
                self.model_label.configure(text=f"Model: {self.model_name}")
            else:
                self.model_label.configure(text="no model loaded")
        elif kind == "delta":
            conv = self.sessions.get(event[1])
            if conv is not None and conv is self.session:
                self.view.feed(event[2])
        elif kind in ("done", "error"):
            self._reply_ended(kind, event)

    def _reply_ended(self, kind: str, event: tuple) -> None:
        conv = self.sessions.get(event[1])
        if conv is not None and conv is self.session:
            if kind == "done":
                kept = bool(conv.messages) and conv.messages[-1].get("role") == "assistant"
                self.view.end_reply(len(conv.messages) - 1 if kept else None)
                self._update_status(event[2])
                if event[2].finish_reason == "cancelled":
                    self.view.insert("[stopped]\n", "meta")
            else:  # the conversation as the session has it now (an edit that failed is undone)
                self._render()
                self.view.show_error(event[2])
            if self.search_query:
                self.view.highlight(self.search_query)
            self.view.see_end()
        if conv is not None and conv.messages:
            try:
                self.store.save(conv)
            except QnextError as e:
                self.view.show_error(str(e))
        self.view.stream = None
        self.send_button.configure(state="normal")
        self.stop_button.configure(state="disabled")
        self._refresh_list()

    # ........................................................ settings
    def open_settings(self) -> "SettingsDialog":
        return SettingsDialog(self)

    def apply_settings(self, new: AppSettings) -> None:
        old_model = self.settings.model
        self.settings = new
        self.save_settings()
        if self.session is not None:
            self.session.settings = SamplingSettings.from_dict(new.sampling.to_dict())
            if not self.session.messages:
                self.session.system = new.system or None
                self._render()
        if new.model != old_model:
            self.switch_model(new.model, new.model or "demo model")

    def close(self) -> None:
        """Quit: remember the window's size and layout, end the generation thread."""
        try:
            self.settings.window_geometry = self.root.geometry()
            self.settings.sidebar_width = int(self.paned.sashpos(0))
            self.store.save_settings(self.settings)
        except (QnextError, self.tk.TclError, ValueError) as e:
            print(f"warning: settings not saved: {e}", file=sys.stderr)
        self.worker.shutdown(timeout=10)
        if self.picker is not None:
            self.picker.close()
        for job in (self._poll_job, self._note_job, self._sidebar_job):  # none may fire once the window is gone
            if job is not None:
                self.root.after_cancel(job)
        self.root.destroy()


class SettingsDialog:
    """Sampling settings, the system message and how thinking is shown (a modal window)."""

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
        win.bind("<Escape>", lambda e: win.destroy())
        frame = ttk.Frame(win, padding=12)
        frame.pack(fill="both", expand=True)
        s = app.settings
        self.vars = {}
        ttk.Label(frame, text="System message (new conversations)").grid(row=0, column=0, columnspan=2, sticky="w")
        self.system_text = tk.Text(frame, height=3, width=48, wrap="word")
        self.system_text.insert("1.0", s.system)
        self.system_text.grid(row=1, column=0, columnspan=2, sticky="we", pady=(0, 8))
        for i, (name, label, _) in enumerate(self.FIELDS, start=2):
            ttk.Label(frame, text=label).grid(row=i, column=0, sticky="w")
            var = tk.StringVar(value=str(getattr(s.sampling, name)))
            ttk.Entry(frame, textvariable=var, width=12).grid(row=i, column=1, sticky="w")
            self.vars[name] = var
        row = 2 + len(self.FIELDS)
        self.expanded_var = tk.BooleanVar(value=s.thinking_expanded)
        ttk.Checkbutton(frame, text="Show thinking expanded", variable=self.expanded_var).grid(
            row=row, column=0, columnspan=2, sticky="w", pady=4
        )
        ttk.Label(frame, text="The model: Models… in the main window", foreground="#59636e").grid(
            row=row + 1, column=0, columnspan=2, sticky="w"
        )
        self.error = ttk.Label(frame, text="", foreground="#b00020")
        self.error.grid(row=row + 2, column=0, columnspan=2, sticky="w")
        buttons = ttk.Frame(frame)
        buttons.grid(row=row + 3, column=0, columnspan=2, sticky="e", pady=(8, 0))
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
        self.app.apply_settings(
            replace(
                self.app.settings,
                system=self.system_text.get("1.0", "end-1c").strip(),
                sampling=sampling,
                thinking_expanded=self.expanded_var.get(),
            )
        )
        self.win.destroy()


# ------------------------------------------------------------------ running
def run_app(store: ConversationStore, settings: AppSettings, load_engine: LoadEngine) -> int:
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
