"""The statistics behind every study's findings: matched random baselines, empirical p-values,
bootstrap intervals, paired tests against the unmodified model, and dose-response trends.

    >>> from neuronatlas.stats.inference import empirical_p, bootstrap_ci, mcnemar_exact, dose_response
    >>> empirical_p(0.2, [0.5, 0.6, 0.4], alternative="less")        # rank of the selected set
    0.25
    >>> bootstrap_ci([1, 0, 1, 1], seed=0)                            # (mean, lo, hi) over facts
    (0.75, 0.25, 1.0)
    >>> mcnemar_exact(before=[1, 1, 0, 1], after=[0, 0, 0, 1])        # exact two-sided McNemar p
    0.5
    >>> dose_response([0.1, 0.5, 1.0], curve, random_curves)          # slope, Spearman, permutation p

Every test states its alternative; every interval says what it is over (facts, random sets). Nothing
here fits a normal approximation to a handful of values.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["Alternative", "empirical_p", "bootstrap_ci", "random_interval", "mcnemar_exact",
           "paired_permutation", "benjamini_hochberg", "DoseResponse", "dose_response", "step_increases",
           "magnitude_bins"]

Alternative = Literal["less", "greater", "two-sided"]


def empirical_p(observed: float, null: Sequence[float] | np.ndarray, alternative: Alternative = "less") -> float:
    """Empirical p-value of ``observed`` among ``null`` draws, counting the observation itself:
    ``(1 + #{null <= observed}) / (1 + n)`` for ``less`` (``>=`` for ``greater``; twice the smaller
    tail, capped at 1, for ``two-sided``). The smallest possible value is ``1 / (n + 1)``."""
    arr = np.asarray(null, dtype=float)
    arr = arr[np.isfinite(arr)]
    if not math.isfinite(observed) or arr.size == 0:
        return math.nan
    lo = (1 + int((arr <= observed).sum())) / (1 + arr.size)
    hi = (1 + int((arr >= observed).sum())) / (1 + arr.size)
    if alternative == "less":
        return lo
    if alternative == "greater":
        return hi
    return min(1.0, 2 * min(lo, hi))


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, level: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mean and a percentile bootstrap interval over the items (facts, prompts) of ``values``."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(arr.mean())
    if arr.size < 2:
        return (mean, mean, mean)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)
    tail = (1 - level) / 2
    return (mean, float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)))


def random_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and central ``level`` range of the random-set distribution itself (not a CI of its mean)."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return (math.nan, math.nan, math.nan)
    tail = (1 - level) / 2
    return (float(arr.mean()), float(np.quantile(arr, tail)), float(np.quantile(arr, 1 - tail)))


def mcnemar_exact(before: Sequence[int] | np.ndarray, after: Sequence[int] | np.ndarray,
                  alternative: Alternative = "two-sided") -> float:
    """Exact McNemar test on paired correctness (0/1 per fact): a binomial test of the discordant
    pairs. ``greater``: ``after`` is correct more often than ``before`` (facts gained > facts lost)."""
    from scipy import stats

    b = np.asarray(before, dtype=bool)
    a = np.asarray(after, dtype=bool)
    if b.shape != a.shape:
        raise ValueError(f"paired vectors differ in length ({b.size} vs {a.size})")
    gained = int((a & ~b).sum())
    lost = int((b & ~a).sum())
    if gained + lost == 0:
        return 1.0
    return float(stats.binomtest(gained, gained + lost, 0.5, alternative=alternative).pvalue)


def paired_permutation(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *,
                       alternative: Alternative = "greater", n_perm: int = 10000, seed: int = 0) -> float:
    """Sign-flip permutation test of the mean paired difference ``x - y`` (``greater``: x > y).
    Exact (all 2^n sign patterns) up to 16 non-zero pairs, Monte Carlo with ``n_perm`` draws above;
    the observed pattern is counted, so p >= 1/(n_perm + 1)."""
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    d = d[np.isfinite(d) & (d != 0)]
    if d.size == 0:
        return 1.0
    obs = d.mean()
    if d.size <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        null = (signs * d).mean(axis=1)
        tol = 1e-12 * max(1.0, abs(obs))
        if alternative == "greater":
            return float((null >= obs - tol).mean())
        if alternative == "less":
            return float((null <= obs + tol).mean())
        return float((np.abs(null) >= abs(obs) - tol).mean())
    rng = np.random.default_rng(seed)
    null = (rng.choice((1.0, -1.0), size=(n_perm, d.size)) * d).mean(axis=1)
    return empirical_p(float(obs), null, alternative)


def benjamini_hochberg(p: Sequence[float] | np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Boolean mask of hypotheses rejected at false discovery rate ``alpha`` (Benjamini-Hochberg);
    NaN p-values are never rejected and do not count as hypotheses."""
    arr = np.asarray(p, dtype=float)
    flat = arr.reshape(-1)
    ok = np.isfinite(flat)
    mask = np.zeros(flat.size, dtype=bool)
    vals = flat[ok]
    m = vals.size
    if m:
        order = np.argsort(vals, kind="stable")
        passed = vals[order] <= alpha * np.arange(1, m + 1) / m
        if passed.any():
            last = int(np.nonzero(passed)[0].max())
            keep = np.zeros(m, dtype=bool)
            keep[order[: last + 1]] = True
            mask[np.nonzero(ok)[0][keep]] = True
    return mask.reshape(arr.shape)


