"""Evaluate trained train.py runs: the mean return of the policy's mean action over episodes,
with its 95% BCa bootstrap confidence interval over the episodes.

    python scripts/evaluate.py runs/<run> [more runs ...] --episodes 10 [--friction X | --segment K] [--seed S]

Each run's policy is loaded with ``ppo_cbp.load_policy`` (its observation normalisation, its
actions clipped as the trainer's evaluations clip them with ``--clip-actions``) and run in a new
env (``ppo_cbp.ppo.evaluation.evaluate``) whose dynamics are fixed: the model's own (default),
friction ``X`` (``--friction``), or segment ``K``'s setting of the run (``--segment``: its
friction and other changes drawn again from the run's seed and settings, as the trainer's
``eval/*`` evaluations draw them; ``K`` up to the segment the run reached). The first reset uses
``--seed``, by default the trainer's evaluation seed of each run, so that ``--segment`` with the
run's ``--eval-episodes`` reproduces its ``eval/return``. One row per run: its label (from its
``config.json``), mean, CI, episodes and dynamics.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ppo_cbp.cli import report_error
from ppo_cbp.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one error: line, exit 2
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="scripts/evaluate.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", type=Path, help="train.py run folders (or checkpoint files)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per run (default 10)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--friction", type=float, help="evaluate with this friction")
    which.add_argument("--segment", type=int, help="evaluate with the run's segment K's setting")
    p.add_argument("--seed", type=int, help="first reset's seed (default: the run's eval seed)")
    p.add_argument(
        "--video",
        type=Path,
        help="record each run's first evaluated episode to this mp4 (pip install -e '.[video]'; off-screen MuJoCo: MUJOCO_GL=egl or osmesa)",
    )
    p.add_argument("--device", default="cpu", help="the policy's device (default cpu)")
    return p


def segment_setting(args: Any, segment: int, reached: int, where: Path) -> dict[str, Any]:
    """Segment ``segment``'s setting of a run with settings ``args`` that reached ``reached``.

    :raises UsageError: for a run without changes or a segment it did not reach."""
    from ppo_cbp.envs.dynamics import DynamicsChange

    from ppo_cbp.ppo.environments import make_env

    if args.friction_every <= 0:
        raise UsageError(f"{where} changes no dynamics (--friction-every 0): drop --segment")
    if not 0 <= segment <= reached:
        raise UsageError(f"--segment {segment}: {where} reached segments 0 to {reached} only")
    env = make_env(args, 0)()
    try:
        inner = env
        while not isinstance(inner, DynamicsChange):
            inner = inner.env
        try:
            return inner.segment_setting(segment)
        except IndexError:
            raise UsageError(f"--segment {segment}: beyond the friction table of {where}") from None
    finally:
        env.close()


def describe(setting: dict[str, Any]) -> str:
    """A setting as ``friction=0.5 mass=1.2 permuted offset reward-flipped``, or ``default``."""
    words = []
    for key, value in setting.items():
        if key == "permute":
            words.append("permuted")
        elif key == "offset":
            words.append("offset")
        elif key == "direction":
            words.append("backward" if value < 0 else "forward")
        else:
            words.append(f"{key}={float(value):.4g}")
    return " ".join(words) or "default"


def label_of(run: Path) -> str:
    folder = run if run.is_dir() else run.parent
    try:
        return str(json.loads((folder / "config.json").read_text())["label"])
    except (OSError, ValueError, KeyError, TypeError):
        return folder.name


def prepare(opts: argparse.Namespace) -> list[tuple[Path, Any, dict[str, Any], int]]:
    """Every run's ``(path, policy, setting, seed)``, every check done before any episode."""
    from ppo_cbp import load_policy
    from ppo_cbp.seeding import TAG_EVAL, derive_seed

    if opts.episodes < 1:
        raise UsageError(f"--episodes must be at least 1, got {opts.episodes}")
    if opts.video is not None:
        from ppo_cbp import tracking

        tracking.require(False, True)  # the encoder, before any work
        if opts.video.suffix != ".mp4":
            raise UsageError(f"--video {opts.video}: the video is an mp4 file (name it .mp4)")
    if opts.friction is not None and not (math.isfinite(opts.friction) and opts.friction > 0):
        raise UsageError(f"--friction must be a positive number, got {opts.friction}")
    plan = []
    for run in opts.runs:
        policy = load_policy(run, opts.device)
        args = policy.settings
        setting: dict[str, Any] = {}
        if opts.friction is not None:
            setting = {"friction": opts.friction}
        elif opts.segment is not None:
            reached = int(policy.checkpoint.get("friction_segment", 0))
            setting = segment_setting(args, opts.segment, reached, run)
        seed = opts.seed if opts.seed is not None else derive_seed(args.seed, TAG_EVAL) % 2**31
        if opts.video is not None:
            from ppo_cbp.ppo.video import check_rendering

            check_rendering(args.env)
        plan.append((run, policy, setting, seed))
    return plan


