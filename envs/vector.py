"""Vector envs with exact checkpoint and restore, for the PPO trainer.

Public surface::

    env_fns = [EnvFactory("Hopper-v4", i, friction=dict(every=2_000_000, seed=1)) for i in range(N)]
    envs = make(env_fns)                   # SingleEnv for N = 1, else ParallelEnvs
    obs = envs.reset(seeds)                # [N, obs_dim]
    obs, reward, terminated, truncated, finals = envs.step(actions)
    states = envs.checkpoint_state()       # torch-loadable, one entry per env
    obs = envs.restore_state(states)       # the same episodes, bit for bit
    envs.close()

``step`` resets an env whose episode ended at once (same-step autoreset) and returns its final
observation in ``finals``, a list of ``(env index, final observation)``. ``call(name, *args)``
reads an attribute of, or calls a method on, every env's wrapper stack (e.g. ``"friction"``).

Exact restore replays the current episode: :class:`CheckpointableEnv` records each episode's
reset inputs (seed, generator state, friction state) and its actions, and redoes them on
restore, which reproduces MuJoCo's full state including the solver's warm start.

With ``N > 1`` env 0 steps in the caller's process and envs 1..N-1 in one worker process each;
steps are handed over through the pipes, or through shared memory with spin-waiting on x86 when
every process has a spare core (see ``_SPIN``).

This package imports nothing from ``ppo_cbp``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ppo_cbp.envs.dynamics import DynamicsChange
from ppo_cbp.envs.friction import FrictionChange

__all__ = ["CheckpointableEnv", "EnvFactory", "ParallelEnvs", "SingleEnv", "make"]


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    state = rng.bit_generator.state
    return {
        k: ({kk: int(vv) for kk, vv in v.items()} if isinstance(v, dict) else v)
        for k, v in state.items()
    }


class CheckpointableEnv(gym.Wrapper):
    """Records what is needed to rebuild the current episode bit for bit: replay.

    At each ``reset`` it stores the seed, the env's generator state and the friction wrapper's
    state from just before the reset; at each ``step`` the action. :meth:`restore_state` redoes
    the reset and replays the actions, which reproduces MuJoCo's full state (including the
    derived quantities and the solver's warm start that ``qpos``/``qvel`` alone would miss), the
    time limit's step counter and the friction schedule. The replayed observation is compared
    with the saved one.
    """

    def __init__(self, env: gym.Env, index: int):
        super().__init__(env)
        self.index = index
        self._friction: FrictionChange | None = None
        e = env
        while isinstance(e, gym.Wrapper):
            if isinstance(e, FrictionChange):
                self._friction = e
                break
            e = e.env
        self._episode: dict[str, Any] | None = None
        self._actions: list[np.ndarray] = []
        self._last_obs: np.ndarray | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        rng = self.unwrapped._np_random
        self._episode = {
            "seed": seed,
            "rng": None if rng is None else _rng_state(rng),
            "friction": None if self._friction is None else self._friction.state_dict(),
        }
        self._actions = []
        obs, info = self.env.reset(seed=seed, options=options)
        self._last_obs = obs
        return obs, info

    def step(self, action):
        self._actions.append(np.array(action, copy=True))
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._last_obs = obs
        return obs, reward, terminated, truncated, info

    def checkpoint_state(self) -> dict[str, Any]:
        """The current episode's reset inputs, actions and last observation (torch-loadable)."""
        if self._episode is None or self._last_obs is None:
            raise RuntimeError("the env has not been reset yet")
        shape = (0, *self.action_space.shape)
        actions = np.stack(self._actions) if self._actions else np.zeros(shape, np.float32)
        return {
            "episode": self._episode,
            "actions": torch.from_numpy(actions),
            "obs": torch.from_numpy(np.array(self._last_obs, copy=True)),
        }

    def restore_state(self, states: Sequence[dict[str, Any]]) -> np.ndarray:
        """Rebuild the episode saved in ``states[self.index]``; returns its last observation."""
        state = states[self.index]
        episode = state["episode"]
        if self._friction is not None:
            self._friction.load_state_dict(episode["friction"])
        if episode["rng"] is not None:
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = episode["rng"]
            self.unwrapped.np_random = rng
        obs, _ = self.reset(seed=episode["seed"])
        for action in state["actions"].numpy():
            obs, _, terminated, truncated, _ = self.step(action)
            if terminated or truncated:
                raise RuntimeError(f"env {self.index}: the replayed episode ended early")
        saved = state["obs"].numpy()
        if obs.shape != saved.shape or not np.array_equal(obs, saved):
            raise RuntimeError(
                f"env {self.index}: replaying the saved episode did not reproduce its observation "
                "(different MuJoCo/gymnasium version?)"
            )
        return obs


