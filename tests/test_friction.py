"""Tests for ppo_cbp.envs.friction: the log-uniform friction sequence and its change schedule."""

from __future__ import annotations

import io
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from ppo_cbp.envs import FrictionChange, sample_frictions

pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date:DeprecationWarning")

ENV_IDS = ["Ant-v4", "Ant-v5", "Hopper-v4", "Hopper-v5", "Walker2d-v4", "Walker2d-v5"]


def _run(wrapper: FrictionChange, n_calls: int, action_seed: int = 0, env_seed: int | None = 0):
    """Step with fixed uniform random actions, resetting after every episode end.

    Returns, per call of ``step`` (index 0 = first call): the sliding coefficients in the model
    while that step was simulated, info's friction and segment, whether the step ended an episode,
    and the observation; plus (model coefficients, info) right after each reset.
    """
    actions = np.random.default_rng(action_seed).uniform(
        -1.0, 1.0, size=(n_calls, *wrapper.action_space.shape)
    )
    rec: dict[str, list] = {k: [] for k in ("model", "f", "seg", "end", "term", "obs", "reset")}
    if env_seed is not None:
        wrapper.reset(seed=env_seed)
    for a in actions:
        rec["model"].append(wrapper.unwrapped.model.geom_friction[:, 0].copy())
        obs, _, term, trunc, info = wrapper.step(a.astype(wrapper.action_space.dtype))
        rec["f"].append(info["friction"])
        rec["seg"].append(info["friction_segment"])
        rec["end"].append(term or trunc)
        rec["term"].append(term)
        rec["obs"].append(obs)
        if term or trunc:
            _, info = wrapper.reset()
            rec["reset"].append((wrapper.unwrapped.model.geom_friction[:, 0].copy(), info))
    return rec


def _boundary_changes(ends: list[bool], every: int, steps_per_step: int = 1) -> list[int]:
    """Hand schedule: 1-based call indices after which the friction changes (paper's rule).

    A change happens at an episode end ``t`` if at least ``every`` total steps have passed since
    the previous change (call index ``last``): ``(t - last) * steps_per_step >= every``.
    """
    changes, last = [], 0
    for t, end in enumerate(ends, start=1):
        if end and (t - last) * steps_per_step >= every:
            changes.append(t)
            last = t
    return changes


def _segments_from_changes(changes: list[int], n_calls: int) -> np.ndarray:
    """Segment index of each call: the number of changes that happened before it."""
    return np.array([sum(c < i for c in changes) for i in range(1, n_calls + 1)])


# ------------------------------------------------------------------ the sampler


def test_sample_frictions_matches_definition_and_is_log_uniform() -> None:
    low, high, n = 0.02, 2.0, 20_000
    f = sample_frictions(7, n, low, high)
    assert f.shape == (n,) and f.dtype == np.float64
    assert f.min() >= low and f.max() <= high
    # Definition, computed another way: f = low * (high / low) ** u with u the PCG64 doubles.
    u = np.random.Generator(np.random.PCG64(7)).random(n)
    np.testing.assert_allclose(f, low * (high / low) ** u, rtol=1e-12)

    # log10 f ~ U(a, b): mean (a+b)/2, variance (b-a)^2/12. Standard errors for n = 20000:
    # mean 0.577/sqrt(n) = 0.0041, variance sqrt((b-a)^4 (1/80 - 1/144) / n) = 0.0021.
    a, b = math.log10(low), math.log10(high)
    x = np.log10(f)
    assert abs(x.mean() - (a + b) / 2) < 5 * 0.0041
    assert abs(x.var() - (b - a) ** 2 / 12) < 5 * 0.0021
    # Kolmogorov-Smirnov statistic against U(a, b); the 0.1% critical value is 1.95/sqrt(n).
    z = np.sort((x - a) / (b - a))
    i = np.arange(1, n + 1)
    ks = max((i / n - z).max(), (z - (i - 1) / n).max())
    assert ks < 1.95 / math.sqrt(n)
    # A *uniform* (not log-uniform) draw on [0.02, 2] would have median ~1.01; log-uniform: 0.2.
    assert abs(np.median(f) - math.sqrt(low * high)) < 0.02


