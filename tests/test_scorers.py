"""Scorers against direct reference computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from sklearn.metrics import average_precision_score

from neuronatlas.errors import DatasetError
from neuronatlas.stats.scorers import APScorer, SMDScorer, average_precision, benjamini_hochberg, top_n


def test_ap_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 7)).astype(np.float32)
    x[:, 3] = np.round(x[:, 3])          # many ties
    x[:, 4] = 1.0                         # all tied
    y = rng.random(60) < 0.3
    ours = average_precision(torch.from_numpy(x), torch.from_numpy(y), chunk=3)
    sc = APScorer(chunk=3).fit(x, y.astype(int))
    for j in range(7):
        assert ours[j].item() == pytest.approx(average_precision_score(y, x[:, j]), abs=1e-12)
        assert sc.neg_scores_[1, j].item() == pytest.approx(average_precision_score(y, -x[:, j]), abs=1e-12)
        assert sc.neg_scores_[0, j].item() == pytest.approx(average_precision_score(~y, -x[:, j]), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=2, max_size=30))
def test_ap_property_matches_sklearn(rows):
    vals = np.array([[float(v)] for v, _ in rows], dtype=np.float32)
    y = np.array([b for _, b in rows])
    if not y.any():
        return
    ours = average_precision(torch.from_numpy(vals), torch.from_numpy(y))[0].item()
    assert ours == pytest.approx(average_precision_score(y, vals[:, 0]), abs=1e-12)


def test_ap_scorer_selects_informative_neuron_and_both_tails():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 20)
    x = rng.normal(size=(60, 10))
    x[labels == 1, 6] += 5      # neuron 6 fires for concept 1
    x[labels == 1, 2] -= 5      # neuron 2 switches off for concept 1
    sc = APScorer().fit(x, labels)
    assert sc.scores_.shape == (3, 10)
    assert int(sc.top_indices(1, 1)[0]) == 6
    assert sc.select(1, 1).pairs == ((0, 6),)                 # 2-D responses: one layer
    both = sc.top_indices(1, 2, tails="both").tolist()
    assert both[0] == 6 and 2 in both
    assert sc.scores_[1, 6] == pytest.approx(average_precision_score(labels == 1, x[:, 6]))


def test_smd_matches_scipy_and_fdr():
    from scipy import stats

    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 30)
    x = rng.normal(size=(60, 50))
    x[labels == 0, 0] += 2.0
    sc = SMDScorer(alpha=0.05).fit(x, labels)
    a, b = x[labels == 0, 0], x[labels == 1, 0]
    sd = np.sqrt((29 * a.var(ddof=1) + 29 * b.var(ddof=1)) / 58)
    assert sc.d_[0, 0] == pytest.approx((a.mean() - b.mean()) / sd)
    assert sc.p_[0, 0] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert sc.significant_[0, 0] and sc.significant_[0].sum() <= 3
    assert sc.top_indices(0, 5).tolist()[0] == 0
    assert len(sc.top_indices(0, 50)) == sc.significant_[0].sum()   # only FDR-significant neurons


def test_benjamini_hochberg_hand_example():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # sorted: .005 (.01), .01 (.02), .03 (.03), .04 (.04), .5 (.05) -> first four rejected
    assert benjamini_hochberg(p, 0.05).tolist() == [True, True, True, True, False]
    assert benjamini_hochberg(np.array([0.2, 0.3]), 0.05).tolist() == [False, False]


def test_top_n_deterministic_ties():
    assert top_n(torch.tensor([1.0, 3.0, 3.0, 2.0]), 3).tolist() == [1, 2, 3]


def test_scorer_errors():
    with pytest.raises(DatasetError, match="no positive"):
        average_precision(torch.zeros(3, 2), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(DatasetError, match="one label per prompt"):
        APScorer().fit(np.zeros((3, 2)), [0, 1])


def test_smd_averages_pseudo_replicates_per_group_before_testing():
    from scipy import stats

    from neuronatlas.stats.scorers import SMDScorer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 1, 5))
    x[:6] += 1.0
    labels = np.array([0] * 6 + [1] * 6)
    groups = [f"f{i // 2}" for i in range(12)]          # each fact filled into two templates
    smd = SMDScorer().fit(x, labels, groups=groups)
    means = x.reshape(6, 2, 5).mean(axis=1)
    want = stats.ttest_ind(means[:3], means[3:], axis=0, equal_var=False).pvalue
    np.testing.assert_allclose(smd.p_[0], want)
    assert smd.n_items_ == 6
    with pytest.raises(Exception, match="two concepts"):
        SMDScorer().fit(x, labels, groups=["g"] * 12)
