"""Reproduce the paper's loss-of-plasticity results at CPU scale, then plot them.

    python scripts/reproduce.py --budget small --data-dir /path/to/mnist      # run + plot
    python scripts/reproduce.py --budget small --scale 0.01 --runs-dir /tmp/r  # quick check
    python scripts/reproduce.py --budget small --dry-run                       # commands only
    python scripts/reproduce.py --budget compare --data-dir /path/to/mnist    # every method
    python scripts/reproduce.py --budget paper                                  # print only
    python scripts/reproduce.py --budget paper --launch                         # run full scale

Experiments (sizes are the named constants below; ``--scale`` multiplies every length, not the
seeds):

1. Slowly-Changing Regression, ReLU, the paper's configuration, seeds batched in one process:
   backprop, L2, Shrink & Perturb, CBP.
2. Online Permuted MNIST on the real MNIST (``--data-dir``), a narrow network, seeds batched:
   backprop, L2, Shrink & Perturb, CBP, Adam.
3. PPO on Hopper-v4 with friction changing at a scaled-down interval: standard Adam, tuned Adam,
   L2, CBP (+ L2, the ``--cbp`` default).

The paper budget prints the paper's own protocols, each group under a ``#`` line that names it:
SCR and Permuted MNIST at full size; PPO on Ant with the friction changing every 2M steps (the
main text's experiment, 20M steps and 100 runs as in the released ``cfg/sant`` configurations
and ``plots/fig3.py``; the methods text gives no length); and PPO on Hopper and Walker2d as in
Extended Data Fig. 5a, which the paper ran on the standard, stationary environments
(``--friction-every 0``) for 100M steps. Friction changes stay the trainer's default; only the
Ant runs use them here.

Every command and its wall time is printed, each command's output going to
``<runs-dir>/<name>.log`` (``runs/repro/<name>.log``), with the progress (commands done, time
elapsed and, for the small budget, an estimate of the time left). Ctrl-C lets the running
commands checkpoint, then exits with 130; the same command resumes them. A run whose folder already holds a finished run of
the requested size is skipped (so the script can be re-run after an interruption); an
unfinished one is resumed. The small budget then plots everything with
:func:`ppo_cbp.reporting.figures.plot_runs` into ``--figures`` (by default ``figures/`` in
``--runs-dir``: ``runs/repro/figures``) and writes ``reproduce_small.json`` there (commands,
scales, seeds, wall times, status). The figures in ``docs/figures`` were made with
``--figures docs/figures``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from ppo_cbp.cli import UsageError, parse, report_error
from ppo_cbp.train import Args

# ---- small budget: each experiment sized for about an hour on a 2-core CPU (one job at a time)
SCR_METHODS = ("bp", "l2", "snp", "cbp")
SCR_SEEDS = tuple(range(8))
SCR_EXAMPLES = 3_000_000  # the paper's length
SCR_BIN = 40_000  # the paper's bin

PM_METHODS = ("bp", "l2", "snp", "cbp", "adam")
PM_SEEDS = tuple(range(4))
PM_WIDTH = 100  # narrow: the paper reports loss of plasticity is strongest in small networks
# Measured on the shared 2-core machine (other jobs running), 4 seeds, one thread, seed-examples
# per second: bp 16k, cbp 4.3k, adam 2.1k, snp 1.4k; 50 x 10k examples is about an hour in all.
PM_TASKS = 50
PM_EXAMPLES_PER_TASK = 10_000  # a prefix of each task's 60,000-image pass

PPO_ENV = "Hopper-v4"
PPO_METHODS = ("standard_adam", "tuned_adam", "l2", "cbp")
PPO_SEEDS = (0,)  # one seed: four 1M-step runs already take about an hour
PPO_STEPS = 1_000_000
PPO_FRICTION_EVERY = 250_000
PPO_BIN = 50_000  # steps per plotted bin
PPO_MIN_STEPS = 2048  # one rollout

# Batch-1 training is a stream of tiny ops: torch's intra-op threads only add synchronisation
# (30x slower measured with 2 threads on a busy 2-core machine). The PPO trainer sets --threads.
SUPERVISED_ENV = {"OMP_NUM_THREADS": "1"}

# ---- compare budget: every method of the MLP benchmarks, side by side (docs/results.md)
COMPARE_METHODS = (
    *("bp", "l2", "snp", "cbp", "redo", "adam", "dropout", "online_norm", "l2_init"),
    *("snp_init", "soft_snp", "parseval", "weight_clipping", "head_reset", "adam+adam_reset"),
    *("layer_norm", "nap", "crelu", "dff", "injection", "upgd", "kron", "trac", "adam+trac"),
    *("cbp+l2_init+layer_norm", "adam+redo+adam_reset"),  # the README's combinations
)
COMPARE_SKIP = {
    ("scr", "online_norm"): "Slowly-Changing Regression does not take online normalisation",
    ("permuted_mnist", "kron"): (
        "Kron's 784 x 784 preconditioner of the first layer costs 20-150 times an SGD step "
        "(docs/benchmarks.md): 600,000 steps would take days on the CPU"
    ),
}
"""Runs the comparison leaves out, and why."""
COMPARE_SCR_SEEDS = tuple(range(8))
COMPARE_PM_SEEDS = tuple(range(5))
COMPARE_PM_TASKS = 10  # each a full pass over the 60,000 images
COMPARE_PM_EXAMPLES_PER_TASK = 60_000

# ---- paper budget (Dohare et al., 2024)
PAPER_SEEDS = tuple(range(30))
PAPER_PM_TASKS = 800
PAPER_PM_WIDTH = 2000
# Ant with friction changes (the main text): the methods give the interval, 2M steps at the first
# episode boundary; the released cfg/sant configurations run 20M steps and fig3.py averages 100.
PAPER_ANT_ENV = "Ant-v4"
PAPER_ANT_STEPS = 20_000_000
PAPER_ANT_FRICTION_EVERY = 2_000_000
PAPER_ANT_SEEDS = tuple(range(100))
# Extended Data Fig. 5a: Hopper and Walker on the standard envs, "for up to 100 million steps".
PAPER_STATIONARY_ENVS = ("Hopper-v4", "Walker2d-v4")
PAPER_STATIONARY_STEPS = 100_000_000

PPO_FLAGS = {
    "standard_adam": ["--standard-adam"],
    "tuned_adam": [],
    "l2": ["--l2"],
    "cbp": ["--cbp"],
}
PPO_TAGS = {"standard_adam": "stdadam", "tuned_adam": "tuned", "l2": "l2", "cbp": "cbp"}


@dataclass
class Experiment:
    """One command: a run folder, what it runs and the size it must reach to count as done."""

    name: str
    benchmark: Literal["scr", "permuted_mnist", "ppo"]
    method: str
    seeds: list[int]
    run_dir: Path
    command: list[str]
    """argv with the script path relative to the repository root (run there)."""
    size: dict[str, int]
    """examples/bins (scr), tasks/examples_per_task/width (permuted_mnist), steps (ppo)."""
    resume: list[str] = field(default_factory=list)
    """Flags that continue an unfinished run."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables set for the command (shown in front of it)."""
    protocol: str = ""
    """Which of the paper's experiments the command reproduces (printed above its group)."""

    def shell(self, argv: list[str] | None = None) -> str:
        prefix = "".join(f"{k}={v} " for k, v in self.env.items())
        return prefix + shlex.join(self.command if argv is None else argv)


