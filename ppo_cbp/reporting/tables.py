"""Method x metric tables from the figures' numbers: mean and IQM over seeds with 95% CIs.

The score is a figure's first panel (accuracy, squared error or episodic return) at the
figure's points (tasks, bins of rows, PPO step bins) over each group's common prefix. Each
metric is one number per seed (NaN points, empty PPO bins, are skipped; a seed without a
value is left out of that metric and the cell's ``n`` says so):

* ``final``: the mean over the final segment: for PPO runs with friction changes the last
  complete friction segment, otherwise the last ``max(1, floor(L / 10))`` of the ``L`` points;
* ``auc``: the mean over all ``L`` points, i.e. the area under the seed's curve divided by its
  length (the points are equally spaced), in the score's units;
* ``segment_k`` (PPO runs with friction changes, ``F = friction_every`` steps): the mean over
  friction segment ``k``, the bins whose right edge ``x`` has ``(k - 1) F < x <= k F``
  (a bin across a change counts in the segment of its right edge); complete segments only,
  those that end within the common prefix.

Per group and metric, over its seeds: the mean with the 95% BCa bootstrap CI of the figures'
bands (:func:`ppo_cbp.reporting.stats.bootstrap_mean_ci`), and the IQM (:func:`ppo_cbp.reporting.stats.iqm`) with
the 95% percentile bootstrap CI (:func:`ppo_cbp.reporting.stats.stratified_ci`, one stratum).

Pooled: when several figures share a score (PPO on several environments, or the accuracy of
several supervised benchmarks), a group label present in all of them gets the mean and IQM of
``final`` and ``auc`` over all its (figure, seed) scores with the stratified bootstrap CI of
rliable, each figure a stratum (seeds resampled within each figure, their numbers kept). Scores
are pooled as they are logged, not normalised: pool scores on comparable scales.

Files: ``<stem>.md`` (per table, one Markdown table of means and one of IQMs, rows = groups,
columns = metrics, cells ``value [low, high]``) and ``<stem>.csv`` (one row per table, group
and metric: ``table, score, group, method, metric, n, mean, mean_low, mean_high, iqm,
iqm_low, iqm_high``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ppo_cbp.reporting.stats import RESAMPLES, bootstrap_mean_ci, iqm, stratified_ci

SCORES = ("accuracy", "squared_error", "episodic_return", "eval_return", "eval_return_previous")
"""Panel keys that are a score (a benchmark's, PPO's evaluation returns): each gets a table."""

METRIC_TITLES = {"final": "final", "auc": "AUC"}


@dataclass
class Cell:
    """One group's metric: its seeds' mean and IQM with their 95% CIs."""

    n: int
    mean: float
    mean_low: float
    mean_high: float
    iqm: float
    iqm_low: float
    iqm_high: float


@dataclass
class Table:
    """One figure's (or one pooled) method x metric table."""

    name: str
    score: str
    ylabel: str
    metrics: list[str]
    rows: dict[str, dict[str, Cell]] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    seeds: dict[str, str] = field(default_factory=dict)
    """Per group the seeds behind it (``3``, or ``3+5`` per pooled figure)."""
    pooled: list[str] = field(default_factory=list)
    """The figures a pooled table pools; empty for a figure's table."""
    per_seed: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """Per group and metric the seeds' values (:func:`seed_metrics`)."""


