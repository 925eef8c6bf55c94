"""Supervised continual-learning benchmarks, all seeds of a run in one process.

    python scripts/supervised.py permuted-mnist --method cbp --data-dir data/mnist --download
    python scripts/supervised.py slowly-changing-regression --activation tanh --seeds 0 1 2 3
    python scripts/supervised.py continual-imagenet --data-dir data/imagenet32 --method cbp
    python scripts/supervised.py incremental-cifar --data-dir data/cifar100 --download --method cbp

Defaults reproduce the paper; flags scale a run down (``--tasks``, ``--examples-per-task``,
``--width``, ``--examples``, ``--epochs``, ``--images-per-class``, ``--classes-per-increment``).
Outputs (per seed CSV and TensorBoard, ``summary.json``, the resolved ``config.json``, an atomic
``checkpoint.pt``) go to ``--out``; ``--resume`` continues a run exactly.

PyTorch runs on one CPU thread unless ``OMP_NUM_THREADS`` says otherwise: online (batch-1)
training is latency-bound, and a second intra-op thread made it many times slower on a busy
2-core machine. Run one process per core instead (``scripts/sweep.py`` does).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated, Any, Union

import torch
import tyro

from ppo_cbp import cli
from ppo_cbp.benchmarks.common import closing_summary
from ppo_cbp.benchmarks.continual_imagenet import ContinualImageNetConfig, run_continual_imagenet
from ppo_cbp.benchmarks.incremental_cifar import IncrementalCIFARConfig, run_incremental_cifar
from ppo_cbp.benchmarks.permuted_mnist import PermutedMNISTConfig, run_permuted_mnist
from ppo_cbp.benchmarks.scr import SCRConfig, run_scr
from ppo_cbp.errors import UsageError

BENCHMARKS = {
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

RUNS = dict(BENCHMARKS.values())


def parse(args: Sequence[str] | None = None) -> Any:
    """The configuration of a command line (``args`` without the program name); a value that
    does not parse, or a benchmark this script does not have, is a :class:`UsageError` of one
    line."""
    args = sys.argv[1:] if args is None else list(args)
    choices = f"choose one of: {', '.join(BENCHMARKS)}"
    if args and not args[0].startswith("-") and args[0] not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {args[0]!r}; {choices}")
    if not any(a in BENCHMARKS or a in ("-h", "--help") for a in args):
        raise UsageError(f"no benchmark given; {choices}")
    return cli.parse(Config, args, description=__doc__)


def main(args: Sequence[str] | None = None) -> None:
    try:
        cfg = parse(args)
    except UsageError as e:
        sys.exit(cli.report_error(e))
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        summary = RUNS[type(cfg)](cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: {cfg.out} holds the run up to its last checkpoint; the same command "
            "with --resume continues it",
            file=sys.stderr,
        )
        sys.exit(130)
    print(closing_summary(summary, cfg.out))


if __name__ == "__main__":
    main()
