"""Friction-changing wrapper for MuJoCo locomotion envs (the paper's non-stationary RL problem).

Dohare et al. (Nature 2024) make Ant (and Hopper, Walker2d) non-stationary by changing the
coefficient of friction during training: a new coefficient is sampled **log-uniformly** on
``[0.02, 2.0]`` (``log10 f ~ U(log10 0.02, log10 2.0)``) and takes effect at the **first episode
boundary after 2 million time steps** have passed since the previous change. The first segment
already uses the first sampled coefficient. (The authors' code tests ``step - last_change > 2M``
at each ``done``; here a ``done`` on exactly the ``every``-th step already counts, see below.)

:class:`FrictionChange` reproduces this on any gymnasium MuJoCo env (Ant, Hopper, Walker2d; v4
and v5) without rebuilding it:

* **Which coefficient.** It overwrites the *sliding* friction (column 0) of **all** geoms in place,
  ``env.unwrapped.model.geom_friction[:, 0] = f``. The torsional and rolling coefficients (columns
  1 and 2) keep their default values. All geoms, not only the floor: for a contact between two
  geoms of equal priority MuJoCo uses the element-wise *maximum* of their friction coefficients,
  so lowering only the floor's coefficient leaves every foot-floor contact unchanged.
* **Sequence.** ``f_k = 10 ** (log10(low) + (log10(high) - log10(low)) * u_k)`` where ``u_k`` is
  the ``k``-th ``Generator(PCG64(seed)).random()`` draw, so one seed always gives the same sequence
  (:func:`sample_frictions` returns its first ``n`` values). The env's own ``reset(seed=...)`` does
  not touch this generator.
* **Timing** (``at_episode_boundary=True``, default, the paper's rule). Let ``s`` be the number of
  environment steps since the last change. A change is due once ``s >= every``; it happens at the
  end of the first episode (``terminated or truncated``) whose last step comes at or after that
  point, and it is applied in the following ``reset()``, so the whole next episode runs with the
  new coefficient and no episode ever mixes two coefficients. ``s`` restarts from 0 at that
  episode end. With ``at_episode_boundary=False`` the change happens right after the step at
  which ``s`` reaches ``every`` (mid-episode): the next step already uses the new coefficient.
  ``every=0`` or ``None`` never changes (a stationary env that still uses the first sample).
* ``start_with_default=True`` keeps the model's own coefficients for the first segment; the
  first sample is then used from the first change on.
* **Vectorised envs** (``steps_per_step``). ``every`` counts the *run's total* environment steps.
  With ``N`` parallel envs, give each of the ``N`` wrappers the **same** ``seed`` and
  ``steps_per_step=N``: every call to ``step`` then advances the counter by ``N``, so each copy
  becomes due after ``every / N`` of its own steps (= ``every`` total steps) and switches at its own
  next episode boundary. All copies follow the run's one friction sequence; they may differ by at
  most one episode in when they switch. Only real transitions are counted: with gymnasium's
  default ``AutoresetMode.NEXT_STEP`` the vector-env call after an episode end only resets that
  copy and does not advance its counter, so a trainer that adds ``N`` per vector step runs slightly
  ahead of the copies' counters (by ``N`` per episode end); ``AutoresetMode.SAME_STEP`` has no such
  calls.

``info["friction"]`` and ``info["friction_segment"]`` in the dicts returned by ``step`` and
``reset`` give the coefficient and the segment index (0 for the first segment) that the returned
observation was simulated with; gymnasium's vector envs stack them per env (with ``SAME_STEP``
autoreset, an ended copy reports its reset's values and the ended episode's are in
``info["final_info"]``).
:meth:`FrictionChange.state_dict` / :meth:`FrictionChange.load_state_dict` save and restore the
schedule and the generator so a resumed run continues the exact same sequence and timing.

Observation note: Ant-v5's default observation (105 dims) includes the clipped external contact
forces ``cfrc_ext``, which change with friction, while Ant-v4's default observation (27 dims)
excludes them (``use_contact_forces=False``). Hopper and Walker2d observe no contact forces.
(The paper used gym's Ant-v3, whose 111-dim observation contains contact forces that were all
zero under MuJoCo >= 2.0.)
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np

__all__ = ["FrictionChange", "sample_frictions"]

#: Keys of the hyper-parameters that define the friction sequence and its timing. A state dict
#: saved under other values of these cannot be continued (``steps_per_step`` may change: the
#: counters are in total environment steps).
_SCHEDULE_KEYS = ("seed", "low", "high", "every", "at_episode_boundary", "start_with_default")


def _log_uniform(rng: np.random.Generator, n: int | None, low: float, high: float) -> Any:
    """``n`` draws (or one float if ``n is None``) of ``10 ** U(log10 low, log10 high)``.

    Uses exactly one ``rng.random()`` double per draw, so ``n`` draws at once and ``n`` single draws
    produce the same values.
    """
    log_low, log_high = math.log10(low), math.log10(high)
    u = rng.random() if n is None else rng.random(n)
    f = np.power(10.0, log_low + (log_high - log_low) * u)
    # Rounding in the power may step a hair outside the interval at the ends.
    f = np.clip(f, low, high)
    return float(f) if n is None else f


def _check_range(low: float, high: float) -> tuple[float, float]:
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high for the friction range, got low={low}, high={high}")
    return float(low), float(high)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def sample_frictions(seed: int, n: int, low: float = 0.02, high: float = 2.0) -> np.ndarray:
    """The first ``n`` friction coefficients of the sequence that ``FrictionChange(seed=seed)`` uses.

    ``f_k = 10 ** (log10(low) + (log10(high) - log10(low)) * u_k)`` with ``u_0, u_1, ...`` the
    successive ``numpy.random.Generator(PCG64(seed)).random()`` draws, i.e. ``f`` is log-uniform
    on ``[low, high]``.

    :param seed: seed of the PCG64 generator (an integer >= 0).
    :param n: number of coefficients (>= 0).
    :param low: lower end of the range (> 0).
    :param high: upper end of the range (>= low).
    :return: float64 array of shape ``(n,)``.
    """
    seed = _check_int("seed", seed, 0)
    n = _check_int("n", n, 0)
    low, high = _check_range(low, high)
    return _log_uniform(np.random.Generator(np.random.PCG64(seed)), n, low, high)


def _env_name(env: gym.Env) -> str:
    spec = getattr(env, "spec", None)
    return spec.id if spec is not None else repr(env)


class FrictionChange(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Change the sliding friction of all geoms of a MuJoCo env on the paper's schedule.

    See the module docstring for the exact definitions. Wrap the env returned by ``gym.make``
    (outside its ``TimeLimit``, so that time-limit truncations count as episode boundaries).

    :param env: a gymnasium MuJoCo env (``env.unwrapped.model.geom_friction`` must exist).
    :param every: environment steps (run totals, see ``steps_per_step``) between changes; a change
        happens at the first episode boundary once ``every`` steps have passed since the previous
        one. ``0`` or ``None``: never change. The paper uses 2,000,000.
    :param low: lower end of the log-uniform range (paper: 0.02).
    :param high: upper end of the log-uniform range (paper: 2.0).
    :param seed: seed of the friction sequence (see :func:`sample_frictions`); it is independent of
        the env's reset seed. Use the same value in all copies of a vectorised env.
    :param at_episode_boundary: if ``False``, change right after the step at which ``every`` steps
        have passed, even mid-episode.
    :param start_with_default: run the first segment with the model's default coefficients instead
        of the first sample.
    :param steps_per_step: how many of the run's environment steps one call to :meth:`step`
        stands for: the number of parallel envs when this wrapper is one copy of a vectorised env.

    :ivar friction: current sliding coefficient; for the default segment of
        ``start_with_default=True`` the geoms' common default, or NaN if the default geoms differ,
        as in Hopper and Walker2d.
    :ivar segment: 0 for the first coefficient, +1 per change.
    :ivar num_steps: run-total steps, in units of ``steps_per_step``.
    :ivar steps_since_change: run-total steps, in units of ``steps_per_step``.
    :ivar pending_change: an episode end has triggered a change that the next ``reset`` applies.
    :ivar default_geom_friction: copy of the model's ``geom_friction`` before wrapping.
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
    ) -> None:
        low, high = _check_range(low, high)
        every = 0 if every is None else _check_int("every", every, 0)
        seed = _check_int("seed", seed, 0)
        steps_per_step = _check_int("steps_per_step", steps_per_step, 1)
        model = getattr(env.unwrapped, "model", None)
        geom_friction = getattr(model, "geom_friction", None)
        if (
            not isinstance(geom_friction, np.ndarray)
            or geom_friction.ndim != 2
            or geom_friction.shape[1] != 3
        ):
            raise ValueError(
                f"FrictionChange needs a MuJoCo env with env.unwrapped.model.geom_friction "
                f"(an array of shape (ngeom, 3)); {_env_name(env)} has none"
            )
        # Recorded so that ``env.spec`` includes this wrapper and ``env.spec.make()`` rebuilds it.
        gym.utils.RecordConstructorArgs.__init__(
            self,
            every=every,
            low=low,
            high=high,
            seed=seed,
            at_episode_boundary=at_episode_boundary,
            start_with_default=start_with_default,
            steps_per_step=steps_per_step,
        )
        gym.Wrapper.__init__(self, env)
        self.every = every
        self.low = low
        self.high = high
        self.seed = seed
        self.at_episode_boundary = bool(at_episode_boundary)
        self.start_with_default = bool(start_with_default)
        self.steps_per_step = steps_per_step

        self._geom_friction = geom_friction  # a view into the MjModel: writes reach the physics
        self.default_geom_friction: np.ndarray = geom_friction.copy()
        default = np.unique(self.default_geom_friction[:, 0])
        # The default segment has one well-defined coefficient only if all geoms share it.
        self._default_friction = float(default[0]) if default.size == 1 else math.nan

        self._rng = np.random.Generator(np.random.PCG64(seed))
        self.num_steps = 0  # run-total environment steps seen by this copy
        self.steps_since_change = 0
        self.segment = 0
        self.pending_change = False  # a change decided at an episode end, applied at reset
        self._using_default = self.start_with_default
        if self._using_default:
            self.friction = self._default_friction
        else:
            self.friction = self._draw_friction()
            self._apply()

    # ------------------------------------------------------------------ schedule

    def _apply(self) -> None:
        if self._using_default:
            self._geom_friction[:, 0] = self.default_geom_friction[:, 0]
        else:
            self._geom_friction[:, 0] = self.friction

    def _draw_friction(self) -> float:
        """The sequence's next coefficient (one ``random()`` double of the generator)."""
        return _log_uniform(self._rng, None, self.low, self.high)

    def _change(self) -> None:
        self.friction = self._draw_friction()
        self._using_default = False
        self.segment += 1
        self._apply()

    def _info(self, info: dict[str, Any]) -> dict[str, Any]:
        info = dict(info)
        info["friction"] = self.friction
        info["friction_segment"] = self.segment
        return info

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        if self.pending_change:
            self.pending_change = False
            self._change()
        obs, info = self.env.reset(seed=seed, options=options)
        return obs, self._info(info)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = self._info(info)  # the coefficient this transition was simulated with
        self.num_steps += self.steps_per_step
        self.steps_since_change += self.steps_per_step
        if self.every > 0 and self.steps_since_change >= self.every and not self.pending_change:
            if not self.at_episode_boundary:
                self.steps_since_change = 0
                self._change()
            elif terminated or truncated:
                self.steps_since_change = 0
                self.pending_change = True
        return obs, reward, terminated, truncated, info

    # ------------------------------------------------------------------ checkpointing

    def _config(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "low": self.low,
            "high": self.high,
            "every": self.every,
            "at_episode_boundary": self.at_episode_boundary,
            "start_with_default": self.start_with_default,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the schedule exactly, as plain Python values.

        Contains the step counters, the segment index, the current coefficient, whether the
        default coefficients are in use, the pending-change flag, the generator's
        ``bit_generator.state`` (nested dict of ints and strings) and the schedule's
        hyper-parameters (checked on load). Safe for ``torch.load(weights_only=True)``.
        """
        rng_state = self._rng.bit_generator.state
        return {
            "num_steps": int(self.num_steps),
            "steps_since_change": int(self.steps_since_change),
            "segment": int(self.segment),
            "friction": float(self.friction),
            "using_default": bool(self._using_default),
            "pending_change": bool(self.pending_change),
            "rng_state": {
                "bit_generator": str(rng_state["bit_generator"]),
                "state": {k: int(v) for k, v in rng_state["state"].items()},
                "has_uint32": int(rng_state["has_uint32"]),
                "uinteger": int(rng_state["uinteger"]),
            },
            "config": self._config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` and write its coefficient into the model.

        :raises ValueError: if the state was saved with a different seed, range, ``every``,
            ``at_episode_boundary`` or ``start_with_default``.
        """
        saved = state.get("config", {})
        own = self._config()
        wrong = [
            f"{k}: saved {saved.get(k)!r}, this wrapper {own[k]!r}"
            for k in _SCHEDULE_KEYS
            if saved.get(k) != own[k]
        ]
        if wrong:
            raise ValueError(
                "friction state dict does not match this FrictionChange: " + "; ".join(wrong)
            )
        self._rng.bit_generator.state = state["rng_state"]
        self.num_steps = int(state["num_steps"])
        self.steps_since_change = int(state["steps_since_change"])
        self.segment = int(state["segment"])
        self.friction = float(state["friction"])
        self._using_default = bool(state["using_default"])
        self.pending_change = bool(state["pending_change"])
        self._apply()
