"""Statistics over seeds for figures and tables: bootstrap confidence intervals and the IQM.

* Mean CI (:func:`bootstrap_mean_ci`): the 95% bootstrap confidence interval of the mean over
  seeds, ``scipy.stats.bootstrap`` with its defaults, BCa (bias-corrected and accelerated) and
  9,999 resamples, as the paper's reinforcement-learning figures (the released code calls
  ``scipy.stats.bootstrap(data=(returns,), statistic=np.mean, confidence_level=0.95)`` per bin).
* IQM (:func:`iqm`): the interquartile mean, the mean of the middle 50% of the scores,
  ``scipy.stats.trim_mean(x, 0.25)`` (``floor(0.25 n)`` scores cut from each end), the
  aggregate of Agarwal et al. (2021, rliable).
* Stratified CI (:func:`stratified_ci`): rliable's stratified bootstrap: the scores of each
  stratum (task, environment) are resampled with replacement within that stratum, so every
  resample keeps each stratum's number of runs; 95% percentile interval of the statistic over
  the resamples.

Every interval is computed with a fresh ``np.random.default_rng(seed)``: the same seed gives
the same interval, and one group's interval does not change when another group is added.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 9_999
"""scipy's default number of resamples, which the paper's plotting code used."""


def iqm(x: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Interquartile mean: ``scipy.stats.trim_mean(x, 0.25, axis)``, the mean of the scores
    left after cutting ``floor(0.25 n)`` of the lowest and as many of the highest."""
    return stats.trim_mean(x, 0.25, axis=axis)


def bootstrap_mean_ci(
    values: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``values`` ([seeds, points]) the 95% BCa bootstrap CI of the mean of its
    finite entries: ``scipy.stats.bootstrap((y,), np.mean, n_resamples=resamples,
    rng=np.random.default_rng(seed))``. NaN where a column has fewer than two finite values;
    ``[y, y]`` where all of them are equal (every resample's mean is ``y``; BCa is undefined
    there). Columns with the same finite seeds are bootstrapped together (one call, the same
    resampled seeds for each column). Returns ``(low, high)``."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"expected a [seeds, points] array, got shape {v.shape}")
    low, high = np.full(v.shape[1], np.nan), np.full(v.shape[1], np.nan)
    ok = np.isfinite(v)
    for pattern in np.unique(ok.T, axis=0):
        cols = np.flatnonzero((ok.T == pattern).all(1))
        y = v[pattern][:, cols]
        if len(y) < 2:
            continue
        flat = (y == y[0]).all(0)
        low[cols[flat]] = high[cols[flat]] = y[0, flat]
        if flat.all():
            continue
        spread = cols[~flat]
        with warnings.catch_warnings():
            # BCa on a handful of seeds warns about a skewed bootstrap distribution
            warnings.simplefilter("ignore")
            ci = stats.bootstrap(
                (y[:, ~flat],),
                np.mean,
                axis=0,
                confidence_level=CONFIDENCE,
                n_resamples=resamples,
                batch=max(1, 20_000_000 // y.size),  # bounds memory for long curves
                rng=np.random.default_rng(seed),
            ).confidence_interval
        low[spread], high[spread] = ci.low, ci.high
    return low, high


def stratified_ci(
    strata: Sequence[np.ndarray],
    statistic: Callable[..., np.ndarray | float],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """95% percentile CI of ``statistic`` of the pooled scores under the stratified bootstrap:
    each resample draws ``len(s)`` scores with replacement from each stratum ``s`` and pools
    them; ``statistic(pooled, axis=-1)`` is evaluated on each. ``scipy.stats.bootstrap`` with
    the strata as its independent samples (``method="percentile"``,
    ``rng=np.random.default_rng(seed)``); a stratum of one score, which every resample keeps
    as it is, is pooled as a constant (scipy resamples only samples of two or more). NaN when
    every stratum has a single score."""
    samples = [np.asarray(s, dtype=np.float64) for s in strata]
    if not samples or any(len(s) == 0 for s in samples):
        raise ValueError("every stratum needs at least one score")
    fixed = np.concatenate([s for s in samples if len(s) == 1] or [np.empty(0)])
    varied = tuple(s for s in samples if len(s) > 1)
    if not varied:
        return float("nan"), float("nan")

    def pooled(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        const = np.broadcast_to(fixed, resampled[0].shape[:-1] + fixed.shape)
        return statistic(np.concatenate((*resampled, const), axis=-1), axis=-1)

    ci = stats.bootstrap(
        varied,
        pooled,
        confidence_level=CONFIDENCE,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return float(ci.low), float(ci.high)