def test_sample_frictions_seeds_and_degenerate_range() -> None:
    np.testing.assert_array_equal(sample_frictions(3, 50), sample_frictions(3, 50))
    assert not np.any(sample_frictions(3, 50) == sample_frictions(4, 50))
    # A prefix of a longer sequence is the shorter sequence.
    np.testing.assert_array_equal(sample_frictions(3, 10), sample_frictions(3, 50)[:10])
    np.testing.assert_array_equal(sample_frictions(0, 5, 0.5, 0.5), np.full(5, 0.5))


def test_wrapper_follows_the_sampled_sequence() -> None:
    """Segment k uses sample k, for the same seed in two independent wrappers."""
    seqs = []
    for _ in range(2):
        w = FrictionChange(gym.make("Hopper-v4"), every=10, at_episode_boundary=False, seed=5)
        rec = _run(w, 60)
        seqs.append(np.array(rec["f"]))
        np.testing.assert_array_equal(rec["f"], sample_frictions(5, 6)[np.array(rec["seg"])])
    np.testing.assert_array_equal(seqs[0], seqs[1])
    other = FrictionChange(gym.make("Hopper-v4"), every=10, at_episode_boundary=False, seed=6)
    assert not np.any(np.array(_run(other, 60)["f"]) == seqs[0])


# ------------------------------------------------------------------ the model


def test_all_geoms_get_the_sliding_coefficient_other_columns_unchanged() -> None:
    default = gym.make("Walker2d-v5").unwrapped.model.geom_friction.copy()
    assert len(np.unique(default[:, 0])) > 1  # Walker2d's geoms differ: a meaningful check
    w = FrictionChange(gym.make("Walker2d-v5"), every=20, at_episode_boundary=False, seed=1)
    rec = _run(w, 100)
    expected = sample_frictions(1, 6)
    assert sorted(set(rec["seg"])) == [0, 1, 2, 3, 4]
    for model_f, seg in zip(rec["model"], rec["seg"], strict=True):
        np.testing.assert_array_equal(model_f, np.full(len(default), expected[seg]))
    np.testing.assert_array_equal(w.unwrapped.model.geom_friction[:, 1:], default[:, 1:])
    # The change after the 100th call is already in the model.
    assert w.segment == 5 and w.friction == expected[5]
    np.testing.assert_array_equal(w.unwrapped.model.geom_friction[:, 0], expected[5])


def test_start_with_default_and_every_zero() -> None:
    default = gym.make("Hopper-v5").unwrapped.model.geom_friction.copy()
    w = FrictionChange(gym.make("Hopper-v5"), every=30, seed=2, start_with_default=True)
    np.testing.assert_array_equal(w.unwrapped.model.geom_friction, default)
    assert w.segment == 0 and math.isnan(w.friction)  # Hopper's defaults are not one value
    rec = _run(w, 200)
    seg = np.array(rec["seg"])
    assert seg.max() >= 2
    samples = sample_frictions(2, seg.max())
    for model_f, s in zip(rec["model"], seg, strict=True):
        np.testing.assert_array_equal(model_f, default[:, 0] if s == 0 else samples[s - 1])

    ant = FrictionChange(gym.make("Ant-v5"), every=None, start_with_default=True)
    assert ant.friction == 1.0  # Ant's geoms share one default coefficient

    # every=0: stationary, but with the first sample (not the default).
    w0 = FrictionChange(gym.make("Hopper-v4"), every=0, seed=2)
    rec0 = _run(w0, 300)
    assert sum(rec0["end"]) > 5
    assert set(rec0["seg"]) == {0}
    np.testing.assert_array_equal(np.array(rec0["model"]), samples[0])


# ------------------------------------------------------------------ the schedule