def _rel(p: Path) -> str:
    p = Path(os.path.abspath(p))
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def _scaled(n: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, round(n * scale))


def scr_experiments(
    runs_dir: Path,
    scale: float,
    seeds=SCR_SEEDS,
    examples: int = SCR_EXAMPLES,
    methods: tuple[str, ...] = SCR_METHODS,
) -> list[Experiment]:
    bins = _scaled(examples // SCR_BIN, scale)
    out = []
    for m in methods:
        run_dir = runs_dir / f"scr_{m}"
        cmd = ["python", "scripts/supervised.py", "slowly-changing-regression", "--method", m]
        cmd += ["--activation", "relu", "--examples", str(bins * SCR_BIN)]
        cmd += ["--bin-size", str(SCR_BIN), "--seeds", *map(str, seeds)]
        cmd += ["--out", _rel(run_dir), "--device", "cpu", "--no-progress"]
        size = {"examples": bins * SCR_BIN, "bins": bins}
        e = Experiment(f"scr_{m}", "scr", m, list(seeds), run_dir, cmd, size, ["--resume"])
        e.env = dict(SUPERVISED_ENV)
        out.append(e)
    return out


def pm_experiments(
    runs_dir: Path,
    scale: float,
    data_dir: Path | None,
    seeds=PM_SEEDS,
    tasks: int = PM_TASKS,
    width: int = PM_WIDTH,
    examples_per_task: int = PM_EXAMPLES_PER_TASK,
    methods: tuple[str, ...] = PM_METHODS,
) -> list[Experiment]:
    tasks = _scaled(tasks, scale)
    out = []
    for m in methods:
        run_dir = runs_dir / f"pm_{m}"
        cmd = ["python", "scripts/supervised.py", "permuted-mnist", "--method", m]
        cmd += ["--width", str(width), "--tasks", str(tasks)]
        cmd += ["--examples-per-task", str(examples_per_task), "--seeds", *map(str, seeds)]
        if data_dir is not None:
            cmd += ["--data-dir", _rel(data_dir)]
        cmd += ["--out", _rel(run_dir), "--device", "cpu", "--no-progress"]
        size = {"tasks": tasks, "examples_per_task": examples_per_task, "width": width}
        e = Experiment(
            f"pm_{m}", "permuted_mnist", m, list(seeds), run_dir, cmd, size, ["--resume"]
        )
        e.env = dict(SUPERVISED_ENV)
        out.append(e)
    return out


def ppo_experiments(
    runs_dir: Path,
    scale: float,
    seeds=PPO_SEEDS,
    env: str = PPO_ENV,
    steps: int = PPO_STEPS,
    friction_every: int = PPO_FRICTION_EVERY,
) -> list[Experiment]:
    steps = _scaled(steps, scale, PPO_MIN_STEPS)
    friction = _scaled(friction_every, scale) if friction_every else 0  # 0: stationary env
    prefix = env.split("-")[0].lower()
    out = []
    for m in PPO_METHODS:
        for s in seeds:
            name = f"{prefix}_{PPO_TAGS[m]}_s{s}"
            run_dir = runs_dir / name
            cmd = ["python", "ppo_cbp/train.py", "--env", env, *PPO_FLAGS[m]]
            cmd += ["--steps", str(steps), "--friction-every", str(friction), "--seed", str(s)]
            cmd += ["--run-name", name, "--runs-dir", _rel(runs_dir), "--no-progress"]
            resume = ["python", "ppo_cbp/train.py", "--resume", _rel(run_dir)]
            resume += ["--steps", str(steps), "--no-progress"]
            size = {"steps": steps, "friction_every": friction}
            e = Experiment(name, "ppo", m, [s], run_dir, cmd, size)
            e.resume = resume  # the trainer's resume is a command of its own
            out.append(e)
    return out


def small_experiments(
    runs_dir: Path, scale: float, data_dir: Path | None, only: tuple[str, ...]
) -> list[Experiment]:
    exps: list[Experiment] = []
    if "scr" in only:
        exps += scr_experiments(runs_dir, scale)
    if "permuted_mnist" in only:
        exps += pm_experiments(runs_dir, scale, data_dir)
    if "ppo" in only:
        exps += ppo_experiments(runs_dir, scale)
    return exps


def compare_experiments(
    runs_dir: Path, scale: float, data_dir: Path | None, only: tuple[str, ...]
) -> list[Experiment]:
    """Every method of :data:`COMPARE_METHODS` on both MLP benchmarks (less
    :data:`COMPARE_SKIP`), method by method: SCR at the paper's length with 8 seeds, Permuted
    MNIST at width 100 with 5 seeds, 10 tasks of a full pass each."""
    exps: list[Experiment] = []
    for m in COMPARE_METHODS:
        if "scr" in only and ("scr", m) not in COMPARE_SKIP:
            exps += scr_experiments(runs_dir, scale, COMPARE_SCR_SEEDS, SCR_EXAMPLES, (m,))
        if "permuted_mnist" in only and ("permuted_mnist", m) not in COMPARE_SKIP:
            exps += pm_experiments(
                runs_dir,
                scale,
                data_dir,
                COMPARE_PM_SEEDS,
                COMPARE_PM_TASKS,
                PM_WIDTH,
                COMPARE_PM_EXAMPLES_PER_TASK,
                (m,),
            )
    for e in exps:
        e.protocol = "methods comparison"
    return exps


def paper_experiments(
    runs_dir: Path, data_dir: Path | None, only: tuple[str, ...]
) -> list[Experiment]:
    def tagged(group: list[Experiment], protocol: str) -> list[Experiment]:
        for e in group:
            e.protocol = protocol
        return group

    exps: list[Experiment] = []
    if "scr" in only:
        exps += tagged(
            scr_experiments(runs_dir, 1.0, PAPER_SEEDS),
            "Slowly-Changing Regression, ReLU: 3M examples",
        )
    if "permuted_mnist" in only:
        exps += tagged(
            pm_experiments(
                runs_dir, 1.0, data_dir, PAPER_SEEDS, PAPER_PM_TASKS, PAPER_PM_WIDTH, 60_000
            ),
            "Online Permuted MNIST: 800 tasks of 60,000 examples, 3 x 2000 units",
        )
    if "ppo" in only:
        exps += tagged(
            ppo_experiments(
                runs_dir,
                1.0,
                PAPER_ANT_SEEDS,
                PAPER_ANT_ENV,
                PAPER_ANT_STEPS,
                PAPER_ANT_FRICTION_EVERY,
            ),
            "PPO on Ant, friction changing every 2M steps at the first episode boundary "
            "(main text; 20M steps, 100 runs as in the released configurations)",
        )
        for env in PAPER_STATIONARY_ENVS:
            exps += tagged(
                ppo_experiments(runs_dir, 1.0, PAPER_SEEDS, env, PAPER_STATIONARY_STEPS, 0),
                f"PPO on {env.split('-')[0]}, standard env without friction changes "
                "(Extended Data Fig. 5a; 100M steps)",
            )
    return exps


# --------------------------------------------------------------------------------------------
# State of a run folder


# What reading a damaged run file raises (a truncated checkpoint: RuntimeError or EOFError).
_UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError)
_UNREADABLE += (pickle.UnpicklingError,)


