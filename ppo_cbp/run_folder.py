"""A run's folder: what every training command writes and how it resumes.

Used by the PPO trainer (``ppo_cbp/train.py``) and the supervised benchmarks
(:class:`ppo_cbp.benchmarks.common.RunOutputs`) alike, so a fix lands once:

* the folder: :func:`check_writable` before any work (by creating it and writing a file in it,
  then removing both; the sweep and the plots check their output folders with it too),
  ``config.json`` written atomically with the code that runs (:func:`write_config`), every
  other file too (:func:`write_json`, :func:`write_atomic`);
* the checkpoint: :func:`save_checkpoint` (a temporary file, fsync, ``os.replace``: a crash
  leaves the old or the new checkpoint, never half of one) and :func:`load_checkpoint`
  (``weights_only=True``: it can never execute code; an empty, truncated, corrupt or foreign
  file is one :class:`~ppo_cbp.errors.UsageError` line that names the file, what it is and
  what to do);
  :func:`clone` for snapshots of a state, :func:`rng_states` / :func:`set_rng_states` for the
  Python, numpy, torch, CUDA and named generators' states;
* provenance: ``config.json`` and every checkpoint hold :func:`ppo_cbp.provenance.record`
  under ``"provenance"``; :func:`warn_other_code` prints one ``warning:`` line when a resumed
  run's checkpoint was written by other code (never a refusal);
* a new run's folder: :func:`check_name` (one folder name, never a path), :func:`check_not_foreign`
  (never a non-empty folder that is not a run folder), :func:`claim` (created exclusively; a
  default name taken by a run started in the same second gets ``-2``, ``-3``, ...),
  :func:`discard_if_empty`;
* resuming: :func:`check_settings` (a resumed run must keep its configuration: every conflict
  is named with both values, dicts key by key) and :func:`refuse_finished` (a run that already reached its end is
  left untouched: nothing rewritten, no new event file);
* :func:`open_writer`: TensorBoard's writer, with ``purge_step`` on resume so that the points a
  killed process logged after its last checkpoint are dropped instead of drawn twice;
* :class:`StopSignal`: SIGINT/SIGTERM set a flag that the loop checks at its next boundary (it
  then checkpoints and stops); a second SIGINT aborts;
* the closing summary's shared lines: :func:`units_replaced_line` and :func:`where_lines`
  (numbers as :mod:`ppo_cbp.formatting` writes them).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ppo_cbp import provenance
from ppo_cbp.errors import ALREADY_FINISHED, UsageError
from ppo_cbp.formatting import count

# torch is imported by the functions that use it: the plots check their folder with
# check_writable and would otherwise load torch (a second and a half) for nothing.
if TYPE_CHECKING:
    import torch

__all__ = [
    "CHECKPOINT_NAME",
    "StopSignal",
    "check_name",
    "check_not_foreign",
    "check_settings",
    "check_writable",
    "claim",
    "clone",
    "discard_if_empty",
    "load_checkpoint",
    "open_writer",
    "refuse_finished",
    "rng_states",
    "save_checkpoint",
    "set_rng_states",
    "units_replaced_line",
    "warn_other_code",
    "where_lines",
    "write_atomic",
    "write_config",
    "write_json",
]

CHECKPOINT_NAME = "checkpoint.pt"


# ------------------------------------------------------------------------------------------------
# files


def check_writable(folder: Path, what: str) -> None:
    """:raises UsageError: unless ``folder`` is, or can be created as, a folder that can be
    written in; the message names it as ``what`` (``--out``, ``the run folder``).

    Checked by doing it: the missing folders are created and a file is written in ``folder``,
    then both are removed again, so that a command stopping before its work leaves nothing
    behind. (``os.access`` tells root that anything is writable, ``/proc`` included.)
    """
    folder = Path(folder)
    if folder.is_file():
        raise UsageError(f"{what} {folder} is a file, not a folder")
    missing = []
    existing = folder
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what} {folder} cannot be created: {existing} is not a folder")
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        place = created[-1] if created else existing
        raise UsageError(
            f"{what} {folder} cannot be written: {place} is not writable "
            f"({e.strerror or type(e).__name__})"
        ) from None
    finally:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()


def check_name(name: str, what: str) -> None:
    """:raises UsageError: unless ``name`` is one folder name (no path separator, not ``.`` or
    ``..``): a run's folder stays inside the folder it is named in."""
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    if not name or name in (".", "..") or any(sep in name for sep in seps):
        raise UsageError(
            f"{what} {name!r} must be a folder name, without path separators or '..' "
            "(choose the parent folder with --runs-dir)"
        )


RUN_FILES = ("config.json", CHECKPOINT_NAME, "trial.log")
"""The files that make a folder one of our run folders (a run that stopped early holds at
least its ``config.json``; a sweep's trial folder its ``trial.log`` before the run starts)."""


