"""What the desktop app keeps on disk: conversations, settings, exports.

Conversations are ``<root>/conversations/<id>.json`` (:meth:`ChatSession.to_dict`),
settings ``<root>/settings.json``; ``<root>`` is :func:`app_data_dir`. Every file is
written atomically (a temp file, then a rename). Works without a display.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..serve.chat_session import ChatError, ChatSession, SamplingSettings, atomic_write_text

__all__ = [
    "APP_NAME",
    "AppSettings",
    "ConversationStore",
    "app_data_dir",
    "conversation_markdown",
    "export_file_name",
]

APP_NAME = "qnext-mlx"
_GEOMETRY = re.compile(r"^\d{2,5}x\d{2,5}([+-]-?\d{1,5}[+-]-?\d{1,5})?$")


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
    """What the app remembers (``settings.json``): the model, the settings dialog's
    values, the folders added to the model picker, the window's size and layout."""

    model: Optional[str] = None  # None: the bundled demo model
    system: str = ""
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    thinking_expanded: bool = True
    model_folders: List[str] = field(default_factory=list)
    window_geometry: str = ""  # Tk's "WxH+X+Y"; empty: the default size
    sidebar_width: int = 0  # the conversation list's width in pixels; 0: the default

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "system": self.system,
            "sampling": self.sampling.to_dict(),
            "thinking_expanded": self.thinking_expanded,
            "model_folders": list(self.model_folders),
            "window_geometry": self.window_geometry,
            "sidebar_width": self.sidebar_width,
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
        folders = data.get("model_folders")
        if isinstance(folders, list):
            out.model_folders = [f for f in folders if isinstance(f, str) and f.strip()]
        geometry = data.get("window_geometry")
        if isinstance(geometry, str) and _GEOMETRY.match(geometry):
            out.window_geometry = geometry
        width = data.get("sidebar_width")
        if isinstance(width, int) and not isinstance(width, bool) and 0 <= width <= 5000:
            out.sidebar_width = width
        return out


class ConversationStore:
    """Conversations as ``<root>/conversations/<id>.json`` (:meth:`ChatSession.to_dict`),
    settings as ``<root>/settings.json``; every file is written atomically."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.folder = self.root / "conversations"
        self._texts: Dict[str, Tuple[float, int, str]] = {}  # id -> (mtime, size, searchable text)

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

    def search(self, query: str) -> List[Tuple[str, str]]:
        """``[(id, title)]`` of the conversations whose title or messages contain every
        word of ``query`` (case-insensitive), most recently changed first."""
        words = query.lower().split()
        out = []
        for conv_id, title in self.list():
            text = self._searchable(conv_id)
            if text is not None and all(w in text for w in words):
                out.append((conv_id, title))
        return out

    def _searchable(self, conv_id: str) -> Optional[str]:
        p = self.path(conv_id)
        try:
            st = p.stat()
            cached = self._texts.get(conv_id)
            if cached and cached[:2] == (st.st_mtime, st.st_size):
                return cached[2]
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        parts = [str(data.get("title") or "")]
        for m in data.get("messages") or []:
            if isinstance(m, dict):
                parts += [str(m.get("content") or ""), str(m.get("reasoning_content") or "")]
        text = "\n".join(parts).lower()
        self._texts[conv_id] = (st.st_mtime, st.st_size, text)
        return text

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


# ------------------------------------------------------------------- export
def conversation_markdown(session: ChatSession, model: str = "", when: Optional[float] = None) -> str:
    """A conversation as a markdown document: a heading per turn, the replies' markdown
    as written, their thinking in a ``<details>`` block."""
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(when if when is not None else time.time()))
    lines = [f"# {session.title or 'Conversation'}", ""]
    lines += [f"*Exported from qnext-mlx on {stamp}" + (f", model {model}*" if model else "*"), ""]
    if session.system:
        lines += ["**System:** " + session.system, ""]
    for m in session.messages:
        role = m.get("role")
        if role == "user":
            lines += ["## You", "", str(m.get("content") or ""), ""]
        elif role == "assistant":
            lines += ["## Assistant", ""]
            if m.get("reasoning_content"):
                lines += ["<details><summary>Thinking</summary>", "", str(m["reasoning_content"]).strip(), ""]
                lines += ["</details>", ""]
            lines += [str(m.get("content") or ""), ""]
        elif role == "tool":
            lines += ["## Tool", "", "```", str(m.get("content") or ""), "```", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def export_file_name(session: ChatSession) -> str:
    """A file name for the export of ``session``: its title, made safe."""
    stem = re.sub(r"[^\w\- ]+", "", session.title or "conversation").strip().replace(" ", "-")[:60]
    return f"{stem or 'conversation'}.md"
