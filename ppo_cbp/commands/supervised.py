"""Supervised continual-learning benchmarks, all seeds of a run in one process.

    python scripts/supervised.py permuted-mnist --method cbp --data-dir data/mnist --download
    python scripts/supervised.py slowly-changing-regression --activation tanh --seeds 0 1 2 3
    python scripts/supervised.py continual-imagenet --data-dir data/imagenet32 --method cbp
    python scripts/supervised.py incremental-cifar --data-dir data/cifar100 --download --method cbp

Defaults reproduce the paper; flags scale a run down (``--tasks``, ``--examples-per-task``,
``--width``, ``--examples``, ``--epochs``, ``--images-per-class``, ``--classes-per-increment``).
Outputs (per seed CSV and TensorBoard, ``summary.json``, the resolved ``config.json``, an atomic
``checkpoint.pt``) go to ``--out``; ``--resume`` continues a run exactly, with the settings it
was started with for every flag not given again. A run, finished or not, is extended with a
larger ``--tasks`` (Permuted MNIST) or ``--examples`` (Slowly-Changing Regression); Continual
ImageNet's and Incremental CIFAR's schedules are drawn for the whole run and cannot be
extended.

PyTorch runs on one CPU thread unless ``OMP_NUM_THREADS`` says otherwise: online (batch-1)
training is latency-bound, and a second intra-op thread made it many times slower on a busy
2-core machine. Run one process per core instead (``scripts/sweep.py`` does).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch

from ppo_cbp import cli
from ppo_cbp.benchmarks.common import closing_summary
from ppo_cbp.benchmarks.registry import RUNS, parse, with_checkpoint_settings
from ppo_cbp.errors import UsageError


def main(args: Sequence[str] | None = None) -> None:
    """Run the benchmark of a command line (``args`` without the program name; by default
    ``sys.argv[1:]``) and print its closing summary.

    :param args: the subcommand and its flags.
    """
    try:
        argv = sys.argv[1:] if args is None else list(args)
        cfg = with_checkpoint_settings(parse(argv, description=__doc__), argv)
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
