"""The PPO trainer's environments: each env's factory with the run's changes of friction and the
other dynamics, observations and rewards (:func:`make_env`), and what the trainer does at the
start of each update about env 0's segments (:class:`Segments`): a new segment is a task
boundary for the plasticity methods, and the evaluations of :mod:`ppo_cbp.ppo.evaluation` run
on their schedule.

The settings (``--dynamics``, ``--dynamics-range``, ``--dynamics-drift``, ``--obs-permute``,
``--obs-offset``, ``--reward-flip``, ``--friction-table``) are checked by
:func:`ppo_cbp.ppo.settings.resolve_args`; :class:`~ppo_cbp.envs.dynamics.DynamicsChange`
defines them. Each changed quantity draws from its own stream
(:func:`ppo_cbp.seeding.env_change_seed`); friction keeps ``PCG64(seed)``.
"""

from __future__ import annotations

import time
from typing import Any

from ppo_cbp import seeding
from ppo_cbp.envs.dynamics import DEFAULT_SCALE_RANGE, SCALES, paper_frictions
from ppo_cbp.envs.vector import EnvFactory
from ppo_cbp.ppo.evaluation import Evaluation

__all__ = ["Segments", "change_kwargs", "make_env", "scale_ranges"]


def scale_ranges(entries: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """``--dynamics-range`` entries ``QUANTITY=LOW,HIGH`` as ``{quantity: (low, high)}``
    (:data:`~ppo_cbp.envs.dynamics.DEFAULT_SCALE_RANGE` for the others).

    :raises ValueError: for an entry that is not of that form."""
    ranges = dict.fromkeys(SCALES, DEFAULT_SCALE_RANGE)
    for entry in entries:
        name, _, values = entry.partition("=")
        low, _, high = values.partition(",")
        try:
            ranges[name.strip()] = (float(low), float(high))
        except ValueError:
            raise ValueError(f"expected QUANTITY=LOW,HIGH, got {entry!r}") from None
    return ranges


def change_kwargs(args: Any) -> dict[str, Any]:
    """:class:`~ppo_cbp.envs.dynamics.DynamicsChange`'s keyword arguments beyond
    :class:`~ppo_cbp.envs.friction.FrictionChange`'s for the run's settings (none when only the
    drawn friction changes, abruptly)."""
    kw: dict[str, Any] = {}
    if "friction" not in args.dynamics:
        kw["friction"] = False
    if args.friction_table == "paper":
        kw["friction_table"] = paper_frictions()[args.seed].tolist()
    ranges = scale_ranges(args.dynamics_range)
    scales = {q: ranges[q] for q in SCALES if q in args.dynamics}
    streams = [*scales, *["permute"] * args.obs_permute, *["offset"] * (args.obs_offset > 0)]
    if scales:
        kw["scales"] = scales
    if streams:
        kw["seeds"] = {s: seeding.env_change_seed(args.seed, s) for s in streams}
    for key, value in (
        ("drift", args.dynamics_drift),
        ("permute_obs", args.obs_permute),
        ("obs_offset_std", args.obs_offset),
        ("flip_reward", args.reward_flip),
    ):
        if value:
            kw[key] = value
    return kw


def make_env(args: Any, index: int) -> EnvFactory:
    """The factory of env ``index`` of a run: its MuJoCo env with the run's changes."""
    changes = None
    if args.friction_every > 0:
        changes = dict(
            every=args.friction_every,
            low=args.friction_low,
            high=args.friction_high,
            seed=args.seed,
            at_episode_boundary=args.friction_at_episode_boundary,
            start_with_default=args.friction_start_default,
            steps_per_step=args.num_envs,
            **change_kwargs(args),
        )
    return EnvFactory(args.env, index, changes)


class Segments:
    """At the start of each update: env 0's new segment is a task boundary (the methods'
    ``at_task_boundary``), evaluated first at its end (with ``--eval-every``), and the periodic
    evaluation runs once the step count has passed a multiple of ``--eval-every``."""

    def __init__(self, args: Any, envs: Any, agent: Any, state: Any, writer: Any):
        self.args, self.envs, self.agent, self.state = args, envs, agent, state
        self.evaluation = None
        if args.eval_every > 0:
            self.evaluation = Evaluation(args, agent, state, writer)
        self.videos = None
        if getattr(args, "capture_video", False):
            from ppo_cbp.ppo.video import Videos

            self.videos = Videos(args, agent, state, writer)

    def update_start(self) -> float:
        """The task boundary and evaluations due now; returns the seconds spent evaluating
        (which the trainer leaves out of its timings)."""
        args, state, evaluation = self.args, self.state, self.evaluation
        t0 = time.perf_counter()
        evaluated, ended = False, None
        if args.friction_every > 0:
            segment = int(self.envs.call("segment")[0])
            if segment > state.friction_segment:
                if self.videos is not None:
                    setting = self.envs.call("segment_setting", state.friction_segment)[0]
                    ended = (state.friction_segment, setting)
                if evaluation is not None:  # the segment that ended, with its setting
                    setting = self.envs.call("segment_setting", state.friction_segment)[0]
                    evaluation.run(self.envs, setting, state.friction_segment)
                    evaluated = True
                self.agent.methods.at_task_boundary()
                state.friction_segment = segment
        step, batch = state.global_step, args.num_steps * args.num_envs
        due = (
            evaluation is not None
            and step > 0
            and step // args.eval_every > (step - batch) // args.eval_every
        )
        if due and not evaluated:
            current = self.envs.call("setting")[0] if args.friction_every > 0 else {}
            evaluation.run(self.envs, current, state.friction_segment)
            evaluated = True
        spent = time.perf_counter() - t0 if evaluated else 0.0
        if self.videos is not None:
            spent += self.videos.update_start(self.envs, ended)
        return spent
