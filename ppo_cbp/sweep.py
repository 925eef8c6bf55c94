"""Sweeps over seeds and hyperparameters, one Ray task per trial (driven by ``scripts/sweep.py``).

A sweep runs one program (``ppo_cbp/train.py`` or a ``scripts/supervised.py`` subcommand)
with fixed flags over the Cartesian product of a grid of flag values and a list of seeds. A
*trial* is one configuration (one value per grid flag) and its seeds: one seed for PPO; for the
supervised benchmarks, which train seeds in lockstep, ``seeds_per_trial`` seeds at once.

Layout under ``<runs_dir>/<sweep name>/``:

* ``manifest.json``: the sweep (program, fixed flags, grid, seeds) and, per trial, its
  configuration, seeds, command, run folder, ``state`` (``pending``, ``running``, ``done``,
  ``failed``), ``attempts`` (launches so far, over all invocations), last return code and
  log tail, and, once done, its per-seed metrics. Written atomically (temporary file, then
  ``os.replace``) by the driver only.
* ``<trial id>/``: the trial's run folder (the program's own outputs) and ``trial.log``, the
  program's stdout and stderr over all attempts, each attempt preceded by a header line.
* ``results.csv``: one row per trial and seed (configuration, seed, metrics); ``summary.csv``:
  per configuration, the number of seeds ``n`` and for every metric the mean over seeds and its
  standard error ``s / sqrt(n)`` (``s`` the sample standard deviation, ``ddof = 1``; empty for
  ``n = 1``).

Metrics per seed, "final" as the tables of ``scripts/plot.py`` define it
(:func:`ppo_cbp.reporting.tables.seed_metrics`). Supervised runs (from ``metrics.csv`` and
``summary.json``): ``final_<m>``, the mean of ``m`` over the last tenth of the rows (tasks or
bins; at least the last row), and ``mean_<m>``, its mean over all rows (for measured metrics
only, not for labels such as class ids or the cumulative units replaced). PPO runs (from the
TensorBoard scalar ``charts/episodic_return``, step = environment step at the episode's end,
in bins of :func:`~ppo_cbp.reporting.figures.readable_bin` steps as the figures bin one run):
``final_episodic_return``, the mean over the bins of the last complete friction segment (with
friction changes) or of the last tenth of the bins; ``mean_episodic_return`` over all
episodes, ``episodes`` and ``last_step``.

Re-running a sweep skips ``done`` trials; any other trial starts again, continuing from its
checkpoint when its folder holds one (``--resume``), otherwise from scratch after clearing the
folder's partial outputs (``trial.log`` is kept). Before anything starts, every
configuration's command is read by the program's own parser (:func:`check_commands`), and the
sweep's folder is checked by creating it (:func:`ppo_cbp.run_folder.check_writable`). A trial
whose program exits non-zero is retried up to ``max_retries`` times per invocation, then marked
``failed``; exit code 2, the program's refusal of its input, is final at once (every attempt
would be refused alike).

On a multi-node cluster the repository must sit at the same path on every node and
``runs_dir`` on a shared filesystem (resuming needs the checkpoint where the trial runs); the
metrics travel back to the driver through Ray.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppo_cbp import run_folder
from ppo_cbp.errors import ALREADY_FINISHED, UsageError
from ppo_cbp.formatting import count, duration, measured

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
TRIAL_LOG = "trial.log"
RESULTS_CSV = "results.csv"
SUMMARY_CSV = "summary.csv"
CHECKPOINT = "checkpoint.pt"
USAGE_ERROR = 2  # the programs' exit code for input they refuse (ppo_cbp.cli.report_error)
LOG_TAIL_LINES = 20

INSTALL_HINT = "sweeps run on Ray: pip install -e '.[sweep]' (from the repository root)"
TOKEN_HINT = (
    "the Ray cluster at {address} uses token authentication (Ray 2.60's `ray start "
    "--head` turns it on): run the sweep with RAY_AUTH_MODE=token set, and with the head's "
    "token in ~/.ray/auth_token on this machine (or in RAY_AUTH_TOKEN)"
)
TOKEN_MISMATCH_HINT = (
    "the Ray cluster at {address} refused this machine's token: copy the head's "
    "~/.ray/auth_token here (or set RAY_AUTH_TOKEN to it)"
)

# Flags the sweep sets itself for every trial.
_MANAGED = {
    "ppo": ("seed", "run-name", "runs-dir", "resume", "progress", "no-progress"),
    "supervised": ("seeds", "out", "resume", "no-resume", "progress", "no-progress"),
}
SUPERVISED_SUBCOMMANDS = (
    "permuted-mnist",
    "slowly-changing-regression",
    "continual-imagenet",
    "incremental-cifar",
)
# Row counters of the benchmarks' metrics.csv, not metrics.
COUNTERS = ("task", "bin", "examples", "increment")
# PPO's method is a set of switches; ``method=cbp`` in a grid turns on ``--cbp``.
PPO_METHODS = {
    "bp": (),
    "ppo": (),
    "cbp": ("--cbp",),
    "redo": ("--redo",),
    "l2": ("--l2",),
    "snp": ("--shrink-perturb",),
    "shrink-perturb": ("--shrink-perturb",),
    "stdadam": ("--standard-adam",),
    "standard-adam": ("--standard-adam",),
}


# --------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class Program:
    """What a trial runs: ``kind`` (``ppo`` or ``supervised``), the script relative to the
    repository root and the subcommand (supervised only)."""

    kind: str
    script: str
    subcommand: str | None = None

    def argv(self) -> list[str]:
        """The program's words, for the manifest and messages."""
        return [self.script] + ([self.subcommand] if self.subcommand else [])


