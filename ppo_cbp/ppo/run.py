"""The PPO trainer's run around the algorithm (``ppo_cbp/train.py``): what is not PPO itself.

* :func:`seed_everything`: Python's, numpy's and torch's global generators and the trainer's
  own (action noise and minibatch order; Shrink & Perturb), plus the seeds of CBP/ReDo;
* :class:`RunState`: what checkpoints carry besides the agent (:func:`start_state`: a new
  run's, after its seeded env resets, or a resumed one's); :func:`snapshot` and
  :func:`restore`: the full training state at an update boundary (networks, optimizer,
  CBP/ReDo, run state, the envs' exact state, RNG states) and back;
* :func:`open_outputs`: the start line, the TensorBoard writer (``purge_step`` on resume),
  ``config.json`` and the hyperparameters table, the first things written; :func:`progress_bar`;
* :class:`Checkpoints`: the last good state and when it is written (every
  ``--checkpoint-every`` steps, at the end, on SIGINT/SIGTERM, on a non-finite loss);
* :class:`TrainResult` (:func:`train_result`) and :func:`closing_summary`, built from :mod:`ppo_cbp.run_folder`'s
  shared summary lines.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ppo_cbp import run_folder, tracking
from ppo_cbp.formatting import count, duration, measured
from ppo_cbp.ppo.normalize import RunningMeanStd
from ppo_cbp.ppo.protocols import Settings, TrainedAgent
from ppo_cbp.ppo.settings import CHECKPOINT_FORMAT, args_dict, configuration_label
from ppo_cbp.seeding import PPO_STREAMS, ppo_seeds

__all__ = [
    "Checkpoints",
    "RunState",
    "TrainResult",
    "closing_summary",
    "open_outputs",
    "progress_bar",
    "restore",
    "seed_everything",
    "snapshot",
    "start_state",
    "train_result",
]

SUMMARY_EPISODES = 100  # the closing summary's return is the mean over this many last episodes


def seed_everything(
    seed: int, device: torch.device
) -> tuple[dict[str, torch.Generator], dict[str, int]]:
    """Seed Python's, numpy's and torch's global generators with ``seed``.

    :return: the trainer's generators on ``device`` (``"main"``: action noise and minibatch
        order; ``"perturb"``: Shrink & Perturb's noise) and the four stream seeds of
        :func:`~ppo_cbp.seeding.ppo_seeds`, by :data:`~ppo_cbp.seeding.PPO_STREAMS` name.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    seeds = dict(zip(PPO_STREAMS, ppo_seeds(seed)))
    generators = {
        name: torch.Generator(device=device).manual_seed(seeds[name])
        for name in ("main", "perturb")
    }
    return generators, seeds


@dataclass
class RunState:
    """What checkpoints carry besides the agent: counters, episode statistics, the optional
    normalisers' statistics and the next observation."""

    num_envs: int
    obs_rms: RunningMeanStd | None
    ret_rms: RunningMeanStd | None
    max_change: Tensor
    global_step: int = 0
    update: int = 0
    friction_segment: int = 0
    """Env 0's friction segment at the last update (a new one is a task boundary)."""
    latest_return: float = math.nan
    next_obs: np.ndarray | None = None
    recent_returns: deque[float] = dataclasses.field(
        default_factory=lambda: deque(maxlen=SUMMARY_EPISODES)
    )

    def __post_init__(self) -> None:
        self.episode_return = np.zeros(self.num_envs, np.float64)
        self.episode_length = np.zeros(self.num_envs, np.int64)
        self.discounted = np.zeros(self.num_envs, np.float64)

    def normalize_obs(self, o: np.ndarray, update_stats: bool) -> np.ndarray:
        if self.obs_rms is None:
            return o
        if update_stats:
            self.obs_rms.update(o)
        return np.clip((o - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + 1e-8), -10.0, 10.0)

    def scale_reward(self, reward: np.ndarray, gamma: float) -> np.ndarray:
        """``reward`` over the running std of the discounted return (updated first), clipped to
        +-10; ``reward`` itself without ``--normalize-reward``."""
        if self.ret_rms is None:
            return reward
        self.discounted = self.discounted * gamma + reward
        self.ret_rms.update(self.discounted)
        return np.clip(reward / np.sqrt(self.ret_rms.var + 1e-8), -10.0, 10.0)

    def end_episode(self, i: int) -> tuple[float, int]:
        """Env ``i``'s episode ended: record its return and length and start the next one."""
        episode_return, length = float(self.episode_return[i]), int(self.episode_length[i])
        self.latest_return = episode_return
        self.recent_returns.append(episode_return)
        self.episode_return[i] = 0.0
        self.episode_length[i] = 0
        self.discounted[i] = 0.0
        return episode_return, length


