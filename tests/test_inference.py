"""The study statistics against independent computations (scipy, hand examples)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuronatlas.stats.inference import (
    benjamini_hochberg, bootstrap_ci, dose_response, empirical_p, magnitude_bins, mcnemar_exact,
    paired_permutation, random_interval, step_increases,
)


def test_empirical_p_counts_the_observation():
    assert empirical_p(0.2, [0.5, 0.6, 0.4], "less") == pytest.approx(1 / 4)
    assert empirical_p(0.5, [0.5, 0.6, 0.4], "less") == pytest.approx(3 / 4)   # ties count against
    assert empirical_p(0.7, [0.5, 0.6, 0.4], "greater") == pytest.approx(1 / 4)
    assert empirical_p(0.2, [0.5, 0.6, 0.4], "two-sided") == pytest.approx(0.5)
    assert math.isnan(empirical_p(0.2, []))
    # the smallest reachable p with 20 random sets
    assert empirical_p(-1.0, np.arange(20.0)) == pytest.approx(1 / 21)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=30), st.floats(-5, 5))
def test_empirical_p_is_a_rank(null, obs):
    p = empirical_p(obs, null, "less")
    assert 1 / (len(null) + 1) <= p <= 1
    assert p == pytest.approx((1 + sum(v <= obs for v in null)) / (1 + len(null)))


def test_bootstrap_and_random_interval():
    vals = np.r_[np.ones(30), np.zeros(70)]
    m, lo, hi = bootstrap_ci(vals, seed=1)
    assert m == pytest.approx(0.3) and 0.2 < lo < 0.3 < hi < 0.4
    # the normal-theory interval of a proportion is close to the bootstrap one for n = 100
    half = 1.96 * math.sqrt(0.3 * 0.7 / 100)
    assert lo == pytest.approx(0.3 - half, abs=0.03) and hi == pytest.approx(0.3 + half, abs=0.03)
    assert bootstrap_ci([0.5]) == (0.5, 0.5, 0.5)
    r = random_interval(np.arange(101.0))
    assert r == pytest.approx((50.0, 2.5, 97.5))


def test_mcnemar_exact_against_binomial_by_hand():
    before = np.array([1] * 10 + [0] * 10)
    after = np.array([0] * 8 + [1] * 2 + [1] * 1 + [0] * 9)     # 8 lost, 1 gained
    # exact two-sided: 2 * P(X <= 1), X ~ Bin(9, 1/2)
    want = 2 * (math.comb(9, 0) + math.comb(9, 1)) / 2 ** 9
    assert mcnemar_exact(before, after) == pytest.approx(want)
    assert mcnemar_exact(before, after, "greater") == pytest.approx(sum(math.comb(9, k) for k in range(1, 10)) / 2 ** 9)
    assert mcnemar_exact(before, before) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([1, 0], [1])


def test_paired_permutation_matches_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    x = rng.normal(0.4, 1, 12)
    y = rng.normal(0.0, 1, 12)
    ours = paired_permutation(x, y, alternative="greater")
    ref = stats.permutation_test((x, y), lambda a, b: np.mean(a - b), permutation_type="samples",
                                 alternative="greater", n_resamples=np.inf).pvalue
    assert ours == pytest.approx(ref)
    # Monte Carlo branch (> 16 pairs) agrees within sampling error
    x2, y2 = rng.normal(0.3, 1, 40), rng.normal(0, 1, 40)
    ref2 = stats.permutation_test((x2, y2), lambda a, b: np.mean(a - b), permutation_type="samples",
                                  alternative="greater", n_resamples=20000, random_state=1).pvalue
    assert paired_permutation(x2, y2, n_perm=20000) == pytest.approx(ref2, abs=0.02)
    assert paired_permutation([1, 2], [1, 2]) == 1.0


def test_benjamini_hochberg_hand_example_and_nan():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    # m = 4 finite: thresholds 0.0125, 0.025, 0.0375, 0.05 -> sorted 0.01 ok, 0.03 > 0.025, 0.04 > 0.0375
    assert benjamini_hochberg(p).tolist() == [True, False, False, False, False]
    assert benjamini_hochberg([0.01, 0.02, 0.03, 0.04]).all()


def test_dose_response_trend_and_monotonicity():
    grid = [0.1, 0.2, 0.5, 1.0]
    falling = [0.9, 0.8, 0.5, 0.2]
    flat_curves = [[0.9, 0.88, 0.91, 0.9], [0.9, 0.9, 0.89, 0.87], [0.92, 0.9, 0.9, 0.9]]
    dr = dose_response(grid, falling, flat_curves)
    xs = np.array(grid)
    want = np.polyfit(xs, falling, 1)[0]
    assert dr.slope == pytest.approx(want)
    assert dr.spearman == pytest.approx(-1.0)
    # exact permutation p: only the identity order gives the steepest slope among 4! orders
    assert dr.p_trend == pytest.approx(1 / math.factorial(4))
    assert dr.p_vs_random == pytest.approx(1 / 4)
    assert not dr.monotone and dr.rising_steps == ()         # no per-item data: monotone is not claimed
    # per-item data: a step that rises on most items breaks monotonicity
    items = np.array([[1] * 20, [0] * 20, [1] * 20, [0] * 20])
    dr2 = dose_response(grid, items.mean(1), per_item=items)
    assert dr2.rising_steps == (1,) and not dr2.monotone
    down = np.array([[1] * 20, [1] * 15 + [0] * 5, [1] * 10 + [0] * 10, [0] * 20])
    assert dose_response(grid, down.mean(1), per_item=down).monotone
    assert step_increases(down) == [False, False, False]


def test_magnitude_bins_are_per_layer_deciles():
    mag = np.stack([np.arange(100.0), np.arange(100.0)[::-1]])
    bins = magnitude_bins(mag, 10)
    assert bins[0, :10].tolist() == [0] * 10 and bins[0, 90:].tolist() == [9] * 10
    assert bins[1, 0] == 9 and bins[1, 99] == 0
    assert np.bincount(bins[0]).tolist() == [10] * 10


def test_permutations_enumerated_exactly():
    # the exact sign-flip branch enumerates 2^n patterns
    d = np.array([1.0, 2.0, 3.0])
    pats = np.array(list(itertools.product((1, -1), repeat=3)))
    want = float(((pats * d).mean(1) >= d.mean() - 1e-12).mean())
    assert paired_permutation(d, np.zeros(3)) == pytest.approx(want)
