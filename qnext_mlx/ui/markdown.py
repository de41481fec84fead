"""Markdown for the desktop app: reply text -> styled runs of text, rendered block by block.

Parsing is markdown-it-py's (CommonMark, plus GitHub's tables and strikethrough; a
single newline is a line break, as chat replies mean it; raw HTML is shown as text).
This module knows nothing of Tk: :func:`render_markdown` turns markdown into
:class:`Span` runs whose tags name what each piece of text is (the ``md_*`` names
in :data:`BLOCK_TAGS`, :data:`INLINE_TAGS` and the layout tags below), and the
transcript (:mod:`qnext_mlx.ui.transcript`) gives the tags their fonts and colours.

Layout tags: ``md_item{n}`` on the first line of a list item at nesting level ``n``
(its marker, then a tab to the item's text), ``md_indent{n}`` on the other lines at
level ``n`` (list items and block quotes nest), ``md_gap`` on the first line of a
block (space above it).

:class:`MarkdownStream` renders a reply while it streams without re-rendering it
all on every token: blocks that later text can no longer change are rendered once,
and only the last block (the one still growing) is rendered again.
"""

from __future__ import annotations

import unicodedata
from typing import List, NamedTuple, Optional, Sequence, Tuple

from markdown_it import MarkdownIt
from markdown_it.token import Token
from markdown_it.tree import SyntaxTreeNode

__all__ = [
    "BLOCK_TAGS",
    "INLINE_TAGS",
    "MarkdownStream",
    "Span",
    "display_width",
    "markdown_parser",
    "plain_text",
    "render_markdown",
    "render_tokens",
]

BLOCK_TAGS = (
    "md_p",  # a paragraph
    "md_h1",
    "md_h2",
    "md_h3",
    "md_h4",
    "md_h5",
    "md_h6",
    "md_quote",  # text inside a block quote
    "md_bullet",  # a list item's marker ("•", "3.")
    "md_code_lang",  # a code block's header: its language
    "md_copy",  # the code block's copy button (action ("copy", code))
    "md_codeblock",  # the code itself
    "md_table",  # a table's rows (monospace, cells padded)
    "md_th",  # a table's header row
    "md_hr",  # a horizontal rule
)
INLINE_TAGS = ("md_em", "md_strong", "md_code", "md_link", "md_strike", "md_image")
BULLETS = ("•", "◦", "▪")
HR_TEXT = "─" * 32


class Span(NamedTuple):
    """A run of text with its tags; ``action``: ``("copy", code)`` or ``("link", url)``
    for text that does something when clicked."""

    text: str
    tags: Tuple[str, ...] = ()
    action: Optional[Tuple[str, str]] = None


def markdown_parser() -> MarkdownIt:
    """The parser every render uses: CommonMark + tables + strikethrough, newlines as
    line breaks, no raw HTML."""
    return MarkdownIt("commonmark", {"breaks": True, "html": False}).enable(["table", "strikethrough"])


_PARSER: Optional[MarkdownIt] = None


def _default_parser() -> MarkdownIt:
    global _PARSER
    if _PARSER is None:
        _PARSER = markdown_parser()
    return _PARSER


def display_width(text: str) -> int:
    """Columns ``text`` takes in a monospace font (wide CJK characters count 2, combining marks 0)."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def plain_text(spans: Sequence[Span]) -> str:
    return "".join(s.text for s in spans)


def normalize_newlines(text: str) -> str:
    """``\\r\\n`` and lone ``\\r`` as ``\\n`` (markdown-it counts lines that way)."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