def check_not_foreign(folder: Path, what: str, instead: str) -> None:
    """:raises UsageError: when ``folder`` exists, holds anything (hidden files aside) and none
    of :data:`RUN_FILES`: it is not a run folder, and a run would mix its files with others'.
    The message names what is there and ends with ``instead`` (what to do)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    entries = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if entries and not any(name in entries for name in RUN_FILES):
        shown = ", ".join(entries[:3]) + (f", ... ({len(entries)} entries)" * (len(entries) > 3))
        raise UsageError(
            f"{what} {folder} is not empty and is not a run folder (it holds {shown}); {instead}"
        )


def claim(parent: Path, name: str, unique: bool) -> Path:
    """Create the folder ``parent/name`` of a new run, exclusively (``mkdir(exist_ok=False)``),
    and return it: two runs never share a folder.

    ``unique`` (a default name): when the folder exists, the next free one of ``name-2``,
    ``name-3``, ... is created instead. Otherwise an existing folder is used as it is when it is
    empty or holds a run of ours that stopped before its first checkpoint (the caller has
    refused one with a checkpoint, and :func:`check_not_foreign` anything else).
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        folder = parent / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            if not unique:
                return folder
    raise UsageError(f"no free run folder name {name}-<n> in {parent}")


def discard_if_empty(folder: Path) -> None:
    """Remove ``folder`` when it is empty (a new run that stopped before writing anything)."""
    with contextlib.suppress(OSError):
        Path(folder).rmdir()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON (paths as strings, tuples as lists), written atomically."""
    write_atomic(path, json.dumps(_jsonable(data), indent=2) + "\n")


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Write a run's ``config.json``: ``config`` (not modified) plus the code that runs.

    :param path: the run folder's ``config.json``.
    :param config: the run's resolved settings.

    The file holds ``config``'s keys, then ``"provenance"``: :func:`ppo_cbp.provenance.record`
    of this process (a resumed run's file describes the code it continues with). In a folder
    that holds a checkpoint (a resumed run: a new run refuses such a folder) it also holds
    ``"started_with"``: the provenance the run began with, taken from the ``config.json`` it
    replaces (that file's ``"started_with"``, else its ``"provenance"``; ``None`` when the run
    began before provenance was recorded).
    """
    data = {k: v for k, v in config.items() if k not in ("provenance", "started_with")}
    data["provenance"] = provenance.record()
    if (path.parent / CHECKPOINT_NAME).exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            old = None
        old = old if isinstance(old, dict) else {}
        data["started_with"] = old.get("started_with", old.get("provenance"))
    write_json(path, data)


# ------------------------------------------------------------------------------------------------
# checkpoints


def clone(obj: Any) -> Any:
    """Deep copy of nested dicts/lists/tuples, cloning tensors (state snapshots)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone(v) for v in obj)
    return obj


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same directory, fsync,
    then ``os.replace`` (a crash leaves either the old or the new checkpoint, never half).

    The file holds ``state``'s keys and ``"provenance"``: :func:`ppo_cbp.provenance.record`,
    the code that wrote it (``state`` itself is not modified)."""
    import torch

    state = {**state, "provenance": provenance.record()}

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, owner: str, foreign: str, start_over: str, older: str | None = None
) -> Any:
    """The checkpoint at ``path``, loaded with ``weights_only=True`` (it can never execute code).

    :param owner: what writes such checkpoints, for the message on a foreign file
        (``"this trainer"``).
    :param foreign: what to do when the file is not a checkpoint at all, or one of Python
        objects (``"pass the checkpoint.pt of a train.py run folder ..."``).
    :param start_over: what to do when the file is damaged (and no older checkpoint is kept).
    :param older: how to resume from an older checkpoint, with ``{path}`` for its path
        (``"resume from it with --resume {path}"``); ``None``: the program cannot.
    :raises UsageError: one line that names the file, says what it is and what to do: a file
        that ``torch.save`` did not write (not a zip archive) or that holds Python objects
        (not a checkpoint of ``owner``): ``foreign``; one that cannot be read (empty,
        truncated, corrupt, no permission): ``older`` with the newest other ``*.pt`` beside it
        if there is one, else ``start_over``.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file makes torch's unpickler raise many kinds
        message = str(e)
        if "Unsupported global" in message:  # a whole, readable file of someone else's
            raise UsageError(
                f"{path} is not a checkpoint of {owner} (it holds Python objects, not only "
                f"tensors and plain values); {foreign}"
            ) from None
        if isinstance(e, OSError):
            reason = e.strerror or message
        elif path.stat().st_size == 0:
            reason = "the file is empty"
        elif not _starts_as_zip(path):
            raise UsageError(
                f"{path} is not a PyTorch checkpoint (unreadable: not a file that torch.save "
                f"writes); {foreign}"
            ) from None
        else:
            # torch's first sentence; the rest is advice about saving
            reason = (message.strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        kept = sorted(p for p in path.parent.glob("*.pt") if p.name != path.name)
        advice = older.format(path=kept[-1]) if older and kept else start_over
        raise UsageError(
            f"cannot resume: {path} is unreadable, truncated or corrupt ({reason}); {advice}"
        ) from None


def _starts_as_zip(path: Path) -> bool:
    """Whether ``path`` begins as the zip archives that ``torch.save`` writes do (a truncated
    checkpoint still does: it is damaged, not foreign)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def rng_states(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """The states of Python's, numpy's, torch's (CPU and every CUDA device) global generators
    and of ``generators``, as tensors and plain values (loadable with ``weights_only=True``)."""
    import torch

    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {k: g.get_state() for k, g in generators.items()},
    }


