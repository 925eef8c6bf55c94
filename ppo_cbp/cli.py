"""How the command lines show bad input and their help.

A user's mistake (a bad value, a missing file, a clash with what is on disk) is raised by the
library as :class:`ppo_cbp.errors.UsageError` and shown as one line ``error: <message>`` on
stderr with exit code 2, before any work starts; the scripts catch only it, so any other
exception, a programming error, keeps its traceback. tyro's parse errors, which it draws as a
box, become such a line too (:func:`parse`).

``--help`` starts with the script's docstring as a reader of the terminal wants it
(:func:`help_description`): no reStructuredText markup, paragraphs wrapped to the terminal's
width, commands line for line; :func:`parse` puts it there, and wraps a usage line that is too
long.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import shutil
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from ppo_cbp.errors import UsageError

__all__ = ["UsageError", "help_description", "help_width", "parse", "report_error", "tyro_message"]

T = TypeVar("T")

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BORDER = "│╭╮╰╯─┃━┏┓┗┛ "


def report_error(error: BaseException) -> int:
    """Print ``error: <message>`` (one line) to stderr and return the exit code 2."""
    message = " ".join(str(error).split())
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def tyro_message(text: str) -> str:
    """The first paragraph of a tyro error box, as one line (empty if there is none).

    tyro draws a parse error as a box: a title row, the message (wrapped over rows), then a
    rule and the argument's help. Where it cannot draw boxes (its output not a terminal, as
    under pytest) the title is followed by a rule of ``-``, then the message and a rule. The
    message is the text between the title (and its rule) and the next rule, joined;
    ``Error parsing X:`` becomes ``X:``.
    """
    rows = [_ANSI.sub("", r).strip(_BORDER) for r in text.splitlines()]
    if len(rows) < 2:
        return ""
    message: list[str] = []
    for row in rows[1:]:
        rule = bool(row.strip()) and not row.strip("─━- ")
        if (rule or not row.strip()) and message:
            break
        if not rule:
            message.append(row.strip())
    line = " ".join(" ".join(message).split())
    # an optional number's message names tyro's internals: say what was expected instead
    line = _OPTIONAL.sub(
        lambda m: f"expected {_KINDS.get(m[1], m[1].lower())} (or None), got {m[2]}", line
    )
    return line.removeprefix("Error parsing ")


_OPTIONAL = re.compile(r"no type matching \{None\}\|(\w+) could be instantiated from \[(.*?)\]")
_KINDS = {"FLOAT": "a number", "INT": "an integer"}


def help_width() -> int:
    """The columns ``--help`` text is wrapped to: the terminal's (``$COLUMNS`` if set), at most
    100 (longer lines are hard to read)."""
    return min(shutil.get_terminal_size().columns, 100)


_LIST_ITEM = re.compile(r"(\d+\.|[-*]) ")


def help_description(doc: str, width: int | None = None) -> str:
    """A docstring as ``--help`` shows it: reStructuredText markup dropped (````code````,
    ``:role:`target``` and ``~``-shortened targets, a closing ``::``), each paragraph and list
    item wrapped to ``width`` columns (default :func:`help_width`), indented blocks (commands)
    kept line for line."""
    width = width or help_width()
    text = inspect.cleandoc(doc)
    text = re.sub(r":[a-z]+:`~([^`]+)`", lambda m: m[1].rsplit(".", 1)[-1], text)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)
    text = re.sub(r"``(.+?)``", r"\1", text, flags=re.S)
    text = re.sub(r"\s*::$", ":", text, flags=re.M)
    blocks = []
    for paragraph in re.split(r"\n[ \t]*\n", text):
        if paragraph[:1].isspace():  # a literal block
            blocks.append(paragraph)
            continue
        items = re.split(r"\n(?=(?:\d+\.|[-*]) )", paragraph)
        wrapped = []
        for item in items:
            marker = _LIST_ITEM.match(item)
            indent = " " * (len(marker[0]) if marker else 0)
            wrapped.append(
                textwrap.fill(
                    " ".join(item.split()),
                    width,
                    subsequent_indent=indent,
                    break_long_words=False,
                    break_on_hyphens=False,
                )
            )
        blocks.append("\n".join(wrapped))
    return "\n\n".join(blocks)


# What tyro is given as the description: it joins a description's lines into paragraphs
# without wrapping them again, so the wrapped text replaces this in the printed help.
_DESCRIPTION = "@@description@@"


class _Captured(io.StringIO):
    """Captured output that passes for ``stream``: a terminal when it is one (tyro colours help
    then), with its encoding (tyro draws boxes in UTF-8 only)."""

    def __init__(self, stream: object) -> None:
        super().__init__()
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._encoding = getattr(stream, "encoding", None)

    def isatty(self) -> bool:
        return self._tty

    @property
    def encoding(self) -> str | None:  # type: ignore[override]
        return self._encoding


def _shown(text: str, description: str | None, width: int) -> str:
    """tyro's help ``text`` with ``description`` in its place and a long usage line wrapped."""
    if description is not None:
        text = text.replace(_DESCRIPTION, description)
    lines = []
    for line in text.split("\n"):
        plain = _ANSI.sub("", line)  # a wrapped usage line loses its colours
        if plain.startswith("usage: ") and len(plain) > width:
            line = textwrap.fill(
                plain,
                width,
                subsequent_indent=" " * len("usage: "),
                break_long_words=False,
                break_on_hyphens=False,
            )
        lines.append(line)
    return "\n".join(lines)


def parse(
    cls: type[T],
    argv: Sequence[str] | None,
    description: str | None = None,
    prog: str | None = None,
) -> T:
    """``tyro.cli(cls)`` with a parse error raised as :class:`UsageError` (the message of
    tyro's box and a pointer to ``<prog> --help``, by default the running script's) instead of
    printed as a box. ``--help`` prints and exits as usual, with ``description`` (a docstring)
    as :func:`help_description` renders it.
    """
    import tyro

    width = help_width()
    shown = None if description is None else help_description(description, width)
    out, err = _Captured(sys.stdout), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            result = tyro.cli(cls, args=argv, description=None if shown is None else _DESCRIPTION)
    except SystemExit as e:
        sys.stdout.write(_shown(out.getvalue(), shown, width))
        text = _shown(err.getvalue(), shown, width)
        message = tyro_message(text) if e.code not in (0, None) else ""
        if not message:  # --help, or an error tyro drew in a way we do not read: show it as is
            sys.stderr.write(text)
            raise
        prog = prog or Path(sys.argv[0]).name or "the script"
        raise UsageError(f"{message} (see {prog} --help)") from None
    except BaseException:
        sys.stdout.write(out.getvalue())
        sys.stderr.write(err.getvalue())
        raise
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())  # tyro's warnings, if any, on a good parse
    return result