def parse_program(words: Sequence[str]) -> tuple[Program, list[str]]:
    """Split ``words`` (the command line after ``sweep.py``'s own options) into the program and
    its fixed flags. ``ppo_cbp/train.py`` (or ``train.py``, ``train``) is PPO;
    ``scripts/supervised.py <subcommand>`` (or ``supervised.py``, ``supervised``) a supervised
    benchmark with one of :data:`SUPERVISED_SUBCOMMANDS`."""
    if not words:
        raise UsageError("missing the program: ppo_cbp/train.py or scripts/supervised.py <sub>")
    name, rest = words[0], list(words[1:])
    base = Path(name).name.removesuffix(".py")
    if base == "train":
        return Program("ppo", "ppo_cbp/train.py"), rest
    if base == "supervised":
        if not rest or rest[0] not in SUPERVISED_SUBCOMMANDS:
            got = rest[0] if rest else "nothing"
            raise UsageError(
                f"scripts/supervised.py needs a subcommand ({', '.join(SUPERVISED_SUBCOMMANDS)}), "
                f"got {got}"
            )
        return Program("supervised", "scripts/supervised.py", rest[0]), rest[1:]
    raise UsageError(
        f"unknown program {name!r}; expected ppo_cbp/train.py or scripts/supervised.py <sub>"
    )


def parse_seeds(specs: Sequence[str]) -> list[int]:
    """Seeds from words like ``0-29``, ``0,1,2`` or ``3`` (ranges inclusive), in order given;
    duplicates and negative seeds are errors."""
    seeds: list[int] = []
    for spec in specs:
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"(\d+)-(\d+)", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise UsageError(f"empty seed range {part!r} (end before start)")
                seeds.extend(range(lo, hi + 1))
            elif re.fullmatch(r"\d+", part):
                seeds.append(int(part))
            else:
                raise UsageError(f"bad seed {part!r}: expected N, N-M or N,M,...")
    if not seeds:
        raise UsageError("no seeds given")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"duplicate seeds in {list(specs)}")
    return seeds


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["method=bp,cbp", "replacement-rate=1e-4,1e-5"]`` -> ``{"method": ["bp", "cbp"], ...}``.

    Keys are flag names without ``--`` (underscores become hyphens); values are kept as
    written. ``true``/``false`` turn a switch on or off (``--flag``/``--no-flag``)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if not sep or not key:
            raise UsageError(f"bad grid item {item!r}: expected flag=value1,value2,...")
        vals = [v.strip() for v in values.split(",")]
        if not all(vals):
            raise UsageError(f"empty value in grid item {item!r}")
        if len(set(vals)) != len(vals):
            raise UsageError(f"duplicate values in grid item {item!r}")
        if key in grid:
            raise UsageError(f"grid flag {key!r} given twice")
        grid[key] = vals
    return grid


def _flag_names(words: Sequence[str]) -> set[str]:
    return {w[2:].split("=", 1)[0].replace("_", "-") for w in words if w.startswith("--")}


