"""A griffe extension for the API reference: show the plain-text docstrings as written.

marginflow's docstrings are plain text with formulas (`||w||_2`, `h_inf^{-1/2}`,
`a * log t`, `<w, x>`), read in a terminal as often as on the site. Rendered as Markdown,
underscores and stars would turn into emphasis and `<w, x>` into an HTML tag. Before
griffe parses a docstring this extension

- escapes `_`, `*` and `<` outside code spans, doctest lines and fenced blocks;
- turns an indented block under a line of running text (an aligned formula) into a code
  block, so its layout is kept, and starts a list where a line starts with "- ";
- retitles prose "Raises:" sections ("NotSeparatedError (a ValueError) if ...") as
  "Errors:", which griffe renders as a titled note; its Google parser would otherwise
  drop such lines, since they are not `Name: description` items.
"""

from __future__ import annotations

import re

import griffe

_ITEM = re.compile(r"^[A-Za-z_][\w.]*\s*:")
# "name:", "a, b:", "name (type):" at the start of a section item: kept as written.
_ITEM_HEAD = re.compile(
    r"^(\s*[A-Za-z_][\w.]*(?:\s*,\s*[A-Za-z_][\w.]*)*(?:\s*\([^)]*\))?:)(\s.*|)$"
)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_SECTIONS = {
    "args", "arguments", "params", "parameters", "keyword args", "keyword arguments",
    "other parameters", "returns", "return", "yields", "yield", "receives", "raises",
    "exceptions", "errors", "warns", "warnings", "attributes", "functions", "methods",
    "classes", "modules", "example", "examples", "note", "notes", "warning", "see also",
    "references", "todo",
}
_ITEM_SECTIONS = {
    "args", "arguments", "params", "parameters", "keyword args", "keyword arguments",
    "other parameters", "returns", "return", "yields", "yield", "receives", "raises",
    "exceptions", "warns", "warnings", "attributes",
}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _escape(text: str) -> str:
    out, last = [], 0
    for match in _CODE_SPAN.finditer(text):
        out.append(_escape_plain(text[last : match.start()]))
        out.append(match.group(0))
        last = match.end()
    out.append(_escape_plain(text[last:]))
    return "".join(out)


def _escape_plain(text: str) -> str:
    return text.replace("\\", "\\\\").replace("_", "\\_").replace("*", "\\*").replace("<", "&lt;")


def retitle_prose_raises(lines: list[str]) -> list[str]:
    lines = list(lines)
    for i, line in enumerate(lines):
        if line.strip() not in ("Raises:", "Exceptions:"):
            continue
        indent = _indent(line)
        block = []
        for following in lines[i + 1 :]:
            if following.strip() and _indent(following) <= indent:
                break
            block.append(following)
        items = [b for b in block if b.strip()]
        if not items:
            continue
        item_indent = min(_indent(b) for b in items)
        firsts = [b.strip() for b in items if _indent(b) == item_indent]
        if not all(_ITEM.match(f) for f in firsts):
            lines[i] = " " * indent + "Errors:"
    return lines


def rewrite(text: str) -> str:
    lines = retitle_prose_raises(text.split("\n"))
    out: list[str] = []
    section = None  # the title of the section we are in (lower case), or None
    fenced = False
    previous = ""  # the previous non-blank line, after rewriting
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            out.append(line)
            continue
        if fenced or not stripped:
            out.append(line)
            continue
        indent = _indent(line)
        if indent == 0:
            title = stripped[:-1].lower() if stripped.endswith(":") else None
            section = title if title in _SECTIONS else None
            if section is not None:
                out.append(line)
                previous = line
                continue
        if stripped.startswith((">>>", "...")) or section in ("example", "examples"):
            out.append(line)
            previous = line
            continue
        if (
            section is None
            and indent >= 4
            and previous.strip()
            and _indent(previous) == 0
            and out
            and out[-1].strip()
        ):
            # An aligned formula under running text: a code block keeps its layout.
            out.append("")
        if (
            section is None
            and indent == 0
            and stripped.startswith("- ")
            and out
            and out[-1].strip()
            and _indent(out[-1]) == 0
            and not out[-1].lstrip().startswith("- ")
        ):
            out.append("")  # a list needs a blank line before it in Markdown
        if section is None and indent >= 4:
            out.append(line)  # inside a code block: nothing to escape
            previous = line
            continue
        head = _ITEM_HEAD.match(line) if section in _ITEM_SECTIONS else None
        if head:
            line = head.group(1) + _escape(head.group(2))
        else:
            line = " " * indent + _escape(stripped)
        out.append(line)
        previous = line
    return "\n".join(out)


class PlainDocstrings(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