@pytest.mark.parametrize("steps_per_step", [1, 2])
def test_changes_at_first_episode_end_after_every_steps(steps_per_step: int) -> None:
    every, n_calls, seed = 120, 1200, 3
    env = gym.make("Hopper-v4", max_episode_steps=25)
    w = FrictionChange(env, every=every, seed=seed, steps_per_step=steps_per_step)
    rec = _run(w, n_calls)
    ends = rec["end"]
    assert any(rec["term"]) and any(e and not t for e, t in zip(ends, rec["term"], strict=True))

    changes = _boundary_changes(ends, every, steps_per_step)
    assert len(changes) >= 4
    # Meaningful: some change had to wait for an episode end after the step count was reached.
    starts = [0, *changes[:-1]]
    assert any((c - s) * steps_per_step > every for s, c in zip(starts, changes, strict=True))
    seg = _segments_from_changes(changes, n_calls)
    np.testing.assert_array_equal(rec["seg"], seg)
    samples = sample_frictions(seed, seg.max() + 1)
    np.testing.assert_array_equal(rec["f"], samples[seg])
    for model_f, s in zip(rec["model"], seg, strict=True):
        np.testing.assert_array_equal(model_f, samples[s])

    # Never mid-episode: the friction is constant between consecutive episode ends.
    episode = np.cumsum([0, *ends[:-1]])
    for e in np.unique(episode):
        assert len(set(np.array(rec["f"])[episode == e])) == 1

    # The reset after a change already reports and uses the new coefficient.
    end_calls = [t for t, end in enumerate(ends, start=1) if end]
    for t, (model_f, info) in zip(end_calls, rec["reset"], strict=True):
        k = sum(c <= t for c in changes)
        assert info["friction"] == samples[k] and info["friction_segment"] == k
        np.testing.assert_array_equal(model_f, samples[k])


@pytest.mark.parametrize("steps_per_step", [1, 2])
def test_changes_exactly_at_step_count_when_not_at_boundary(steps_per_step: int) -> None:
    every, n_calls, seed = 100, 400, 4
    w = FrictionChange(
        gym.make("Hopper-v4"),
        every=every,
        seed=seed,
        at_episode_boundary=False,
        steps_per_step=steps_per_step,
    )
    rec = _run(w, n_calls)
    calls_per_segment = every // steps_per_step  # 100 calls, or 50 calls with 2 envs
    seg = np.arange(n_calls) // calls_per_segment
    np.testing.assert_array_equal(rec["seg"], seg)
    samples = sample_frictions(seed, seg.max() + 1)
    np.testing.assert_array_equal(np.array(rec["model"]), samples[seg][:, None].repeat(5, 1))
    assert w.num_steps == n_calls * steps_per_step
    # Changes fall mid-episode: some episode contains steps of two segments.
    episode = np.cumsum([0, *rec["end"][:-1]])
    assert any(len(set(seg[episode == e])) > 1 for e in np.unique(episode))