def check_flags(program: Program, fixed: Sequence[str], grid: dict[str, list[str]]) -> None:
    """Reject flags the sweep sets itself and grid flags also given as fixed flags."""
    managed = set(_MANAGED[program.kind])
    for name in sorted(_flag_names(fixed) | set(grid)):
        if name in managed:
            raise UsageError(
                f"--{name} is set by the sweep for every trial; remove it "
                "(seeds: --seeds; output: --runs-dir/--name)"
            )
    both = _flag_names(fixed) & set(grid)
    if both:
        raise UsageError(f"flags both fixed and in the grid: {', '.join(sorted(both))}")
    if program.kind == "ppo" and "method" in grid:
        bad = [v for v in grid["method"] if any(m not in PPO_METHODS for m in v.split("+"))]
        if bad:
            raise UsageError(
                f"unknown PPO method {bad[0]!r}; expected one of {', '.join(PPO_METHODS)} "
                "(combine with +, e.g. cbp+l2)"
            )


def config_flags(program: Program, config: dict[str, str]) -> list[str]:
    """Command-line words for one configuration."""
    words: list[str] = []
    for key, value in config.items():
        if program.kind == "ppo" and key == "method":
            for m in value.split("+"):
                words.extend(PPO_METHODS[m])
        elif value.lower() == "true":
            words.append(f"--{key}")
        elif value.lower() == "false":
            words.append(f"--no-{key}")
        else:
            words.extend([f"--{key}", value])
    return words


