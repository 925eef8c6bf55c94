"""Supervised continual-learning benchmarks, all seeds of a run in one process.

    python scripts/supervised.py permuted-mnist --seeds 0 1 2 --method.method cbp
    python scripts/supervised.py slowly-changing-regression --activation tanh --seeds 0 1 2 3
    python scripts/supervised.py continual-imagenet --data-dir data/imagenet32 --method cbp
    python scripts/supervised.py incremental-cifar --data-dir data/cifar100 --download --method cbp

Defaults reproduce the paper; flags scale a run down (``--tasks``, ``--examples-per-task``,
``--width``, ``--examples``, ``--epochs``, ``--images-per-class``, ``--classes-per-increment``). Outputs (per seed CSV and TensorBoard, ``summary.json``, the
resolved ``config.json``, an atomic ``checkpoint.pt``) go to ``--out``; ``--resume`` continues
a run exactly.

PyTorch runs on one CPU thread unless ``OMP_NUM_THREADS`` says otherwise: online (batch-1)
training is latency-bound, and a second intra-op thread made it many times slower on a busy
2-core machine. Run one process per core instead (``scripts/sweep.py`` does).
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Union

import torch
import tyro

from ppo_cbp.benchmarks.continual_imagenet import ContinualImageNetConfig, run_continual_imagenet
from ppo_cbp.benchmarks.incremental_cifar import IncrementalCIFARConfig, run_incremental_cifar
from ppo_cbp.benchmarks.permuted_mnist import PermutedMNISTConfig, run_permuted_mnist
from ppo_cbp.benchmarks.scr import SCRConfig, run_scr

Config = Union[  # noqa: UP007 (tyro reads the subcommands from the Union)
    Annotated[PermutedMNISTConfig, tyro.conf.subcommand("permuted-mnist")],
    Annotated[SCRConfig, tyro.conf.subcommand("slowly-changing-regression")],
    Annotated[ContinualImageNetConfig, tyro.conf.subcommand("continual-imagenet")],
    Annotated[IncrementalCIFARConfig, tyro.conf.subcommand("incremental-cifar")],
]


def parse(args: list[str] | None = None) -> Config:
    """The benchmark's settings from the command line (``args``, default ``sys.argv``)."""
    return tyro.cli(Config, args=args, description=__doc__)


def main() -> None:
    cfg = parse()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    if isinstance(cfg, PermutedMNISTConfig):
        summary = run_permuted_mnist(cfg)
    elif isinstance(cfg, ContinualImageNetConfig):
        summary = run_continual_imagenet(cfg)
    elif isinstance(cfg, IncrementalCIFARConfig):
        summary = run_incremental_cifar(cfg)
    else:
        summary = run_scr(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "seeds"}, indent=2))


if __name__ == "__main__":
    main()
