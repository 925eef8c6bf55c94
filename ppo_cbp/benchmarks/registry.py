"""The supervised benchmarks by subcommand name: each one's configuration class and run, the
tyro union of the configurations, and the parser of a ``scripts/supervised.py`` command line.

``scripts/supervised.py`` (the command) and :mod:`ppo_cbp.sweep` (which checks a sweep's
commands before starting them) both read command lines with :func:`parse`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Union

import tyro

from ppo_cbp import cli, run_folder
from ppo_cbp.benchmarks.continual_imagenet import ContinualImageNetConfig, run_continual_imagenet
from ppo_cbp.benchmarks.incremental_cifar import IncrementalCIFARConfig, run_incremental_cifar
from ppo_cbp.benchmarks.permuted_mnist import PermutedMNISTConfig, run_permuted_mnist
from ppo_cbp.benchmarks.scr import SCRConfig, run_scr
from ppo_cbp.errors import UsageError

BENCHMARKS: dict[str, tuple[type, Callable[..., dict[str, Any]]]] = {
    "permuted-mnist": (PermutedMNISTConfig, run_permuted_mnist),
    "slowly-changing-regression": (SCRConfig, run_scr),
    "continual-imagenet": (ContinualImageNetConfig, run_continual_imagenet),
    "incremental-cifar": (IncrementalCIFARConfig, run_incremental_cifar),
}
"""The subcommands: each benchmark's configuration and run."""

# tyro reads the subcommands from the Union
Config = Union[  # noqa: UP007
    tuple(Annotated[cls, tyro.conf.subcommand(name)] for name, (cls, _) in BENCHMARKS.items())
]
"""The configuration of any benchmark, its subcommand name choosing which."""

RUNS: dict[type, Callable[..., dict[str, Any]]] = dict(BENCHMARKS.values())
"""Each configuration class's run (it returns the run's summary)."""


def parse(
    args: Sequence[str] | None = None,
    description: str | None = None,
    prog: str | None = None,
) -> Any:
    """The configuration of a command line.

    :param args: the words after the program's name (by default ``sys.argv[1:]``), the
        subcommand first.
    :param description: the docstring that ``--help`` shows above the flags.
    :param prog: the program's name in a parse error's pointer to ``--help`` (by default the
        running script's).
    :return: the chosen benchmark's configuration (an instance of one of :data:`BENCHMARKS`'
        classes).
    :raises UsageError: of one line, for a value that does not parse, or a benchmark that is
        not one of :data:`BENCHMARKS`.
    """
    args = sys.argv[1:] if args is None else list(args)
    choices = f"choose one of: {', '.join(BENCHMARKS)}"
    if args and not args[0].startswith("-") and args[0] not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {args[0]!r}; {choices}")
    if not any(a in BENCHMARKS or a in ("-h", "--help") for a in args):
        raise UsageError(f"no benchmark given; {choices}")
    return cli.parse(Config, args, description=description, prog=prog)


_OWN = {"resume", "out", "progress", "device"}
"""Flags that a resume never takes from the checkpoint."""


def given_flags(args: Sequence[str]) -> set[str]:
    """The field names a command line sets (``--name``, ``--name=v``, ``--no-name``), as
    :func:`ppo_cbp.ppo.settings.given_fields` reads ``train.py``'s."""
    names = set()
    for word in args:
        if word.startswith("--"):
            name = word[2:].split("=", 1)[0].replace("-", "_")
            names |= {name, name.removeprefix("no_")}
    return names


def with_checkpoint_settings(cfg: Any, args: Sequence[str]) -> Any:
    """For ``--resume``: ``cfg`` with every setting not given in ``args`` taken from the
    ``config.json`` of the run in ``cfg.out`` (as ``train.py --resume`` takes its settings from
    the checkpoint). Unchanged when ``cfg.resume`` is off or ``--out`` holds no run (the run
    then says so)."""
    path = Path(cfg.out) / "config.json"
    if not cfg.resume or not (Path(cfg.out) / run_folder.CHECKPOINT_NAME).exists():
        return cfg
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return cfg  # the checkpoint's own check names what is wrong
    given = given_flags(args)

    def fill(obj: Any, values: dict[str, Any]) -> Any:
        changes = {}
        for f in dataclasses.fields(obj):
            nested = dataclasses.is_dataclass(getattr(obj, f.name))
            if f.name in _OWN or (f.name in given and not nested) or f.name not in values:
                continue
            now, then = getattr(obj, f.name), values[f.name]
            if dataclasses.is_dataclass(now) and isinstance(then, dict):
                changes[f.name] = fill(now, then)  # its flags are top-level: --method, --lr
            elif isinstance(then, list) and isinstance(now, tuple):  # JSON has no tuples
                changes[f.name] = tuple(then)
            elif isinstance(then, str) and ("Path" in str(f.type) or isinstance(now, Path)):
                changes[f.name] = Path(then)
            else:
                changes[f.name] = then
        return dataclasses.replace(obj, **changes)

    return fill(cfg, saved) if isinstance(saved, dict) else cfg
