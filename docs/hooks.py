"""mkdocs hook: the flag tables of the command pages, generated from the real argparse parser.

A line ``<!-- flags: train classify -->`` (any command path; ``dinotune`` alone for the global
options) becomes a Markdown table ``flag | value | default | help`` of that parser's options,
grouped by the parser's argument groups when it has several. ``<!-- flags: sweep classify :: sweep
options -->`` keeps the named group only. The help texts end with ``(default: X)``: that part goes to
the default column. An unknown command or group fails the build, so a page cannot drift from the CLI.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARKER = re.compile(r"^<!-- flags:(?P<spec>[^>]*?)-->[ \t]*$", re.MULTILINE)
DEFAULT = re.compile(r"\s*\(default: (?P<default>[^()]*(?:\([^()]*\)[^()]*)*)\)\s*$")
_ESCAPES = str.maketrans({"\\": "\\\\", "`": "\\`", "*": "\\*", "_": "\\_", "[": "\\[", "]": "\\]",
                          "|": "\\|", "<": "&lt;", ">": "&gt;", "&": "&amp;", "#": "\\#"})


def escape(text: str) -> str:
    """Plain text as one Markdown table cell: no emphasis, no HTML, no cell break, no line break;
    text between a pair of backticks stays a code span."""
    parts = " ".join(str(text).split()).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: all of it is plain text
        return "`".join(parts).translate(_ESCAPES)
    return "".join(code(part) if i % 2 else part.translate(_ESCAPES) for i, part in enumerate(parts))


def code(text: str) -> str:
    """A code span for a table cell (pipes inside code spans do not split Python-Markdown's cells)."""
    text = " ".join(str(text).split())
    ticks = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def split_default(help_text: str) -> tuple[str, str]:
    """``"learning rate (default: 0.001)"`` -> ``("learning rate", "0.001")``; no default -> ``(text, "")``."""
    text = (help_text or "").replace("%%", "%")
    match = DEFAULT.search(text)
    if not match:
        return text.strip(), ""
    return text[:match.start()].strip(), match.group("default").strip()


def looks_like_value(default: str) -> bool:
    """A default to show as code (``0.001``, ``'lora'``, ``[1, 2, 3]``), not words (``the official one``)."""
    if not default or len(default) > 60:
        return False
    return " " not in default or (default[0] in "[{(" and default[-1] in "]})")


@functools.cache
def _root_parser() -> argparse.ArgumentParser:
    from dinotune.cli.parser import build_parser

    return build_parser()


def find_parser(path: str | list[str]) -> argparse.ArgumentParser:
    """The parser of a command path (``"train classify"``, ``"eval"``, ``"data download"``, ``"dinotune"``)."""
    words = path.split() if isinstance(path, str) else list(path)
    if words and words[0] == "dinotune":
        words = words[1:]
    parser = _root_parser()
    walked = ["dinotune"]
    for word in words:
        subs = parser._subparsers._group_actions[0].choices if parser._subparsers else {}
        if word not in subs:
            raise ValueError(f"flags marker: {' '.join(walked)} has no command {word!r} "
                             f"(it has: {', '.join(subs) or 'none'})")
        parser = subs[word]
        walked.append(word)
    return parser


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:  # a switch
        return ""
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        values = " \\| ".join(code(c) for c in action.choices)
    elif not action.option_strings:  # an operand: its name says it
        return ""
    elif action.metavar is not None:
        values = code(action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar))
    else:
        values = code(action.dest.rsplit(".", 1)[-1].upper())
    if action.nargs in ("+", "*"):
        values += " ..."
    return values


def _name(action: argparse.Action) -> str:
    if action.option_strings:
        return ", ".join(code(s) for s in action.option_strings)
    name = code(action.metavar if isinstance(action.metavar, str) else action.dest.upper())
    return name + (" ..." if action.nargs in ("+", "*") else "")


def rows(parser: argparse.ArgumentParser) -> list[tuple[str, list[argparse.Action]]]:
    """(group title, documented actions) per argument group, in the parser's order; the help
    action, hidden (``SUPPRESS``) options and sub-command choosers are left out."""
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.help != argparse.SUPPRESS and not isinstance(a, (argparse._HelpAction,
                                                                          argparse._SubParsersAction))]
        if actions:
            out.append((group.title or "", actions))
    return out


def flag_table(path: str, group: str | None = None) -> str:
    """The Markdown table(s) of a command's flags."""
    parser = find_parser(path)
    groups = rows(parser)
    if group is not None:
        groups = [(title, actions) for title, actions in groups if title == group]
        if not groups:
            raise ValueError(f"flags marker: {path!r} has no group {group!r} "
                             f"(it has: {', '.join(t for t, _ in rows(parser))})")
    if not groups:
        return f"`dinotune {path}` takes no options."
    blocks = []
    for title, actions in groups:
        lines = ["| flag | value | default | help |", "|---|---|---|---|"]
        for action in actions:
            text, default = split_default(action.help or "")
            shown = code(default) if looks_like_value(default) else escape(default)
            lines.append(f"| {_name(action)} | {_value(action)} | {shown} | {escape(text)} |")
        table = "\n".join(lines)
        blocks.append(f"**{escape(title)}**\n\n{table}" if len(groups) > 1 else table)
    return "\n\n".join(blocks)


def render(markdown: str) -> str:
    """Every flags marker of a page replaced by its table."""
    def replace(match: re.Match) -> str:
        spec = match.group("spec").strip()
        path, _, group = spec.partition("::")
        return flag_table(path.strip(), group.strip() or None)

    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    try:
        return render(markdown)
    except ValueError as exc:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{page.file.src_uri}: {exc}") from exc
