"""The method x metric table of docs/results.md: each run's last row, mean over seeds with a 95%
confidence interval.

    python scripts/method_table.py runs/results/pmnist/* --metrics accuracy dead_fraction effective_rank_3 weight_magnitude

Each path is a run folder of ``scripts/supervised.py`` (``config.json``, ``seed_<s>/metrics.csv``).
Per run and metric: the values of the last CSV row of every seed (``<metric>:mean``: each seed's
mean over all its rows instead), their mean over seeds and the 95%
Student-t interval ``mean +- t_{0.975, n-1} s / sqrt(n)`` (``s`` the sample standard deviation,
ddof = 1; none for one seed). With three seeds a bootstrap interval cannot reach the t
interval's coverage, so the t interval it is. A Markdown table goes to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scipy import stats

from ppo_cbp.formatting import measured


def last_rows(run: Path) -> list[dict[str, float]]:
    """Per seed of ``run``: its ``metrics.csv``'s last row, plus ``<metric>:mean``, each
    metric's mean over all the seed's rows."""
    rows = []
    for path in sorted(run.glob("seed_*/metrics.csv")):
        with open(path, newline="") as f:
            table = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        if table:
            row = dict(table[-1])
            for k in table[0]:
                row[f"{k}:mean"] = sum(r[k] for r in table) / len(table)
            rows.append(row)
    return rows


def mean_interval(values: list[float]) -> tuple[float, float | None]:
    """The mean and the half-width of its 95% Student-t interval (None for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * s / math.sqrt(n)


def table(runs: list[Path], metrics: list[str]) -> str:
    lines = [
        "| method | seeds | " + " | ".join(metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for run in runs:
        rows = last_rows(run)
        if not rows:
            continue
        cells = []
        for m in metrics:
            values = [r[m] for r in rows if m in r]
            if not values:
                cells.append("")
                continue
            mean, half = mean_interval(values)
            cells.append(measured(mean) + ("" if half is None else f" ± {measured(half, 2)}"))
        lines.append(f"| {run.name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="run folders (or quoted globs)")
    parser.add_argument("--metrics", nargs="+", required=True, help="CSV columns")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    runs = [Path(p) for pattern in args.runs for p in sorted(glob.glob(pattern)) or [pattern]]
    missing = [r for r in runs if not (r / "config.json").is_file()]
    if missing:
        print(f"error: not a run folder (no config.json): {missing[0]}", file=sys.stderr)
        return 2
    text = table(runs, args.metrics)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