class _Renderer:
    """One render of a token list into spans (no state survives between top-level
    blocks but what the tree holds, so blocks render the same alone or together)."""

    def __init__(self):
        self.out: List[Span] = []
        self.level = 0  # nesting of list items and block quotes
        self.marker: Optional[Tuple[str, int]] = None  # a list item's marker, for its first line
        self.gap = False  # the next line starts a block
        self.line_start = True
        self.line_tags: Tuple[str, ...] = ()
        self.context: Tuple[str, ...] = ()  # tags of everything inside (md_quote)
        self.lists = 0  # list nesting

    # ............................................................ lines
    def _begin_line(self) -> None:
        extra = ("md_gap",) if self.gap else ()
        self.gap = False
        if self.marker is not None:
            text, level = self.marker
            self.marker = None
            layout = f"md_item{level}"
            self.out.append(Span(text + "\t", ("md_bullet", layout) + extra + self.context))
            self.line_tags = (layout,)
        else:
            self.line_tags = ((f"md_indent{self.level}",) if self.level else ()) + extra
        self.line_start = False

    def emit(self, text: str, tags: Tuple[str, ...] = (), action: Optional[Tuple[str, str]] = None) -> None:
        for i, piece in enumerate(text.split("\n")):
            if i:
                self._put("\n", tags, None)
                self.line_start = True
            if piece:
                self._put(piece, tags, action)

    def _put(self, text: str, tags: Tuple[str, ...], action) -> None:
        if self.line_start:
            self._begin_line()
        self.out.append(Span(text, tags + self.context + self.line_tags, action))

    # ........................................................... blocks
    def blocks(self, nodes) -> None:
        for node in nodes:
            self.block(node)

    def block(self, node: SyntaxTreeNode) -> None:
        kind = node.type
        if kind == "paragraph":
            if not node.hidden:  # paragraphs of tight lists sit close together
                self.gap = True
            self.inline_children(node, ("md_p",))
            self.emit("\n", ("md_p",))
        elif kind == "heading":
            tag = f"md_{node.tag}"
            self.gap = True
            self.inline_children(node, (tag,))
            self.emit("\n", (tag,))
        elif kind in ("fence", "code_block"):
            self.code_block(node.content, node.info.strip().split(" ")[0] if kind == "fence" else "")
        elif kind == "blockquote":
            self.gap = True
            saved = self.context
            self.context = saved + ("md_quote",) if "md_quote" not in saved else saved
            self.level += 1
            self.blocks(node.children)
            self.level -= 1
            self.context = saved
        elif kind in ("bullet_list", "ordered_list"):
            self.list_block(node)
        elif kind == "hr":
            self.gap = True
            self.emit(HR_TEXT, ("md_hr",))
            self.emit("\n", ("md_hr",))
        elif kind == "table":
            self.table(node)
        elif kind == "html_block":  # not produced with html disabled; shown as text
            self.gap = True
            self.emit(node.content.rstrip("\n") + "\n", ("md_p",))
        elif node.children:
            self.blocks(node.children)
        elif node.content:
            self.emit(node.content.rstrip("\n") + "\n", ("md_p",))

    def code_block(self, code: str, lang: str) -> None:
        self.gap = True
        self.emit(f" {lang or 'code'} ", ("md_code_lang",))
        self.emit(" ", ("md_code_lang",))
        self.emit(" Copy ", ("md_copy",), ("copy", code))
        self.emit("\n", ("md_code_lang",))
        body = code[:-1] if code.endswith("\n") else code
        self.emit(body + "\n", ("md_codeblock",))

    def list_block(self, node: SyntaxTreeNode) -> None:
        if not self.lists:
            self.gap = True
        self.lists += 1
        ordered = node.type == "ordered_list"
        start = int(node.attrs.get("start", 1)) if ordered else 1
        for i, item in enumerate(node.children):
            self.level += 1
            marker = f"{start + i}." if ordered else BULLETS[(self.lists - 1) % len(BULLETS)]
            self.marker = (marker, self.level)
            self.blocks(item.children)
            if self.marker is not None:  # an empty item: its marker alone
                self.emit("\n")
            self.level -= 1
        self.lists -= 1

    def table(self, node: SyntaxTreeNode) -> None:
        rows: List[Tuple[bool, List[Tuple[List[Span], str]]]] = []
        for section in node.children:  # thead, tbody
            for tr in section.children:
                cells = []
                for cell in tr.children:
                    style = str(cell.attrs.get("style", ""))
                    align = style.split(":", 1)[1] if style.startswith("text-align:") else "left"
                    cells.append((self.inline_spans(cell, ()), align))
                rows.append((section.type == "thead", cells))
        if not rows:
            return
        ncols = max(len(cells) for _, cells in rows)
        widths = [0] * ncols
        for _, cells in rows:
            for j, (spans, _) in enumerate(cells):
                widths[j] = max(widths[j], display_width(plain_text(spans)))
        self.gap = True
        for header, cells in rows:
            base = ("md_table", "md_th") if header else ("md_table",)
            for j in range(ncols):
                spans, align = cells[j] if j < len(cells) else ([], "left")
                pad = widths[j] - display_width(plain_text(spans))
                left = pad if align == "right" else pad // 2 if align == "center" else 0
                self.emit((" │ " if j else " ") + " " * left, base)
                for s in spans:
                    self.emit(s.text, base + s.tags, s.action)
                self.emit(" " * (pad - left), base)
            self.emit(" \n", base)
            if header:
                self.emit("─" + "─┼─".join("─" * w for w in widths) + "─\n", ("md_table",))

    # ........................................................... inline
    def inline_children(self, node: SyntaxTreeNode, tags: Tuple[str, ...]) -> None:
        for s in self.inline_spans(node, tags):
            self.emit(s.text, s.tags, s.action)

    def inline_spans(self, node: SyntaxTreeNode, tags: Tuple[str, ...]) -> List[Span]:
        """The spans of a block's inline content (without line layout)."""
        out: List[Span] = []
        for child in node.children:
            if child.type == "inline":
                for c in child.children:
                    self._inline(c, tags, None, out)
            else:
                self._inline(child, tags, None, out)
        return out

    def _inline(self, node: SyntaxTreeNode, tags, action, out: List[Span]) -> None:
        kind = node.type
        if kind == "text":
            out.append(Span(node.content, tags, action))
        elif kind in ("softbreak", "hardbreak"):
            out.append(Span("\n", tags, None))
        elif kind == "code_inline":
            out.append(Span(node.content, tags + ("md_code",), action))
        elif kind in ("em", "strong", "s"):
            tag = {"em": "md_em", "strong": "md_strong", "s": "md_strike"}[kind]
            for c in node.children:
                self._inline(c, tags + (tag,), action, out)
        elif kind == "link":
            for c in node.children:
                self._inline(c, tags + ("md_link",), ("link", str(node.attrs.get("href", ""))), out)
        elif kind == "image":
            out.append(Span(f"[image: {node.content}]", tags + ("md_image",), ("link", str(node.attrs.get("src", "")))))
        elif node.children:
            for c in node.children:
                self._inline(c, tags, action, out)
        else:
            out.append(Span(node.content, tags, action))


