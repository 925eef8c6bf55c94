"""GAE of the PPO trainer against hand-computed values and the Monte Carlo return."""

import numpy as np
import pytest

from ppo_cbp.train import compute_gae

# One env, four steps, gamma = lambda = 0.5 (so gamma * lambda = 0.25):
#   t=0 ordinary step (next state s1, V(s1) = 1.0)
#   t=1 time-limit truncation, V(final observation) = 10
#   t=2 termination (the value 7 of its final observation must be ignored)
#   t=3 ordinary last step of the rollout, bootstraps from V(s4) = 3
REWARDS = [1.0, 2.0, 3.0, 4.0]
VALUES = [0.5, 1.0, 1.5, 2.0]
NEXT_VALUES = [1.0, 10.0, 7.0, 3.0]
TERMINATED = [False, False, True, False]
TRUNCATED = [False, True, False, False]


def _column(x, dtype=np.float64):
    return np.asarray(x, dtype=dtype)[:, None]


def _gae(bootstrap_truncation):
    return compute_gae(
        _column(REWARDS),
        _column(VALUES),
        _column(NEXT_VALUES),
        _column(TERMINATED, bool),
        _column(TRUNCATED, bool),
        gamma=0.5,
        gae_lambda=0.5,
        bootstrap_truncation=bootstrap_truncation,
    )


def test_gae_bootstraps_truncation_from_final_value():
    adv, ret = _gae(True)
    # delta3 = 4 + 0.5*3 - 2 = 3.5;  A3 = 3.5
    # delta2 = 3 - 1.5 = 1.5 (terminated: no bootstrap, no carry);  A2 = 1.5
    # delta1 = 2 + 0.5*10 - 1 = 6 (truncated: bootstrap, no carry);  A1 = 6
    # delta0 = 1 + 0.5*1 - 0.5 = 1;  A0 = 1 + 0.25*6 = 2.5
    np.testing.assert_array_equal(adv[:, 0], [2.5, 6.0, 1.5, 3.5])
    np.testing.assert_array_equal(ret[:, 0], [3.0, 7.0, 3.0, 5.5])


def test_gae_without_truncation_bootstrap_treats_it_as_termination():
    adv, ret = _gae(False)
    # delta1 = 2 - 1 = 1;  A1 = 1;  A0 = 1 + 0.25*1 = 1.25; steps 2 and 3 as before
    np.testing.assert_array_equal(adv[:, 0], [1.25, 1.0, 1.5, 3.5])
    np.testing.assert_array_equal(ret[:, 0], [1.75, 2.0, 3.0, 5.5])


def test_gae_envs_are_independent_columns():
    # second env: no episode end, r = 1, V = 0, V(s4) = 2
    # delta = [1, 1, 1, 1 + 0.5*2] = [1, 1, 1, 2]
    # A3 = 2, A2 = 1 + 0.25*2 = 1.5, A1 = 1 + 0.25*1.5 = 1.375, A0 = 1 + 0.25*1.375 = 1.34375
    rewards = np.array([REWARDS, [1.0] * 4]).T
    values = np.array([VALUES, [0.0] * 4]).T
    next_values = np.array([NEXT_VALUES, [0.0, 0.0, 0.0, 2.0]]).T
    terminated = np.array([TERMINATED, [False] * 4]).T
    truncated = np.array([TRUNCATED, [False] * 4]).T
    adv, _ = compute_gae(rewards, values, next_values, terminated, truncated, 0.5, 0.5, True)
    np.testing.assert_array_equal(adv[:, 0], [2.5, 6.0, 1.5, 3.5])
    np.testing.assert_array_equal(adv[:, 1], [1.34375, 1.375, 1.5, 2.0])


def test_lambda_one_gives_monte_carlo_return():
    # With lambda = 1 and no episode end, A_t + V(s_t) is the discounted return plus the
    # discounted bootstrap: sum_{k=t}^{T-1} gamma^(k-t) r_k + gamma^(T-t) V(s_T).
    rng = np.random.default_rng(0)
    T, gamma = 50, 0.97
    rewards = rng.normal(size=(T, 1))
    values = rng.normal(size=(T + 1, 1))
    none = np.zeros((T, 1), bool)
    _, ret = compute_gae(rewards, values[:-1], values[1:], none, none, gamma, 1.0)
    expected = [
        sum(gamma ** (k - t) * rewards[k, 0] for k in range(t, T)) + gamma ** (T - t) * values[T, 0]
        for t in range(T)
    ]
    np.testing.assert_allclose(ret[:, 0], expected, rtol=1e-12, atol=1e-12)


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        compute_gae(
            np.zeros((3, 1)),
            np.zeros((4, 1)),
            np.zeros((3, 1)),
            np.zeros((3, 1), bool),
            np.zeros((3, 1), bool),
            0.9,
            0.9,
        )