def evaluate_run(policy: Any, setting: dict[str, Any], episodes: int, seed: int) -> list[float]:
    """The returns of ``episodes`` episodes of ``policy``'s mean action under ``setting``: the
    trainer's evaluation (its normalisation, its clipping with ``--clip-actions``)."""
    from ppo_cbp.ppo.evaluation import evaluate

    return evaluate(acting(policy), policy.settings.env, setting, episodes, seed)


def acting(policy: Any) -> Any:
    """The mean action of ``policy`` as the trainer evaluates it (its normalisation, its
    clipping with ``--clip-actions``)."""
    from ppo_cbp.ppo.evaluation import deterministic_policy, make_eval_env

    args = policy.settings
    clip = None
    if getattr(args, "clip_actions", False):
        env = make_eval_env(args.env, {})
        clip = (env.action_space.low, env.action_space.high)
        env.close()
    return deterministic_policy(policy.actor, policy.normalize, clip)


def summary(returns: list[float]) -> tuple[float, float, float]:
    """Mean and 95% BCa bootstrap CI over episodes (``reporting.stats.bootstrap_mean_ci``)."""
    from ppo_cbp.reporting.stats import bootstrap_mean_ci

    values = np.asarray(returns, np.float64)[:, None]
    low, high = bootstrap_mean_ci(values)
    return float(values.mean()), float(low[0]), float(high[0])


def table(rows: list[tuple[str, float, float, float, int, str]]) -> str:
    head = ("run", "mean return", "95% CI", "episodes", "dynamics")
    cells = [
        (label, f"{mean:.2f}", f"[{low:.2f}, {high:.2f}]", str(n), dyn)
        for label, mean, low, high, n, dyn in rows
    ]
    widths = [max(len(r[i]) for r in [head, *cells]) for i in range(len(head))]

    def line(r: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), rule, *map(line, cells)])


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parser().parse_args(argv)
        plan = prepare(opts)
    except UsageError as e:
        return report_error(e)
    rows = []
    for k, (run, policy, setting, seed) in enumerate(plan):
        returns = evaluate_run(policy, setting, opts.episodes, seed)
        mean, low, high = summary(returns)
        rows.append((label_of(run), mean, low, high, len(returns), describe(setting)))
        if opts.video is not None:
            path = opts.video if len(plan) == 1 else opts.video.with_stem(f"{opts.video.stem}_{k}")
            record_video(policy, setting, seed, path)
            print(f"video of the first episode of {label_of(run)}: {path}")
    print(table(rows))
    return 0


def record_video(policy: Any, setting: dict[str, Any], seed: int, path: Path) -> None:
    """The first evaluated episode (reset with ``seed``, as :func:`evaluate_run`'s first),
    rendered off-screen to the mp4 ``path``."""
    from ppo_cbp import tracking
    from ppo_cbp.ppo.video import record_episode

    frames, fps = record_episode(acting(policy), policy.settings.env, setting, seed)
    tracking.write_video(path, frames, fps)


if __name__ == "__main__":
    sys.exit(main())