def step_increases(per_item: np.ndarray, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> list[bool]:
    """For a dose-response measured on the same items at every grid point (``per_item``: grid x
    items, e.g. 0/1 correctness), whether each step k -> k+1 *rises* beyond noise: the lower end of
    the bootstrap interval (over items) of the mean difference is above 0."""
    arr = np.asarray(per_item, dtype=float)
    out: list[bool] = []
    for k in range(arr.shape[0] - 1):
        diff = arr[k + 1] - arr[k]
        _, lo, _ = bootstrap_ci(diff, level=level, n_boot=n_boot, seed=seed + k)
        out.append(bool(np.isfinite(lo) and lo > 0))
    return out


@dataclass(frozen=True)
class DoseResponse:
    """A dose-response test of one curve (e.g. accuracy vs share of neurons deactivated)."""

    slope: float                 # least-squares slope of the curve against the grid
    spearman: float              # Spearman rho of the curve against the grid
    p_trend: float               # permutation p of the slope (grid order shuffled), one-sided 'decreasing'
    random_slopes: tuple[float, ...]
    p_vs_random: float           # empirical rank of the slope among the random curves' slopes (steeper = smaller)
    monotone: bool               # no step rises beyond noise (see step_increases); needs per-item data
    rising_steps: tuple[int, ...]


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(y)
    if ok.sum() < 2:
        return math.nan
    xc = x[ok] - x[ok].mean()
    denom = float((xc ** 2).sum())
    return float((xc * (y[ok] - y[ok].mean())).sum() / denom) if denom > 0 else math.nan


def dose_response(grid: Sequence[float], curve: Sequence[float], random_curves: Sequence[Sequence[float]] = (), *,
                  per_item: np.ndarray | None = None, n_perm: int = 10000, seed: int = 0) -> DoseResponse:
    """Trend over the whole grid (not the endpoints): slope and Spearman of ``curve`` against
    ``grid``; p of a decreasing trend by permuting the grid order (exact up to 8 points); the
    slope's rank among ``random_curves`` (the random sets' curves on the same grid); and
    monotonicity within noise from ``per_item`` (grid x items) when given."""
    from scipy import stats

    x = np.asarray(grid, dtype=float)
    y = np.asarray(curve, dtype=float)
    slope = _slope(x, y)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = float(stats.spearmanr(x, y).statistic) if np.isfinite(y).sum() > 2 and np.nanstd(y) > 0 else math.nan
    if x.size <= 8:
        perms = np.array(list(itertools.permutations(range(x.size))))
    else:
        rng = np.random.default_rng(seed)
        perms = np.array([rng.permutation(x.size) for _ in range(n_perm)])
    null = np.array([_slope(x[p], y) for p in perms])
    p_trend = float((null <= slope + 1e-12).mean()) if math.isfinite(slope) else math.nan
    r_slopes = tuple(_slope(x, np.asarray(c, dtype=float)) for c in random_curves)
    p_rand = empirical_p(slope, r_slopes, "less") if r_slopes else math.nan
    rising: tuple[int, ...] = ()
    if per_item is not None:
        rising = tuple(k for k, up in enumerate(step_increases(per_item, seed=seed)) if up)
    return DoseResponse(slope, rho, p_trend, r_slopes, p_rand, per_item is not None and not rising, rising)


def magnitude_bins(magnitude: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Decile (``n_bins``-quantile) index of every neuron's activation magnitude within its layer:
    (layers, neurons) int array; equal magnitudes are ordered by neuron index."""
    mag = np.asarray(magnitude, dtype=float)
    bins = np.zeros(mag.shape, dtype=np.int64)
    for layer in range(mag.shape[0]):
        ranks = np.argsort(np.argsort(mag[layer], kind="stable"), kind="stable")
        bins[layer] = np.minimum(n_bins - 1, (ranks * n_bins) // mag.shape[1])
    return bins
