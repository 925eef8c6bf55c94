"""Figures of the paper's kinds from run folders: reading, grouping over seeds, mean and CI.

Two input kinds are read:

* supervised benchmark runs (``scripts/supervised.py``): ``config.json`` plus, per seed,
  ``seed_<s>/metrics.csv`` with one row per task (Permuted MNIST, Continual ImageNet), per
  increment (class-incremental CIFAR) or per bin (Slowly-Changing Regression);
* PPO runs (``ppo_cbp/train.py``): ``config.json`` plus TensorBoard event files in the folder.

Every seed is one :class:`SeedRun`. Runs are grouped by their configuration with the seed,
names, output paths, devices, logging settings and the run length removed (:func:`group_key`),
so an unfinished run and a finished one of the same configuration fall into one group.

Statistics, at each x over the n seeds that have a value there: ``mean = sum(y) / n``; the
band is by default the 95% bootstrap CI of the mean (:func:`ppo_cbp.reporting.stats.bootstrap_mean_ci`:
``scipy.stats.bootstrap``, BCa, 9,999 resamples, as the paper's RL figures), or with
``band="se"`` one standard error ``s / sqrt(n)``, ``s`` the sample standard deviation
(``ddof = 1``; :func:`mean_and_se`). For n = 1 there is no band. The legend's title says which
band is drawn. Within a group all seeds are cut to their common prefix (the shortest seed's
length), with a printed note that also goes into the figure's title. The method x metric
table beside the figures is :mod:`ppo_cbp.reporting.tables`'s.

PPO scalars are binned by environment step: bin ``b`` holds the values logged at steps
``s`` with ``b * bin_size < s <= (b + 1) * bin_size`` (step ``s`` counts the steps taken, so an
episode ending at step ``s`` ended within the first ``s`` steps) and is plotted at
``x = (b + 1) * bin_size``. Only complete bins count: a run whose last logged step is ``L``
has ``floor(L / bin_size)`` bins. Without a given ``bin_size`` each figure takes
:func:`readable_bin` of the shortest of its runs: about 100 bins over the steps all runs cover,
rounded to 1, 2 or 5 times a power of ten. Per bin and seed: the mean of the episodic returns ending in
it (NaN if none) and of the plasticity metrics logged in it, and the maximum of
``max_weight_change`` (the largest single-update change in the bin, as in Extended Data
Fig. 5c). Then mean and band over seeds as above.

A point without data (an empty bin: metrics are logged every few updates, episodes end
irregularly) is left out of the curve, whose line joins the points on either side; the
written CSV keeps it with an empty mean; a curve of one point shows its band as an error bar.
The legend sits below the axes, its labels wrapped, and the figure grows to hold it, so long
labels leave the axes their size. Figures go to ``out_dir``, by default
``<the run folders' common parent>/figures`` (:func:`default_out_dir`).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ppo_cbp import run_folder
from ppo_cbp.benchmarks.common import ROW_LABELS
from ppo_cbp.errors import UsageError
from ppo_cbp.plasticity import suite
from ppo_cbp.reporting.stats import RESAMPLES, bootstrap_mean_ci
from ppo_cbp.reporting.tables import metric_tables, table_rows, wide_markdown, write_table

# Keys that do not change what is learned (or only how long): removed before grouping.
IGNORED_KEYS = frozenset(
    {
        # both
        "seed",
        "seeds",
        "device",
        "resume",
        "progress",
        "checkpoint_every",
        "provenance",  # which code ran: seeds run by other commits still pool
        "label",  # the configuration's name, made from the other keys
        "eval_every",  # evaluation does not change the training: runs with and without it pool
        "eval_episodes",
        "eval_previous",
        "started_with",
        # supervised
        "out",
        "chunk",
        "data_dir",
        "download",
        "method",  # the unresolved method flags; resolved_method holds the values used
        "tasks",
        "resolved_tasks",
        "examples",
        "bins",
        # PPO
        "run_name",
        "runs_dir",
        "threads",
        "metrics_every",
        "steps",
    }
)

SUPERVISED_NAMES = {
    "bp": "Backprop",
    "l2": "L2",
    "snp": "Shrink & Perturb",
    "cbp": "CBP",
    "redo": "ReDo",
    "adam": "Adam",
    "dropout": "Dropout",
    "scratch": "Retrained from scratch",
}
PPO_NAMES = {
    "standard_adam": "Standard Adam",
    "tuned_adam": "Tuned Adam",
    "l2": "L2",
    "cbp": "CBP",
    "cbp+l2": "CBP",  # --cbp's L2 1e-4 is its own setting: no suffix in its label
    "redo": "ReDo",
    "redo+l2": "ReDo",
    "snp": "Shrink & Perturb",
    "adam": "Adam",
}
# One colour per method, the same in every figure (the paper's where it names one).
METHOD_COLOURS = {
    "bp": "#333333",
    "tuned_adam": "#333333",
    "standard_adam": "tab:red",
    "adam": "tab:cyan",
    "l2": "tab:purple",
    "snp": "tab:orange",
    "cbp": "tab:blue",
    "cbp+l2": "tab:blue",
    "redo": "tab:green",
    "redo+l2": "tab:green",
    "dropout": "tab:pink",
    "scratch": "tab:olive",
}
# Legend order: the baselines first, the paper's method last.
_METHOD_ORDER = {
    m: i
    for i, m in enumerate(
        ("bp", "standard_adam", "tuned_adam", "adam", "dropout", "l2", "snp", "redo", "redo+l2")
        + ("scratch", "cbp", "cbp+l2")
    )
}
_FALLBACK_COLOURS = ["tab:brown", "tab:olive", "tab:gray", "gold", "navy", "teal", "maroon"]

EVAL_PANELS = {
    "eval/return": "Evaluation return",
    "eval/return_previous": "Evaluation return, earlier dynamics",
}
"""PPO's evaluation scalars (``--eval-every``): the deterministic policy's return with the
current dynamics and with those of earlier segments; panels and tables when a run has them."""

BANDS = ("ci", "se")
"""Shaded bands: the 95% bootstrap CI of the mean (the paper's RL figures) or one SE."""

KIND_TITLES = {
    "permuted_mnist": "Online Permuted MNIST",
    "imagenet": "Continual ImageNet",
    "scr": "Slowly-Changing Regression",
    "cifar": "Class-incremental CIFAR-100",
    "ppo": "PPO",
}


def note(message: str) -> None:
    """Print a note about what is (not) plotted."""
    print(f"note: {message}", flush=True)


def warn(message: str) -> None:
    """Print a warning about runs that are left out (on stderr)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class SeedRun:
    """One seed of one run: its grouping configuration and its raw series."""

    run_dir: Path
    seed: int
    kind: str
    """permuted_mnist, imagenet, scr, cifar or ppo."""
    method: str
    """Short method id (bp, l2, snp, cbp, adam, ... / standard_adam, tuned_adam, cbp+l2, ...)."""
    config: dict[str, Any]
    """The configuration without :data:`IGNORED_KEYS`."""
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    """Supervised: every CSV column (float64), one value per row."""
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """PPO: TensorBoard tag -> (steps, values)."""
    length: int = 0
    """Supervised: rows; PPO: the last logged environment step."""
    label: str = ""
    """The configuration's label (:func:`run_label`)."""


def is_run_dir(path: Path) -> bool:
    """A folder with ``config.json`` and either ``seed_*/metrics.csv`` or event files."""
    if not (path / "config.json").is_file():
        return False
    return any(path.glob("seed_*/metrics.csv")) or any(path.glob("events.out.tfevents.*"))


def expand_paths(paths: Sequence[Path | str]) -> list[Path]:
    """``paths`` with each glob pattern (``*``, ``?``, ``[...]``) that names no existing path
    replaced by its matches, sorted (a quoted pattern reaches us unexpanded).

    :raises UsageError: for a pattern that matches nothing.
    """
    out: list[Path] = []
    for p in map(str, paths):
        if glob.has_magic(p) and not os.path.exists(p):
            matches = sorted(glob.glob(os.path.expanduser(p)))
            if not matches:
                raise UsageError(f"no path matches {p}")
            out += map(Path, matches)
        else:
            out.append(Path(p).expanduser())
    return out


def find_run_dirs(paths: Sequence[Path | str]) -> list[Path]:
    """Run folders among ``paths`` (folders or glob patterns) and below them. A run folder's
    subfolders are not searched: run folders inside one (a sweep written into a benchmark's
    output folder) are left out with a warning that names them.

    :raises UsageError: for a path that does not exist or holds no run folder.
    """
    if not paths:
        raise UsageError("no run folders given")
    found: list[Path] = []
    for p in expand_paths(paths):
        if not p.exists():
            raise UsageError(f"{p} does not exist")
        if not p.is_dir():
            raise UsageError(f"{p} is not a folder")
        here = _run_dirs_in(p)
        if not here:
            raise UsageError(
                f"no run folders under {p}: expected config.json with seed_<s>/metrics.csv "
                "(supervised benchmarks) or with TensorBoard event files (PPO)"
            )
        for run in here:
            inside = [d for sub in sorted(run.iterdir()) if sub.is_dir() for d in _run_dirs_in(sub)]
            if inside:
                more = f" and {len(inside) - 1} more" if len(inside) > 1 else ""
                warn(
                    f"{run} is a run folder, so the run folders inside it are not plotted: "
                    f"{inside[0]}{more}; give their paths to plot them"
                )
        found.extend(here)
    return sorted(dict.fromkeys(found))


def _run_dirs_in(top: Path) -> list[Path]:
    """``top`` if it is a run folder, else the run folders below it (none searched inside)."""
    found = []
    for root, dirs, _ in os.walk(top):
        dirs.sort()
        if is_run_dir(Path(root)):
            found.append(Path(root))
            dirs[:] = []
    return found


def default_out_dir(run_dirs: Sequence[Path]) -> Path:
    """``figures`` in the deepest folder that holds all of ``run_dirs`` (a run folder's parent
    for one run, the sweep's folder for a sweep's trials), beside the runs, not in the code."""
    parents = [os.path.abspath(Path(d).parent) for d in run_dirs]
    return Path(os.path.commonpath(parents)) / "figures"


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(
            f"{path} is unreadable ({e}); remove that run folder or fix the file"
        ) from e
    if not isinstance(config, dict):
        raise UsageError(f"{path} is not a JSON object; remove that run folder or fix the file")
    for key in ("method", "resolved_method"):  # settings renamed since: runs before still pool
        if isinstance(config.get(key), dict):
            config[key] = suite.current_names(config[key])
            spec = config[key].get("method")
            if isinstance(spec, str):  # the suite's order is the methods' order: one name
                config[key]["method"] = "+".join(_in_suite_order(spec.split("+")))
    return config


def _in_suite_order(names: Sequence[str]) -> list[str]:
    order = list(suite.METHODS)
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


def run_label(config: dict[str, Any], kind: str, ppo_settings: type | None = None) -> str:
    """The label of a run: the one its ``config.json`` recorded (the run's own
    :class:`~ppo_cbp.plasticity.suite.Label`). A run written before labels were recorded gets
    the label it would get now where its settings are known: a PPO run through ``ppo_settings``
    (``train.py``'s ``Args``, which the command lines pass), a supervised run through its
    benchmark's method defaults; otherwise its methods with each of their settings, the step
    size and the weight decay."""
    if isinstance(config.get("label"), str):
        return config["label"]
    if kind == "ppo":
        return _ppo_label(config, ppo_settings)
    resolved = config.get("resolved_method") or {}
    spec = str(resolved.get("method", "bp")) if isinstance(resolved, dict) else str(resolved)
    flat = resolved if isinstance(resolved, dict) else {}
    names = spec.split("+")
    defaults = _method_defaults(kind, spec)
    if defaults is None:
        return suite.Label.of(names, flat, None).text
    keys = {k for k in flat if k not in ("method", "methods")}
    return suite.Label.of(names, {k: flat[k] for k in keys}, defaults, ()).text


def _method_defaults(kind: str, spec: str) -> dict[str, Any] | None:
    """The resolved settings of ``--method spec`` alone on benchmark ``kind``, or None."""
    from dataclasses import asdict

    from ppo_cbp.benchmarks import continual_imagenet, incremental_cifar, permuted_mnist, scr
    from ppo_cbp.benchmarks.common import MethodConfig, resolve_method
    from ppo_cbp.benchmarks.conv_learner import resolve_module_method

    try:
        if kind in ("permuted_mnist", "scr"):
            module = permuted_mnist if kind == "permuted_mnist" else scr
            return asdict(resolve_method(MethodConfig(method=spec), module.DEFAULTS))
        if kind == "imagenet":
            cfg = continual_imagenet.ImageNetMethodConfig(method=spec)
            return asdict(resolve_module_method(cfg, continual_imagenet.DEFAULTS, {"linear": "bp"}))
        if kind == "cifar":
            cfg = incremental_cifar.CIFARMethodConfig(method=spec)
            m = resolve_module_method(cfg, incremental_cifar.DEFAULTS, incremental_cifar.ALIASES)
            return asdict(m)
    except (UsageError, TypeError, ValueError):
        pass
    return None


def _ppo_label(config: dict[str, Any], ppo_settings: type | None) -> str:
    from ppo_cbp.ppo.settings import args_from_dict, configuration_label, resolve_args

    if ppo_settings is not None:
        known = {f.name for f in dataclasses.fields(ppo_settings)}
        defaults = dataclasses.asdict(ppo_settings())
        given = {k: v for k, v in config.items() if k in known}
        try:
            args = args_from_dict(ppo_settings, {**defaults, **given, "device": "cpu"})
            return configuration_label(resolve_args(args)).text
        except (UsageError, TypeError, ValueError):
            pass
    # unknown settings: the methods' own settings, and the optimizer's against the presets
    from types import SimpleNamespace

    from ppo_cbp.ppo.agent import method_names
    from ppo_cbp.ppo.settings import presets

    flags = SimpleNamespace(**config)
    try:
        names = list(method_names(flags))
    except AttributeError:  # written before some method flags: only the paper's methods
        names = [n for n in ("cbp", "redo", "l2") if config.get(n)]
        names += ["snp"] if config.get("shrink_perturb") else []
    names += ["standard_adam"] if config.get("standard_adam") else []
    defaults = presets(flags)
    keys = [k for k in config if k in defaults or suite.SETTINGS.get(k) in names]
    shown = {k: config[k] for k in keys}
    return suite.Label.of(names or ["tuned_adam"], shown, {**shown, **defaults}).text


def group_key(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the keys that do not define the experiment (:data:`IGNORED_KEYS`)."""
    return {k: v for k, v in config.items() if k not in IGNORED_KEYS}


def ppo_method(config: dict[str, Any]) -> str:
    """Method id of a PPO run from its resolved flags (see :data:`PPO_NAMES`)."""
    wd = float(config.get("weight_decay") or 0.0)
    if config.get("cbp"):
        return "cbp+l2" if wd > 0 else "cbp"
    if config.get("redo"):
        return "redo+l2" if wd > 0 else "redo"
    if config.get("shrink_perturb"):
        return "snp"
    if config.get("l2"):
        return "l2"
    if config.get("standard_adam"):
        return "standard_adam"
    b1, b2 = config.get("adam_beta1"), config.get("adam_beta2")
    if b1 is not None and b1 == b2:
        return "tuned_adam"
    return "adam"


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    """Every column as float64. A last row with a missing or unparsable value is dropped with a
    note (a running benchmark may be writing it); such a row elsewhere is an error."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(
            f"{path} is unreadable ({e}); remove that run folder or fix the file"
        ) from e
    values: list[list[float]] = []
    for i, r in enumerate(rows):
        try:
            values.append([float(r[k]) for k in rows[0]])
        except (ValueError, TypeError) as e:  # TypeError: a short row has None for its tail
            if i == len(rows) - 1:
                note(f"{path}: last row incomplete (still being written?); skipped")
                break
            raise UsageError(
                f"{path} is unreadable (row {i + 1}: {e}); remove that run folder or fix the file"
            ) from e
    if not values:
        return {}
    table = np.array(values, dtype=np.float64)
    return {k: table[:, j] for j, k in enumerate(rows[0])}


def _supervised_kind(config: dict[str, Any], columns: dict[str, np.ndarray]) -> str:
    benchmark = str(config.get("benchmark", ""))
    if "imagenet" in benchmark:
        return "imagenet"
    if "cifar" in benchmark or "increment" in columns:
        return "cifar"
    if "squared_error" in columns or "bin_size" in config:
        return "scr"
    return "permuted_mnist"


def load_supervised(run_dir: Path) -> list[SeedRun]:
    """One :class:`SeedRun` per ``seed_<s>/metrics.csv`` with at least one row."""
    config = _read_config(run_dir / "config.json")
    summary_path = run_dir / "summary.json"
    if "benchmark" not in config and summary_path.is_file():
        config = dict(config, benchmark=_read_config(summary_path).get("benchmark"))
    resolved = config.get("resolved_method") or config.get("method") or {}
    method = str(resolved.get("method", "bp")) if isinstance(resolved, dict) else str(resolved)
    runs = []
    for csv_path in sorted(run_dir.glob("seed_*/metrics.csv")):
        seed = int(csv_path.parent.name.removeprefix("seed_"))
        columns = _read_csv(csv_path)
        if not columns:
            note(f"{csv_path} has no rows yet; skipped")
            continue
        runs.append(
            SeedRun(
                run_dir=run_dir,
                seed=seed,
                kind=_supervised_kind(config, columns),
                method=method,
                config=group_key(config),
                columns=columns,
                length=len(next(iter(columns.values()))),
                label=run_label(config, _supervised_kind(config, columns)),
            )
        )
    return runs


def load_ppo(run_dir: Path, ppo_settings: type | None = None) -> list[SeedRun]:
    """The run's TensorBoard scalars (all of them, every event file in the folder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _read_config(run_dir / "config.json")
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        steps = np.array([e.step for e in events], dtype=np.int64)
        values = np.array([e.value for e in events], dtype=np.float64)
        scalars[tag] = (steps, values)
    if not scalars:
        note(f"{run_dir} has no scalars yet; skipped")
        return []
    return [
        SeedRun(
            run_dir=run_dir,
            seed=int(config.get("seed", 0)),
            kind="ppo",
            method=ppo_method(config),
            config=group_key(config),
            scalars=scalars,
            length=int(max(s.max() for s, _ in scalars.values() if len(s))),
            label=run_label(config, "ppo", ppo_settings),
        )
    ]


def load_runs(paths: Sequence[Path | str], ppo_settings: type | None = None) -> list[SeedRun]:
    """Every seed of every run folder among and below ``paths``.

    :param ppo_settings: ``train.py``'s ``Args``, to label PPO runs that recorded no label as
        a new run is labelled (:func:`run_label`).
    :raises UsageError: when no folder is found, a file is unreadable or no run holds data.
    """
    runs: list[SeedRun] = []
    for d in find_run_dirs(paths):
        supervised = any(d.glob("seed_*/metrics.csv"))
        runs += load_supervised(d) if supervised else load_ppo(d, ppo_settings)
    if not runs:
        raise UsageError(f"the run folders under {', '.join(map(str, paths))} hold no data yet")
    return runs


# --------------------------------------------------------------------------------------------
# Grouping and statistics


@dataclass
class Group:
    """Seeds of one method and configuration."""

    kind: str
    method: str
    config: dict[str, Any]
    runs: list[SeedRun]
    label: str = ""

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


def _canonical(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def group_runs(runs: Sequence[SeedRun]) -> list[Group]:
    """Runs grouped by (kind, configuration), each group labelled with its configuration's
    label (:func:`run_label`: its methods and the settings that differ from their defaults),
    which does not depend on the other runs shown. Should two groups of one figure still share
    a label (runs written before labels were recorded differing in a setting outside their
    methods'), each gets a short hash of its configuration appended.

    :raises UsageError: when run folders hold the same seed of one configuration (naming them
        all: the figure would count that seed twice).
    """
    groups: dict[tuple[str, str], Group] = {}
    folders: dict[tuple[str, str, int], list[Path]] = {}
    for r in runs:
        key = (r.kind, _canonical(r.config))
        groups.setdefault(key, Group(r.kind, r.method, r.config, [])).runs.append(r)
        folders.setdefault((*key, r.seed), []).append(r.run_dir)
    twice = {k: v for k, v in folders.items() if len(v) > 1}
    if twice:
        where = "; ".join(
            f"seed {seed} in {' and '.join(map(str, dirs))}" for (_, _, seed), dirs in twice.items()
        )
        example = next(iter(twice.values()))[-1]
        raise UsageError(
            f"run folders repeat a seed of one configuration: {where}; pass only the folders "
            f"to plot, by their paths or a quoted glob (e.g. {example}), not a folder above them"
        )
    out = list(groups.values())
    for g in out:
        g.runs.sort(key=lambda r: r.seed)
        g.label = g.runs[0].label
    for fig in {figure_key(g) for g in out}:
        same_fig = [g for g in out if figure_key(g) == fig]
        for label in {g.label for g in same_fig}:
            clash = [g for g in same_fig if g.label == label]
            if len(clash) > 1:  # runs that recorded no label, or settings a label leaves out
                for g in clash:
                    digest = hashlib.sha1(_canonical(g.config).encode()).hexdigest()[:6]
                    g.label += f" [{digest}]"
    out.sort(key=lambda g: (g.kind, _METHOD_ORDER.get(g.method, len(_METHOD_ORDER)), g.label))
    return out


def figure_key(group: Group) -> str:
    """The figure a group is drawn in: its benchmark, or ``ppo_<env>``."""
    return f"ppo_{group.config.get('env', 'env')}" if group.kind == "ppo" else group.kind


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, ""))  # resolved_method's keys read best without a prefix
        else:
            flat[prefix + k] = v
    return flat


def mean_and_se(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds (axis 0) and its standard error, ignoring NaN entries.

    For each column j with n_j finite values: ``mean_j = sum(y) / n_j`` and
    ``se_j = std(y, ddof=1) / sqrt(n_j)``; ``se_j`` is NaN when n_j < 2 and ``mean_j`` is NaN
    when n_j = 0. Returns ``(mean, se, n)``.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"expected a [seeds, points] array, got shape {v.shape}")
    ok = np.isfinite(v)
    n = ok.sum(0)
    safe = np.where(ok, v, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, safe.sum(0) / n, np.nan)
        dev = np.where(ok, v - mean, 0.0)
        var = np.where(n > 1, (dev**2).sum(0) / (n - 1), np.nan)
        se = np.sqrt(var) / np.sqrt(n)
    return mean, se, n


def bin_by_step(
    steps: np.ndarray, values: np.ndarray, bin_size: int, n_bins: int, reduce: str = "mean"
) -> np.ndarray:
    """Per bin ``b`` (steps ``b * bin_size < s <= (b + 1) * bin_size``; the first bin also
    holds step 0, where PPO logs the networks as built) the mean or max of the values logged
    there; NaN for an empty bin. Values beyond ``n_bins`` bins are dropped."""
    if bin_size < 1:
        raise ValueError(f"bin size must be >= 1, got {bin_size}")
    out = np.full(n_bins, np.nan)
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    idx = np.maximum(steps - 1, 0) // bin_size
    keep = (idx >= 0) & (idx < n_bins) & np.isfinite(values)
    idx, values = idx[keep], values[keep]
    if reduce == "mean":
        sums = np.bincount(idx, weights=values, minlength=n_bins)
        counts = np.bincount(idx, minlength=n_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    elif reduce == "max":
        for b, v in zip(idx, values):
            out[b] = v if math.isnan(out[b]) else max(out[b], v)
    else:
        raise ValueError(f"reduce must be mean or max, got {reduce!r}")
    return out


# --------------------------------------------------------------------------------------------
# Panels: what each figure kind shows


@dataclass
class Panel:
    """One axis: a metric extracted per seed as an array over x."""

    key: str
    ylabel: str
    extract: Callable[[SeedRun], np.ndarray | None]
    """The seed's values (one per row or bin) or None when the run lacks the metric."""


def _column(name: str, scale: float = 1.0) -> Callable[[SeedRun], np.ndarray | None]:
    def f(r: SeedRun) -> np.ndarray | None:
        c = r.columns.get(name)
        return None if c is None else c * scale

    return f


def _layer_sum(prefix: str) -> Callable[[SeedRun], np.ndarray | None]:
    def f(r: SeedRun) -> np.ndarray | None:
        cols = [
            v for k, v in r.columns.items() if k.startswith(prefix) and k[len(prefix) :].isdigit()
        ]
        return None if not cols else np.sum(cols, axis=0)

    return f


def _first_column(names: Sequence[str]) -> Callable[[SeedRun], np.ndarray | None]:
    def f(r: SeedRun) -> np.ndarray | None:
        for n in names:
            if n in r.columns:
                return r.columns[n]
        return None

    return f


def _dead_units_pct(r: SeedRun) -> np.ndarray | None:
    """Dead units in %: the MLP benchmarks' and Continual ImageNet's ``dead_fraction`` x 100,
    or CIFAR's ``dead_percentage``."""
    if "dead_fraction" in r.columns:
        return r.columns["dead_fraction"] * 100.0
    return r.columns.get("dead_percentage")


def _effective_rank(r: SeedRun) -> np.ndarray | None:
    """The effective rank summed over the layers the run measured: ``effective_rank_<k>`` per
    hidden layer (the MLP benchmarks), or one ``effective_rank`` (SCR's one hidden layer,
    the last hidden layer of Continual ImageNet and CIFAR-100)."""
    summed = _layer_sum("effective_rank_")(r)
    return summed if summed is not None else r.columns.get("effective_rank")


def every_metric_panels(runs: Sequence[SeedRun], bin_size: int) -> list[Panel]:
    """One panel per metric any of ``runs`` wrote: every CSV column but the row labels
    (task, bin, examples, ...) of a supervised run, every TensorBoard scalar of a PPO run
    (binned by ``bin_size`` steps), in the order first written."""
    keys: dict[str, None] = {}
    for r in runs:
        names = r.scalars if r.kind == "ppo" else r.columns
        keys.update((k, None) for k in names if k not in ROW_LABELS)
    if runs and runs[0].kind == "ppo":
        return [Panel(k, k, _scalar_binned(k, bin_size)) for k in keys]
    return [Panel(k, k, _column(k)) for k in keys]


def _cifar_relative(r: SeedRun) -> np.ndarray | None:
    acc = _first_column(("test_accuracy", "accuracy"))(r)
    ref = _first_column(("scratch_accuracy", "reference_accuracy"))(r)
    return None if acc is None or ref is None else acc - ref


def supervised_panels(kind: str) -> list[Panel]:
    """Extended Data Fig. 4's layout, one panel per metric: Permuted MNIST / ImageNet the
    accuracy, SCR the squared error per bin, then dead units (% of all hidden units; SCR's
    count of its 5), the effective rank (summed over the hidden layers), the average weight
    magnitude and the feature norm of the last hidden layer (where the runs wrote them; a
    panel without data is skipped); CIFAR: test accuracy per increment and, with a
    ``scratch_accuracy`` column, accuracy minus the retrained-from-scratch network's."""
    if kind == "cifar":
        return [
            Panel("accuracy", "Test accuracy", _first_column(("test_accuracy", "accuracy"))),
            Panel("relative_accuracy", "Accuracy - retrained from scratch", _cifar_relative),
            Panel("dead_units_pct", "Dead units (%)", _dead_units_pct),
            Panel("effective_rank", "Effective rank (sum over layers)", _effective_rank),
        ]
    if kind == "scr":
        score = Panel("squared_error", "Squared error", _column("squared_error"))
        dead = Panel("dead_units", "Dead units (of 5)", _column("dead_units"))
    else:
        acc_label = "Online accuracy" if kind == "permuted_mnist" else "Test accuracy"
        score = Panel("accuracy", acc_label, _first_column(("accuracy", "test_accuracy")))
        dead = Panel("dead_units_pct", "Dead units (%)", _dead_units_pct)
    return [
        score,
        dead,
        Panel("effective_rank", "Effective rank (sum over layers)", _effective_rank),
        Panel("weight_magnitude", "Average weight magnitude", _column("weight_magnitude")),
        Panel("feature_norm", "Feature norm (last hidden layer)", _column("feature_norm")),
    ]


def _scalar_binned(
    tag: str, bin_size: int, reduce: str = "mean", scale: float = 1.0
) -> Callable[[SeedRun], np.ndarray | None]:
    def f(r: SeedRun) -> np.ndarray | None:
        if tag not in r.scalars:
            return None
        steps, values = r.scalars[tag]
        return bin_by_step(steps, values * scale, bin_size, r.length // bin_size, reduce)

    return f


def ppo_panels(bin_size: int, network: str = "policy") -> list[Panel]:
    """Episodic return, then the plasticity panels of ``network`` (policy or value): dead
    units (% of hidden units active on at most 1% of the states), stable rank of the last
    hidden layer, average weight magnitude and the largest single-update weight change."""
    p = f"plasticity/{network}/"
    return [
        Panel(
            "episodic_return", "Episodic return", _scalar_binned("charts/episodic_return", bin_size)
        ),
        Panel(
            "dead_units_pct",
            f"Dead units (%, {network})",
            _scalar_binned(p + "dead_units", bin_size, scale=100.0),
        ),
        Panel(
            "stable_rank", f"Stable rank ({network})", _scalar_binned(p + "stable_rank", bin_size)
        ),
        Panel(
            "weight_magnitude",
            f"Weight magnitude ({network})",
            _scalar_binned(p + "weight_magnitude/overall", bin_size),
        ),
        Panel(
            "max_weight_change",
            f"Largest weight change ({network})",
            _scalar_binned(p + "max_weight_change", bin_size, "max"),
        ),
    ]


# --------------------------------------------------------------------------------------------
# Series and figures


@dataclass
class Series:
    """One group's curve in one panel."""

    label: str
    method: str
    x: np.ndarray
    mean: np.ndarray
    se: np.ndarray
    n: np.ndarray
    n_seeds: int
    ci_low: np.ndarray
    ci_high: np.ndarray
    """95% bootstrap CI of the mean (:func:`ppo_cbp.reporting.stats.bootstrap_mean_ci`)."""
    values: np.ndarray
    """The seeds' values, [seeds, points] (the common prefix)."""


def group_series(
    group: Group,
    panel: Panel,
    x_of: Callable[[SeedRun, int], np.ndarray],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[Series | None, str | None]:
    """The group's mean, SE and bootstrap CI (``resamples``, ``seed``) over its seeds' common
    prefix; a note when seeds differ in length or some lack the metric."""
    per_seed = [(r, panel.extract(r)) for r in group.runs]
    have = [(r, v) for r, v in per_seed if v is not None]
    msg = None
    if len(have) < len(per_seed):
        missing = [r.seed for r, v in per_seed if v is None]
        msg = f"{group.label}: seeds {missing} lack {panel.key}"
    if not have:
        return None, msg
    lengths = [len(v) for _, v in have]
    L = min(lengths)
    if L == 0:
        return None, f"{group.label}: no complete point of {panel.key} yet"
    if max(lengths) != L:
        m = f"{group.label}: seeds have {min(lengths)}-{max(lengths)} points; common prefix of {L} plotted"
        msg = m if msg is None else f"{msg}; {m}"
    values = np.stack([v[:L] for _, v in have])
    mean, se, n = mean_and_se(values)
    low, high = bootstrap_mean_ci(values, resamples=resamples, seed=seed)
    x = x_of(have[0][0], L)
    return Series(group.label, group.method, x, mean, se, n, len(have), low, high, values), msg


@dataclass
class FigureResult:
    """What :func:`plot_runs` wrote for one figure, or (kind ``table``) for the table."""

    name: str
    kind: str
    files: list[Path]
    notes: list[str]
    groups: list[Group]


def _colour_map(groups: Sequence[Group]) -> dict[str, str]:
    """One colour per group, never two groups the same: the paper's colour for the first group
    of each of its methods, then distinct colours of matplotlib's palettes, then evenly spaced
    hues (as many as needed)."""
    from matplotlib import colormaps
    from matplotlib.colors import hsv_to_rgb, to_hex

    colours: dict[str, str] = {}
    used: set[str] = set()
    palette = [to_hex(c) for name in ("tab10", "Dark2", "tab20b") for c in colormaps[name].colors]
    spare = iter([to_hex(c) for c in _FALLBACK_COLOURS] + palette)
    for i, g in enumerate(groups):
        names = PPO_NAMES if g.kind == "ppo" else SUPERVISED_NAMES
        paper = names.get(g.method) == g.label  # the paper's method, at its own settings
        c = to_hex(METHOD_COLOURS[g.method]) if paper and g.method in METHOD_COLOURS else None
        while c is None or c in used:
            c = next(spare, None) or to_hex(hsv_to_rgb(((i * 0.618034) % 1, 0.75, 0.8)))
            if c in used:
                i += 1
        colours[g.label] = c
        used.add(c)
    return colours


def friction_changes(runs: Sequence[SeedRun]) -> np.ndarray:
    """Steps at which the first run that logs ``env/friction`` logged a new value."""
    for r in runs:
        if "env/friction" in r.scalars:
            steps, values = r.scalars["env/friction"]
            order = np.argsort(steps, kind="stable")
            steps, values = steps[order], values[order]
            return steps[1:][values[1:] != values[:-1]]
    return np.array([], dtype=np.int64)


def drawn_points(
    s: Series, band: str = "ci"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The points of ``s`` that a curve joins: ``(x, mean, low, high)`` at the x with a finite
    mean (points without data are skipped, so the line runs across them rather than breaking
    into dots). The band is the bootstrap CI (``band="ci"``) or ``mean -/+ se``
    (``band="se"``); its ends are NaN where there is one seed."""
    if band not in BANDS:
        raise ValueError(f"band must be one of {', '.join(BANDS)}, got {band!r}")
    keep = np.isfinite(s.mean)
    x, mean = s.x[keep], s.mean[keep]
    if band == "se":
        return x, mean, mean - s.se[keep], mean + s.se[keep]
    return x, mean, s.ci_low[keep], s.ci_high[keep]


def band_caption(band: str, resamples: int = RESAMPLES) -> str:
    """What the shaded bands are, for the legend's title."""
    if band == "se":
        return "shaded: ±1 standard error of the mean over seeds"
    return f"shaded: 95% bootstrap CI of the mean over seeds (BCa, {resamples:,} resamples)"


def _draw(
    name: str,
    title: str,
    panel_series: list[tuple[Panel, list[Series]]],
    out_dir: Path,
    xlabel: str,
    colours: dict[str, str],
    vlines: np.ndarray | None,
    top_panel_wide: bool,
    caption: str,
    band: str,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, MaxNLocator

    k = len(panel_series)
    if top_panel_wide and k > 1:
        rest = k - 1
        fig = plt.figure(figsize=(max(3.2 * rest, 7.0), 7.0), layout="constrained")
        gs = fig.add_gridspec(2, rest, height_ratios=[1.3, 1.0])
        axes = [fig.add_subplot(gs[0, :])] + [fig.add_subplot(gs[1, i]) for i in range(rest)]
    else:
        cols = min(k, 5)  # many panels (every metric): rows of five
        rows = -(-k // cols)
        fig, ax_arr = plt.subplots(
            rows, cols, figsize=(3.6 * cols + 0.4, 3.6 * rows), layout="constrained", squeeze=False
        )
        axes = list(ax_arr.flat)
        for ax in axes[k:]:
            ax.set_visible(False)
        axes = axes[:k]
    for i, (ax, (panel, series)) in enumerate(zip(axes, panel_series)):
        if not any(np.isfinite(s.mean).any() for s in series):  # say so, not empty axes
            ax.text(
                0.5, 0.5, f"no {panel.ylabel.lower()} logged\nin the plotted range",
                ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4",
            )  # fmt: skip
            ax.set_ylabel(panel.ylabel)
            ax.set_xlabel(xlabel)
            continue
        for s in series:
            c = colours[s.label]
            x, mean, lo, hi = drawn_points(s, band)
            marker = "o" if len(x) <= 30 else None
            ax.plot(
                x, mean, color=c, lw=1.4, marker=marker, ms=3, label=f"{s.label} (n={s.n_seeds})"
            )
            if s.n_seeds > 1 and len(x) > 1:
                ax.fill_between(x, lo, hi, where=np.isfinite(lo), color=c, alpha=0.25, lw=0)
            elif s.n_seeds > 1 and np.isfinite(lo).all():  # one point: the band as an error bar
                ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], color=c, capsize=3, lw=1)
        if i == 0 and vlines is not None:
            x_max = max(float(np.nanmax(s.x)) for s in series)
            for j, v in enumerate(v for v in vlines if v <= x_max):
                ax.axvline(
                    v, color="0.6", lw=0.6, ls=":", label="friction change" if j == 0 else None
                )
        ax.set_ylabel(panel.ylabel)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        # min_n_ticks=1: with fewer than two integers in view (one task) the locator would
        # otherwise fall back to fractional ticks
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=True, min_n_ticks=1))
        xs = np.unique(np.concatenate([s.x[np.isfinite(s.mean)] for s in series]))
        if len(xs) == 1 and xs[0] > 0:  # one point: a view of +-50% around it, not +-5%
            ax.set_xlim(0.5 * xs[0], 1.5 * xs[0])
        ax.grid(alpha=0.3)
    _legend_below(fig, axes[0], caption)
    fig.suptitle(title, fontsize=10)
    files = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.savefig(files[0], dpi=150)
    fig.savefig(files[1])
    plt.close(fig)
    return files


LEGEND_WRAP = 60
"""Characters per legend line at most; longer labels (configuration suffixes) wrap."""


def _legend_below(fig: Any, ax: Any, caption: str) -> None:
    """One legend for the figure, below the axes, titled with what the bands are. Labels wrap
    at :data:`LEGEND_WRAP` characters and the title at the figure's width (fewer in a narrow
    figure: about 14 of the 8-point font fit an inch), the columns are as many as fit the
    figure's width, and the figure grows by the legend's height, so long labels leave the axes
    their size."""
    import textwrap

    width, height = fig.get_size_inches()
    fits = max(20, int(14 * width))
    handles, labels = ax.get_legend_handles_labels()
    labels = [textwrap.fill(t, min(LEGEND_WRAP, fits)) for t in labels]
    caption = textwrap.fill(caption, fits)
    ncols = len(labels)
    # measured with the renderer alone: a full draw would lay the axes out around a legend
    # the figure has not yet grown for (and collapse them when the legend is tall)
    renderer = fig.canvas.get_renderer()
    while True:
        legend = fig.legend(
            handles, labels, loc="outside lower center", ncols=max(ncols, 1), fontsize=8,
            title=caption, title_fontsize=8, frameon=False,
        )  # fmt: skip
        box = legend.get_window_extent(renderer)
        if box.width <= 0.9 * width * fig.dpi or ncols <= 1:  # a margin: the drawn text runs wider
            break
        legend.remove()
        ncols -= 1
    fig.set_size_inches(width, height + box.height / fig.dpi)


def _write_data(
    name: str,
    kind: str,
    title: str,
    notes: list[str],
    groups: list[Group],
    panel_series: list[tuple[Panel, list[Series]]],
    out_dir: Path,
) -> list[Path]:
    """``<name>.csv`` (panel, group, n_seeds, x, mean, se, ci_low, ci_high, n: the seeds with
    a value at x) and ``<name>.json`` (groups, notes and per panel and group the last point and
    the point of the highest mean)."""
    csv_path, json_path = out_dir / f"{name}.csv", out_dir / f"{name}.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["panel", "group", "n_seeds", "x", "mean", "se", "ci_low", "ci_high", "n"])
        for panel, series in panel_series:
            for s in series:
                for i in range(len(s.x)):
                    w.writerow(
                        [panel.key, s.label, s.n_seeds]
                        + [_num(a[i]) for a in (s.x, s.mean, s.se, s.ci_low, s.ci_high)]
                        + [int(s.n[i])]
                    )

    def point(s: Series, i: int) -> dict[str, Any]:
        keys = ("x", "mean", "se", "ci_low", "ci_high")
        arrays = (s.x, s.mean, s.se, s.ci_low, s.ci_high)
        return {k: _num(a[i]) for k, a in zip(keys, arrays)} | {"n": int(s.n[i])}

    panels = {}
    for panel, series in panel_series:
        entry = {}
        for s in series:
            finite = np.flatnonzero(np.isfinite(s.mean))
            if not len(finite):
                continue
            peak = int(finite[np.argmax(s.mean[finite])])
            entry[s.label] = {"last": point(s, int(finite[-1])), "max": point(s, peak)}
        panels[panel.key] = entry
    data = {
        "figure": name,
        "kind": kind,
        "title": title,
        "notes": notes,
        "groups": [
            {
                "label": g.label,
                "method": g.method,
                "n_seeds": g.n,
                "seeds": g.seeds,
                "runs": sorted({str(r.run_dir) for r in g.runs}),
                "lengths": [r.length for r in g.runs],
                "config": g.config,
            }
            for g in groups
        ],
        "panels": panels,
    }
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return [csv_path, json_path]


def _num(v: Any) -> float | int | None:
    v = float(v)
    if math.isnan(v):
        return None
    return int(v) if v.is_integer() and abs(v) < 2**53 else v


def readable_bin(span: int, points: int = 100) -> int:
    """Steps per bin for about ``points`` bins over ``span`` steps: of the numbers 1, 2 and 5
    times a power of ten, the one nearest to ``span / points`` on a log scale (at least 1).
    E.g. 200,000 steps -> 2,000; 3,000,000 -> 20,000 (150 bins, nearer than 50,000's 60)."""
    target = span / points
    if target <= 1:
        return 1
    k = math.floor(math.log10(target))
    candidates = [m * 10**e for e in (k - 1, k, k + 1) for m in (1, 2, 5)]
    return min(candidates, key=lambda c: abs(math.log(c / target)))


@dataclass
class _Figure:
    """One figure's numbers, computed before anything is written."""

    name: str
    kind: str
    title: str
    xlabel: str
    groups: list[Group]
    panel_series: list[tuple[Panel, list[Series]]]
    notes: list[str]
    vlines: np.ndarray | None


def plot_runs(
    paths: Sequence[Path | str],
    out_dir: Path | str | None = None,
    *,
    bin_size: int | None = None,
    task_bin: int = 1,
    network: str = "policy",
    name: str | None = None,
    band: str = "ci",
    resamples: int = RESAMPLES,
    bootstrap_seed: int = 0,
    ppo_settings: type | None = None,
) -> list[FigureResult]:
    """Read the runs among and below ``paths`` (folders or glob patterns) and write one figure
    per benchmark (per env for PPO) to ``out_dir`` (default :func:`default_out_dir`):
    ``<name>.png``, ``<name>.pdf``, ``<name>.csv``, ``<name>.json``.

    ``bin_size``: environment steps per PPO bin (default: :func:`readable_bin` of the shortest
    run in the figure). ``task_bin``: consecutive rows (tasks, bins, increments) averaged into
    one point for the supervised benchmarks (1 = every row). ``name``: the figure's file name
    (with the benchmark appended when there are several). ``band``: ``"ci"``, the 95% bootstrap
    CI of the mean, or ``"se"``, one standard error. ``ppo_settings``: ``train.py``'s ``Args``,
    to label PPO runs that recorded no label (:func:`run_label`). ``resamples`` and ``bootstrap_seed``: of
    every bootstrap, in the figures and the table.

    Each figure has a companion ``<name>_all`` with one panel per metric the runs wrote (every
    CSV column, every TensorBoard scalar). Besides the figures, ``<name>_table.md`` and ``.csv``
    (``table`` without a ``name``): the method x metric table of
    :func:`ppo_cbp.reporting.tables.write_table`.

    Every figure is computed before the first file is written, so bad input writes nothing.

    :raises UsageError: for an empty or wrong folder, repeated seeds, or bad settings.
    """
    if bin_size is not None and bin_size < 1:
        raise UsageError(f"bin size must be >= 1, got {bin_size}")
    if task_bin < 1:
        raise UsageError(f"task bin must be >= 1, got {task_bin}")
    if network not in ("policy", "value"):
        raise UsageError(f"network must be policy or value, got {network!r}")
    if band not in BANDS:
        raise UsageError(f"band must be one of {', '.join(BANDS)}, got {band!r}")
    if resamples < 1:
        raise UsageError(f"resamples must be >= 1, got {resamples}")
    runs = load_runs(paths, ppo_settings)
    out = default_out_dir([r.run_dir for r in runs]) if out_dir is None else Path(out_dir)
    run_folder.check_writable(out, "the figures folder" if out_dir is None else "--out")
    groups = group_runs(runs)
    by_name: dict[str, list[Group]] = {}
    for g in groups:
        by_name.setdefault(figure_key(g), []).append(g)
    figures = []
    for fig_name, fgroups in by_name.items():
        final_name = (
            fig_name if name is None else (name if len(by_name) == 1 else f"{name}_{fig_name}")
        )
        figures.append(
            _figure(final_name, fgroups, bin_size, task_bin, network, resamples, bootstrap_seed)
        )
    tables = table_rows(figures, resamples=resamples, seed=bootstrap_seed)
    figures += [
        _figure(f"{f.name}_all", f.groups, bin_size, task_bin, network, resamples,
                bootstrap_seed, every_metric=True)
        for f in list(figures)
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for f in figures:
        for m in f.notes:
            note(f"{f.name}: {m}")
        colours = _colour_map(f.groups)
        caption = (
            band_caption(band, resamples)
            if any(s.n_seeds > 1 for _, series in f.panel_series for s in series)
            else "one seed per curve: no band"
        )
        files = _draw(
            f.name, f.title, f.panel_series, out, f.xlabel, colours, f.vlines,
            top_panel_wide=f.kind == "ppo", caption=caption, band=band,
        )  # fmt: skip
        files += _write_data(f.name, f.kind, f.title, f.notes, f.groups, f.panel_series, out)
        results.append(FigureResult(f.name, f.kind, files, f.notes, f.groups))
    if tables:
        stem = "table" if name is None else f"{name}_table"
        files = write_table(tables, out, stem, resamples, bootstrap_seed)
        wide = out / f"{stem}_metrics.md"
        wide.write_text(
            "# Method x metric tables\n\n"
            + METRICS_CAPTION.format(resamples=resamples, seed=bootstrap_seed)
            + "".join(
                "\n"
                + wide_markdown(f.name, metric_tables(f, resamples=resamples, seed=bootstrap_seed))
                for f in figures
                if not f.name.endswith("_all") and f.groups[0].kind != "ppo"
            )
        )
        files.append(wide)
        groups = [g for f in figures for g in f.groups]
        results.append(FigureResult(stem, "table", files, [], groups))
    return results


METRICS_CAPTION = (
    "Per supervised benchmark, each metric of its figure (Extended Data Fig. 4's panels): the "
    "mean over seeds with its 95% bootstrap CI (BCa, {resamples:,} resamples, seed {seed}) of "
    "each seed's final value (mean over the last tenth of the points) and of its AUC (mean over "
    "all points). See ppo_cbp/reporting/tables.py.\n"
)


def _figure(
    name: str,
    groups: list[Group],
    bin_size: int | None,
    task_bin: int,
    network: str,
    resamples: int,
    seed: int,
    every_metric: bool = False,
) -> _Figure:
    """The figure of ``groups``: the benchmark's panels, or with ``every_metric`` one panel per
    metric the runs wrote (:func:`every_metric_panels`)."""
    kind = groups[0].kind
    notes: list[str] = []
    vlines = None
    if kind == "ppo":
        all_runs = [r for g in groups for r in g.runs]
        if bin_size is None:
            span = min(r.length for r in all_runs)
            bin_size = readable_bin(span)
            notes.append(
                f"bins of {bin_size:,} steps, about 100 over the {span:,} steps every run "
                "covers (--bin sets them)"
            )
        step = bin_size
        panels = ppo_panels(step, network)
        for tag, ylabel in EVAL_PANELS.items():  # with --eval-every: scores of their own
            if any(tag in r.scalars for r in all_runs):
                panels.append(Panel(tag.replace("/", "_"), ylabel, _scalar_binned(tag, step)))
        if every_metric:
            panels = every_metric_panels(all_runs, step)
        title = f"{KIND_TITLES[kind]} on {groups[0].config.get('env', '?')}, bins of {step:,} steps"
        xlabel = "Environment steps"

        def x_of(r: SeedRun, L: int) -> np.ndarray:
            return (np.arange(L) + 1.0) * step

        vlines = friction_changes(all_runs)
        for r in all_runs:
            if r.length < step:
                notes.append(f"{r.run_dir}: {r.length} steps, shorter than one bin of {step}")
    else:
        base = supervised_panels(kind)
        if every_metric:
            base = every_metric_panels([r for g in groups for r in g.runs], 1)
        panels = [Panel(p.key, p.ylabel, _row_binned(p.extract, task_bin)) for p in base]
        unit = {"scr": "Example", "cifar": "Increment"}.get(kind, "Task")
        title = KIND_TITLES[kind] + (f", bins of {task_bin} rows" if task_bin > 1 else "")
        xlabel = f"{unit} number" if kind != "scr" else "Examples"

        def x_of(r: SeedRun, L: int) -> np.ndarray:
            if kind == "scr" and "examples" in r.columns:
                ex = r.columns["examples"]
                return ex[task_bin - 1 :: task_bin][:L]
            return (np.arange(L) + 1.0) * task_bin

    panel_series: list[tuple[Panel, list[Series]]] = []
    for panel in panels:
        series, panel_notes = [], []
        for g in groups:
            s, msg = group_series(g, panel, x_of, resamples=resamples, seed=seed)
            if msg and msg not in notes:
                panel_notes.append(msg)
            if s is not None:
                series.append(s)
        if series:
            panel_series.append((panel, series))
            notes += panel_notes
        else:
            notes.append(f"no run has {panel.key}; panel skipped")
    if not panel_series:
        raise UsageError(f"{name}: none of the runs has a metric to plot yet")
    prefix_notes = [m for m in notes if "common prefix" in m]
    if prefix_notes:
        title += "\n(seeds of different lengths: common prefix plotted)"
    lengths = {g.label: min(r.length for r in g.runs) for g in groups}
    if len(set(lengths.values())) > 1:
        notes.append(
            "groups differ in length: " + ", ".join(f"{k}: {v}" for k, v in lengths.items())
        )
    return _Figure(name, kind, title, xlabel, groups, panel_series, notes, vlines)


def _row_binned(
    extract: Callable[[SeedRun], np.ndarray | None], k: int
) -> Callable[[SeedRun], np.ndarray | None]:
    """Means of consecutive blocks of ``k`` rows (an incomplete last block is dropped)."""
    if k == 1:
        return extract

    def f(r: SeedRun) -> np.ndarray | None:
        v = extract(r)
        if v is None:
            return None
        m = len(v) // k
        return v[: m * k].reshape(m, k).mean(1)

    return f