def _merge(spans: List[Span]) -> List[Span]:
    """Adjacent spans with the same tags and action as one."""
    out: List[Span] = []
    for s in spans:
        if not s.text:
            continue
        if out and out[-1].tags == s.tags and out[-1].action == s.action:
            out[-1] = Span(out[-1].text + s.text, s.tags, s.action)
        else:
            out.append(s)
    return out


def render_tokens(tokens: Sequence[Token]) -> List[Span]:
    """Spans for markdown-it block tokens (whole top-level blocks)."""
    r = _Renderer()
    r.blocks(SyntaxTreeNode(list(tokens)).children)
    return _merge(r.out)


def render_markdown(text: str, parser: Optional[MarkdownIt] = None) -> List[Span]:
    """Spans for a markdown text, rendered at once. Every block ends with a newline."""
    return render_tokens((parser or _default_parser()).parse(normalize_newlines(text)))


def _line_offset(text: str, line: int) -> int:
    """Where line ``line`` (0-based) of ``text`` starts."""
    pos = 0
    for _ in range(line):
        pos = text.index("\n", pos) + 1
    return pos


class MarkdownStream:
    """Markdown that arrives piece by piece, rendered incrementally.

    :meth:`commit` renders the top-level blocks that later text cannot change any
    more (every block but the last of the complete lines: in CommonMark a block that
    a later block followed is closed for good) and returns their spans, once;
    :meth:`tail` renders what is left (the last block, still growing). A caller shows
    the committed spans and replaces the tail's on each update, so an update costs
    about the size of the last block, not of the whole reply.

    The one thing that can reach back is a link reference definition (``[x]: url``)
    written after its use; :meth:`finish` says whether the streamed render equals
    the render of the whole text at once, so the caller can render it again whole
    in that rare case.
    """

    def __init__(self, parser: Optional[MarkdownIt] = None):
        self.parser = parser or _default_parser()
        self.text = ""
        self.done = 0  # self.text[:done] is rendered for good
        self.spans: List[Span] = []  # the spans of self.text[:done]

    def feed(self, piece: str) -> None:
        self.text += piece

    def commit(self) -> List[Span]:
        """Render the blocks that can no longer change; returns their spans (only the new ones)."""
        raw = self.text[self.done :]
        if raw.endswith("\r"):  # maybe the first half of "\r\n": wait for more
            return []
        tail = normalize_newlines(raw)
        cut = tail.rfind("\n") + 1
        if cut == 0:
            return []
        tokens = self.parser.parse(tail[:cut])
        starts = [i for i, t in enumerate(tokens) if t.level == 0 and t.nesting >= 0 and t.map is not None]
        if len(starts) < 2:
            return []
        last = starts[-1]
        new = render_tokens(tokens[:last])
        self.text = self.text[: self.done] + tail
        self.done += _line_offset(tail, tokens[last].map[0])
        self.spans.extend(new)
        return new

    def tail(self) -> List[Span]:
        """Spans of the text after the committed blocks (rendered anew on each call)."""
        return render_markdown(self.text[self.done :], self.parser)

    def spans_now(self) -> List[Span]:
        """All the spans as the stream shows them: the committed ones and the tail."""
        return _merge(self.spans + self.tail())

    def finish(self) -> bool:
        """True when the streamed render (:meth:`spans_now`) equals rendering the whole
        text at once; False when the caller must render the whole text again."""
        return self.spans_now() == render_markdown(self.text, self.parser)