@dataclass(frozen=True)
class EnvFactory:
    """Builds env ``index`` of a vector env: ``gym.make(env_id)``, then :class:`DynamicsChange`
    (a :class:`FrictionChange` with the other changes) with the keyword arguments ``friction``
    (none when ``None``), then :class:`CheckpointableEnv`. A picklable stand-in for a closure, for worker processes."""

    env_id: str
    index: int = 0
    friction: dict[str, Any] | None = None

    def __call__(self) -> CheckpointableEnv:
        if multiprocessing.parent_process() is not None:
            # Workers ignore Ctrl-C: the trainer checkpoints and then closes them.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is out of date.*")
            env = gym.make(self.env_id)
        if self.friction is not None:
            env = DynamicsChange(env, **self.friction)
        return CheckpointableEnv(env, self.index)


def make(fns: Sequence[Callable[[], CheckpointableEnv]]) -> SingleEnv | ParallelEnvs:
    """One env per factory: :class:`SingleEnv` for one, :class:`ParallelEnvs` for several."""
    return SingleEnv(fns[0]) if len(fns) == 1 else ParallelEnvs(list(fns))


StepResult = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]
"""``(obs, reward, terminated, truncated, finals)`` of one vector step."""


class SingleEnv:
    """One env in this process, with the vector-env interface (no overhead)."""

    def __init__(self, fn: Callable[[], CheckpointableEnv]):
        self.env = fn()
        self.num_envs = 1
        self.single_observation_space = self.env.observation_space
        self.single_action_space = self.env.action_space

    def reset(self, seeds: list[int]) -> np.ndarray:
        return self.env.reset(seed=seeds[0])[0][None]

    def step(self, actions: np.ndarray) -> StepResult:
        obs, reward, terminated, truncated, _ = self.env.step(actions[0])
        finals = []
        if terminated or truncated:
            finals.append((0, obs))
            obs, _ = self.env.reset()
        return obs[None], np.array([reward]), np.array([terminated]), np.array([truncated]), finals

    def call(self, name: str, *args: Any) -> tuple[Any, ...]:
        """Attribute ``name`` of the env's wrapper stack, called with ``args`` if callable."""
        attr = self.env.get_wrapper_attr(name)
        return (attr(*args) if callable(attr) else attr,)

    def checkpoint_state(self) -> list[dict[str, Any]]:
        """Each env's :meth:`CheckpointableEnv.checkpoint_state` (torch-loadable)."""
        return list(self.call("checkpoint_state"))

    def restore_state(self, states: Sequence[dict[str, Any]]) -> np.ndarray:
        """Rebuild the episodes saved by :meth:`checkpoint_state`; returns the observations."""
        return np.stack(self.call("restore_state", states))

    def wake(self) -> None:
        """Nothing to wake: the env steps in this process."""

    def close(self) -> None:
        self.env.close()


# Step hand-off between the trainer and a worker through shared memory with busy-waiting.
# Waking a sleeping process through a pipe costs ~100 us per step on small VMs (the env step
# itself is ~100-250 us), which made 2 envs slower than 1. Spinning on a shared counter hands
# a step over in < 1 us. This relies on x86's total store order (data written before the
# counter is seen before it); elsewhere the pipe is used for steps too.
#
# Spinning only pays when every spinning process has a core of its own: on a busy machine the
# trainer and the workers spin on cores that the others need to step their envs (on a busy
# 2-core VM, --num-envs 2 ran 9-20x slower than one env). ParallelEnvs therefore spins only when
# the cores this process may use, less the load average, leave one for each of its processes
# (``spare_cores() >= N``); otherwise every step goes through the pipes, a blocking wait that
# leaves the cores to whoever needs them.
_SPIN = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686"}
_SPIN_SECONDS = 2e-3  # a worker sleeps on its pipe after this long without a step


