"""Figures of the paper's kinds from run folders, written with matplotlib (PNG and PDF).

    python scripts/plot.py runs/repro/scr_bp runs/repro/scr_cbp --out docs/figures
    python scripts/plot.py runs/hopper --bin 100000 --out docs/figures --name hopper

Each path is a run folder (``config.json`` with ``seed_<s>/metrics.csv`` from
``scripts/supervised.py``, or with TensorBoard event files from ``ppo_cbp/train.py``) or a
folder searched for them. Runs are grouped by method and configuration (seed, names, output
paths and run length ignored); each group is drawn as the mean over its seeds with a band of
one standard error (sample std with ddof = 1 over sqrt(n); no band for one seed). One figure
per benchmark (per env for PPO): ``<name>.png``, ``<name>.pdf``, and the plotted numbers in
``<name>.csv`` and ``<name>.json``. See :mod:`ppo_cbp.plotting` for the exact definitions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ppo_cbp.plotting import plot_runs  # noqa: E402


@dataclass
class PlotArgs:
    paths: tyro.conf.Positional[list[Path]]
    """Run folders, or folders containing them."""
    out: Path = Path("docs/figures")
    """Output folder."""
    bin: int = 100_000
    """PPO: environment steps per bin."""
    task_bin: int = 1
    """Supervised: consecutive tasks (rows) averaged into one point."""
    network: Literal["policy", "value"] = "policy"
    """PPO: network whose plasticity metrics are shown."""
    name: str | None = None
    """File name of the figure (default: the benchmark, or ppo_<env>)."""


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(PlotArgs, args=argv, description=__doc__)
    try:
        results = plot_runs(
            args.paths,
            args.out,
            bin_size=args.bin,
            task_bin=args.task_bin,
            network=args.network,
            name=args.name,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        groups = ", ".join(f"{g.label} (n={g.n})" for g in r.groups)
        print(f"{r.name}: {groups}")
        for f in r.files:
            print(f"  wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