def _seed_label(seeds: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2_5``."""
    parts = []
    for _, run in itertools.groupby(enumerate(seeds), key=lambda p: p[1] - p[0]):
        r = [s for _, s in run]
        parts.append(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}")
    return "_".join(parts)


def trial_id(config: dict[str, str], seeds: Sequence[int]) -> str:
    """Folder-safe trial name: ``method=cbp__replacement-rate=1e-4__s0`` (``s0-4`` for seeds
    0..4 in one trial)."""
    parts = [f"{k}={v}" for k, v in config.items()] + [f"s{_seed_label(seeds)}"]
    return re.sub(r"[^A-Za-z0-9=._+-]", "_", "__".join(parts))


@dataclass
class Trial:
    """One configuration and its seeds, run by one program invocation."""

    id: str
    config: dict[str, str]
    seeds: list[int]
    run_dir: Path


def make_trials(
    program: Program,
    grid: dict[str, list[str]],
    seeds: Sequence[int],
    sweep_dir: Path,
    seeds_per_trial: int = 1,
) -> list[Trial]:
    """Trials in grid order (first grid flag slowest), each configuration's seeds in chunks of
    ``seeds_per_trial`` (supervised benchmarks only)."""
    if seeds_per_trial < 1:
        raise UsageError(f"--seeds-per-trial must be >= 1, got {seeds_per_trial}")
    if seeds_per_trial > 1 and program.kind != "supervised":
        raise UsageError(
            "--seeds-per-trial > 1 needs a supervised benchmark (PPO runs one seed per trial)"
        )
    keys = list(grid)
    trials = []
    for values in itertools.product(*(grid[k] for k in keys)):
        config = dict(zip(keys, values))
        for i in range(0, len(seeds), seeds_per_trial):
            chunk = list(seeds[i : i + seeds_per_trial])
            tid = trial_id(config, chunk)
            trials.append(Trial(tid, config, chunk, Path(sweep_dir) / tid))
    return trials


# The programs as modules: what an installed copy, without the checkout's files, runs.
MODULES = {
    "ppo_cbp/train.py": "ppo_cbp.train",
    "scripts/supervised.py": "ppo_cbp.commands.supervised",
}


def trial_command(program: Program, fixed: Sequence[str], trial: Trial, resume: bool) -> list[str]:
    """The program's argument list (without the interpreter) for ``trial``: the checkout's
    script, or ``-m <module>`` in an installed copy (``ppo-cbp-sweep``), which has no
    ``scripts/``."""
    script = REPO_ROOT / program.script
    words = [str(script)] if script.is_file() else ["-m", MODULES[program.script]]
    if program.subcommand:
        words.append(program.subcommand)
    words += list(fixed) + config_flags(program, trial.config)
    run_dir = Path(trial.run_dir).resolve()
    if program.kind == "ppo":
        (seed,) = trial.seeds
        words += ["--seed", str(seed), "--runs-dir", str(run_dir.parent)]
        words += ["--run-name", run_dir.name, "--no-progress"]
        if resume:
            words += ["--resume", str(run_dir)]
    else:
        words += ["--seeds", *map(str, trial.seeds), "--out", str(run_dir), "--no-progress"]
        if resume:
            words.append("--resume")
    return words


def program_parser(program: Program) -> Callable[[Sequence[str]], Any]:
    """The program's own command-line parser: its arguments (without the script's path) to its
    settings, or a :class:`UsageError` of one line. Parsing has no side effects."""
    from ppo_cbp import cli

    if program.kind == "ppo":
        from ppo_cbp.train import Args

        return lambda argv: cli.parse(Args, argv, prog="train.py")
    from ppo_cbp.benchmarks.registry import parse

    prog = f"supervised.py {program.subcommand}"
    return lambda argv: parse(argv, prog=prog)


def check_commands(program: Program, fixed: Sequence[str], trials: Sequence[Trial]) -> None:
    """Read the fixed flags, then each configuration's command (with its first trial's seeds),
    with the program's parser: a flag it does not know or a value it cannot read would fail
    every attempt.

    :raises UsageError: naming the fixed flags or the grid point, and what the program said.
    """
    if not trials:
        return
    parse = program_parser(program)
    first = trials[0]
    points = {"fixed flags": Trial(first.id, {}, first.seeds, first.run_dir)}
    for t in trials:
        if t.config:
            points.setdefault("grid point " + " ".join(f"{k}={v}" for k, v in t.config.items()), t)
    for where, t in points.items():
        try:
            parse(trial_command(program, fixed, t, resume=False)[1:])
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None


# --------------------------------------------------------------------------------------------
# Manifest


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_manifest(sweep_dir: Path) -> dict[str, Any] | None:
    path = Path(sweep_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest.get("trials"), dict):
            raise ValueError("no trials in it")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise UsageError(
            f"{path} is unreadable ({e}); remove it to start the sweep over, or use another --name"
        ) from e
    return manifest


def init_manifest(
    sweep_dir: Path,
    program: Program,
    fixed: Sequence[str],
    trials: Sequence[Trial],
) -> dict[str, Any]:
    """The sweep's manifest: the existing one with this invocation's new trials added, or a new
    one. A manifest of another program or other fixed flags is an error."""
    manifest = load_manifest(sweep_dir)
    if manifest is None:
        manifest = {"program": program.argv(), "fixed": list(fixed), "trials": {}}
    elif manifest["program"] != program.argv() or manifest["fixed"] != list(fixed):
        raise UsageError(
            f"{Path(sweep_dir) / MANIFEST} belongs to another sweep (program "
            f"{' '.join(manifest['program'])}, fixed flags {manifest['fixed']}); "
            "use the same program and fixed flags, or another --name"
        )
    for t in trials:
        manifest["trials"].setdefault(
            t.id,
            {
                "config": t.config,
                "seeds": t.seeds,
                "run_dir": str(t.run_dir),
                "state": "pending",
                "attempts": 0,
                "returncode": None,
                "log_tail": None,
                "metrics": None,
            },
        )
    return manifest


# --------------------------------------------------------------------------------------------
# Reading results


def supervised_metrics(run_dir: Path, seeds: Sequence[int]) -> dict[int, dict[str, float]]:
    """Per seed: ``final_<m>`` for every column of ``metrics.csv`` (the row counters
    :data:`COUNTERS` excluded), its mean over the last tenth of the rows (the tables' final),
    and ``mean_<m>`` for every metric averaged over the rows (``summary.json``'s
    ``mean_over_rows``: no labels, no cumulative counts)."""
    from ppo_cbp.reporting.tables import final_points

    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"no summary of the finished run: expected {path}")
    per_seed = json.loads(path.read_text())["seeds"]
    out: dict[int, dict[str, float]] = {}
    for seed in seeds:
        s = per_seed[str(seed)]
        with open(Path(run_dir) / f"seed_{seed}" / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        last = rows[-final_points(len(rows)) :]
        keys = [k for k in rows[-1] if k not in COUNTERS]
        out[seed] = {f"final_{k}": sum(float(r[k]) for r in last) / len(last) for k in keys}
        out[seed].update({f"mean_{k}": float(v) for k, v in s["mean_over_rows"].items()})
    return out


def ppo_metrics(run_dir: Path) -> dict[str, float]:
    """Episodic-return metrics of a PPO run from its TensorBoard events (see module doc)."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ppo_cbp.reporting.figures import bin_by_step, readable_bin
    from ppo_cbp.reporting.tables import seed_metrics

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tag = "charts/episodic_return"
    tags = acc.Tags().get("scalars", [])
    if tag not in tags:
        return {"episodes": 0.0}
    events = sorted(acc.Scalars(tag), key=lambda e: e.step)
    steps = np.array([e.step for e in events])
    returns = np.array([e.value for e in events], dtype=np.float64)
    last = int(steps[-1])
    length = max(max(e.step for e in acc.Scalars(t)) for t in tags)  # as the figures read it
    path = Path(run_dir) / "config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    bin_size = readable_bin(length)
    n_bins = max(1, length // bin_size)
    binned = bin_by_step(steps, returns, bin_size, n_bins)
    x = (np.arange(n_bins) + 1) * bin_size
    every = int(config.get("friction_every") or 0)
    final = float(seed_metrics(binned[None, :], x, every)["final"][0])
    return {
        "final_episodic_return": final,
        "mean_episodic_return": float(returns.mean()),
        "episodes": float(len(returns)),
        "last_step": float(last),
    }


def trial_metrics(kind: str, run_dir: Path, seeds: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per seed (keys are strings, as in JSON) the trial's metrics."""
    if kind == "ppo":
        return {str(seeds[0]): ppo_metrics(run_dir)}
    return {str(s): m for s, m in supervised_metrics(run_dir, seeds).items()}


# --------------------------------------------------------------------------------------------
# The Ray task's body


def _die_with_parent() -> None:
    # The program must not outlive the Ray worker (killed when the sweep's driver dies): ask
    # Linux for SIGTERM on the worker's death, which the trainers answer with a checkpoint.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _finished_before(log: Path, attempt: int) -> bool:
    """Whether attempt ``attempt``'s program refused to resume because its run had already
    finished (:data:`ppo_cbp.errors.ALREADY_FINISHED`): the sweep died between the program's
    end and recording it."""
    text = _tail(log, lines=LOG_TAIL_LINES)
    _, _, output = text.rpartition(f"=== attempt {attempt} on ")
    return any(
        line.startswith("error: ") and ALREADY_FINISHED in line for line in output.splitlines()
    )


def run_trial(
    kind: str,
    command: Sequence[str],
    run_dir: str,
    seeds: Sequence[int],
    attempt: int,
    resume: bool,
    cpus: float,
    gpus: float,
) -> dict[str, Any]:
    """Run one trial's program to its end (the body of the Ray task).

    ``command`` excludes the interpreter: the worker's own ``sys.executable`` runs it. Output
    goes to ``<run_dir>/trial.log`` (appended). A fresh (non-resume) attempt first clears the
    folder's partial outputs. Returns ``returncode``, ``log_tail``, ``host``, ``seconds`` and,
    on success, ``metrics`` (see :func:`trial_metrics`)."""
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if not resume:
        for p in folder.iterdir():
            if p.name != TRIAL_LOG:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    env = dict(os.environ)
    threads = str(max(1, int(cpus)))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    if gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU trial must not take a GPU others declared
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    argv = [sys.executable, *command]
    log = folder / TRIAL_LOG
    t0 = time.time()
    with open(log, "a") as f:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"=== attempt {attempt} on {socket.gethostname()} at {stamp}")
        f.write(f" ({'resume' if resume else 'fresh'}): {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(
            argv,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else None,
            preexec_fn=_die_with_parent,
        )
        try:
            # Wait in short slices: Ray's cancellation is an exception raised between
            # bytecodes, which a single blocking wait would hold off until the program ends.
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
        finally:  # cancelled (KeyboardInterrupt in the task): let the program checkpoint
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                f.write(
                    f"=== attempt {attempt} stopped by the sweep: program (pid {proc.pid}) "
                    f"exited with code {proc.returncode}\n"
                )
        f.write(f"=== attempt {attempt} exited with code {rc}\n")
    if rc == 2 and resume and _finished_before(log, attempt):
        rc = 0  # the program had finished before the sweep could record it
    result: dict[str, Any] = {
        "returncode": rc,
        "host": socket.gethostname(),
        "seconds": time.time() - t0,
        "log_tail": _tail(log),
        "metrics": None,
    }
    if rc == 0:
        try:
            result["metrics"] = trial_metrics(kind, folder, seeds)
        except Exception as e:  # counted as a failure: the run finished without its outputs
            result["returncode"] = -1
            result["log_tail"] += f"\nreading the results failed: {e!r}"
    return result


# --------------------------------------------------------------------------------------------
# Tables


def recorded_label(run_dir: Path | str) -> str:
    """The configuration's label that the run recorded in its ``config.json`` (as in the
    figures and tables of ``scripts/plot.py``); empty before the run wrote one."""
    try:
        label = json.loads((Path(run_dir) / "config.json").read_text()).get("label")
    except (OSError, ValueError, AttributeError):
        return ""
    return label if isinstance(label, str) else ""


def result_rows(manifest: dict[str, Any], ids: Sequence[str]) -> list[dict[str, Any]]:
    """One row per trial and seed: ``trial``, ``state``, the configuration's ``label``
    (:func:`recorded_label`), the grid's settings, ``seed``, ``run_dir`` and the metrics (empty
    unless done)."""
    rows = []
    for tid in ids:
        t = manifest["trials"][tid]
        label = recorded_label(t["run_dir"])
        for seed in t["seeds"]:
            metrics = (t.get("metrics") or {}).get(str(seed), {}) if t["state"] == "done" else {}
            rows.append(
                {
                    "trial": tid,
                    "state": t["state"],
                    "label": label,
                    **t["config"],
                    "seed": seed,
                    "run_dir": t["run_dir"],
                    **metrics,
                }
            )
    return rows


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error ``s / sqrt(n)`` (``s`` with ``ddof = 1``; NaN for n = 1)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def group_rows(
    rows: Sequence[dict[str, Any]], config_keys: Sequence[str], metric_keys: Sequence[str]
) -> list[dict[str, Any]]:
    """Per configuration (first-seen order), over its ``done`` rows: ``n``, and for each
    metric ``<m>_mean`` and ``<m>_se``. Configurations without a done seed are left out."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["state"] == "done":
            groups.setdefault(tuple(r[k] for k in config_keys), []).append(r)
    table = []
    for key, members in groups.items():
        out: dict[str, Any] = {"label": members[0].get("label", "")}
        out.update(zip(config_keys, key))
        out["n"] = len(members)
        for m in metric_keys:
            vals = [float(r[m]) for r in members if r.get(m) not in (None, "")]
            mean, se = mean_se(vals) if vals else (math.nan, math.nan)
            out[f"{m}_mean"], out[f"{m}_se"] = mean, se
        table.append(out)
    return table


def _cell(v: Any) -> Any:
    return "" if isinstance(v, float) and math.isnan(v) else v


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows to CSV (columns in first-seen order; NaN and missing as empty), atomically."""
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
    os.replace(tmp, path)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``columns``: floats as measured values, integers as counts
    (:mod:`ppo_cbp.formatting`), anything else as it is."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return measured(v)
        if isinstance(v, int) and not isinstance(v, bool):
            return count(v)
        return str(v)

    cells = [list(columns)] + [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` returns."""

    sweep_dir: Path
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# The driver


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise UsageError(f"Ray is not installed ({e}); {INSTALL_HINT}") from e
    return ray


def needs_token(exc: BaseException) -> bool:
    """Whether an exception is Ray's refusal of a missing or wrong token.

    :param exc: the exception raised while joining the cluster.
    :return: True when ``exc`` or an exception it came from (its cause or context) is that
        refusal: Ray 2.60 wraps it in a ConnectionError whose cause quotes it as text.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "AuthenticationError" or any(
            s in str(e) for s in ("AuthenticationError", "InvalidAuthToken", "Unauthenticated")
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at ``host:port`` (Ray itself would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"bad --address {address!r}: expected host:port (the head's) or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise UsageError(
            f"nothing answers at --address {address} ({e}): start the head there with "
            f"`ray start --head --port {port}`, or check the address"
        ) from e


def join_ray(ray: Any, address: str | None, num_cpus: int | None) -> None:
    """``ray.init``: a local instance with ``num_cpus`` CPUs, or the cluster at ``address``.

    :raises UsageError: when the cluster cannot be reached or asks for a token we lack.
    """
    if not address:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        return
    if address != "auto" and "://" not in address:
        _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as e:
        if needs_token(e):
            token_mode = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
            hint = TOKEN_MISMATCH_HINT if token_mode else TOKEN_HINT
            raise UsageError(hint.format(address=address)) from None
        if isinstance(e, ConnectionError):
            raise UsageError(f"cannot join the Ray cluster at {address}: {e}") from None
        raise


def _slots(ray: Any, cpus: float, gpus: float) -> int:
    """Trials the cluster can run at once now (re-read every loop: clusters grow and shrink)."""
    res = ray.cluster_resources()
    n = math.floor(res.get("CPU", 0) / cpus) if cpus > 0 else 10**9
    if gpus > 0:
        n = min(n, math.floor(res.get("GPU", 0) / gpus + 1e-9))
    return max(1, n)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def run_sweep(
    program: Program,
    fixed: Sequence[str],
    grid: dict[str, list[str]],
    seeds: Sequence[int],
    name: str,
    *,
    runs_dir: str | Path = "runs",
    seeds_per_trial: int = 1,
    max_retries: int = 1,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    log: Any = print,
) -> SweepOutcome:
    """Run (or continue) the sweep ``name``; see the module docstring.

    Ray: an already initialised Ray is used as is; otherwise ``ray.init(address=address)``
    joins a cluster, or without ``address`` a local instance with ``num_cpus`` (default: this
    machine's cores) is started, and shut down at the end. Each trial is a task declaring
    ``cpus_per_trial`` CPUs and ``gpus_per_trial`` GPUs (default: 1 when the cluster has GPUs,
    else 0; fractions share a GPU). At most as many trials are submitted as the cluster's
    resources can run at once, so that ``running`` means running.

    Nothing is written before Ray is up and the cluster can run a trial.

    :raises UsageError: for a bad sweep definition (flags or values the program does not
        accept, a folder that cannot be written; found before Ray is started), a cluster that
        cannot be joined or is too small, or a missing Ray.
    """
    if not re.fullmatch(r"[A-Za-z0-9._+=-]+", name or ""):
        raise UsageError(f"bad sweep name {name!r}: use letters, digits and . _ + = -")
    if max_retries < 0:
        raise UsageError(f"--max-retries must be >= 0, got {max_retries}")
    if cpus_per_trial <= 0:
        raise UsageError(f"--cpus-per-trial must be > 0, got {cpus_per_trial}")
    if gpus_per_trial is not None and gpus_per_trial < 0:
        raise UsageError(f"--gpus-per-trial must be >= 0, got {gpus_per_trial}")
    if num_cpus is not None and num_cpus < 1:
        raise UsageError(f"--num-cpus must be >= 1, got {num_cpus}")
    check_flags(program, fixed, grid)
    seeds = list(seeds)
    sweep_dir = Path(runs_dir).resolve() / name
    trials = make_trials(program, grid, seeds, sweep_dir, seeds_per_trial)
    ids = [t.id for t in trials]
    if len(set(ids)) != len(ids):
        raise UsageError("two grid values map to the same trial folder name; rename them")
    check_commands(program, fixed, trials)
    run_folder.check_writable(Path(runs_dir) / name, "the sweep folder")
    by_id = {t.id: t for t in trials}
    manifest = init_manifest(sweep_dir, program, fixed, trials)  # checks; written below
    manifest_path = sweep_dir / MANIFEST
    ray = _import_ray()

    def save() -> None:
        write_json_atomic(manifest_path, manifest)

    started_ray = not ray.is_initialized()
    if started_ray:
        join_ray(ray, address, num_cpus)
    # After ray.init, whose handlers would abort the driver on SIGTERM: treat it as Ctrl-C so
    # that the trials stop with a checkpoint and the manifest is saved.
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        res = ray.cluster_resources()
        gpus = (1.0 if res.get("GPU", 0) > 0 else 0.0) if gpus_per_trial is None else gpus_per_trial
        if gpus > 0 and res.get("GPU", 0) < gpus:
            raise UsageError(
                f"--gpus-per-trial {gpus:g} but the cluster has {res.get('GPU', 0):g} GPUs"
            )
        if res.get("CPU", 0) < cpus_per_trial:
            raise UsageError(
                f"--cpus-per-trial {cpus_per_trial:g} but the cluster has {res.get('CPU', 0):g} CPUs"
            )
        sweep_dir.mkdir(parents=True, exist_ok=True)
        save()
        entries = manifest["trials"]
        outcome = SweepOutcome(sweep_dir)
        outcome.skipped = [i for i in ids if entries[i]["state"] == "done"]
        queue = [i for i in ids if entries[i]["state"] != "done"]
        configs = math.prod(len(v) for v in grid.values())
        log(
            f"sweep {name}: {' '.join(program.argv())}; {_plural(len(ids), 'trial')} "
            f"({_plural(configs, 'configuration')} x {_plural(len(seeds), 'seed')}, "
            f"{seeds_per_trial} per trial); {len(outcome.skipped)} done before, "
            f"{len(queue)} to run"
        )
        log(
            f"resources: {cpus_per_trial:g} CPU and {gpus:g} GPU per trial; cluster "
            f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs on "
            f"{len(ray.nodes())} node(s): up to {_slots(ray, cpus_per_trial, gpus)} trials at once"
        )
        for tid in queue:
            if entries[tid]["state"] == "running":
                log(f"  {tid}: interrupted in an earlier run; continuing it")
        remote = ray.remote(max_retries=0)(run_trial)
        failures: dict[str, int] = {}
        running: dict[Any, str] = {}
        t_start = time.time()
        bar = None
        if progress and sys.stderr.isatty():  # a bar redrawn in place is for terminals
            from tqdm import tqdm

            bar = tqdm(total=len(ids), initial=len(outcome.skipped), unit="trial", desc=name)

        def status() -> None:
            if bar is not None:
                bar.set_postfix(
                    done=sum(entries[i]["state"] == "done" for i in ids),
                    running=len(running),
                    failed=len(outcome.failed),
                )

        def submit(tid: str) -> None:
            t, e = by_id[tid], entries[tid]
            resume = (t.run_dir / CHECKPOINT).exists()
            e["attempts"] += 1
            e["state"] = "running"
            e["command"] = trial_command(program, fixed, t, resume)
            ref = remote.options(num_cpus=cpus_per_trial, num_gpus=gpus).remote(
                program.kind,
                e["command"],
                str(t.run_dir),
                t.seeds,
                e["attempts"],
                resume,
                cpus_per_trial,
                gpus,
            )
            running[ref] = tid

        try:
            while queue or running:
                free = _slots(ray, cpus_per_trial, gpus) - len(running)
                while queue and free > 0:
                    submit(queue.pop(0))
                    free -= 1
                save()
                status()
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in ready:
                    tid = running.pop(ref)
                    e = entries[tid]
                    try:
                        r = ray.get(ref)
                    except Exception as exc:  # the worker or its node died
                        r = {
                            "returncode": None,
                            "metrics": None,
                            "log_tail": _tail(by_id[tid].run_dir / TRIAL_LOG) + f"\n{exc!r}",
                        }
                    e["returncode"], e["log_tail"] = r["returncode"], r["log_tail"]
                    e["host"], e["seconds"] = r.get("host"), r.get("seconds")
                    if r["returncode"] == 0:
                        e["state"], e["metrics"] = "done", r["metrics"]
                        outcome.done.append(tid)
                    else:
                        failures[tid] = failures.get(tid, 0) + 1
                        refused = r["returncode"] == USAGE_ERROR
                        if failures[tid] <= max_retries and not refused:
                            e["state"] = "pending"
                            queue.insert(0, tid)
                            msg = f"{tid}: exit code {r['returncode']}; retry {failures[tid]}"
                            (bar.write if bar else log)(msg + f" of {max_retries}")
                        else:
                            e["state"] = "failed"
                            outcome.failed.append(tid)
                            why = ": the program refused its input, not retried" if refused else ""
                            msg = (
                                f"FAILED {tid} after {_plural(failures[tid], 'attempt')} "
                                f"(exit code {r['returncode']}{why}); log "
                                f"{by_id[tid].run_dir / TRIAL_LOG}, last lines:\n"
                                + "\n".join("    " + ln for ln in r["log_tail"].splitlines())
                            )
                            (bar.write if bar else log)(msg)
                    if bar is not None:
                        bar.update(1 if e["state"] in ("done", "failed") else 0)
                save()
                status()
        except BaseException:
            # Interrupted: stop the programs (they checkpoint on SIGTERM) and leave the
            # trials pending; the next run continues them.
            for ref in running:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            with contextlib.suppress(BaseException):
                ray.wait(list(running), num_returns=len(running), timeout=30)
            for tid in running.values():
                entries[tid]["state"] = "pending"
            save()
            raise
        finally:
            if bar is not None:
                bar.close()
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if started_ray:
            ray.shutdown()

    outcome.rows = result_rows(manifest, ids)
    config_keys = list(grid)
    base = {"trial", "state", "label", "seed", "run_dir", *config_keys}
    metric_keys: list[str] = []
    for r in outcome.rows:
        metric_keys.extend(k for k in r if k not in base and k not in metric_keys)
    outcome.summary = group_rows(outcome.rows, config_keys, metric_keys)
    write_csv(sweep_dir / RESULTS_CSV, outcome.rows)
    write_csv(sweep_dir / SUMMARY_CSV, outcome.summary)
    elapsed = time.time() - t_start
    log(
        f"\n{len(outcome.done)} trials run, {len(outcome.skipped)} done before, "
        f"{len(outcome.failed)} failed ({duration(elapsed)})"
    )
    if outcome.summary:
        shown = [m for m in metric_keys if m.startswith("final_")] or metric_keys
        table = [
            dict(
                r,
                **{m: f"{measured(r[m + '_mean'])} +- {measured(r[m + '_se'], 2)}" for m in shown},
            )
            for r in outcome.summary
        ]
        log("mean +- standard error over seeds:")
        log(format_table(table, ["label", *config_keys, "n", *shown]))
    log(f"per trial: {sweep_dir / RESULTS_CSV}\nper configuration: {sweep_dir / SUMMARY_CSV}")
    for tid in outcome.failed:
        log(f"failed: {tid} (log: {by_id[tid].run_dir / TRIAL_LOG})")
    return outcome
