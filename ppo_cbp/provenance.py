"""Which code made a run: the package version, the git commit and the library versions.

Every run's ``config.json`` and every checkpoint hold :func:`record` under ``"provenance"``
(written by :mod:`ppo_cbp.run_folder`), and a resumed run whose checkpoint was written by other
code prints :func:`resume_warning` (one line; the run is never refused for it).

A low layer: only the standard library is imported; the library versions are read from the
installed distributions' metadata, without importing the libraries.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "LIBRARIES",
    "NO_RECORD",
    "differences",
    "distribution_version",
    "git_state",
    "record",
    "resume_warning",
    "short_sha",
]

PACKAGE = "ppo_cbp"
LIBRARIES = ("torch", "numpy", "gymnasium", "mujoco")
"""The libraries whose versions :func:`record` keeps (besides Python's)."""
GIT_TIMEOUT = 5.0
"""Seconds each ``git`` call may take before the commit counts as unknown."""
SHORT = 12
"""Characters of a commit's sha in messages."""
NO_RECORD = "the checkpoint records no code version (made before provenance was recorded)"
"""What :func:`differences` says of a checkpoint without provenance."""
# Variables that point git at another repository than the folder it is run in.
_GIT_REDIRECTS = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
)


def distribution_version(name: str) -> str | None:
    """:return: the version of the installed distribution ``name`` (from its metadata, without
    importing it), or ``None`` when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(root: Path, *args: str) -> str | None:
    """``git -C root <args>``'s standard output, or ``None`` when git is missing, fails or
    takes longer than :data:`GIT_TIMEOUT` (nothing is printed then)."""
    env = {k: v for k, v in os.environ.items() if k not in _GIT_REDIRECTS}
    try:
        proc = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT,
            env=env,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """The commit and the dirty flag of the git checkout whose top folder is ``root``.

    :param root: the folder that should be a checkout's top (the package's repository root).
    :return: ``(commit, dirty)``: ``commit`` is the full sha of ``HEAD`` (``git rev-parse
        HEAD``); ``dirty`` is whether a tracked file differs from ``HEAD``, staged or not
        (``git status --porcelain --untracked-files=no`` prints anything; untracked files do
        not count). Both are ``None`` when git is missing, ``root`` is not the top of a git
        checkout (e.g. the package installed in ``site-packages`` inside some other
        repository) or ``HEAD`` has no commit; ``dirty`` alone is ``None`` when ``git status``
        fails.
    """
    root = Path(root)
    out = _git(root, "rev-parse", "--show-toplevel", "HEAD")
    lines = out.splitlines() if out else []
    if len(lines) != 2 or Path(lines[0]).resolve() != root.resolve():
        return None, None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return lines[1].strip(), None if status is None else bool(status.strip())


@functools.cache
def _record() -> dict[str, Any]:
    commit, dirty = git_state(Path(__file__).resolve().parents[1])
    versions = {"python": platform.python_version()}
    versions.update({name: distribution_version(name) for name in LIBRARIES})
    return {
        "package_version": distribution_version(PACKAGE),
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": versions,
    }


def record() -> dict[str, Any]:
    """The code that runs in this process, computed once (at the first call) and then reused.

    :return: a new dict (plain values, JSON- and ``weights_only``-loadable) with

        * ``package_version``: ``ppo_cbp``'s version as installed
          (``importlib.metadata.version("ppo_cbp")``), ``None`` when it is not installed;
        * ``git_commit``: the full sha of ``HEAD`` of the git checkout that holds this
          package's files (the folder above ``ppo_cbp/``, :func:`git_state`), ``None`` when
          that folder is not a checkout's top or git is missing;
        * ``git_dirty``: whether a tracked file of that checkout differs from ``HEAD``
          (uncommitted changes; untracked files do not count), ``None`` without a commit;
        * ``versions``: ``{"python": ..., "torch": ..., "numpy": ..., "gymnasium": ...,
          "mujoco": ...}``: Python's version (``platform.python_version()``) and each
          library's installed version (its distribution's metadata), ``None`` when one is not
          installed.
    """
    return copy.deepcopy(_record())


def short_sha(sha: str | None) -> str:
    """:return: the first :data:`SHORT` characters of ``sha``, or ``"unknown"`` for ``None``."""
    return sha[:SHORT] if sha else "unknown"


def _dirty_word(dirty: bool | None) -> str:
    return {True: "with uncommitted changes", False: "clean"}.get(dirty, "unknown")


def differences(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """What differs between the code that wrote a checkpoint and the code running now.

    :param saved: the checkpoint's ``"provenance"`` (a :func:`record`), ``None`` (or anything
        but a dict) when it has none.
    :param current: the :func:`record` of the code running now.
    :return: one phrase per difference, in this order, each ``<what> <then> -> <now>``:
        ``package version``, ``commit`` (shas cut to :data:`SHORT` characters), ``checkout``
        (``clean`` / ``with uncommitted changes``), then each of ``python``, ``torch``,
        ``numpy``, ``gymnasium``, ``mujoco`` whose version differs (``not installed`` for
        ``None``); empty when nothing differs. A checkpoint without provenance gives the one
        phrase :data:`NO_RECORD`. Two checkouts with uncommitted changes on the same commit
        count as the same code: their changes are not compared.
    """
    if not isinstance(saved, dict):
        return [NO_RECORD]
    out = []
    then, now = saved.get("package_version"), current.get("package_version")
    if then != now:
        out.append(f"package version {then or 'unknown'} -> {now or 'unknown'}")
    then, now = saved.get("git_commit"), current.get("git_commit")
    if then != now:
        out.append(f"commit {short_sha(then)} -> {short_sha(now)}")
    then, now = saved.get("git_dirty"), current.get("git_dirty")
    if then != now:
        out.append(f"checkout {_dirty_word(then)} -> {_dirty_word(now)}")
    saved_versions = saved.get("versions")
    saved_versions = saved_versions if isinstance(saved_versions, dict) else {}
    current_versions = current.get("versions") or {}
    names = ["python", *LIBRARIES]
    names += [n for n in {**saved_versions, **current_versions} if n not in names]
    for name in names:
        then, now = saved_versions.get(name), current_versions.get(name)
        if then != now:
            out.append(f"{name} {then or 'not installed'} -> {now or 'not installed'}")
    return out


def _describe(current: dict[str, Any]) -> str:
    words = [f"version {current.get('package_version') or 'unknown'}"]
    words.append(f"commit {short_sha(current.get('git_commit'))}")
    if current.get("git_dirty"):
        words.append("with uncommitted changes")
    return ", ".join(words)


def resume_warning(saved: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """The line a resumed run prints when its checkpoint was written by other code.

    :param saved: the checkpoint's ``"provenance"``, ``None`` when it has none.
    :param current: the :func:`record` of the code running now.
    :return: ``None`` when :func:`differences` finds none; else one line (no newline) that
        starts with ``warning: `` and names every difference (``commit 3fe6b1176dde ->
        0a1b2c3d4e5f; torch 2.3.0 -> 2.4.0``), or, for a checkpoint without provenance, says so
        and names the code running now.
    """
    found = differences(saved, current)
    if not found:
        return None
    if found == [NO_RECORD]:
        return (
            f"warning: resuming with code that may differ from the run's start: {NO_RECORD}; "
            f"it continues with {_describe(current)}"
        )
    return (
        "warning: resuming with other code than the checkpoint was written with: "
        + "; ".join(found)
        + " (the run continues; its results mix both)"
    )
