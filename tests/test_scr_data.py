"""Slowly-Changing Regression stream: inputs, flip schedule, target net, reproducibility."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from ppo_cbp.datasets.scr import SlowlyChangingRegression, SlowlyChangingRegressionBatch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def _segments(x: torch.Tensor, n_slow: int, change_every: int) -> np.ndarray:
    """Slow block of every segment after checking it is constant within the segment."""
    slow = x[:, :n_slow].cpu().numpy().reshape(-1, change_every, n_slow)
    assert (slow == slow[:, :1]).all(), "slow bits changed inside a segment"
    return slow[:, 0]


def _target_exact(x: np.ndarray, w: np.ndarray, v: np.ndarray, beta: float, b: float = 0.0):
    """Target from the definition, with exact rational thresholds (independent of the code)."""
    m1 = w.shape[1]
    n_neg = [sum(1 for value in row if value < 0) for row in w]
    theta = [Fraction(str(beta)) * m1 - s for s in n_neg]
    pre = x.astype(np.int64) @ w.astype(np.int64).T  # exact integers
    fire = np.array(
        [[int(pre[t, i]) > theta[i] for i in range(len(theta))] for t in range(pre.shape[0])],
        dtype=np.float64,
    )
    return fire @ v.astype(np.float64) + b, fire


# --------------------------------------------------------------------------------------------------
# Inputs


@pytest.mark.parametrize("device", DEVICES)
def test_paper_defaults_layout(device):
    scr = SlowlyChangingRegression(seed=0, device=device)
    x, y = scr.generate(0, 30_000)
    assert x.shape == (30_000, 21) and y.shape == (30_000, 1)
    assert x.dtype == torch.float32 and x.device.type == device and y.device.type == device
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert (x[:, 20] == 1).all()  # constant bias input last
    slow = _segments(x, 15, 10_000)
    assert slow.shape == (3, 15)
    assert ((slow[1:] != slow[:-1]).sum(axis=1) == 1).all()


def test_flip_one_schedule():
    # 3000 segments cross the generator's block boundaries (1024 segments) and random chunks.
    T, n_seg = 10, 3000
    scr = SlowlyChangingRegression(seed=1, change_every=T)
    x, _ = scr.generate(0, T * n_seg)
    slow = _segments(x, 15, T)
    diff = slow[1:] != slow[:-1]
    assert (diff.sum(axis=1) == 1).all()  # exactly one bit flipped at every change
    flipped = diff.argmax(axis=1)
    counts = np.bincount(flipped, minlength=15)
    assert (np.abs(counts - (n_seg - 1) / 15) < 75).all()  # uniform choice, sd ~ 13
    for k in range(4, 11):  # no repeating flip sequence at power-of-two periods
        period = 2**k
        assert (flipped[period:] == flipped[:-period]).mean() < 0.15, period  # ~ 1/15


def test_redraw_schedule():
    T, n_seg = 10, 3000
    scr = SlowlyChangingRegression(seed=1, change_every=T, flip_one=False)
    x, _ = scr.generate(0, T * n_seg)
    slow = _segments(x, 15, T)
    hamming = (slow[1:] != slow[:-1]).sum(axis=1)
    # All 15 bits redrawn: Hamming distance ~ Binomial(15, 1/2), mean 7.5, sd of mean 0.035.
    assert abs(hamming.mean() - 7.5) < 0.2
    assert abs(hamming.var() - 3.75) < 0.4
    assert abs(slow.mean() - 0.5) < 0.02
    for k in range(4, 11):  # no repetition at power-of-two periods
        period = 2**k
        assert abs((slow[period:] == slow[:-period]).mean() - 0.5) < 0.05, period


def test_initial_slow_bits_uniform():
    first = np.stack([SlowlyChangingRegression(seed=s).slow_bits(0).numpy() for s in range(200)])
    x, _ = SlowlyChangingRegression(seed=3).generate(0, 1)
    np.testing.assert_array_equal(x[0, :15].numpy(), first[3])
    assert abs(first.mean() - 0.5) < 0.05  # 3000 fair bits: sd 0.009
    assert len({tuple(row) for row in first}) > 190


def test_random_bits_iid():
    scr = SlowlyChangingRegression(seed=2)
    x, _ = scr.generate(0, 100_000)
    r = x[:, 15:20].double()
    assert (r.mean(dim=0) - 0.5).abs().max() < 0.01  # sd 0.0016
    # Independent across examples and across bits: correlations near 0 (sd ~ 0.003).
    lag = torch.corrcoef(torch.stack([r[:-1, 0], r[1:, 0]]))[0, 1]
    assert abs(lag.item()) < 0.02
    cross = torch.corrcoef(r.T)
    assert (cross - torch.eye(5, dtype=torch.float64)).abs().max() < 0.02
    # They vary within a segment (unlike the slow bits).
    assert r[:10_000].std(dim=0).min() > 0.45
    # No repetition at any power-of-two period (a generator reused across draws would repeat).
    r_long = SlowlyChangingRegression(seed=2).generate(0, 200_000)[0][:, 15:20]
    for k in range(6, 17):
        period = 2**k
        same = (r_long[period:] == r_long[:-period]).double().mean().item()
        assert abs(same - 0.5) < 0.01, period


def test_without_bias_column():
    with_bias = SlowlyChangingRegression(seed=4)
    without = SlowlyChangingRegression(seed=4, include_bias_input=False)
    x1, y1 = with_bias.generate(0, 5000)
    x2, y2 = without.generate(0, 5000)
    assert x2.shape == (5000, 20)
    assert torch.equal(x1[:, :20], x2) and torch.equal(y1, y2)


# --------------------------------------------------------------------------------------------------
# Target net


def test_target_weights_and_thresholds_by_hand():
    scr = SlowlyChangingRegression(seed=5)
    w, v = scr.input_weights.numpy(), scr.output_weights.numpy()
    assert w.shape == (100, 21) and v.shape == (100,)
    assert set(np.unique(w)) == {-1.0, 1.0} and set(np.unique(v)) == {-1.0, 1.0}
    assert abs(w.mean()) < 0.1  # 2100 fair signs: sd 0.022
    for i in range(100):
        s_i = sum(1 for j in range(21) if w[i, j] == -1)  # bias-input weight included
        assert scr.n_negative_weights[i].item() == s_i
        assert scr.thresholds[i].item() == pytest.approx(0.7 * 21 - s_i, abs=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_target_matches_definition(device):
    scr = SlowlyChangingRegression(seed=6, change_every=100, device=device)
    x, y = scr.generate(0, 3000)
    expected, fire = _target_exact(
        x.cpu().numpy(), scr.input_weights.numpy(), scr.output_weights.numpy(), 0.7
    )
    np.testing.assert_array_equal(y.cpu().double().numpy()[:, 0], expected)
    # Not vacuous: units fire on some inputs and the target takes many values.
    assert 0.01 < fire.mean() < 0.99
    assert len(np.unique(expected)) > 5
    assert torch.equal(scr.target(x), y)
    assert torch.equal(scr.target(x[:, :20]), y)


def test_threshold_is_strict_and_exact_at_integers():
    # beta (m + 1) = 0.58 * 50 = 29 exactly, but the float product is just below 29. The unit must
    # not fire when W x equals the (integral) threshold.
    beta, m = 0.58, 49
    assert beta * (m + 1) < 29
    scr = SlowlyChangingRegression(seed=7, n_inputs=m, n_slow=44, beta=beta, change_every=7)
    x, y = scr.generate(0, 3000)
    w, v = scr.input_weights.numpy(), scr.output_weights.numpy()
    expected, _ = _target_exact(x.numpy(), w, v, beta)
    np.testing.assert_array_equal(y.double().numpy()[:, 0], expected)
    naive = (x.double().numpy() @ w.T > beta * (m + 1) - (w < 0).sum(axis=1)) @ v
    assert not np.array_equal(naive, expected)  # inputs landing on the threshold occur


def test_beta_one_never_fires():
    # W_i . x <= (m + 1) - S_i = theta_i when beta = 1, so with a strict ">" no unit ever fires.
    scr = SlowlyChangingRegression(seed=8, beta=1.0, change_every=50)
    _, y = scr.generate(0, 2000)
    assert (y == 0).all()


def test_output_bias_option():
    plain = SlowlyChangingRegression(seed=9)
    biased = SlowlyChangingRegression(seed=9, output_bias=True)
    assert plain.output_bias_value == 0.0 and biased.output_bias_value in (-1.0, 1.0)
    _, y0 = plain.generate(0, 1000)
    _, y1 = biased.generate(0, 1000)
    assert torch.equal(y1 - y0, torch.full_like(y0, biased.output_bias_value))


# --------------------------------------------------------------------------------------------------
# Reproducibility


def test_chunking_invariance():
    whole_x, whole_y = SlowlyChangingRegression(seed=10).generate(0, 20_000)
    scr = SlowlyChangingRegression(seed=10)
    parts = [scr.generate(0, 7000), scr.generate(7000, 13_000)]
    assert torch.equal(whole_x, torch.cat([p[0] for p in parts]))
    assert torch.equal(whole_y, torch.cat([p[1] for p in parts]))


@pytest.mark.parametrize("flip_one", [True, False])
def test_random_access_across_chunk_and_block_boundaries(flip_one):
    # T = 60: 2 slow-bit blocks of 1024 segments; 123,000 examples: 2 random-bit chunks of 65,536.
    kwargs = dict(seed=11, change_every=60, flip_one=flip_one)
    x, y = SlowlyChangingRegression(**kwargs).generate(0, 123_000)
    for start, n in [(65_530, 13), (61_430, 20), (122_999, 1), (0, 1), (100_000, 23_000)]:
        fresh = SlowlyChangingRegression(**kwargs)  # as after a resume: nothing generated before
        xs, ys = fresh.generate(start, n)
        assert torch.equal(xs, x[start : start + n]) and torch.equal(ys, y[start : start + n])
    scr = SlowlyChangingRegression(**kwargs)  # many small calls, out of order
    for start in [5000, 3, 70_000, 4, 65_535, 65_536]:
        assert torch.equal(scr.generate(start, 1)[0], x[start : start + 1])


def test_determinism_per_seed():
    a = SlowlyChangingRegression(seed=12).generate(0, 5000)
    b = SlowlyChangingRegression(seed=12).generate(0, 5000)
    c = SlowlyChangingRegression(seed=13).generate(0, 5000)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    w12 = SlowlyChangingRegression(seed=12).input_weights
    assert not torch.equal(w12, SlowlyChangingRegression(seed=13).input_weights)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"flip_one": False, "include_bias_input": False, "output_bias": True, "change_every": 7}],
)
def test_batch_equals_per_seed(device, kwargs):
    seeds = [0, 3, 17]
    batch = SlowlyChangingRegressionBatch(seeds, device=device, **kwargs)
    assert len(batch) == 3
    for start, n in [(0, 4000), (9000, 2000)]:
        xb, yb = batch.generate(start, n)
        assert xb.shape[:2] == (3, n) and yb.shape == (3, n, 1) and xb.device.type == device
        for k, seed in enumerate(seeds):
            xs, ys = SlowlyChangingRegression(seed, device=device, **kwargs).generate(start, n)
            assert torch.equal(xb[k], xs) and torch.equal(yb[k], ys)


def test_dtype_float64_same_values():
    x32, y32 = SlowlyChangingRegression(seed=14).generate(100, 500)
    x64, y64 = SlowlyChangingRegression(seed=14, dtype=torch.float64).generate(100, 500)
    assert x64.dtype == torch.float64 and y64.dtype == torch.float64
    assert torch.equal(x64, x32.double()) and torch.equal(y64, y32.double())


def test_empty_range():
    x, y = SlowlyChangingRegression(seed=0).generate(10, 0)
    assert x.shape == (0, 21) and y.shape == (0, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_slow": 21}, "n_slow"),
        ({"beta": 0.0}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"beta": math.nan}, "beta"),
        ({"change_every": 0}, "change_every"),
        ({"n_hidden": 0}, "n_hidden"),
        ({"seed": -1}, "seed"),
        ({"dtype": torch.int64}, "dtype"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlowlyChangingRegression(**{"seed": 0, **kwargs})


def test_invalid_range():
    scr = SlowlyChangingRegression(seed=0)
    with pytest.raises(ValueError, match="start"):
        scr.generate(-1, 10)
    with pytest.raises(ValueError, match="n must"):
        scr.generate(0, -5)