@pytest.mark.parametrize(
    "mode", [gym.vector.AutoresetMode.NEXT_STEP, gym.vector.AutoresetMode.SAME_STEP]
)
def test_vector_env_copies_follow_one_sequence(mode: gym.vector.AutoresetMode) -> None:
    """Two copies with steps_per_step=2 each switch after 50 of their own steps (100 total)."""
    n_envs, every, seed, n_calls = 2, 100, 9, 150

    def make() -> FrictionChange:
        env = gym.make("Hopper-v5")
        return FrictionChange(
            env, every=every, seed=seed, at_episode_boundary=False, steps_per_step=n_envs
        )

    vec = gym.vector.SyncVectorEnv([make for _ in range(n_envs)], autoreset_mode=mode)
    vec.reset(seed=0)
    vec.action_space.seed(0)
    samples = sample_frictions(seed, 4)
    own = np.zeros(n_envs, dtype=int)  # real environment steps taken by each copy
    autoreset = np.zeros(n_envs, dtype=bool)
    for _ in range(n_calls):
        *_, term, trunc, infos = vec.step(vec.action_space.sample())
        done = term | trunc
        before = own.copy()
        # NEXT_STEP: the call after an episode end only resets that copy (no step).
        own += ~autoreset
        if mode == gym.vector.AutoresetMode.NEXT_STEP:
            # The step's own friction, or after an autoreset the (unchanged) current one.
            expected_seg = before // (every // n_envs)
            autoreset = done
        else:
            # SAME_STEP: an ended copy is reset in the same call and reports the reset's info;
            # the ended episode's friction is in final_info.
            expected_seg = np.where(done, own, before) // (every // n_envs)
            if done.any():
                final = infos["final_info"]
                np.testing.assert_array_equal(
                    final["friction"][done], samples[before[done] // (every // n_envs)]
                )
        np.testing.assert_array_equal(infos["friction_segment"], expected_seg)
        np.testing.assert_array_equal(infos["friction"], samples[expected_seg])
    assert (own // (every // n_envs)).min() >= 2  # both copies changed twice
    if mode == gym.vector.AutoresetMode.NEXT_STEP:
        assert own.max() < n_calls  # reset-only calls happened and were not counted as steps
    for sub, n in zip(vec.envs, own, strict=True):
        assert sub.num_steps == n * n_envs and sub.segment == n // (every // n_envs)
    vec.close()


# ------------------------------------------------------------------ the dynamics


def _ant_trajectory(low: float, high: float, floor_only: float | None = None) -> np.ndarray:
    env = gym.make("Ant-v4")
    if floor_only is not None:
        env.unwrapped.model.geom_friction[0, 0] = floor_only  # geom 0 is the floor
        w = env
    else:
        w = FrictionChange(env, every=0, low=low, high=high)
    w.reset(seed=0)
    actions = np.random.default_rng(0).uniform(-1, 1, size=(150, 8))
    xy = []
    for a in actions:
        w.step(a)
        xy.append(env.unwrapped.data.qpos[:2].copy())
    return np.array(xy)


def test_friction_changes_the_dynamics() -> None:
    slippery = _ant_trajectory(0.02, 0.02)
    sticky = _ant_trajectory(2.0, 2.0)
    np.testing.assert_array_equal(sticky, _ant_trajectory(2.0, 2.0))  # deterministic control
    assert np.abs(slippery - sticky).max() > 0.05
    # Why all geoms: MuJoCo takes the larger coefficient of the two geoms, so a slippery floor
    # alone (the feet keep 1.0) gives exactly the default dynamics.
    np.testing.assert_array_equal(
        _ant_trajectory(0, 0, floor_only=0.02), _ant_trajectory(0, 0, floor_only=1.0)
    )


# ------------------------------------------------------------------ checkpointing


def _plain(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return x is None or type(x) in (bool, int, float, str)


def _through_torch(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save({"friction": state}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["friction"]


@pytest.mark.parametrize("where", ["waiting_for_episode_end", "pending_reset"])
def test_state_round_trip_continues_same_sequence_and_timing(where: str) -> None:
    every, n_calls, seed = 100, 900, 11
    kwargs = dict(every=every, seed=seed)
    ref = _run(FrictionChange(gym.make("Hopper-v4"), **kwargs), n_calls)
    changes = _boundary_changes(ref["end"], every)
    assert len(changes) >= 3
    # Interrupt after call k: either mid-episode after `every` steps have passed (change due, not
    # yet made), or right after the episode end that triggers a change, before the reset.
    k = changes[1] - 1 if where == "waiting_for_episode_end" else changes[1]
    assert k - changes[0] >= every and ref["end"][k - 1] == (where == "pending_reset")

    actions = np.random.default_rng(0).uniform(-1, 1, size=(n_calls, 3)).astype(np.float32)
    first = FrictionChange(gym.make("Hopper-v4"), **kwargs)
    part1 = _run(first, k - 1)  # same actions as ref's first k - 1 (same generator prefix)
    *_, info = first.step(actions[k - 1])  # the k-th call, without the reset that may follow
    assert part1["f"] + [info["friction"]] == ref["f"][:k]
    assert first.pending_change == (where == "pending_reset")
    state = first.state_dict()
    assert _plain(state)
    state = _through_torch(state)
    assert state == first.state_dict()

    # Same physics state: wrap the same inner env; the new wrapper first applies its own first
    # sample, so the model only matches the reference if load_state_dict restores the friction.
    resumed = FrictionChange(first.env, **kwargs)
    assert resumed.friction != first.friction
    resumed.load_state_dict(state)
    assert resumed.friction == first.friction and resumed.segment == first.segment
    if where == "pending_reset":
        resumed.reset()
    rest: dict[str, list] = {"f": [], "seg": [], "obs": []}
    for a in actions[k:]:
        obs, _, term, trunc, info = resumed.step(a)
        rest["f"].append(info["friction"])
        rest["seg"].append(info["friction_segment"])
        rest["obs"].append(obs)
        if term or trunc:
            resumed.reset()
    assert rest["f"] == ref["f"][k:] and rest["seg"] == ref["seg"][k:]
    assert len(set(rest["seg"])) >= 2  # the resumed part itself contains changes
    np.testing.assert_array_equal(np.array(rest["obs"]), np.array(ref["obs"][k:]))


def test_loaded_state_is_written_into_a_fresh_model() -> None:
    kwargs = dict(every=40, seed=8, at_episode_boundary=False, start_with_default=True)
    default = gym.make("Walker2d-v4").unwrapped.model.geom_friction.copy()
    a = FrictionChange(gym.make("Walker2d-v4"), **kwargs)
    _run(a, 90)
    assert a.segment == 2 and a.friction == sample_frictions(8, 2)[1]
    b = FrictionChange(gym.make("Walker2d-v4"), **kwargs)
    np.testing.assert_array_equal(b.unwrapped.model.geom_friction, default)
    b.load_state_dict(_through_torch(a.state_dict()))
    np.testing.assert_array_equal(b.unwrapped.model.geom_friction[:, 0], a.friction)
    np.testing.assert_array_equal(b.unwrapped.model.geom_friction[:, 1:], default[:, 1:])
    # Both continue identically: 10 more calls finish segment 2, then sample index 2 follows.
    ra, rb = _run(a, 40, env_seed=None), _run(b, 40, env_seed=0)
    assert ra["f"] == rb["f"] and ra["seg"] == rb["seg"]
    assert rb["seg"] == [2] * 30 + [3] * 10
    assert rb["f"][-1] == sample_frictions(8, 3)[2]

    with pytest.raises(ValueError, match="seed"):
        FrictionChange(gym.make("Walker2d-v4"), **{**kwargs, "seed": 9}).load_state_dict(
            a.state_dict()
        )


# ------------------------------------------------------------------ envs and API


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_all_envs(env_id: str) -> None:
    w = FrictionChange(gym.make(env_id), every=30, seed=0, at_episode_boundary=False)
    obs, info = w.reset(seed=0)
    assert info["friction"] == sample_frictions(0, 1)[0] and info["friction_segment"] == 0
    if env_id.startswith("Ant"):
        # v5 observes the contact forces (which friction changes); v4 does not.
        assert obs.shape == ((105,) if env_id.endswith("v5") else (27,))
    rec = _run(w, 40, env_seed=None)
    assert rec["seg"] == [0] * 30 + [1] * 10
    assert np.all(w.unwrapped.model.geom_friction[:, 0] == sample_frictions(0, 2)[1])


def test_passes_gymnasium_env_checker() -> None:
    # check_env recommends the unwrapped env and warns about wrappers; the wrapper is what we
    # need checked, so it is passed as is and the warning is expected. The check rebuilds the env
    # from env.spec (close check), which works because the wrapper records its arguments.
    w = FrictionChange(gym.make("Hopper-v4"), every=50, seed=0)
    with pytest.warns(UserWarning):
        check_env(w, skip_render_check=True)
    rebuilt = w.spec.make()
    assert isinstance(rebuilt, FrictionChange) and rebuilt.friction == w.friction


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(low=0.0), "low"),
        (dict(low=-1.0), "low"),
        (dict(low=2.0, high=1.0), "low <= high"),
        (dict(high=math.inf), "high"),
        (dict(low=math.nan), "low"),
        (dict(every=-1), "every"),
        (dict(every=1.5), "every"),
        (dict(steps_per_step=0), "steps_per_step"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FrictionChange(gym.make("Hopper-v5"), **kwargs)


def test_non_mujoco_env_is_rejected() -> None:
    with pytest.raises(ValueError, match="CartPole-v1"):
        FrictionChange(gym.make("CartPole-v1"))
    with pytest.raises(ValueError, match="low"):
        sample_frictions(0, 3, low=0.0)