def snapshot(
    given_args: Settings,
    args: Settings,
    agent: TrainedAgent,
    state: RunState,
    envs: Any,
    generators: dict,
) -> dict:
    """The full training state at this update boundary (cloned, device tensors)."""
    return run_folder.clone(
        {
            "format": CHECKPOINT_FORMAT,
            "args": args_dict(given_args),
            "resolved": args_dict(args),
            "global_step": state.global_step,
            "update": state.update,
            **agent.state_dict(),  # actor, critic, log_std, optimizer, resetters, methods, churn
            "friction_segment": state.friction_segment,
            "obs_rms": None if state.obs_rms is None else state.obs_rms.state_dict(),
            "ret_rms": None if state.ret_rms is None else state.ret_rms.state_dict(),
            "discounted": torch.from_numpy(state.discounted.copy()),
            "episode_return": torch.from_numpy(state.episode_return.copy()),
            "episode_length": torch.from_numpy(state.episode_length.copy()),
            "max_change": state.max_change,
            "latest_return": state.latest_return,
            "recent_returns": torch.tensor(list(state.recent_returns), dtype=torch.float64),
            "next_obs": torch.from_numpy(state.next_obs.copy()),
            "envs": envs.checkpoint_state(),
            "rng": run_folder.rng_states(generators),
        }
    )


def restore(ckpt: dict, agent: TrainedAgent, state: RunState, envs: Any, generators: dict) -> None:
    """Load what :func:`snapshot` saved into ``agent``, ``state``, the envs and the generators."""
    agent.load_state_dict(ckpt)
    state.friction_segment = int(ckpt.get("friction_segment", 0))
    if state.obs_rms is not None:
        state.obs_rms.load_state_dict(ckpt["obs_rms"])
    if state.ret_rms is not None:
        state.ret_rms.load_state_dict(ckpt["ret_rms"])
    state.discounted = ckpt["discounted"].numpy().copy()
    state.global_step, state.update = int(ckpt["global_step"]), int(ckpt["update"])
    state.episode_return = ckpt["episode_return"].numpy().copy()
    state.episode_length = ckpt["episode_length"].numpy().copy()
    state.max_change = ckpt["max_change"].to(state.max_change.device)
    state.latest_return = float(ckpt["latest_return"])
    state.recent_returns.extend(ckpt.get("recent_returns", torch.zeros(0)).tolist())
    envs.restore_state(ckpt["envs"])
    state.next_obs = ckpt["next_obs"].numpy().copy()
    run_folder.set_rng_states(ckpt["rng"], generators)


def start_state(
    args: Settings,
    obs_dim: int,
    device: torch.device,
    envs: Any,
    agent: TrainedAgent,
    generators: dict[str, torch.Generator],
    ckpt: dict | None,
) -> RunState:
    """A new run's state after its seeded env resets (env i with ``seed + i``), or a resumed
    run's, restored with the agent, envs and generators from ``ckpt`` (:func:`restore`)."""
    state = RunState(
        args.num_envs,
        obs_rms=RunningMeanStd((obs_dim,)) if args.normalize_obs else None,
        ret_rms=RunningMeanStd(()) if args.normalize_reward else None,
        max_change=torch.zeros(2, dtype=torch.float64, device=device),
    )
    if ckpt is None:
        seeded = envs.reset([args.seed + i for i in range(args.num_envs)])
        state.next_obs = state.normalize_obs(seeded, True).astype(np.float32)
    else:
        restore(ckpt, agent, state, envs, generators)
    return state


def open_outputs(run_dir: Path, args: Settings, state: RunState, resumed: bool) -> Any:
    """Print where the run writes, then create its folder, its writer (TensorBoard, and W&B
    with ``--track``: :class:`~ppo_cbp.tracking.FanOutWriter`; TensorBoard's of a resumed
    run's with ``purge_step`` = its checkpoint's step + 1: that step's points were logged and
    flushed before the checkpoint was written), ``config.json`` and, for a new run, the
    hyperparameters table. Called once every check has passed."""
    if resumed:
        print(f"resuming {run_dir} at step {state.global_step:,} of {args.steps:,}")
    else:
        print(
            f"writing to {run_dir} (TensorBoard events, config.json, {run_folder.CHECKPOINT_NAME})"
        )
    sys.stdout.flush()
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = run_folder.open_writer(run_dir, state.global_step + 1 if resumed else None)
    resolved = args_dict(args)
    config = dict(resolved, label=configuration_label(args).text)
    run_folder.write_config(run_dir / "config.json", config)
    wandb_run = None
    if getattr(args, "track", False):
        wandb_run = tracking.start_wandb(
            run_dir, config, args.wandb_project_name, args.wandb_entity
        )
    writer = tracking.FanOutWriter(writer, wandb_run)
    if not resumed:
        table = "\n".join(f"|{k}|{v}|" for k, v in resolved.items())
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table, 0)
    return writer


