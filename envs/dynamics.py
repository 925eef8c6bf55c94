"""Dynamics, observation and reward changes for MuJoCo locomotion envs: the friction changes of
:mod:`ppo_cbp.envs.friction` generalised.

:class:`DynamicsChange` is a :class:`~ppo_cbp.envs.friction.FrictionChange` (same schedule, same
friction sequence for the same seed, same state dict plus a ``"dynamics"`` entry) that changes,
at each segment (every ``every`` run-total steps, at the next episode boundary, as friction):

* **Quantities** (:data:`QUANTITIES`), one or several at once:

  - ``friction``: the sliding coefficient of every geom, an *absolute* value as in
    :class:`FrictionChange` (log-uniform on ``[0.02, 2]``, the paper's range), drawn from
    ``PCG64(seed)``; or a row of the released table (:func:`paper_frictions`).
  - ``gravity``: ``model.opt.gravity`` = ``m * g0`` (its magnitude scaled, direction kept).
  - ``mass``: ``body_mass``, ``body_inertia`` and ``body_subtreemass`` = ``m *`` their model
    values, so each body keeps its shape of inertia (a uniformly denser body) and the subtree
    masses MuJoCo divides by in ``mj_comPos`` stay the sums of the masses. The constants that
    MuJoCo derives once at compile time for its solver's regularisation (``*_invweight0``,
    ``stat.meaninertia``) are kept, as every runtime change of an ``MjModel`` keeps them.
  - ``damping``: ``dof_damping`` = ``m *`` the model's (every dof; zeros stay zero).
  - ``gear``: ``actuator_gear`` = ``m *`` the model's (every actuator: its strength).

  Each multiplier ``m`` is drawn per segment log-uniformly on its range
  (:data:`DEFAULT_SCALE_RANGE`: ``[0.5, 2]``, a factor of two either way, which covers the
  spread of CARL's widest context variation, relative standard deviation 0.5 of the default
  value (Benjamins et al., "Contextualize Me -- The Case for Context in Reinforcement
  Learning", TMLR 2023; ``experiments/benchmarking`` of automl/CARL), symmetric in log scale so
  that halving and doubling are equally likely), from its own generator ``PCG64(seeds[q])``:
  adding a quantity does not change another's sequence.

* **Observations**: ``permute_obs``: a uniformly random permutation ``P_k`` of the observation's
  entries per segment (Permuted MNIST's change, Goodfellow et al. 2013 and Dohare et al. 2024,
  applied to the state vector); ``obs_offset_std > 0``: an offset ``o_k ~ N(0, std^2 I)`` added
  per segment. The returned observation is ``obs[P_k] + o_k``. The default std 1 is one unit of
  the scale that observation normalisation gives the inputs: a shift the size of a typical
  normalised feature (our choice: no published default for MuJoCo states).
* **Reward direction**: ``flip_reward``: in odd segments the forward-progress term of the reward
  is negated, ``r' = r - 2 f`` with ``f`` the env's forward term (:func:`forward_reward`), the
  other terms (control, contact, survival) unchanged: every change reverses the direction that
  is rewarded.

Segment 0 uses the first draw of each stream (``start_with_default``: the model's own values,
the identity observation and forward reward, with the first draws from the first change on).
``drift=True`` changes gradually instead: during segment ``k`` each quantity (and the offset)
moves linearly from its value ``v_k`` to the next segment's ``v_{k+1}``, ``v = v_k + a (v_{k+1} -
v_k)`` with ``a = min(steps_since_change / every, 1)``, rewritten after every step (held at
``v_{k+1}`` from ``every`` steps until the episode ends). The sequences ``v_0, v_1, ...`` are the
same as without drift; the permutation and the reward direction still change at the segment's
start, which stays the task boundary.

``info["friction"]`` (the coefficient in force) and ``info["friction_segment"]`` are reported as
by :class:`FrictionChange`; :meth:`DynamicsChange.values` gives every quantity's current value;
:meth:`DynamicsChange.setting` a segment's full setting, which :class:`FixedDynamics` applies to
another env (evaluation). The state dict restores everything, in the middle of a segment and of
a drift.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from ppo_cbp.envs.friction import FrictionChange, _check_range, _log_uniform

__all__ = [
    "DEFAULT_SCALE_RANGE",
    "QUANTITIES",
    "DynamicsChange",
    "FixedDynamics",
    "forward_reward",
    "paper_frictions",
]

QUANTITIES = ("friction", "gravity", "mass", "damping", "gear")
"""What :class:`DynamicsChange` can change; all but friction are multipliers."""
SCALES = QUANTITIES[1:]
DEFAULT_SCALE_RANGE = (0.5, 2.0)
"""Default log-uniform range of every multiplier (see the module docstring for the source)."""
STREAMS = (*SCALES, "permute", "offset")
"""The random streams a :class:`DynamicsChange` takes a seed for (friction's is ``seed``)."""
TABLE_PATH = Path(__file__).parent / "data" / "paper_frictions.npy"


def paper_frictions() -> np.ndarray:
    """The released code's friction table, ``[100 seeds, 50 segments]`` (``data/README.md``)."""
    return np.load(TABLE_PATH, allow_pickle=False)


def forward_reward(env: gym.Env, info: Mapping[str, Any]) -> float:
    """The forward-progress term of a gymnasium MuJoCo locomotion reward, from a step's ``info``:
    ``reward_forward`` (Ant-v4/v5, HalfCheetah-v5, Hopper-v5, Walker2d-v5, Humanoid-v5),
    ``reward_run`` (HalfCheetah-v4), ``reward_linvel`` (Humanoid-v4), else (Hopper-v4,
    Walker2d-v4, which report no reward terms) ``forward_reward_weight * x_velocity``."""
    for key in ("reward_forward", "reward_run", "reward_linvel"):
        if key in info:
            return float(info[key])
    weight = getattr(env.unwrapped, "_forward_reward_weight", None)
    if weight is None or "x_velocity" not in info:
        raise ValueError(f"{env}: no forward reward term in the step's info")
    return float(weight) * float(info["x_velocity"])


class _Model:
    """The model fields each quantity writes, with their original values."""

    def __init__(self, model: Any):
        self.model = model
        self.fields = {
            "gravity": [model.opt.gravity],
            "mass": [model.body_mass, model.body_inertia, model.body_subtreemass],
            "damping": [model.dof_damping],
            "gear": [model.actuator_gear],
        }
        self.original = {q: [a.copy() for a in arrays] for q, arrays in self.fields.items()}
        self.friction = model.geom_friction[:, 0].copy()

    def scale(self, quantity: str, m: float) -> None:
        for array, original in zip(self.fields[quantity], self.original[quantity]):
            np.multiply(original, m, out=array)


def _mix(a: Any, b: Any, frac: float) -> Any:
    return a if frac == 0.0 else a + frac * (b - a)


class DynamicsChange(FrictionChange):
    """:class:`FrictionChange` with the other changes of the module docstring.

    The first eight parameters are :class:`FrictionChange`'s (its schedule and friction
    sequence). The others:

    :param friction: change the friction (``False``: the model's own coefficients throughout).
    :param friction_table: a sequence of coefficients to use instead of the drawn ones, in order
        (a row of :func:`paper_frictions`).
    :param scales: ``{quantity: (low, high)}`` of the multipliers to change (:data:`SCALES`).
    :param seeds: ``{stream: seed}`` for every stream used (:data:`STREAMS`).
    :param drift: linear drift from one segment's values to the next.
    :param permute_obs: permute the observation per segment.
    :param obs_offset_std: std of the per-segment observation offset (0: none).
    :param flip_reward: negate the forward reward term in odd segments.
    """

    def __init__(
        self,
        env: gym.Env,
        every: int | None = 2_000_000,
        low: float = 0.02,
        high: float = 2.0,
        seed: int = 0,
        at_episode_boundary: bool = True,
        start_with_default: bool = False,
        steps_per_step: int = 1,
        *,
        friction: bool = True,
        friction_table: Sequence[float] | None = None,
        scales: Mapping[str, tuple[float, float]] | None = None,
        seeds: Mapping[str, int] | None = None,
        drift: bool = False,
        permute_obs: bool = False,
        obs_offset_std: float = 0.0,
        flip_reward: bool = False,
    ) -> None:
        scales = {q: _check_range(*r) for q, r in (scales or {}).items()}
        unknown = sorted(set(scales) - set(SCALES))
        if unknown:
            raise ValueError(f"unknown quantities {unknown}: expected some of {list(SCALES)}")
        if not (math.isfinite(obs_offset_std) and obs_offset_std >= 0):
            raise ValueError(f"obs_offset_std must be >= 0, got {obs_offset_std}")
        used = [
            *scales,
            *(["permute"] if permute_obs else []),
            *(["offset"] * (obs_offset_std > 0)),
        ]
        seeds = dict(seeds or {})
        missing = [s for s in used if s not in seeds]
        if missing:
            raise ValueError(f"no seed for the streams {missing}")
        gym.utils.RecordConstructorArgs.__init__(
            self,
            every=every,
            low=low,
            high=high,
            seed=seed,
            at_episode_boundary=at_episode_boundary,
            start_with_default=start_with_default,
            steps_per_step=steps_per_step,
            friction=friction,
            friction_table=None if friction_table is None else list(friction_table),
            scales=scales,
            seeds=seeds,
            drift=drift,
            permute_obs=permute_obs,
            obs_offset_std=obs_offset_std,
            flip_reward=flip_reward,
        )
        # Set before FrictionChange.__init__, which draws and applies the first coefficient.
        self.change_friction = bool(friction)
        self.table = None if friction_table is None else [float(f) for f in friction_table]
        self.table_index = 0
        self.scales = scales
        self.seeds = {s: int(seeds[s]) for s in used}
        self.drift = bool(drift)
        self.permute_obs = bool(permute_obs)
        self.obs_offset_std = float(obs_offset_std)
        self.flip_reward = bool(flip_reward)
        self._model = _Model(env.unwrapped.model)
        self._rngs = {s: np.random.Generator(np.random.PCG64(self.seeds[s])) for s in used}
        self.obs_dim = int(np.prod(env.observation_space.shape))
        self._ready = False
        super().__init__(
            env, every, low, high, seed, at_episode_boundary, start_with_default, steps_per_step
        )
        # Segment 0's values (the model's own with start_with_default) and, drifting, the next.
        self.current = self._defaults() if self.start_with_default else self._draw()
        self.target = self._draw() if self.drift else None
        self.friction_next = self._draw_friction() if self.drift and friction else math.nan
        self._ready = True
        self._apply()

    # ------------------------------------------------------------------ draws

    def _draw_friction(self) -> float:
        if not self.change_friction:
            return self._default_friction
        if self.table is None:
            return super()._draw_friction()
        if self.table_index >= len(self.table):
            raise RuntimeError(
                f"the friction table has {len(self.table)} values: a run this long needs more"
            )
        self.table_index += 1
        return self.table[self.table_index - 1]

    def _defaults(self) -> dict[str, Any]:
        return {
            **dict.fromkeys(self.scales, 1.0),
            **({"permute": np.arange(self.obs_dim)} if self.permute_obs else {}),
            **({"offset": np.zeros(self.obs_dim)} if self.obs_offset_std > 0 else {}),
        }

    def _draw(self) -> dict[str, Any]:
        """One segment's draw of every stream but friction's."""
        out: dict[str, Any] = {}
        for q, (lo, hi) in self.scales.items():
            out[q] = _log_uniform(self._rngs[q], None, lo, hi)
        if self.permute_obs:
            out["permute"] = self._rngs["permute"].permutation(self.obs_dim)
        if self.obs_offset_std > 0:
            out["offset"] = self._rngs["offset"].normal(0.0, self.obs_offset_std, self.obs_dim)
        return out

    def _change(self) -> None:
        if self.change_friction and self.drift:
            self.friction, self.friction_next = self.friction_next, self._draw_friction()
        elif self.change_friction:
            self.friction = self._draw_friction()
        if self.drift:
            self.current, self.target = self.target, self._draw()
        else:
            self.current = self._draw()
        self._using_default = False
        self.segment += 1
        self._apply()

    # ------------------------------------------------------------------ applying

    def _fraction(self) -> float:
        if not self.drift or self.every == 0:
            return 0.0
        if self.pending_change:
            return 1.0
        return min(self.steps_since_change / self.every, 1.0)

    def values(self) -> dict[str, float]:
        """Every changed quantity's value in force now (friction's coefficient; multipliers)."""
        a = self._fraction()
        out = {}
        if self.change_friction:
            start = self._default_friction if self._using_default else self.friction
            out["friction"] = float(_mix(start, self.friction_next, a))
        for q in self.scales:
            out[q] = float(_mix(self.current[q], self.target[q] if self.drift else 0.0, a))
        return out

    def _apply(self) -> None:
        column = self._model.model.geom_friction[:, 0]
        if not self._ready:  # FrictionChange.__init__'s call: only the coefficient exists yet
            start = self._model.friction if self._using_default else self.friction
            column[:] = start if self.change_friction else self._model.friction
            return
        if not self.change_friction:
            column[:] = self._model.friction
        else:
            start = self._model.friction if self._using_default else self.friction
            a = self._fraction()
            column[:] = _mix(start, self.friction_next, a) if a else start
        for q, m in self.values().items():
            if q != "friction":
                self._model.scale(q, m)

    def _info(self, info: dict[str, Any]) -> dict[str, Any]:
        info = super()._info(info)
        if self._ready and self.change_friction and self.drift:
            info["friction"] = self.values()["friction"]
        return info

    @property
    def direction(self) -> float:
        """The sign of the forward reward term in the current segment."""
        return -1.0 if self.flip_reward and self.segment % 2 else 1.0

    def _observe(self, obs: np.ndarray) -> np.ndarray:
        if self.permute_obs:
            obs = obs[self.current["permute"]]
        if self.obs_offset_std > 0:
            target = self.target["offset"] if self.drift else 0.0
            obs = obs + _mix(self.current["offset"], target, self._fraction())
        return obs

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        obs, info = super().reset(seed=seed, options=options)
        return self._observe(obs), info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        direction = self.direction  # of the segment this transition is simulated in
        obs, reward, terminated, truncated, info = super().step(action)
        if direction < 0:
            reward = float(reward) - 2.0 * forward_reward(self.env, info)
        if self.drift:
            self._apply()  # the values of the next step
        return self._observe(obs), reward, terminated, truncated, info

    # ------------------------------------------------------------------ settings

    def setting(self) -> dict[str, Any]:
        """The setting in force now: :meth:`values`, the observation change and the reward
        direction, as :class:`FixedDynamics` takes it."""
        out: dict[str, Any] = dict(self.values())
        if self.permute_obs:
            out["permute"] = self.current["permute"].copy()
        if self.obs_offset_std > 0:
            target = self.target["offset"] if self.drift else 0.0
            out["offset"] = _mix(self.current["offset"], target, self._fraction()).copy()
        if self.flip_reward:
            out["direction"] = self.direction
        return out

    def segment_setting(self, k: int) -> dict[str, Any]:
        """Segment ``k``'s setting at its start, drawn again from the seeds (a pure function of
        the configuration). A quantity at the model's own values is left out."""
        j = k - 1 if self.start_with_default else k  # the draw that segment k uses
        out: dict[str, Any] = {}
        if self.change_friction and j >= 0:
            if self.table is not None:
                out["friction"] = self.table[j]
            else:
                rng = np.random.Generator(np.random.PCG64(self.seed))
                out["friction"] = float(_log_uniform(rng, j + 1, self.low, self.high)[j])
        for q, (lo, hi) in self.scales.items():
            rng = np.random.Generator(np.random.PCG64(self.seeds[q]))
            out[q] = float(_log_uniform(rng, j + 1, lo, hi)[j]) if j >= 0 else 1.0
        if self.permute_obs and j >= 0:
            rng = np.random.Generator(np.random.PCG64(self.seeds["permute"]))
            for _ in range(j + 1):
                out["permute"] = rng.permutation(self.obs_dim)
        if self.obs_offset_std > 0 and j >= 0:
            rng = np.random.Generator(np.random.PCG64(self.seeds["offset"]))
            for _ in range(j + 1):
                out["offset"] = rng.normal(0.0, self.obs_offset_std, self.obs_dim)
        if self.flip_reward:
            out["direction"] = -1.0 if k % 2 else 1.0
        return out

    # ------------------------------------------------------------------ checkpointing

    def _dynamics_config(self) -> dict[str, Any]:
        return {
            "friction": self.change_friction,
            "friction_table": self.table,
            "scales": {q: list(r) for q, r in self.scales.items()},
            "seeds": dict(self.seeds),
            "drift": self.drift,
            "permute_obs": self.permute_obs,
            "obs_offset_std": self.obs_offset_std,
            "flip_reward": self.flip_reward,
        }

    def _plain(self) -> bool:
        """Only the drawn friction changes, abruptly: the state of a FrictionChange suffices."""
        return self._dynamics_config() == {
            "friction": True,
            "friction_table": None,
            "scales": {},
            "seeds": {},
            "drift": False,
            "permute_obs": False,
            "obs_offset_std": 0.0,
            "flip_reward": False,
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()

        def plain(d: dict[str, Any] | None) -> dict[str, Any] | None:
            if d is None:
                return None
            return {
                k: (v.tolist() if isinstance(v, np.ndarray) else float(v)) for k, v in d.items()
            }

        state["dynamics"] = {
            "config": self._dynamics_config(),
            "table_index": self.table_index,
            "friction_next": float(self.friction_next),
            "current": plain(self.current),
            "target": plain(self.target),
            "rngs": {
                s: {
                    "bit_generator": str(r.bit_generator.state["bit_generator"]),
                    "state": {k: int(v) for k, v in r.bit_generator.state["state"].items()},
                    "has_uint32": int(r.bit_generator.state["has_uint32"]),
                    "uinteger": int(r.bit_generator.state["uinteger"]),
                }
                for s, r in self._rngs.items()
            },
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, or a :class:`FrictionChange`'s when only the drawn
        friction changes abruptly (a checkpoint written before this wrapper existed).

        :raises ValueError: if the state was saved under another configuration."""
        dyn = state.get("dynamics")
        if dyn is None:
            if not self._plain():
                raise ValueError("friction state dict without dynamics for a DynamicsChange")
            super().load_state_dict(state)
            return
        if dyn["config"] != self._dynamics_config():
            raise ValueError(
                "dynamics state dict does not match this DynamicsChange: saved "
                f"{dyn['config']!r}, this wrapper {self._dynamics_config()!r}"
            )

        def arrays(d: dict[str, Any] | None) -> dict[str, Any] | None:
            if d is None:
                return None
            return {
                k: (
                    np.asarray(v, np.int64 if k == "permute" else np.float64)
                    if isinstance(v, list)
                    else v
                )
                for k, v in d.items()
            }

        self.table_index = int(dyn["table_index"])
        self.friction_next = float(dyn["friction_next"])
        self.current, self.target = arrays(dyn["current"]), arrays(dyn["target"])
        for s, r in self._rngs.items():
            r.bit_generator.state = dyn["rngs"][s]
        super().load_state_dict(state)  # the schedule; applies everything


class FixedDynamics(gym.Wrapper):
    """An env with one fixed setting of :meth:`DynamicsChange.setting`: ``friction`` (absolute),
    the multipliers, ``permute``/``offset`` of the observation and the reward ``direction``.
    Quantities not in the setting keep the model's values."""

    def __init__(self, env: gym.Env, setting: Mapping[str, Any]):
        super().__init__(env)
        unknown = sorted(set(setting) - {*QUANTITIES, "permute", "offset", "direction"})
        if unknown:
            raise ValueError(f"unknown setting keys {unknown}")
        self.setting = dict(setting)
        model = _Model(env.unwrapped.model)
        if "friction" in setting:
            env.unwrapped.model.geom_friction[:, 0] = float(setting["friction"])
        for q in SCALES:
            if q in setting:
                model.scale(q, float(setting[q]))
        self.direction = float(setting.get("direction", 1.0))

    def _observe(self, obs: np.ndarray) -> np.ndarray:
        if "permute" in self.setting:
            obs = obs[np.asarray(self.setting["permute"])]
        if "offset" in self.setting:
            obs = obs + np.asarray(self.setting["offset"], np.float64)
        return obs

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        return self._observe(obs), info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.direction < 0:
            reward = float(reward) - 2.0 * forward_reward(self.env, info)
        return self._observe(obs), reward, terminated, truncated, info