def spare_cores() -> float:
    """The cores this process may run on, less the 1-minute load average (it counts this
    process when it is running)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return cores - load


def spin_pays(num_envs: int) -> bool:
    """Whether ``num_envs`` envs should hand steps over by spinning: on x86, with a spare core
    for each of their processes (see ``_SPIN``)."""
    return _SPIN and spare_cores() >= num_envs


class _SharedStep:
    """Shared-memory buffers of one worker: counters, action and step results."""

    def __init__(self, obs_dim: int, act_dim: int, ctx: Any):
        self.dims = (obs_dim, act_dim)
        # ctrl: [step requested, step done]; flags: [terminated, truncated, has final obs]
        self.raw = (
            ctx.RawArray("q", 2),
            ctx.RawArray("f", act_dim),
            ctx.RawArray("d", 2 * obs_dim + 1),
            ctx.RawArray("q", 3),
        )
        self.views()

    def views(self) -> None:
        obs_dim, _ = self.dims
        ctrl, action, data, flags = self.raw
        self.ctrl = np.frombuffer(ctrl, np.int64)
        self.action = np.frombuffer(action, np.float32)
        data = np.frombuffer(data, np.float64)
        self.obs, self.final, self.reward = data[:obs_dim], data[obs_dim:-1], data[-1:]
        self.flags = np.frombuffer(flags, np.int64)

    def __getstate__(self) -> dict[str, Any]:
        return {"dims": self.dims, "raw": self.raw}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.dims, self.raw = state["dims"], state["raw"]
        self.views()


def _worker_step(env: CheckpointableEnv, action: np.ndarray) -> tuple:
    obs, reward, terminated, truncated, _ = env.step(action)
    final = None
    if terminated or truncated:
        final = obs
        obs, _ = env.reset()
    return obs, reward, terminated, truncated, final


def _env_worker(
    conn: Any, parent_conn: Any, fn: Callable[[], CheckpointableEnv], shared: _SharedStep | None
) -> None:
    """Worker process of :class:`ParallelEnvs`: runs one env.

    Steps arrive through ``shared`` (busy-waiting, see ``_SPIN``) or the pipe; resets, calls,
    wake-ups and close through the pipe.
    """
    parent_conn.close()
    env = None
    try:
        env = fn()
        done = 0
        while True:
            if shared is not None:
                ctrl = shared.ctrl
                deadline = time.perf_counter() + _SPIN_SECONDS
                spins = 0
                while ctrl[0] == done:
                    spins += 1
                    if spins % 1024 == 0 and (conn.poll(0) or time.perf_counter() > deadline):
                        break
                if ctrl[0] != done:
                    obs, reward, terminated, truncated, final = _worker_step(
                        env, shared.action.copy()
                    )
                    shared.obs[:] = obs
                    shared.reward[0] = reward
                    if final is not None:
                        shared.final[:] = final
                    shared.flags[:] = (terminated, truncated, final is not None)
                    done = int(ctrl[0])
                    ctrl[1] = done  # written last: the trainer reads the results after seeing it
                    continue
            cmd, data = conn.recv()  # sleeps until the trainer sends something
            if cmd == "step":
                conn.send(_worker_step(env, data))
            elif cmd == "reset":
                conn.send(env.reset(seed=data)[0])
            elif cmd == "call":
                name, args = data
                attr = env.get_wrapper_attr(name)
                conn.send(attr(*args) if callable(attr) else attr)
            elif cmd == "close":
                break
            # "wake": back to spinning
    except KeyboardInterrupt:
        pass
    except BaseException as e:  # report to the trainer rather than dying silently
        import traceback

        with contextlib.suppress(BrokenPipeError, OSError):
            conn.send(_WorkerError(f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if env is not None:
            env.close()
        conn.close()


@dataclass
class _WorkerError:
    message: str


class ParallelEnvs:
    """``N`` envs stepped in parallel: env 0 in this process, envs 1..N-1 in one worker each.

    The trainer's own process steps env 0 while the workers step theirs. Steps are handed over
    through the pipes (blocking waits), or, on x86 with a spare core for every process, through
    shared memory with busy-waiting (see ``_SPIN``): a worker spins for up to
    2 ms after each step, so during a rollout it answers within a microsecond, and sleeps
    during the update. Same-step autoreset: an env whose episode ends is reset at once and its
    final observation returned in the step's ``finals``.
    """

    def __init__(self, fns: list[Callable[[], CheckpointableEnv]], spin: bool | None = None):
        """``spin``: hand steps over by spinning (True) or through the pipes (False); by
        default spin when it pays (:func:`spin_pays`)."""
        spin = spin_pays(len(fns)) if spin is None else spin
        ctx = multiprocessing.get_context()
        self.num_envs = len(fns)
        self.local = SingleEnv(fns[0])
        self.single_observation_space = self.local.single_observation_space
        self.single_action_space = self.local.single_action_space
        obs_dim = int(np.prod(self.single_observation_space.shape))
        act_dim = int(np.prod(self.single_action_space.shape))
        self.pipes: list[Any] = []
        self.procs: list[Any] = []
        self.shared: list[_SharedStep] = []
        self.spin = spin
        self._requested = 0
        for fn in fns[1:]:
            parent, child = ctx.Pipe()
            shared = _SharedStep(obs_dim, act_dim, ctx) if spin else None
            proc = ctx.Process(target=_env_worker, args=(child, parent, fn, shared), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)
            if shared is not None:
                self.shared.append(shared)
        self._obs = np.zeros((self.num_envs, obs_dim), np.float64)

    def _recv(self, pipe: Any) -> Any:
        out = pipe.recv()
        if isinstance(out, _WorkerError):
            raise RuntimeError(f"env worker failed: {out.message}")
        return out

    def _wait(self, i: int) -> None:
        """Spin until worker ``i`` has finished the requested step (waking it if it slept)."""
        ctrl, pipe, proc = self.shared[i].ctrl, self.pipes[i], self.procs[i]
        spins = 0
        woken = False
        start = time.perf_counter()
        while ctrl[1] != self._requested:
            spins += 1
            if spins % 4096 == 0:
                if pipe.poll(0):
                    self._recv(pipe)  # only an error report can arrive here
                waited = time.perf_counter() - start
                if not woken and waited > 2 * _SPIN_SECONDS:
                    # it went to sleep just before the request: wake it
                    pipe.send(("wake", None))
                    woken = True
                if waited > 1.0 and not proc.is_alive():
                    raise RuntimeError(f"env worker {i + 1} died (exit code {proc.exitcode})")

    def reset(self, seeds: list[int]) -> np.ndarray:
        for pipe, seed in zip(self.pipes, seeds[1:]):
            pipe.send(("reset", seed))
        obs = self._obs.copy()
        obs[0] = self.local.reset(seeds[:1])[0]
        for i, pipe in enumerate(self.pipes, 1):
            obs[i] = self._recv(pipe)
        return obs

    def wake(self) -> None:
        """Tell sleeping workers that steps are coming (call before a rollout)."""
        if self.spin:
            for pipe in self.pipes:
                pipe.send(("wake", None))

    def step(self, actions: np.ndarray) -> StepResult:
        n = self.num_envs
        if self.spin:
            self._requested += 1
            for i, shared in enumerate(self.shared, 1):
                shared.action[:] = actions[i]
                shared.ctrl[0] = self._requested
        else:
            for i, pipe in enumerate(self.pipes, 1):
                pipe.send(("step", actions[i]))
        obs0, reward0, term0, trunc0, finals = self.local.step(actions[:1])
        obs = np.empty_like(self._obs)
        reward = np.empty(n, np.float64)
        terminated = np.empty(n, bool)
        truncated = np.empty(n, bool)
        obs[0], reward[0], terminated[0], truncated[0] = obs0[0], reward0[0], term0[0], trunc0[0]
        for i in range(1, n):
            if self.spin:
                self._wait(i - 1)
                shared = self.shared[i - 1]
                obs[i], reward[i] = shared.obs, shared.reward[0]
                terminated[i], truncated[i], has_final = shared.flags
                final = shared.final.copy() if has_final else None
            else:
                obs[i], reward[i], terminated[i], truncated[i], final = self._recv(
                    self.pipes[i - 1]
                )
            if final is not None:
                finals.append((i, final))
        return obs, reward, terminated, truncated, finals

    def call(self, name: str, *args: Any) -> tuple[Any, ...]:
        """Attribute ``name`` of every env's wrapper stack, called with ``args`` if callable."""
        for pipe in self.pipes:
            pipe.send(("call", (name, args)))
        first = self.local.call(name, *args)
        return first + tuple(self._recv(pipe) for pipe in self.pipes)

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(BrokenPipeError, OSError):
                pipe.send(("close", None))
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        for pipe in self.pipes:
            pipe.close()
        self.local.close()

    def checkpoint_state(self) -> list[dict[str, Any]]:
        """Each env's :meth:`CheckpointableEnv.checkpoint_state` (torch-loadable)."""
        return list(self.call("checkpoint_state"))

    def restore_state(self, states: Sequence[dict[str, Any]]) -> np.ndarray:
        """Rebuild the episodes saved by :meth:`checkpoint_state`; returns the observations."""
        return np.stack(self.call("restore_state", states))