def progress_bar(args: Settings, state: RunState) -> Any:
    """tqdm's bar over ``args.steps`` from the run's current step; only on a terminal, and none
    with ``--no-progress``."""
    from tqdm import tqdm

    return tqdm(
        total=args.steps,
        initial=state.global_step,
        unit="step",
        unit_scale=True,
        dynamic_ncols=True,
        disable=None if args.progress else True,  # None: only on a terminal
    )


class Checkpoints:
    """The last good state (a :func:`snapshot` at every update boundary) and its writing, atomic
    (:func:`run_folder.save_checkpoint`): at the first boundary after every
    ``checkpoint_every`` steps, at the end, on SIGINT/SIGTERM, and on a non-finite loss (then
    the state before the update that produced it)."""

    def __init__(
        self,
        given_args: Settings,
        args: Settings,
        agent: TrainedAgent,
        state: RunState,
        envs: Any,
        generators: dict[str, torch.Generator],
        run_dir: Path,
        writer: Any,
        timings: dict[str, float],
    ):
        self._parts = (given_args, args, agent, state, envs, generators)
        self.args, self.state, self.run_dir, self.writer, self.timings = (
            args,
            state,
            run_dir,
            writer,
            timings,
        )
        self.file = run_dir / run_folder.CHECKPOINT_NAME
        self.good = snapshot(*self._parts)
        self.last_step = state.global_step

    def update_done(self, stopping: bool) -> None:
        """Take the snapshot of this boundary; write it if one is due, the run has reached its
        steps or it is ``stopping`` (events flushed first, so they are never behind it)."""
        self.good = snapshot(*self._parts)
        step, every = self.state.global_step, self.args.checkpoint_every
        due = every and step // every > self.last_step // every
        if due or step >= self.args.steps or stopping:
            t_c = time.perf_counter()
            self.writer.flush()
            run_folder.save_checkpoint(self.good, self.file)
            self.last_step = step
            self.timings["checkpoint"] += time.perf_counter() - t_c

    def save_last_good(self, batch: int) -> str:
        """Write the state before the current update (whose loss is not finite); the message."""
        run_folder.save_checkpoint(self.good, self.file)
        self.writer.flush()
        state = self.state
        return (
            f"non-finite loss in update {state.update} (steps {state.global_step - batch}-"
            f"{state.global_step}); stopped. The last good state (step "
            f"{self.good['global_step']}) is saved in {self.file}"
        )

    def stopped(self, signum: int) -> None:
        """After SIGINT/SIGTERM: write the last state if the signal came after the save check,
        and say how to continue."""
        if self.last_step != self.state.global_step:
            run_folder.save_checkpoint(self.good, self.file)
            self.last_step = self.state.global_step
        name = signal.Signals(signum).name
        print(
            f"{name}: stopped at step {self.state.global_step}; checkpoint saved to {self.file}. "
            f"Continue with: python ppo_cbp/train.py --resume {self.run_dir}",
            file=sys.stderr,
        )


@dataclass
class TrainResult:
    """What :func:`main` returns."""

    run_dir: Path
    global_step: int
    updates: int
    interrupted_by: int | None = None
    """Signal number when stopped by SIGINT/SIGTERM, else None."""
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    """Wall-time seconds spent in env, acting, update, cbp (CBP/ReDo/S&P steps; part of update),
    metrics, checkpoint and total, in this process."""
    recent_returns: list[float] = dataclasses.field(default_factory=list)
    """Returns of the last ``SUMMARY_EPISODES`` (100) episodes that ended, oldest first."""
    units_replaced: dict[str, int] = dataclasses.field(default_factory=dict)
    """Units CBP/ReDo replaced over the whole run, per network; empty without either."""


def train_result(
    run_dir: Path,
    state: RunState,
    agent: TrainedAgent,
    interrupted_by: int | None,
    timings: dict[str, float],
) -> TrainResult:
    """What the trainer's ``main`` returns at the end of a run."""
    return TrainResult(
        run_dir,
        state.global_step,
        state.update,
        interrupted_by,
        timings,
        recent_returns=list(state.recent_returns),
        units_replaced=agent.units_replaced,
    )


def closing_summary(result: TrainResult, total: int, steps: int, seconds: float) -> str:
    """The closing lines: how far the run got, at what speed, its return and replacements, and
    where its outputs are."""
    state = "stopped" if result.interrupted_by is not None else "finished"
    lines = [
        f"{state} at step {count(result.global_step)} of {count(total)}: {count(steps)} steps "
        f"in {duration(seconds)} ({count(steps / max(seconds, 1e-9))} steps/s)"
    ]
    returns = result.recent_returns
    if returns:
        n = len(returns)
        mean = sum(returns) / n
        episodes = f"{count(n)} episode{'s' * (n > 1)}"
        lines.append(f"episodic return: {measured(mean)} (mean of the last {episodes})")
    else:
        lines.append("episodic return: no episode has ended yet")
    lines.append(run_folder.units_replaced_line(result.units_replaced, "none (no --cbp or --redo)"))
    lines += run_folder.where_lines(result.run_dir)
    return "\n".join(lines)
