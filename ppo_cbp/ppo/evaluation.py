"""Evaluation of a policy on an env with given dynamics: what the agent can do now, and what it
has forgotten of the segments before.

:func:`evaluate` runs episodes of a policy callable (observation -> action) in a new env built
by ``gym.make(env_id)`` with a fixed setting (:class:`~ppo_cbp.envs.dynamics.FixedDynamics`:
friction, multipliers, observation change, reward direction, as
:meth:`~ppo_cbp.envs.dynamics.DynamicsChange.setting` gives them), reset with ``seed`` first and
without a seed after (the env's own generator continues). :func:`deterministic_policy` is the
trained policy's mean action, with the run's observation normalisation (its statistics read,
not updated). Scripts (evaluation of saved runs, videos) build on these two.

:class:`Evaluation` is the trainer's use (``--eval-every``, ``--eval-episodes``,
``--eval-previous``): ``eval/return`` (mean return of the episodes under the current setting, or
under the ended segment's at a segment's end), ``eval/return_previous`` (the mean over the
previous ``k`` segments' settings, at their starts) and ``eval/return_previous_<d>`` (``d``
segments back). It draws no random number of the training streams and touches no training env:
a run trains identically with and without it. Every evaluation's first reset seed is the same,
``derive_seed(seed, TAG_EVAL)`` modulo 2**31, so evaluations differ only by the policy and the
setting.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from ppo_cbp.envs.dynamics import FixedDynamics
from ppo_cbp.seeding import TAG_EVAL, derive_seed

__all__ = ["Evaluation", "deterministic_policy", "evaluate", "make_eval_env"]


def make_eval_env(env_id: str, setting: Mapping[str, Any]) -> gym.Env:
    """``gym.make(env_id)`` with ``setting`` fixed (:class:`FixedDynamics`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is out of date.*")
        env = gym.make(env_id)
    return FixedDynamics(env, setting)


def evaluate(
    policy: Callable[[np.ndarray], np.ndarray],
    env_id: str,
    setting: Mapping[str, Any],
    episodes: int,
    seed: int,
) -> list[float]:
    """The undiscounted returns of ``episodes`` episodes of ``policy`` in
    :func:`make_eval_env` ``(env_id, setting)``, the first reset with ``seed``."""
    env = make_eval_env(env_id, setting)
    returns = []
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed if episode == 0 else None)
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(policy(obs))
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return returns


def deterministic_policy(
    actor: torch.nn.Module,
    normalize: Callable[[np.ndarray], np.ndarray] | None = None,
    clip: tuple[np.ndarray, np.ndarray] | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """The mean action ``actor(normalize(obs))`` as float32 numpy (clipped to ``clip``'s
    bounds if given), computed without gradients on the actor's device."""
    device = next(actor.parameters()).device

    def policy(obs: np.ndarray) -> np.ndarray:
        x = obs if normalize is None else normalize(obs)
        with torch.no_grad():
            t = torch.as_tensor(np.asarray(x, np.float32)[None], device=device)
            action = actor(t)[0].cpu().numpy()
        return action if clip is None else np.clip(action, *clip)

    return policy


class Evaluation:
    """The trainer's evaluations (see the module docstring)."""

    def __init__(self, args: Any, agent: Any, state: Any, writer: Any):
        self.args, self.agent, self.state, self.writer = args, agent, state, writer
        self.seed = derive_seed(args.seed, TAG_EVAL) % 2**31

    def policy(self, action_space: gym.spaces.Box) -> Callable[[np.ndarray], np.ndarray]:
        def normalize(obs: np.ndarray) -> np.ndarray:
            return self.state.normalize_obs(obs[None], False)[0]

        clip = (action_space.low, action_space.high) if self.args.clip_actions else None
        return deterministic_policy(self.agent.actor, normalize, clip)

    def mean_return(self, envs: Any, setting: Mapping[str, Any]) -> float:
        policy = self.policy(envs.single_action_space)
        args = self.args
        return float(np.mean(evaluate(policy, args.env, setting, args.eval_episodes, self.seed)))

    def run(self, envs: Any, setting: Mapping[str, Any], segment: int) -> None:
        """Evaluate under ``setting`` (``eval/return``) and under the settings of the
        ``--eval-previous`` segments before ``segment``, logged at the current step."""
        step = self.state.global_step
        self.writer.add_scalar("eval/return", self.mean_return(envs, setting), step)
        previous = []
        for back in range(1, min(self.args.eval_previous, segment) + 1):
            earlier = envs.call("segment_setting", segment - back)[0]
            previous.append(self.mean_return(envs, earlier))
            self.writer.add_scalar(f"eval/return_previous_{back}", previous[-1], step)
        if previous:
            self.writer.add_scalar("eval/return_previous", float(np.mean(previous)), step)