def run_state(e: Experiment) -> tuple[str, str]:
    """``("new" | "finished" | "partial" | "conflict", reason)`` for ``e``'s run folder."""
    d = e.run_dir
    if e.benchmark == "ppo":
        ckpt = d / "checkpoint.pt"
        if not ckpt.exists():
            return "new", ""
        import torch

        try:
            step = int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
        except _UNREADABLE as err:
            return "conflict", f"{ckpt} is unreadable ({type(err).__name__}: {err})"
        return ("finished", "") if step >= e.size["steps"] else ("partial", f"at step {step}")
    config_path = d / "config.json"
    if not config_path.exists():
        return "new", ""
    try:
        config = json.loads(config_path.read_text())
    except _UNREADABLE as err:
        return "conflict", f"{config_path} is unreadable ({type(err).__name__}: {err})"
    if not isinstance(config, dict):
        return "conflict", f"{config_path} is not a JSON object"
    if e.benchmark == "scr":
        want = {"bins": e.size["bins"], "bin_size": SCR_BIN}
        done_key = "bins_completed"
    else:
        want = {
            "resolved_tasks": e.size["tasks"],
            "examples_per_task": e.size["examples_per_task"],
            "width": e.size["width"],
        }
        done_key = "tasks_completed"
    want["seeds"] = e.seeds
    diff = {k: (config.get(k), v) for k, v in want.items() if config.get(k) != v}
    if diff:
        return "conflict", f"{d} holds a run of another size or seeds {diff} (found, wanted)"
    summary = d / "summary.json"
    if summary.exists():
        try:
            done = json.loads(summary.read_text()).get(done_key)
        except _UNREADABLE:
            done = None  # half-written: the run is not known to be finished
        target = e.size["bins"] if e.benchmark == "scr" else e.size["tasks"]
        if done == target:
            return "finished", ""
    if (d / "checkpoint.pt").exists():
        return "partial", ""
    return "new", ""