def final_points(n_points: int) -> int:
    """Points in the final segment without friction segments: ``max(1, floor(L / 10))``."""
    return max(1, n_points // 10)


def friction_segments(x: np.ndarray, friction_every: int) -> list[np.ndarray]:
    """Per complete friction segment ``k = 1, 2, ...`` the indices of the points whose right
    edge ``x`` has ``(k - 1) F < x <= k F``; a segment is complete when ``k F <= x[-1]``."""
    if friction_every <= 0 or not len(x):
        return []
    seg = np.ceil(np.asarray(x, dtype=np.float64) / friction_every).astype(np.int64)
    complete = int(x[-1] // friction_every)
    return [np.flatnonzero(seg == k) for k in range(1, complete + 1)]


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Per seed (row) the mean of its finite values; NaN for a row without any."""
    ok = np.isfinite(values)
    n = ok.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, values, 0.0).sum(1) / n, np.nan)


def seed_metrics(values: np.ndarray, x: np.ndarray, friction_every: int = 0) -> dict[str, Any]:
    """Per metric (see the module docstring) the per-seed values of ``values`` ([seeds,
    points] at the points ``x``)."""
    segments = friction_segments(x, friction_every)
    idx = segments[-1] if segments else np.arange(len(x) - final_points(len(x)), len(x))
    out = {"final": _nanmean_rows(values[:, idx]), "auc": _nanmean_rows(values)}
    for k, s in enumerate(segments, 1):
        out[f"segment_{k}"] = _nanmean_rows(values[:, s])
    return out


def cell(strata: Sequence[np.ndarray], *, resamples: int = RESAMPLES, seed: int = 0) -> Cell:
    """Mean and IQM of the finite scores with 95% CIs. One stratum: the BCa CI of the mean
    (:func:`bootstrap_mean_ci`) and the percentile CI of the IQM; several: both under the
    stratified bootstrap (:func:`stratified_ci`). A stratum without a finite score is
    dropped."""
    strata = [s[np.isfinite(s)] for s in map(np.asarray, strata)]
    strata = [s for s in strata if len(s)]
    if not strata:
        nan = math.nan
        return Cell(0, nan, nan, nan, nan, nan, nan)
    pooled = np.concatenate(strata)
    if len(strata) == 1:
        low, high = bootstrap_mean_ci(pooled[:, None], resamples=resamples, seed=seed)
        mean_ci = (float(low[0]), float(high[0]))
    else:
        mean_ci = stratified_ci(strata, np.mean, resamples=resamples, seed=seed)
    iqm_ci = stratified_ci(strata, iqm, resamples=resamples, seed=seed)
    return Cell(len(pooled), float(pooled.mean()), *mean_ci, float(iqm(pooled)), *iqm_ci)


def figure_tables(figure: Any, *, resamples: int = RESAMPLES, seed: int = 0) -> list[Table]:
    """The tables of one :class:`ppo_cbp.reporting.figures._Figure`: one per panel that is a
    score (:data:`SCORES`), in the panels' order."""
    return [
        figure_table(figure, panel, series, resamples=resamples, seed=seed)
        for panel, series in figure.panel_series
        if panel.key in SCORES
    ]


def figure_table(
    figure: Any, panel: Any, series: Sequence[Any], *, resamples: int = RESAMPLES, seed: int = 0
) -> Table:
    """The table of one score panel of a :class:`ppo_cbp.reporting.figures._Figure`."""
    table = Table(figure.name, panel.key, panel.ylabel, [])
    for g in figure.groups:
        s = next((s for s in series if s.label == g.label), None)
        if s is None:
            continue
        every = int(g.config.get("friction_every") or 0) if g.kind == "ppo" else 0
        table.per_seed[g.label] = seed_metrics(s.values, s.x, every)
        table.methods[g.label] = g.method
        table.seeds[g.label] = str(s.n_seeds)
    table.metrics = _union(m for metrics in table.per_seed.values() for m in metrics)
    for label, metrics in table.per_seed.items():
        table.rows[label] = {
            m: cell([v], resamples=resamples, seed=seed) for m, v in metrics.items()
        }
    return table


def pooled_tables(
    tables: Sequence[Table], *, resamples: int = RESAMPLES, seed: int = 0
) -> list[Table]:
    """Per score shared by two or more tables, the pooled ``final`` and ``auc`` of the group
    labels present in all of them, each table a stratum."""
    out = []
    for score in dict.fromkeys(t.score for t in tables):
        same = [t for t in tables if t.score == score]
        if len(same) < 2:
            continue
        labels = [lb for lb in same[0].rows if all(lb in t.rows for t in same[1:])]
        pooled = Table(
            "pooled", score, same[0].ylabel, ["final", "auc"], pooled=[t.name for t in same]
        )
        for label in labels:
            per_seed = [t.per_seed[label] for t in same]
            pooled.rows[label] = {
                m: cell([p[m] for p in per_seed], resamples=resamples, seed=seed)
                for m in pooled.metrics
            }
            pooled.methods[label] = same[0].methods[label]
            pooled.seeds[label] = "+".join(t.seeds[label] for t in same)
        if labels:
            out.append(pooled)
    return out


def table_rows(figures: Sequence[Any], *, resamples: int = RESAMPLES, seed: int = 0) -> list[Table]:
    """Every figure's table, then the pooled ones."""
    tables = [t for f in figures for t in figure_tables(f, resamples=resamples, seed=seed)]
    return tables + pooled_tables(tables, resamples=resamples, seed=seed)


IQM_MIN_SEEDS = 8
"""The fewest seeds per configuration for which the wide tables give the IQM: with fewer, the
mean of the middle 50% is the mean of three or fewer seeds (five seeds: three)."""


def metric_tables(figure: Any, *, resamples: int = RESAMPLES, seed: int = 0) -> list[Table]:
    """One table per panel of ``figure`` (every metric, not only the scores), for
    :func:`wide_markdown`."""
    return [
        figure_table(figure, panel, series, resamples=resamples, seed=seed)
        for panel, series in figure.panel_series
    ]


def wide_markdown(name: str, tables: Sequence[Table]) -> str:
    """The method x metric tables of one figure's panels (:func:`metric_tables`): one of the
    final values and one of the AUCs, each cell the mean over seeds with its 95% CI, rows the
    configurations in the figure's order; a third of the final values' IQMs where every
    configuration has :data:`IQM_MIN_SEEDS` seeds or more, else a line saying why not."""
    labels = list(dict.fromkeys(lb for t in tables for lb in t.rows))
    seeds = {lb: next(t.seeds[lb] for t in tables if lb in t.seeds) for lb in labels}
    lines = [f"## {name}: method x metric"]
    header = "| Method | n | " + " | ".join(t.ylabel for t in tables) + " |"
    rule = "|---|---|" + "---|" * len(tables)
    stats = [("final", "mean"), ("auc", "mean")]
    if all(int(n) >= IQM_MIN_SEEDS for n in seeds.values()):
        stats.append(("final", "iqm"))
    for metric, stat in stats:
        what = "IQM" if stat == "iqm" else "Mean"
        lines += ["", f"{what} of the {_title(metric)} values [95% CI]:", "", header, rule]
        for lb in labels:
            texts = []
            for t in tables:
                c = t.rows.get(lb, {}).get(metric)
                if c is None:
                    texts.append("")
                elif stat == "iqm":
                    texts.append(_cell_text(c.iqm, c.iqm_low, c.iqm_high))
                else:
                    texts.append(_cell_text(c.mean, c.mean_low, c.mean_high))
            lines.append(
                f"| {lb.replace('|', chr(92) + '|')} | {seeds[lb]} | " + " | ".join(texts) + " |"
            )
    if len(stats) == 2:
        fewest = min(int(n) for n in seeds.values())
        lines += [
            "",
            f"No IQM: {fewest} seeds for some configuration, fewer than {IQM_MIN_SEEDS}; the mean "
            f"of the middle 50% would be that of {fewest - 2 * int(0.25 * fewest)} seeds.",
        ]
    return "\n".join(lines) + "\n"


def _union(items: Any) -> list[str]:
    """The metrics in order: final, auc, then the segments by number."""
    found = set(items)
    segs = sorted((m for m in found if m.startswith("segment_")), key=lambda m: int(m[8:]))
    return [m for m in ("final", "auc") if m in found] + segs


def _title(metric: str) -> str:
    return METRIC_TITLES.get(metric) or f"seg {metric.removeprefix('segment_')}"


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"


def _cell_text(value: float, low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]"


def markdown(tables: Sequence[Table], resamples: int = RESAMPLES, seed: int = 0) -> str:
    """The tables as Markdown, each with what its cells are."""
    lines = [
        "# Method x metric tables",
        "",
        f"Mean: over seeds, 95% bootstrap CI (BCa, {resamples:,} resamples, seed {seed}). "
        "IQM: mean of the middle 50% of the seeds' scores (scipy.stats.trim_mean(x, 0.25)), "
        f"95% percentile bootstrap CI ({resamples:,} resamples). "
        "final: mean over the last complete friction segment (PPO with friction changes) or "
        "the last tenth of the points; AUC: mean over all points (area under the curve / "
        "length); seg k: mean over friction segment k. See ppo_cbp/reporting/tables.py.",
    ]
    for t in tables:
        if t.pooled:
            lines += [
                "",
                f"## Pooled over {', '.join(t.pooled)}: {t.ylabel}",
                "",
                "Over all (figure, seed) scores, scores as logged (not normalised); 95% "
                "stratified bootstrap CI: seeds resampled within each figure (percentile, "
                f"{resamples:,} resamples). n: seeds per figure.",
            ]
        else:
            lines += ["", f"## {t.name}: {t.ylabel}"]
        for stat in ("mean", "iqm"):
            lines += ["", f"{'Mean' if stat == 'mean' else 'IQM'} [95% CI]:", ""]
            lines.append("| Method | n | " + " | ".join(map(_title, t.metrics)) + " |")
            lines.append("|---|---|" + "---|" * len(t.metrics))
            for label, cells in t.rows.items():
                texts = []
                for m in t.metrics:
                    c = cells.get(m)
                    if c is None:
                        texts.append("")
                        continue
                    v = (
                        (c.mean, c.mean_low, c.mean_high)
                        if stat == "mean"
                        else (c.iqm, c.iqm_low, c.iqm_high)
                    )
                    extra = f" (n={c.n})" if str(c.n) != t.seeds[label] and not t.pooled else ""
                    texts.append(_cell_text(*v) + extra)
                name = label.replace("|", "\\|")
                lines.append(f"| {name} | {t.seeds[label]} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def write_table(
    tables: Sequence[Table], out_dir: Path, stem: str, resamples: int = RESAMPLES, seed: int = 0
) -> list[Path]:
    """``<stem>.md`` and ``<stem>.csv`` in ``out_dir`` (see the module docstring)."""
    md_path, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    md_path.write_text(markdown(tables, resamples, seed))
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["table", "score", "group", "method", "metric", "n"]
            + ["mean", "mean_low", "mean_high", "iqm", "iqm_low", "iqm_high"]
        )
        for t in tables:
            name = "pooled:" + "+".join(t.pooled) if t.pooled else t.name
            for label, cells in t.rows.items():
                for m, c in cells.items():
                    nums = (c.mean, c.mean_low, c.mean_high, c.iqm, c.iqm_low, c.iqm_high)
                    w.writerow(
                        [name, t.score, label, t.methods[label], m, c.n]
                        + ["" if not math.isfinite(v) else repr(v) for v in nums]
                    )
    return [md_path, csv_path]
