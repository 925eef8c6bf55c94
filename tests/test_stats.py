"""ppo_cbp.reporting.stats against values computed here: the IQM by hand, the CIs against
scipy.stats.bootstrap called directly and a percentile bootstrap written out with numpy."""

import numpy as np
import pytest
from scipy import stats as sps

from ppo_cbp.reporting.stats import bootstrap_mean_ci, iqm, stratified_ci


def test_iqm_by_hand():
    x = np.array([10.0, 1.0, 7.0, 3.0, 100.0, 5.0, 2.0, 8.0])
    # sorted 1 2 3 5 7 8 10 100; floor(8 / 4) = 2 cut from each end: mean(3, 5, 7, 8)
    assert iqm(x) == pytest.approx(5.75)
    # n = 10: floor(2.5) = 2 cut from each end
    y = np.arange(10.0) ** 2  # 0 1 4 9 16 25 36 49 64 81
    assert iqm(y) == pytest.approx(np.mean([4, 9, 16, 25, 36, 49]))
    # n = 3: nothing cut, the plain mean
    assert iqm(np.array([1.0, 2.0, 9.0])) == pytest.approx(4.0)


def test_mean_ci_is_scipys_bca_per_column_on_its_finite_seeds():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(6, 4))
    v[2, 1] = np.nan  # column 1: five seeds
    v[:5, 3] = np.nan  # column 3: one seed, no interval
    low, high = bootstrap_mean_ci(v, resamples=999, seed=7)
    for j in (0, 2):
        ref = sps.bootstrap(
            (v[:, j],), np.mean, n_resamples=999, rng=np.random.default_rng(7)
        ).confidence_interval
        assert (low[j], high[j]) == pytest.approx((ref.low, ref.high), rel=1e-12)
    col = v[np.isfinite(v[:, 1]), 1]
    ref = sps.bootstrap(
        (col,), np.mean, n_resamples=999, rng=np.random.default_rng(7)
    ).confidence_interval
    assert (low[1], high[1]) == pytest.approx((ref.low, ref.high), rel=1e-12)
    assert np.isnan(low[3]) and np.isnan(high[3])
    assert (low[:3] < np.nanmean(v[:, :3], 0)).all() and (np.nanmean(v[:, :3], 0) < high[:3]).all()


def test_mean_ci_is_close_to_a_percentile_bootstrap_by_hand():
    # the BCa interval of a mean of 20 roughly symmetric scores is near the plain percentile
    # interval of 20,000 resampled means drawn here
    rng = np.random.default_rng(0)
    y = rng.normal(5.0, 2.0, size=20)
    means = y[rng.integers(0, 20, size=(20_000, 20))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    low, high = bootstrap_mean_ci(y[:, None])
    se = y.std(ddof=1) / np.sqrt(20)
    # within 0.15 SE (a 90% interval would be 0.3 SE off at each end, one SE 0.96)
    assert abs(low[0] - lo) < 0.15 * se and abs(high[0] - hi) < 0.15 * se


def test_mean_ci_of_equal_scores_is_that_score_and_seeded():
    v = np.array([[2.0, 1.0], [2.0, 4.0], [2.0, 3.0]])
    low, high = bootstrap_mean_ci(v, resamples=500, seed=1)
    assert low[0] == high[0] == 2.0
    again = bootstrap_mean_ci(v, resamples=500, seed=1)
    other = bootstrap_mean_ci(v, resamples=500, seed=2)
    assert (low[1], high[1]) == (again[0][1], again[1][1])
    assert (low[1], high[1]) != (other[0][1], other[1][1])


def test_stratified_bootstrap_keeps_each_strata_count():
    sizes = []

    def recording_iqm(x, axis=-1):
        sizes.append(x.shape[-1])
        return iqm(x, axis=axis)

    a, b, c = np.array([0.0, 1, 2]), np.array([5.0, 6, 7, 8, 9]), np.array([3.0])
    stratified_ci([a, b, c], recording_iqm, resamples=50)
    assert set(sizes) == {9}  # every resample pools 3 + 5 + 1 scores
    # task A all 0, task B all 1, four runs each: every stratified resample holds four of each,
    # so its IQM (the middle four of eight: two 0s and two 1s) is 0.5 exactly ...
    zeros, ones = np.zeros(4), np.ones(4)
    assert stratified_ci([zeros, ones], iqm) == (0.5, 0.5)
    assert stratified_ci([zeros, ones], np.mean) == (0.5, 0.5)
    # ... while resampling the eight pooled scores ignores the tasks and spreads
    lo, hi = stratified_ci([np.concatenate([zeros, ones])], iqm)
    assert lo < 0.5 < hi


def test_stratified_ci_is_scipys_multi_sample_percentile():
    rng = np.random.default_rng(5)
    strata = [rng.normal(size=4), rng.normal(3.0, size=6)]

    def pooled_iqm(a, b, axis=-1):
        return sps.trim_mean(np.concatenate([a, b], axis=-1), 0.25, axis=-1)

    ref = sps.bootstrap(
        strata, pooled_iqm, n_resamples=2000, method="percentile", rng=np.random.default_rng(9)
    ).confidence_interval
    got = stratified_ci(strata, iqm, resamples=2000, seed=9)
    assert got == pytest.approx((ref.low, ref.high), rel=1e-12)
    # a single score per stratum: nothing to resample
    lo, hi = stratified_ci([np.array([1.0]), np.array([2.0])], iqm)
    assert np.isnan(lo) and np.isnan(hi)
