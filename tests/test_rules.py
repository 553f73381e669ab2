"""Findings rules on fixed inputs: each rule's verdict and the numbers its sentence quotes."""

from __future__ import annotations

import math

import pytest

from neuronatlas.studies import rules
from neuronatlas.studies.framework import Comparison


def _cmp(selected: float, p_random: float, p_unmod: float, n_random: int = 20) -> Comparison:
    return Comparison("exact", 10, selected, 0.9, 0.85, 0.7, 0.95, n_random, p_random, p_unmod, "less")


def test_selected_vs_random_needs_both_tests_and_a_majority() -> None:
    comps = {"a": _cmp(0.1, 1 / 21, 0.001), "b": _cmp(0.2, 1 / 21, 0.004), "c": _cmp(0.8, 0.5, 0.3)}
    f = rules.selected_vs_random("k", "K", comps, alpha=0.05, what="X", metric_name="recall")
    assert f.holds is True and f.numbers["passed"] == ["a", "b"] and f.numbers["n"] == 3
    assert "2 of 3" in f.text and "for 2." in f.text
    # beating the random sets is not enough: the paired test must survive BH too
    weak = {"a": _cmp(0.1, 1 / 21, 0.2), "b": _cmp(0.2, 1 / 21, 0.3), "c": _cmp(0.8, 0.5, 0.3)}
    g = rules.selected_vs_random("k", "K", weak, alpha=0.05, what="X", metric_name="recall")
    assert g.holds is False and g.numbers["beat_random"] == ["a", "b"] and g.numbers["passed"] == []
    # with 3 random sets no concept can pass, and the sentence says so
    few = rules.selected_vs_random("k", "K", {"a": _cmp(0.1, 0.25, 0.001, n_random=3)}, alpha=0.05, what="X",
                                   metric_name="recall")
    assert few.holds is False and "smallest possible p is 0.25" in few.text
    assert rules.selected_vs_random("k", "K", {}, alpha=0.05, what="X", metric_name="r").holds is None


def test_dose_response_monotone_only_when_falling_and_no_rise() -> None:
    trends = {"a": {"slope": -0.5, "p_trend": 0.01, "p_slope_vs_random": 0.04, "monotone": True},
              "b": {"slope": -0.4, "p_trend": 0.02, "p_slope_vs_random": 0.3, "monotone": False},
              "c": {"slope": 0.1, "p_trend": 0.9, "p_slope_vs_random": 0.9, "monotone": True},
              "d": {"slope": math.nan, "p_trend": math.nan, "p_slope_vs_random": None, "monotone": False}}
    f = rules.dose_response_finding("cum", "C", trends, alpha=0.05, on="recall")
    assert f.numbers["falling"] == ["a", "b"] and f.numbers["monotone"] == ["a"]
    assert f.numbers["steeper_than_random"] == ["a"] and f.holds is False      # 2 of 4 is not a majority
    assert "falls with the dose for 2 of 4" in f.text and "1 of the falling curves" in f.text
    # a trend measured without random curves does not claim a comparison with them
    bare = {c: {**t, "p_slope_vs_random": math.nan} for c, t in trends.items()}
    g = rules.dose_response_finding("cum", "C", bare, alpha=0.05, on="recall")
    assert "no random curves were measured" in g.text and "steeper" not in g.text and g.numbers["falling"] == ["a", "b"]


def test_interference_only_for_rises_that_survive_bh() -> None:
    pairs = [{"deactivated": "a", "evaluated": "b", "delta_acc": 0.2, "p_mcnemar": 0.001, "interference": True,
              "p_vs_random": 0.04},
             {"deactivated": "b", "evaluated": "a", "delta_acc": 0.1, "p_mcnemar": 0.2, "interference": False},
             {"deactivated": "a", "evaluated": "c", "delta_acc": -0.3, "p_mcnemar": 1.0, "interference": False}]
    f = rules.interference("i", "I", pairs, alpha=0.05)
    assert f.holds is True and f.numbers == {"tested": 3, "gaining": 2, "interference": 1, "beyond_random": 1,
                                             "pairs": ["a->b"]}
    none = rules.interference("i", "I", pairs[1:], alpha=0.05)
    assert none.holds is False and "no pair is called interference" in none.text


def test_layer_concentration_binomial() -> None:
    from scipy import stats

    f = rules.layer_concentration({"r": [0, 0, 9, 9, 0, 0], "s": [1, 0, 1, 0, 0, 0]}, alpha=0.05)
    assert f.numbers["share"] == pytest.approx(19 / 20) and f.numbers["expected"] == pytest.approx(2 / 6)
    assert f.numbers["p"] == pytest.approx(stats.binomtest(19, 20, 1 / 3, alternative="greater").pvalue)
    assert f.holds is True and "layers 2-3" in f.text
    flat = rules.layer_concentration({"r": [3, 3, 3, 3, 3, 3]}, alpha=0.05)
    assert flat.holds is False and "not shown to be concentrated" in flat.text
    late = rules.layer_concentration({"r": [0, 0, 0, 0, 5, 5]}, alpha=0.05, region="late")
    assert late.holds is True and late.key == "layers_late"
    assert rules.layer_concentration({"r": [2, 2]}, alpha=0.05).holds is None          # too few layers
    # thousands of neurons make a one-point excess 'significant'; the effect-size threshold says no
    big = rules.layer_concentration({"r": [4200, 4600, 4200]}, alpha=0.05)
    assert big.numbers["p"] < 0.05 and big.holds is False and "ratio 1.06" in big.text


def test_ability_holds_only_without_harm_beyond_chance() -> None:
    ok = {"facts": _cmp(0.88, 0.3, 0.4), "text": _cmp(0.9, 0.5, 0.9)}
    f = rules.ability_holds("ab", "A", ok, alpha=0.05, what="With X suppressed")
    assert f.holds is True and f.numbers["harmed"] == [] and "0 of 2 checks" in f.text
    # significant against the unmodified model but inside the random sets: ordinary, not harm
    inside = {"facts": _cmp(0.5, 0.4, 0.001), "text": _cmp(0.9, 0.5, 0.9)}
    assert rules.ability_holds("ab", "A", inside, alpha=0.05, what="X").holds is True
    # significant and beyond the random sets: harmed
    harmed = {"facts": _cmp(0.5, 1 / 21, 0.001), "text": _cmp(0.9, 0.5, 0.9)}
    g = rules.ability_holds("ab", "A", harmed, alpha=0.05, what="X")
    assert g.holds is False and g.numbers["harmed"] == ["facts"] and "(facts)" in g.text
    # without random sets the paired test alone decides; BH over the checks
    bare = {"a": _cmp(0.5, math.nan, 0.01, n_random=0), "b": _cmp(0.5, math.nan, 0.04, n_random=0),
            "c": _cmp(0.5, math.nan, 0.9, n_random=0)}
    h = rules.ability_holds("ab", "A", bare, alpha=0.05, what="X")
    assert h.numbers["harmed"] == ["a"] and h.holds is False
    assert rules.ability_holds("ab", "A", {}, alpha=0.05, what="X").holds is None
