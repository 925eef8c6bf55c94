"""Errors in what the user gave (a flag's value, an input file, an output folder).

The command lines print such an error as one ``error: <message>`` line on stderr and exit with
status 2, before any work and without leaving files behind; every other exception is a
programming error and keeps its traceback. The classes derive from the built-in exceptions that
the library raised before (``ValueError``, ``FileNotFoundError``), so callers that catch those
keep working.
"""

from __future__ import annotations

__all__ = ["ALREADY_FINISHED", "MissingFileError", "UsageError"]

ALREADY_FINISHED = "run already finished at"
"""The words of the refusal to resume a finished run (:func:`ppo_cbp.run_folder.refuse_finished`);
``scripts/sweep.py`` recognises by them a trial that finished before the sweep recorded it."""


class UsageError(ValueError):
    """A bad value, file or folder given by the user; the message says which and what to do."""


class MissingFileError(UsageError, FileNotFoundError):
    """A required input file does not exist; the message names its expected path."""
