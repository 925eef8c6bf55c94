"""Supervised continual-learning benchmarks, all seeds of a run in one process.

    python scripts/supervised.py permuted-mnist --seeds 0 1 2 --method.method cbp
    python scripts/supervised.py slowly-changing-regression --activation tanh --seeds 0 1 2 3

Defaults reproduce the paper; flags scale a run down (``--tasks``, ``--examples-per-task``,
``--width``, ``--examples``). Outputs (per seed CSV and TensorBoard, ``summary.json``, the
resolved ``config.json``, an atomic ``checkpoint.pt``) go to ``--out``; ``--resume`` continues
a run exactly.
"""

from __future__ import annotations

import json
from typing import Annotated, Union

import tyro

from ppo_cbp.benchmarks.permuted_mnist import PermutedMNISTConfig, run_permuted_mnist
from ppo_cbp.benchmarks.scr import SCRConfig, run_scr


def main() -> None:
    cfg = tyro.cli(
        Union[  # noqa: UP007 (tyro reads the subcommands from the Union)
            Annotated[PermutedMNISTConfig, tyro.conf.subcommand("permuted-mnist")],
            Annotated[SCRConfig, tyro.conf.subcommand("slowly-changing-regression")],
        ],
        description=__doc__,
    )
    if isinstance(cfg, PermutedMNISTConfig):
        summary = run_permuted_mnist(cfg)
    else:
        summary = run_scr(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "seeds"}, indent=2))


if __name__ == "__main__":
    main()
