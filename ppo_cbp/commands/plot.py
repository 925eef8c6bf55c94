"""Figures of the paper's kinds from run folders, written with matplotlib (PNG and PDF).

    python scripts/plot.py runs                          # every run below runs/ -> runs/figures
    python scripts/plot.py runs/repro/scr_bp runs/repro/scr_cbp --out /tmp/figures
    python scripts/plot.py 'runs/Hopper-v4__cbp__*' --bin 100000 --name hopper

Each path is a run folder (``config.json`` with ``seed_<s>/metrics.csv`` from
``scripts/supervised.py``, or with TensorBoard event files from ``ppo_cbp/train.py``), a folder
searched for them, or a quoted glob pattern of either; a run folder is not searched inside (a
warning names the run folders it holds, to be given by their paths). Runs are grouped by method and
configuration (seed, names, output paths and run length ignored); two folders with the same
seed of one configuration are refused (name only the folders to plot). Each group is drawn as
the mean over its seeds with a band of the 95% bootstrap CI of the mean (BCa, as the paper's RL
figures; ``--band se``: one standard error, sample std with ddof = 1 over sqrt(n)); no band for
one seed; the legend, below the axes, says what the bands are. PPO curves are binned by
environment step: by default about 100 bins over the steps every run covers, rounded to 1, 2 or
5 times a power of ten (200,000 steps give bins of 2,000). One figure per benchmark (per env
for PPO), by default in ``figures/`` beside the runs (in the deepest folder holding them all):
``<name>.png``, ``<name>.pdf``, and the plotted numbers in ``<name>.csv`` and ``<name>.json``.
Beside them ``table.md`` and ``table.csv`` (``<name>_table`` with ``--name``): per method and
configuration the score's final segment, AUC and friction segments as mean and IQM over seeds
with 95% bootstrap CIs, and envs pooled with the stratified bootstrap. See :mod:`ppo_cbp.reporting.figures`, :mod:`ppo_cbp.reporting.tables` and
:mod:`ppo_cbp.reporting.stats` for the exact definitions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from ppo_cbp.cli import UsageError, parse, report_error
from ppo_cbp.reporting.figures import plot_runs
from ppo_cbp.reporting.stats import RESAMPLES
from ppo_cbp.train import Args


@dataclass
class PlotArgs:
    paths: Annotated[
        tyro.conf.Positional[list[str]], tyro.conf.arg(metavar="PATH", help_behavior_hint="")
    ]
    """Run folders, folders containing them, or quoted glob patterns."""
    out: Annotated[
        Path | None,
        tyro.conf.arg(
            metavar="PATH",
            help_behavior_hint="(default: figures/ in the deepest folder holding all the runs)",
        ),
    ] = None
    """Output folder."""
    bin: Annotated[
        int | None,
        tyro.conf.arg(
            metavar="INT",
            help_behavior_hint="(default: about 100 bins over the steps every run covers, "
            "rounded to 1, 2 or 5 times a power of ten)",
        ),
    ] = None
    """PPO: environment steps per bin."""
    task_bin: int = 1
    """Supervised: consecutive tasks (rows) averaged into one point."""
    network: Literal["policy", "value"] = "policy"
    """PPO: network whose plasticity metrics are shown."""
    name: Annotated[
        str | None,
        tyro.conf.arg(metavar="STR", help_behavior_hint="(default: the benchmark, or ppo_<env>)"),
    ] = None
    """File name of the figure."""
    band: Literal["ci", "se"] = "ci"
    """Shaded bands: ci, the 95% bootstrap CI of the mean (BCa, as the paper's RL figures); se, one standard error."""
    resamples: int = RESAMPLES
    """Bootstrap resamples of every CI (scipy's default, which the paper's code used)."""
    bootstrap_seed: int = 0
    """Seed of every bootstrap: the same seed gives the same intervals."""


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(PlotArgs, argv, __doc__)
        for flag, value in (
            ("--bin", args.bin),
            ("--task-bin", args.task_bin),
            ("--resamples", args.resamples),
        ):
            if value is not None and value < 1:
                raise UsageError(f"{flag} must be >= 1, got {value}")
        results = plot_runs(
            args.paths,
            args.out,
            bin_size=args.bin,
            task_bin=args.task_bin,
            network=args.network,
            name=args.name,
            band=args.band,
            resamples=args.resamples,
            bootstrap_seed=args.bootstrap_seed,
            ppo_settings=Args,
        )
    except UsageError as e:
        return report_error(e)
    for r in results:
        groups = ", ".join(f"{g.label} (n={g.n})" for g in r.groups)
        print(f"{r.name}: {'method x metric table' if r.kind == 'table' else groups}")
        for f in r.files:
            print(f"  wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
