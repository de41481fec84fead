"""The desktop app's model picker: a window listing the models of :mod:`qnext_mlx.ui.catalog`
(the demo model, the Hugging Face cache, the folders the user added) with their size,
quantization and MTP head, to switch to one (loaded in the background by the
generation thread, cancelable from the main window)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Dict, List, Optional

from .catalog import ModelInfo, format_size, hf_repo_of, list_models

__all__ = ["ModelPicker"]

COLUMNS = (("source", "Where", 150), ("size", "Size", 90), ("quantization", "Quantization", 120), ("mtp", "MTP", 60))


class ModelPicker:
    """The "Models" window of ``app`` (a :class:`~qnext_mlx.ui.desktop.ChatApp`).

    The scan runs on a short-lived thread (it reads configs and safetensors headers,
    never weights), so the window opens at once. ``infos`` maps the tree's rows to
    their :class:`ModelInfo`; ``scanned`` is set when the list is filled.
    """

    def __init__(self, app):
        tk, ttk = app.tk, app.ttk
        self.app = app
        self.infos: Dict[str, ModelInfo] = {}
        self.scanned = False
        self._result: Optional[List[ModelInfo]] = None
        self._poll_job = None
        self.win = win = tk.Toplevel(app.root)
        win.title("Models")
        win.transient(app.root)
        win.geometry("+60+60")
        win.bind("<Escape>", lambda e: self.close())
        frame = ttk.Frame(win, padding=12)
        frame.pack(fill="both", expand=True)
        ttk.Label(
            frame,
            text="The demo model, Qwen3-Next models in the Hugging Face cache, and folders you added. "
            "Nothing is downloaded.",
            wraplength=560,
        ).pack(anchor="w")
        table = ttk.Frame(frame)
        table.pack(fill="both", expand=True, pady=8)
        self.tree = ttk.Treeview(table, columns=[c for c, _, _ in COLUMNS], height=8, selectmode="browse")
        self.tree.heading("#0", text="Model", anchor="w")
        self.tree.column("#0", width=260, stretch=True)
        for name, title, width in COLUMNS:
            self.tree.heading(name, text=title, anchor="w")
            self.tree.column(name, width=width, stretch=False)
        self.tree.tag_configure("unusable", foreground="#9a9a9a")
        scroll = ttk.Scrollbar(table, command=self.tree.yview)
        self.tree.configure(yscrollcommand=scroll.set)
        scroll.pack(side="right", fill="y")
        self.tree.pack(side="left", fill="both", expand=True)
        self.tree.bind("<Double-1>", lambda e: self.load_selected())
        self.tree.bind("<Return>", lambda e: self.load_selected())
        self.tree.bind("<<TreeviewSelect>>", lambda e: self._show_selected())
        self.status = ttk.Label(frame, text="", foreground="#59636e", wraplength=560)
        self.status.pack(anchor="w")

        typed = ttk.Frame(frame)
        typed.pack(fill="x", pady=(8, 0))
        ttk.Label(typed, text="Folder or Hugging Face repo id:").pack(side="left")
        self.typed_var = tk.StringVar()
        self.typed_entry = ttk.Entry(typed, textvariable=self.typed_var)
        self.typed_entry.pack(side="left", fill="x", expand=True, padx=6)
        self.typed_entry.bind("<Return>", lambda e: self.load_typed())
        ttk.Button(typed, text="Open", command=self.load_typed).pack(side="left")

        buttons = ttk.Frame(frame)
        buttons.pack(fill="x", pady=(10, 0))
        ttk.Button(buttons, text="Add Folder…", command=self.add_folder).pack(side="left")
        self.remove_button = ttk.Button(buttons, text="Remove Folder", command=self.remove_folder, state="disabled")
        self.remove_button.pack(side="left", padx=6)
        ttk.Button(buttons, text="Refresh", command=self.refresh).pack(side="left")
        self.load_button = ttk.Button(buttons, text="Load", command=self.load_selected, state="disabled")
        self.load_button.pack(side="right")
        ttk.Button(buttons, text="Close", command=self.close).pack(side="right", padx=6)
        self.refresh()

    # ............................................................. scan
    def refresh(self) -> None:
        """Scan again (on a thread) and fill the list when done."""
        self.scanned = False
        self.status.configure(text="Looking for models …")
        folders = list(self.app.settings.model_folders)

        def scan():
            try:
                self._result = list_models(folders)
            except Exception as e:  # noqa: BLE001 - shown in the window
                self._result = []
                self._scan_error = f"{type(e).__name__}: {e}"

        self._result, self._scan_error = None, None
        threading.Thread(target=scan, name="qnext-mlx-model-scan", daemon=True).start()
        if self._poll_job is None:
            self._poll_job = self.win.after(30, self._poll_scan)

    def _poll_scan(self) -> None:
        self._poll_job = None
        if not self.win.winfo_exists():
            return
        if self._result is None:
            self._poll_job = self.win.after(30, self._poll_scan)
            return
        self.populate(self._result)
        if self._scan_error:
            self.status.configure(text=f"error: {self._scan_error}")

    def _is_current(self, info: ModelInfo) -> bool:
        current = self.app.current_model_arg
        if info.model_arg is None or current is None:
            return info.model_arg is None and current is None
        return os.path.realpath(info.model_arg) == os.path.realpath(current)

    def populate(self, infos: List[ModelInfo]) -> None:
        self.tree.delete(*self.tree.get_children())
        self.infos = {}
        selected = None
        for i, info in enumerate(infos):
            iid = f"m{i}"
            current = self._is_current(info)
            values = (
                info.source,
                format_size(info.size_bytes) if info.size_bytes else "—",
                info.quantization or "—",
                "yes" if info.has_mtp else "no",
            )
            text = ("● " if current else "   ") + info.name
            self.tree.insert("", "end", iid=iid, text=text, values=values, tags=("unusable",) if info.error else ())
            self.infos[iid] = info
            if current:
                selected = iid
        if selected:
            self.tree.selection_set(selected)
            self.tree.see(selected)
        n = len(infos)
        self.status.configure(text=f"{n} model{'s' if n != 1 else ''}" + ("" if n else ": add a folder"))
        self.scanned = True

    # .......................................................... actions
    def selected(self) -> Optional[ModelInfo]:
        sel = self.tree.selection()
        return self.infos.get(sel[0]) if sel else None

    def _show_selected(self) -> None:
        info = self.selected()
        self.load_button.configure(state="normal" if info is not None and not info.error else "disabled")
        self.remove_button.configure(state="normal" if info is not None and info.added else "disabled")
        if info is not None:
            self.status.configure(text=f"cannot be loaded: {info.error}" if info.error else str(info.path))

    def load_selected(self) -> None:
        info = self.selected()
        if info is None or info.error:
            return
        self.app.switch_model(info.model_arg, info.name)
        self.close()

    def load_typed(self) -> None:
        text = self.typed_var.get().strip()
        if not text:
            return
        self.app.switch_model(text, hf_repo_of(text) or (Path(text).name if os.path.isdir(text) else text))
        self.close()

    def add_folder(self) -> None:
        folder = self.app.ask_folder()
        if not folder:
            return
        folder = str(Path(folder).expanduser())
        if folder not in self.app.settings.model_folders:
            self.app.settings.model_folders.append(folder)
            self.app.save_settings()
        self.refresh()

    def remove_folder(self) -> None:
        info = self.selected()
        if info is None or not info.added:
            return
        if info.added in self.app.settings.model_folders:
            self.app.settings.model_folders.remove(info.added)
            self.app.save_settings()
        self.refresh()

    def close(self) -> None:
        if self._poll_job is not None:
            self.win.after_cancel(self._poll_job)
            self._poll_job = None
        if self.win.winfo_exists():
            self.win.destroy()