# --------------------------------------------------------------------------------------------
# Running


# Seed-examples per second of Permuted MNIST's methods at PM_WIDTH (measured as above).
PM_RATES = {"bp": 16e3, "l2": 16e3, "cbp": 4.3e3, "adam": 2.1e3, "snp": 1.4e3}
SCR_SECONDS = 15 * 60  # one method, all SCR_SEEDS, SCR_EXAMPLES (about an hour for four)
PPO_SECONDS = 15 * 60  # one 1M-step run (four take about an hour)


def estimate_s(e: Experiment) -> float:
    """About how long ``e`` of the small budget takes on a 2-core CPU, one job at a time (from
    the measurements that sized the budget)."""
    if e.benchmark == "scr":
        return SCR_SECONDS * e.size["examples"] / SCR_EXAMPLES
    if e.benchmark == "permuted_mnist":
        examples = len(e.seeds) * e.size["tasks"] * e.size["examples_per_task"]
        return examples / PM_RATES.get(e.method, min(PM_RATES.values()))
    return PPO_SECONDS * e.size["steps"] / PPO_STEPS


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _execute(e: Experiment, argv: list[str], log: Path) -> tuple[int, float]:
    real = [sys.executable if a == "python" and i == 0 else a for i, a in enumerate(argv)]
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {e.shell(argv)}\n")
        f.flush()
        env = dict(os.environ, **e.env)
        proc = subprocess.Popen(real, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the command too: it checkpoints and stops; let it finish (a second
            # Ctrl-C kills it, and it resumes from its previous checkpoint)
            try:
                proc.wait()
            except KeyboardInterrupt:
                proc.kill()
                proc.wait()
            raise
    return rc, time.perf_counter() - t0


def run_all(exps: list[Experiment], jobs: int, dry_run: bool) -> list[dict[str, Any]]:
    """Run (or skip, or resume) each experiment; print each command and its wall time."""
    records: list[dict[str, Any]] = []
    small = all(not e.protocol for e in exps)  # the paper budget's protocols are not timed
    left = {e.name: estimate_s(e) for e in exps} if small else {}
    t_start = time.perf_counter()
    done: list[str] = []
    if exps and not dry_run:
        where = _rel(exps[0].run_dir.parent)
        print(f"each command's output goes to {where}/<name>.log", flush=True)
        if small:
            print(
                f"{len(exps)} commands, about {_hms(sum(left.values()))} on a 2-core CPU one at a "
                "time (finished runs are skipped, unfinished ones resumed)",
                flush=True,
            )

    def progress(e: Experiment) -> str:
        done.append(e.name)
        left.pop(e.name, None)
        text = f"{len(done)}/{len(exps)} done, {_hms(time.perf_counter() - t_start)} elapsed"
        return text + (f", about {_hms(sum(left.values()))} left" if small else "")

    def one(e: Experiment) -> dict[str, Any]:
        state, reason = run_state(e)
        if state == "partial":
            argv = e.resume if e.benchmark == "ppo" else e.command + e.resume
        else:
            argv = e.command
        rec: dict[str, Any] = {
            "name": e.name,
            "benchmark": e.benchmark,
            "method": e.method,
            "seeds": e.seeds,
            "size": e.size,
            "run_dir": _rel(e.run_dir),
            "command": e.shell(),
            "wall_time_s": None,
        }
        if state == "finished":
            print(f"[skip] {e.name}: finished run in {_rel(e.run_dir)}", flush=True)
            return dict(rec, status="skipped")
        if state == "conflict":
            print(f"[fail] {e.name}: {reason}; remove it or choose another --runs-dir", flush=True)
            return dict(rec, status="conflict", reason=reason)
        print(f"[run] {e.shell(argv)}", flush=True)
        if dry_run:
            return dict(rec, status="dry-run")
        log = e.run_dir.parent / f"{e.name}.log"
        rc, wall = _execute(e, argv, log)
        status = "ran" if rc == 0 else f"failed (exit {rc}, see {_rel(log)})"
        resumed = " (resumed)" if state == "partial" else ""
        print(f"[done] {e.name}{resumed}: {wall:.1f} s, {status} ({progress(e)})", flush=True)
        return dict(rec, status=status, wall_time_s=round(wall, 1), resumed=state == "partial")

    if jobs <= 1 or dry_run:
        records = [one(e) for e in exps]
    else:
        pool = ThreadPoolExecutor(jobs)
        try:
            records = list(pool.map(one, exps))
        finally:  # on Ctrl-C: start nothing more, wait for the running commands to checkpoint
            pool.shutdown(wait=True, cancel_futures=True)
    return records


INTERRUPTED = (
    "interrupted: the running commands checkpointed and stopped; the same reproduce.py command "
    "resumes them (finished runs are skipped)"
)


def make_figures(
    exps: list[Experiment], figures: Path, bin_size: int, prefix: str = "small"
) -> list[str]:
    """Plot each benchmark's runs that hold data (figures ``<prefix>_<benchmark>``); a
    benchmark without data is noted."""
    from ppo_cbp.reporting.figures import plot_runs

    files: list[str] = []
    for bench in ("scr", "permuted_mnist", "ppo"):
        name = f"{prefix}_{bench}"
        dirs = [e.run_dir for e in exps if e.benchmark == bench and e.run_dir.exists()]
        if not dirs:
            continue
        try:
            for r in plot_runs(dirs, figures, bin_size=bin_size, name=name, ppo_settings=Args):
                files += [_rel(f) for f in r.files]
        except ValueError as err:
            print(f"note: {bench} not plotted: {err}", flush=True)
    return files


@dataclass
class ReproduceArgs:
    budget: Literal["small", "compare", "paper"] = "small"
    """small: run the CPU-scale experiments and plot; compare: every method of the MLP benchmarks side by side (docs/results.md section 4; hours of compute, resumable) and plot; paper: print the full-scale commands."""
    scale: float = 1.0
    """Multiplier of every length (examples, tasks, steps, friction interval); seeds unchanged."""
    runs_dir: Path | None = None
    """Folder of the run folders (default runs/repro, runs/compare or runs/paper by --budget)."""
    figures: Path | None = None
    """Folder of the figures and reproduce_<budget>.json (default figures/ in --runs-dir)."""
    data_dir: Path | None = None
    """Folder with the four MNIST .gz files (default: $PPO_CBP_MNIST_DIR if set, else ~/.cache/ppo_cbp/mnist)."""
    only: tuple[Literal["scr", "permuted_mnist", "ppo"], ...] = ("scr", "permuted_mnist", "ppo")
    """Experiments to run."""
    jobs: int = 1
    """Commands run at once (each is single-process; 2 fills a 2-core machine)."""
    dry_run: bool = False
    """Print the commands without running them."""
    launch: bool = False
    """With --budget paper: run the full-scale commands (days of compute)."""


def sizes_at_scale_1(budget: str) -> dict[str, Any]:
    """What each benchmark of ``budget`` runs at ``--scale 1``, for the report."""
    if budget == "compare":
        return {
            "scr": {"examples": SCR_EXAMPLES, "bin": SCR_BIN, "seeds": list(COMPARE_SCR_SEEDS)},
            "permuted_mnist": {
                "tasks": COMPARE_PM_TASKS,
                "examples_per_task": COMPARE_PM_EXAMPLES_PER_TASK,
                "width": PM_WIDTH,
                "seeds": list(COMPARE_PM_SEEDS),
            },
            "methods": list(COMPARE_METHODS),
            "left_out": {f"{b} {m}": why for (b, m), why in COMPARE_SKIP.items()},
        }
    return {
        "scr": {"examples": SCR_EXAMPLES, "bin": SCR_BIN, "seeds": list(SCR_SEEDS)},
        "permuted_mnist": {
            "tasks": PM_TASKS,
            "examples_per_task": PM_EXAMPLES_PER_TASK,
            "width": PM_WIDTH,
            "seeds": list(PM_SEEDS),
        },
        "ppo": {
            "env": PPO_ENV,
            "steps": PPO_STEPS,
            "friction_every": PPO_FRICTION_EVERY,
            "bin": PPO_BIN,
            "seeds": list(PPO_SEEDS),
        },
    }


def check_args(a: ReproduceArgs) -> None:
    """Reject settings that would fail later or be silently ignored.

    :raises UsageError: naming the flag and the bad value.
    """
    if not (a.scale > 0 and math.isfinite(a.scale)):
        raise UsageError(f"--scale must be a positive number, got {a.scale}")
    if a.budget == "paper" and a.scale != 1.0:
        raise UsageError(
            f"--scale {a.scale:g} applies to --budget small; the paper's sizes are fixed"
        )
    if a.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {a.jobs}")
    if a.launch and a.budget != "paper":
        raise UsageError("--launch only applies to --budget paper")
    if not a.only:
        raise UsageError("--only needs at least one of scr, permuted_mnist, ppo")
    for flag, folder in (("--runs-dir", a.runs_dir), ("--figures", a.figures)):
        if folder is not None and folder.exists() and not folder.is_dir():
            raise UsageError(f"{flag} {folder} is a file, not a folder")
    if a.data_dir is not None and "permuted_mnist" in a.only:
        path = a.data_dir / "train-images-idx3-ubyte.gz"
        if not path.exists():
            raise UsageError(f"--data-dir: MNIST not found: {path} does not exist")


def main(argv: list[str] | None = None) -> int:
    try:
        a = parse(ReproduceArgs, argv, __doc__)
        check_args(a)
    except UsageError as e:
        return report_error(e)
    default_runs = {"paper": "runs/paper", "compare": "runs/compare"}.get(a.budget, "runs/repro")
    runs_dir = Path(os.path.abspath(a.runs_dir or default_runs))
    data_dir = None if a.data_dir is None else Path(os.path.abspath(a.data_dir))
    if a.budget == "paper":
        exps = paper_experiments(runs_dir, data_dir, a.only)
        if not a.launch:
            print("# Full-scale commands (not run; add --launch to run them):")
            protocol = None
            for e in exps:
                if e.protocol != protocol:
                    protocol = e.protocol
                    print(f"# {protocol}")
                print(e.shell())
            return 0
        try:
            records = run_all(exps, a.jobs, a.dry_run)
        except KeyboardInterrupt:
            print(f"\n{INTERRUPTED}", file=sys.stderr)
            return 130
        return 0 if all(r["status"] in ("ran", "skipped", "dry-run") for r in records) else 1

    if a.budget == "compare":
        exps = compare_experiments(runs_dir, a.scale, data_dir, a.only)
        for (bench, m), why in COMPARE_SKIP.items():
            if bench in a.only:
                print(f"note: {bench} {m} is left out: {why}", flush=True)
    else:
        exps = small_experiments(runs_dir, a.scale, data_dir, a.only)
    t0 = time.perf_counter()
    try:
        records = run_all(exps, a.jobs, a.dry_run)
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        return 130
    if a.dry_run:
        return 0
    figures = runs_dir / "figures" if a.figures is None else Path(os.path.abspath(a.figures))
    figures.mkdir(parents=True, exist_ok=True)
    bin_size = _scaled(PPO_BIN, a.scale, PPO_MIN_STEPS)
    files = make_figures(exps, figures, bin_size, prefix=a.budget)
    report_path = figures / f"reproduce_{a.budget}.json"
    previous = {}
    if report_path.exists():
        previous = {
            r["name"]: r for r in json.loads(report_path.read_text()).get("experiments", [])
        }
    for r in records:
        # A skipped run keeps the wall time measured when it ran (same command).
        old = previous.get(r["name"])
        if r["status"] == "skipped" and old and old.get("command") == r["command"]:
            r["wall_time_s"] = old.get("wall_time_s")
            r["status"] = "skipped (ran earlier)"
    report = {
        "budget": a.budget,
        "scale": a.scale,
        "runs_dir": _rel(runs_dir),
        "sizes_at_scale_1": sizes_at_scale_1(a.budget),
        "jobs": a.jobs,
        "experiments": records,
        "wall_time_this_call_s": round(time.perf_counter() - t0, 1),
        "figures": files,
    }
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {_rel(report_path)}")
    failed = [r["name"] for r in records if not str(r["status"]).startswith(("ran", "skipped"))]
    if failed:
        print(
            f"error: {len(failed)} experiment(s) did not finish: {', '.join(failed)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