def set_rng_states(state: dict[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """Restore what :func:`rng_states` returned (CUDA's only where CUDA is available)."""
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])


# ------------------------------------------------------------------------------------------------
# resuming


def check_settings(path: Path, conflicts: Iterable[tuple[str, Any, Any]]) -> None:
    """:raises UsageError: naming every ``(setting, checkpoint's value, value now)`` in
    ``conflicts``, if there is any: a resumed run keeps the configuration it started with."""
    differences = [d for name, then, now in conflicts for d in _differences(name, then, now)]
    if differences:
        raise UsageError(
            f"{path} was written with a different configuration: "
            + "; ".join(
                f"{name} (checkpoint {then!r}, now {now!r})" for name, then, now in differences
            )
        )


def _differences(name: str, then: Any, now: Any) -> list[tuple[str, Any, Any]]:
    """``(name, then, now)``, or for two dicts the keys that differ (``name.key``, recursively;
    a key missing on one side shows as ``None`` there)."""
    if not (isinstance(then, dict) and isinstance(now, dict)):
        return [(name, then, now)] if then != now else []
    return [
        d
        for key in dict.fromkeys([*then, *now])
        for d in _differences(f"{name}.{key}", then.get(key), now.get(key))
    ]


def warn_other_code(state: Any) -> None:
    """Print :func:`ppo_cbp.provenance.resume_warning` to stderr (one line) when a resumed
    run's checkpoint ``state`` was written by other code than runs now, or records none.

    Called once a resume is accepted, before training continues; nothing for ``None`` (a new
    run) or when the code is the same. A warning only: the run is never refused for it."""
    if state is None:
        return
    saved = state.get("provenance") if isinstance(state, dict) else None
    line = provenance.resume_warning(saved, provenance.record())
    if line:
        print(line, file=sys.stderr, flush=True)


def refuse_finished(folder: Path, unit: str, reached: int, total: int, advice: str) -> None:
    """:raises UsageError: ``run already finished at <unit> <reached>; <advice>`` when a resumed
    run has nothing left to do (``reached >= total``), before anything in ``folder`` changes."""
    if reached >= total:
        raise UsageError(f"{folder}: {ALREADY_FINISHED} {unit} {reached}; {advice}")


def open_writer(folder: Path, resumed_at: int | None) -> Any:
    """A TensorBoard ``SummaryWriter`` on ``folder``.

    ``resumed_at``: the first step that a resumed run logs (its checkpoint's step + 1 when the
    checkpoint's own step was logged before it was written), or ``None`` for a new run. On
    resume TensorBoard's readers then discard every event at a step >= ``resumed_at`` from the
    older event files: the points a killed process logged after its last checkpoint.
    """
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder), purge_step=resumed_at)


# ------------------------------------------------------------------------------------------------
# signals


class StopSignal:
    """SIGINT/SIGTERM set ``signum``, checked by the loop at its next boundary; a second SIGINT
    aborts (``KeyboardInterrupt``). Handlers are installed only in the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        print(
            f"\n{name} received: stopping at the end of this update (SIGINT again: abort)",
            file=sys.stderr,
        )

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------------
# closing summary


def units_replaced_line(counts: Mapping[str, int], none: str) -> str:
    """``units replaced: <total> (<name> <count>, ...)`` over ``counts`` (per network or per
    seed), or ``units replaced: <none>`` when there is nothing to count."""
    if not counts:
        return f"units replaced: {none}"
    parts = ", ".join(f"{k} {count(v)}" for k, v in counts.items())
    return f"units replaced: {count(sum(counts.values()))} ({parts})"


def where_lines(folder: Path) -> list[str]:
    """The summary's last lines: the run folder and the command that draws its curves."""
    return [f"run folder: {folder}", f"curves: tensorboard --logdir {shlex.quote(str(folder))}"]
