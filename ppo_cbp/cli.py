"""How the command lines show bad input: one line, exit code 2, no traceback.

A user's mistake (a bad value, a missing file, a clash with what is on disk) is raised by the
library as :class:`ppo_cbp.errors.UsageError` and shown as one line ``error: <message>`` on
stderr with exit code 2, before any work starts; the scripts catch only it, so any other
exception, a programming error, keeps its traceback. tyro's parse errors, which it draws as a
box, become such a line too (:func:`parse`).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from ppo_cbp.errors import UsageError

__all__ = ["UsageError", "parse", "report_error", "tyro_message"]

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
    return line.removeprefix("Error parsing ")


def parse(
    cls: type[T],
    argv: Sequence[str] | None,
    description: str | None = None,
    prog: str | None = None,
) -> T:
    """``tyro.cli(cls)`` with a parse error raised as :class:`UsageError` (the message of
    tyro's box and a pointer to ``<prog> --help``, by default the running script's) instead of
    printed as a box. ``--help`` prints and exits as usual."""
    import tyro

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            result = tyro.cli(cls, args=argv, description=description)
    except SystemExit as e:
        text = captured.getvalue()
        message = tyro_message(text) if e.code not in (0, None) else ""
        if not message:  # --help, or an error tyro drew in a way we do not read: show it as is
            sys.stderr.write(text)
            raise
        prog = prog or Path(sys.argv[0]).name or "the script"
        raise UsageError(f"{message} (see {prog} --help)") from None
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    sys.stderr.write(captured.getvalue())  # tyro's warnings, if any, on a good parse
    return result
