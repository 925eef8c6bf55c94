"""Videos of a PPO run (``--capture-video``): one episode of the deterministic policy
(:func:`~ppo_cbp.ppo.evaluation.deterministic_policy`, as the evaluations use it) rendered
off-screen (``render_mode="rgb_array"``; MuJoCo's backend from ``MUJOCO_GL``: ``egl`` or
``osmesa``) at step 0, once the step count has passed a multiple of ``--video-every``, and at
the end of each segment of env 0 (with the ended segment's setting), written to
``<run>/videos/<step>.mp4`` (``<step>_segment<k>_end.mp4``) and, with ``--track``, sent to W&B
as ``videos/episode``.

Like the evaluations it draws no random number of the training streams and touches no training
env (its env is new, reset with the evaluations' seed): a run trains identically with and
without it (tested).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from ppo_cbp import tracking
from ppo_cbp.envs.dynamics import FixedDynamics
from ppo_cbp.errors import UsageError
from ppo_cbp.ppo.evaluation import Evaluation

__all__ = ["Videos", "check_rendering", "record_episode"]


def render_env(env_id: str, setting: Mapping[str, Any]) -> gym.Env:
    """``gym.make(env_id, render_mode="rgb_array")`` with ``setting`` fixed."""
    return FixedDynamics(gym.make(env_id, render_mode="rgb_array"), setting)


def check_rendering(env_id: str) -> None:
    """Render one frame of ``env_id`` off-screen, before any work.

    :raises UsageError: if no frame comes (no GL backend), naming ``MUJOCO_GL``'s choices.
    """
    try:
        env = render_env(env_id, {})
        try:
            env.reset(seed=0)
            env.render()
        finally:
            env.close()
    except Exception as e:  # any GL failure: one line
        gl = os.environ.get("MUJOCO_GL", "unset")
        raise UsageError(
            f"--capture-video: {env_id} cannot render off-screen with MUJOCO_GL={gl} "
            f"({type(e).__name__}); set MUJOCO_GL=egl (with a GPU) or MUJOCO_GL=osmesa "
            "(apt-get install libosmesa6)"
        ) from None


def record_episode(
    policy: Callable[[np.ndarray], np.ndarray],
    env_id: str,
    setting: Mapping[str, Any],
    seed: int,
) -> tuple[list[np.ndarray], int]:
    """The frames (``[H, W, 3]`` uint8, the env's render size) of one episode of ``policy`` in
    ``env_id`` with ``setting`` fixed, reset with ``seed``, and the env's frames per second."""
    env = render_env(env_id, setting)
    try:
        obs, _ = env.reset(seed=seed)
        frames, done = [env.render()], False
        while not done:
            obs, _, terminated, truncated, _ = env.step(policy(obs))
            frames.append(env.render())
            done = terminated or truncated
        fps = int(env.metadata.get("render_fps") or 30)
    finally:
        env.close()
    return frames, fps


class Videos:
    """The trainer's videos (see the module docstring); ``writer``: the run's
    :class:`~ppo_cbp.tracking.FanOutWriter` (its folder is the run's)."""

    def __init__(self, args: Any, agent: Any, state: Any, writer: Any):
        self.args, self.state, self.writer = args, state, writer
        self.folder = Path(writer.get_logdir()) / "videos"
        self.evaluation = Evaluation(args, agent, state, writer)  # its policy and seed

    def record(self, envs: Any, setting: Mapping[str, Any], name: str) -> None:
        policy = self.evaluation.policy(envs.single_action_space)
        frames, fps = record_episode(policy, self.args.env, setting, self.evaluation.seed)
        path = self.folder / f"{name}.mp4"
        tracking.write_video(path, frames, fps)
        self.writer.add_video_file("videos/episode", path, self.state.global_step, fps)

    def update_start(self, envs: Any, ended: tuple[int, Mapping[str, Any]] | None) -> float:
        """The videos due now (``ended``: the segment that just ended and its setting); the
        seconds they took."""
        t0 = time.perf_counter()
        args, step = self.args, self.state.global_step
        batch = args.num_steps * args.num_envs
        recorded = False
        if ended is not None:
            self.record(envs, ended[1], f"{step}_segment{ended[0]}_end")
            recorded = True
        every = args.video_every
        if step == 0 or (every > 0 and step // every > (step - batch) // every):
            current = envs.call("setting")[0] if args.friction_every > 0 else {}
            self.record(envs, current, str(step))
            recorded = True
        return time.perf_counter() - t0 if recorded else 0.0
