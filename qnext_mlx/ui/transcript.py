"""The conversation as the desktop app shows it: a Tk ``Text`` widget with the messages,
replies rendered as markdown (:mod:`qnext_mlx.ui.markdown`) while they stream, the
model's thinking in sections that fold, and clickable actions (edit a message; copy,
show raw, regenerate a reply; copy a code block; open a link).

Every piece of a rendered reply carries the ``md_*`` tags of what it is, so tests
read the widget's tags to check the rendering. Tk is passed in (the widget), never
imported at module level: the module imports without a display.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..serve.reply import Delta
from .markdown import MarkdownStream, Span, render_markdown

__all__ = ["ACTION_TAGS", "Fonts", "TranscriptView"]

# The tags of the clickable actions, one per kind (the click handler gets the kind and its argument).
ACTION_TAGS = ("action_edit", "action_copy", "action_raw", "action_regenerate")
HEADING_SIZE = {"md_h1": 7, "md_h2": 5, "md_h3": 3, "md_h4": 1, "md_h5": 0, "md_h6": 0}
MONO_TAGS = ("md_code", "md_codeblock", "md_table", "md_code_lang", "raw")
INDENT = 22  # pixels per list / quote level
MARGIN = {"assistant": 12, "thinking": 26}
CODE_BG, INLINE_CODE_BG = "#f3f4f6", "#eceef1"


class Fonts:
    """The transcript's fonts, from the platform's named fonts (San Francisco and Menlo on
    a Mac): one :class:`tkinter.font.Font` per (family, size, bold, italic), made on demand."""

    def __init__(self, root):
        import tkinter.font as tkfont

        self._tkfont = tkfont
        self.root = root
        sans = tkfont.nametofont("TkDefaultFont", root=root).actual()
        mono = tkfont.nametofont("TkFixedFont", root=root).actual()
        self.sans, self.mono = sans["family"], mono["family"]
        self.size = max(11, int(abs(sans["size"])) + 1)  # points; a little larger than the UI's
        self._fonts: Dict[Tuple[str, int, bool, bool], object] = {}

    def get(self, mono: bool = False, delta: int = 0, bold: bool = False, italic: bool = False):
        key = (self.mono if mono else self.sans, self.size + delta - (1 if mono else 0), bold, italic)
        if key not in self._fonts:
            self._fonts[key] = self._tkfont.Font(
                root=self.root,
                family=key[0],
                size=key[1],
                weight="bold" if bold else "normal",
                slant="italic" if italic else "roman",
            )
        return self._fonts[key]


class TranscriptView:
    """The conversation in ``text`` (a ``tk.Text``). ``on_action(kind, arg)`` is called for
    clicks: ``("edit", i)``, ``("copy", i)``, ``("raw", i)``, ``("regenerate", i)`` with a
    message index, ``("copy_code", code)``, ``("link", url)``."""

    def __init__(self, text, fonts: Fonts, on_action: Callable[[str, object], None]):
        self.text = text
        self.fonts = fonts
        self.on_action = on_action
        self._actions = 0
        self._think_blocks = 0
        self._derived: Dict[str, str] = {}  # font / layout tag names made on demand
        self.stream: Optional[dict] = None  # the reply being streamed
        self.full_rerenders = 0  # streamed sections rendered again whole at their end (see MarkdownStream)
        self.renders = 0  # tail renders while streaming
        self._configure()

    # ........................................................... tags
    def _configure(self) -> None:
        t, f = self.text, self.fonts
        t.configure(font=f.get(), tabs=())
        t.tag_configure("user_label", font=f.get(delta=-1, bold=True), foreground="#1f5fbf", spacing1=12)
        t.tag_configure("user", lmargin1=12, lmargin2=12, spacing3=2)
        t.tag_configure("assistant_label", font=f.get(delta=-1, bold=True), foreground="#2e7d32", spacing1=12)
        t.tag_configure("assistant", lmargin1=12, lmargin2=12)
        t.tag_configure("think_header", foreground="#7a7a7a", font=f.get(delta=-2, italic=True), lmargin1=12)
        t.tag_configure("thinking", foreground="#858585", lmargin1=26, lmargin2=26)
        t.tag_configure("error", foreground="#b00020", lmargin1=12)
        t.tag_configure("meta", foreground="#9a9a9a", font=f.get(delta=-3), lmargin1=12)
        t.tag_configure("actions", foreground="#8a8f98", font=f.get(delta=-3), lmargin1=12, spacing1=2)
        t.tag_configure("action")
        t.tag_configure("search_hit", background="#fff1a8")
        # markdown. Priority is creation order: a table's rows touch (box-drawing lines join),
        # md_gap wins over that on a table's first line, headings' own spacing over md_gap.
        t.tag_configure("md_table", wrap="none", spacing1=0, spacing3=0)
        t.tag_configure("md_gap", spacing1=7)
        for tag, size in HEADING_SIZE.items():
            t.tag_configure(tag, spacing1=12 if size >= 3 else 9, spacing3=2)
        t.tag_configure("md_code", background=INLINE_CODE_BG, foreground="#9a2151")
        t.tag_configure("md_codeblock", background=CODE_BG, foreground="#1f2328")
        t.tag_configure("md_code_lang", background="#e6e8eb", foreground="#59636e")
        t.tag_configure("md_copy", background="#d9dde2", foreground="#1f5fbf", relief="raised", borderwidth=1)
        t.tag_configure("md_link", foreground="#1f5fbf", underline=True)
        t.tag_configure("md_image", foreground="#1f5fbf")
        t.tag_configure("md_strike", overstrike=True)
        t.tag_configure("md_quote", foreground="#59636e")
        t.tag_configure("md_bullet", foreground="#59636e")
        t.tag_configure("md_hr", foreground="#c3c8ce")
        t.tag_configure("raw", foreground="#3a3f45")
        for tag in ("action", "md_copy", "md_link", "md_image", "think_header"):
            t.tag_bind(tag, "<Enter>", lambda e: self.text.configure(cursor="hand2"))
            t.tag_bind(tag, "<Leave>", lambda e: self.text.configure(cursor="arrow"))

    def _font_tag(self, tags: Sequence[str]) -> Optional[str]:
        mono = any(t in MONO_TAGS for t in tags)
        heading = next((t for t in tags if t in HEADING_SIZE), None)
        bold = heading is not None or "md_strong" in tags or "md_th" in tags
        italic = "md_em" in tags or ("thinking" in tags and not mono and heading is None)
        delta = HEADING_SIZE[heading] if heading else -2 if "md_copy" in tags else 0
        if not (mono or bold or italic or delta):
            return None
        name = f"font_{int(mono)}{int(bold)}{int(italic)}_{delta}"
        if name not in self._derived:
            self.text.tag_configure(name, font=self.fonts.get(mono=mono, delta=delta, bold=bold, italic=italic))
            self._derived[name] = name
        return name

    def _layout_tag(self, tag: str, base: int) -> str:
        name = f"layout_{base}_{tag}"
        if name not in self._derived:
            if tag.startswith("md_item"):
                n = int(tag[len("md_item") :])
                stop = base + n * INDENT
                self.text.tag_configure(name, lmargin1=base + (n - 1) * INDENT, lmargin2=stop, tabs=(stop,))
            else:
                n = int(tag[len("md_indent") :])
                self.text.tag_configure(name, lmargin1=base + n * INDENT, lmargin2=base + n * INDENT)
            self._derived[name] = name
        return name

    def _action_tag(self, kind: str, arg) -> str:
        self._actions += 1
        name = f"act{self._actions}"
        self.text.tag_bind(name, "<Button-1>", lambda e, k=kind, a=arg: self.on_action(k, a))
        return name

    # ......................................................... insert
    def _insert_args(self, spans: Sequence[Span], base: Tuple[str, ...]) -> List[object]:
        margin = next((MARGIN[b] for b in base if b in MARGIN), 12)
        args: List[object] = []
        for s in spans:
            tags = list(base) + list(s.tags)
            for t in s.tags:
                if t.startswith(("md_item", "md_indent")):
                    tags.append(self._layout_tag(t, margin))
            font = self._font_tag(tags)
            if font:
                tags.append(font)
            if s.action is not None:
                kind = "copy_code" if s.action[0] == "copy" else s.action[0]
                tags.append(self._action_tag(kind, s.action[1]))
            args += [s.text, tuple(tags)]
        return args

    def insert_spans(self, spans: Sequence[Span], base: Tuple[str, ...] = ("assistant",)) -> None:
        """Append ``spans`` with the section tags ``base`` (e.g. ``("assistant",)``)."""
        args = self._insert_args(spans, base)
        if args:
            self._edit(lambda: self.text.insert("end-1c", *args))

    def insert(self, text: str, *tags) -> None:
        self._edit(lambda: self.text.insert("end-1c", text, tags))

    def _edit(self, fn) -> None:
        self.text.configure(state="normal")
        try:
            fn()
        finally:
            self.text.configure(state="disabled")

    def clear(self) -> None:
        self._edit(lambda: self.text.delete("1.0", "end"))
        self.stream = None

    def see_end(self) -> None:
        self.text.see("end")

    # ....................................................... messages
    def add_system(self, text: str) -> None:
        self.insert(f"System: {text}\n", "meta")

    def add_user(self, index: int, text: str) -> None:
        self.insert("You", "user_label")
        self.insert("   ", "user_label")
        self.insert("Edit", "user_label", "actions", "action", "action_edit", self._action_tag("edit", index))
        self.insert("\n", "user_label")
        self.insert(text + "\n", "user")

    def add_assistant(
        self, index: int, message: dict, raw: bool = False, expanded: bool = True, last: bool = False
    ) -> None:
        """A finished reply: its thinking (folded unless ``expanded``), its answer as
        markdown (``raw``: as written), and its action line."""
        self.insert("Assistant\n", "assistant_label")
        reasoning = message.get("reasoning_content")
        if reasoning:
            tag = self._begin_thinking()
            self._insert_section(reasoning, ("thinking", tag), raw)
            self.set_thinking(tag, expanded)
        self._insert_section(message.get("content") or "", ("assistant",), raw)
        self.add_reply_actions(index, raw, last)

    def _insert_section(self, text: str, base: Tuple[str, ...], raw: bool) -> None:
        if raw:
            body = text if text.endswith("\n") else text + "\n"
            font = self._font_tag(base + ("raw",))
            self.insert(body, *base, "raw", *((font,) if font else ()))
        elif text:
            self.insert_spans(render_markdown(text), base)

    def add_reply_actions(self, index: int, raw: bool, last: bool) -> None:
        """The line under a reply: Copy · Raw (or Rendered) · Regenerate (on the last one)."""
        self.remove_regenerate()
        self.insert("Copy", "actions", "action", "action_copy", self._action_tag("copy", index))
        self.insert("  ·  ", "actions")
        self.insert("Rendered" if raw else "Raw", "actions", "action", "action_raw", self._action_tag("raw", index))
        if last:
            self.insert("  ·  ", "actions", "regenerate_part")
            tag = self._action_tag("regenerate", index)
            self.insert("Regenerate", "actions", "action", "action_regenerate", "regenerate_part", tag)
        self.insert("\n", "actions")

    def remove_regenerate(self) -> None:
        """Take the Regenerate action off the reply that had it (only the last reply has one)."""
        ranges = self.text.tag_ranges("regenerate_part")
        if ranges:

            def delete():
                for i in range(len(ranges) - 2, -1, -2):  # from the end: earlier indices stay valid
                    self.text.delete(ranges[i], ranges[i + 1])

            self._edit(delete)

    def show_error(self, message: str) -> None:
        self.insert(f"error: {message}\n", "error")

    # ....................................................... thinking
    def _begin_thinking(self) -> str:
        """Insert a clickable "Thinking" header; returns the tag of the body that follows."""
        self._think_blocks += 1
        tag = f"think{self._think_blocks}"
        header = f"{tag}_header"
        if self.text.get("end-2c") != "\n":  # thinking that starts mid-reply: own line
            self.insert("\n", "assistant")
        self.insert("▾ Thinking\n", "think_header", header)
        self.text.tag_bind(header, "<Button-1>", lambda e, t=tag: self.toggle_thinking(t))
        return tag

    def set_thinking(self, tag: str, expanded: bool) -> None:
        self.text.tag_configure(tag, elide=not expanded)
        ranges = self.text.tag_ranges(f"{tag}_header")
        if ranges:

            def flip():
                self.text.delete(ranges[0], f"{ranges[0]}+1c")
                self.text.insert(ranges[0], "▾" if expanded else "▸", ("think_header", f"{tag}_header"))

            self._edit(flip)

    def toggle_thinking(self, tag: str) -> None:
        """Show or hide one thinking section."""
        hidden = str(self.text.tag_cget(tag, "elide")) in ("1", "true")
        self.set_thinking(tag, hidden)

    # ...................................................... streaming
    def begin_reply(self, expanded: bool) -> None:
        """Start the reply being streamed (after the user message)."""
        self.insert("Assistant\n", "assistant_label")
        self.stream = {"kind": None, "md": None, "base": None, "think": None, "expanded": expanded, "dirty": False}

    def feed(self, delta: Delta) -> None:
        """Add a piece of the streamed reply (shown at the next :meth:`flush`)."""
        st = self.stream
        if st is None or delta.kind not in ("reasoning", "content") or not delta.text:
            return
        if st["kind"] != delta.kind:
            self._end_section()
            if delta.kind == "reasoning":
                st["think"] = self._begin_thinking()
                st["base"] = ("thinking", st["think"])
            else:
                st["base"] = ("assistant",)
            st["kind"], st["md"] = delta.kind, MarkdownStream()
            self.text.mark_set("section_start", "end-1c")
            self.text.mark_gravity("section_start", "left")
            self.text.mark_set("tail_start", "end-1c")
            self.text.mark_gravity("tail_start", "left")
        st["md"].feed(delta.text)
        st["dirty"] = True

    def flush(self) -> None:
        """Show what was fed: render the blocks that became final once, and the last one again."""
        st = self.stream
        if st is None or not st["dirty"]:
            return
        st["dirty"] = False
        md: MarkdownStream = st["md"]
        done = self._insert_args(md.commit(), st["base"])
        tail = self._insert_args(md.tail(), st["base"])

        def update():
            self.text.delete("tail_start", "end-1c")
            if done:
                self.text.insert("end-1c", *done)
            self.text.mark_set("tail_start", "end-1c")
            if tail:
                self.text.insert("end-1c", *tail)

        self._edit(update)
        self.renders += 1

    def _end_section(self) -> None:
        st = self.stream
        if st is None or st["md"] is None:
            return
        st["dirty"] = True
        self.flush()
        md: MarkdownStream = st["md"]
        if not md.finish():  # a reference link defined after its use: render the section whole
            self.full_rerenders += 1
            args = self._insert_args(render_markdown(md.text), st["base"])

            def whole():
                self.text.delete("section_start", "end-1c")
                self.text.insert("end-1c", *args)

            self._edit(whole)
        if st["kind"] == "reasoning":
            self.set_thinking(st["think"], st["expanded"])
        st["md"] = None

    def end_reply(self, index: Optional[int]) -> None:
        """The streamed reply ended; ``index``: its message index (None: it was not kept)."""
        if self.stream is None:
            return
        self._end_section()
        self.stream = None
        if index is not None:
            self.add_reply_actions(index, raw=False, last=True)

    # ........................................................ reading
    def text_of(self, visible_only: bool = False) -> str:
        """The transcript's text (``visible_only``: without folded thinking)."""
        t = self.text
        if not visible_only:
            return t.get("1.0", "end-1c")
        hidden = [tag for tag in t.tag_names() if str(t.tag_cget(tag, "elide")) in ("1", "true")]
        if not hidden:
            return t.get("1.0", "end-1c")
        out, index, end = [], "1.0", t.index("end-1c")
        while t.compare(index, "<", end):
            if not set(t.tag_names(index)) & set(hidden):
                out.append(t.get(index))
            index = t.index(f"{index}+1c")
        return "".join(out)

    def highlight(self, query: str) -> int:
        """Mark every occurrence of ``query``'s words (case-insensitive); returns how many."""
        import tkinter as tk

        t = self.text
        t.tag_remove("search_hit", "1.0", "end")
        found = 0
        for word in query.split():
            count = tk.IntVar(master=t)
            index = "1.0"
            while True:
                index = t.search(word, index, stopindex="end", nocase=True, count=count)
                if not index or not count.get():
                    break
                t.tag_add("search_hit", index, f"{index}+{count.get()}c")
                index = f"{index}+{count.get()}c"
                found += 1
        if found:
            t.see(t.tag_ranges("search_hit")[0])
        return found
