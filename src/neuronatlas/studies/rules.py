"""Findings rules: every sentence a study writes comes from one of these functions, which apply a
stated test with stated thresholds to the numbers and say whether the claim holds.

    >>> from neuronatlas.studies.rules import layer_concentration
    >>> f = layer_concentration({"r": [0, 0, 9, 9, 0, 0]}, alpha=0.05)
    >>> f.holds, f.numbers["share"]
    (True, 1.0)

Each rule is tested on fixed inputs in ``tests/test_rules.py``; docs/results.md quotes only what
these rules produce.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from neuronatlas.report.model import Finding
from neuronatlas.stats.inference import benjamini_hochberg
from neuronatlas.studies.framework import Comparison

__all__ = ["selected_vs_random", "dose_response_finding", "interference", "layer_concentration", "ability_holds", "pct",
           "num"]


def pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


def num(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _majority(k: int, n: int) -> bool | None:
    return None if n == 0 else k > n / 2


def selected_vs_random(key: str, title: str, comps: Mapping[str, Comparison], *, alpha: float, what: str,
                       metric_name: str, unit: str = "concept", direction: str = "lower",
                       as_percent: bool = True) -> Finding:
    """Per concept, the selected arm passes when (a) its empirical p among the matched random arms
    is <= ``alpha`` and (b) the paired test against the unmodified model, Benjamini-Hochberg
    corrected over the concepts, has q < ``alpha``. The claim holds when more than half pass.
    With R random sets the smallest empirical p is 1/(R+1): (a) is only reachable when R >= 19."""
    names = [c for c, v in comps.items() if math.isfinite(v.selected)]
    p_unmod = np.array([comps[c].p_vs_unmodified for c in names], dtype=float)
    ok_unmod = benjamini_hochberg(p_unmod, alpha) if names else np.zeros(0, dtype=bool)
    passed = [c for i, c in enumerate(names) if comps[c].p_vs_random <= alpha and ok_unmod[i]]
    beat_random = [c for c in names if comps[c].p_vs_random <= alpha]
    n_random = max((comps[c].n_random for c in names), default=0)
    sel = float(np.mean([comps[c].selected for c in names])) if names else math.nan
    base = float(np.mean([comps[c].baseline for c in names])) if names else math.nan
    rnd = float(np.nanmean([comps[c].random_mean for c in names])) if names else math.nan
    floor = 1 / (n_random + 1) if n_random else math.nan
    show = pct if as_percent else (lambda x: num(x, "+.2f"))
    side = "below" if direction == "lower" else "above"
    text = (f"{what} {'leaves' if direction == 'lower' else 'brings'} {metric_name} {'at' if direction == 'lower' else 'to'} "
            f"{show(sel)} on average (unmodified: {show(base)}), against {show(rnd)} for {n_random} matched random sets "
            f"per {unit}. The selected set is {side} the random sets at empirical p <= {alpha} for {len(beat_random)} of "
            f"{len(names)} {unit}s, and also significantly {side} the unmodified model (paired test, BH q < {alpha}) "
            f"for {len(passed)}.")
    if n_random and floor > alpha:
        text += f" With {n_random} random sets the smallest possible p is {floor:.2f}, so no {unit} can pass."
    return Finding(key, title, text,
                   rule=f"per {unit}: empirical p ({'lower' if direction == 'lower' else 'higher'} than) "
                        f"{n_random} random sets <= {alpha} and BH-corrected paired p vs "
                        f"the unmodified model < {alpha}; holds when more than half of the {unit}s pass",
                   holds=_majority(len(passed), len(names)),
                   numbers={"passed": passed, "beat_random": beat_random, "n": len(names), "mean_selected": sel,
                            "mean_unmodified": base, "mean_random": rnd, "n_random": n_random})


def dose_response_finding(key: str, title: str, trends: Mapping[str, Mapping[str, Any]], *, alpha: float,
                          on: str) -> Finding:
    """Per concept: 'falls with the dose' when the permutation p of the slope (grid order shuffled)
    is < ``alpha`` and the slope is negative; 'steeper than random' when the slope's empirical rank
    among the random curves' slopes is <= ``alpha``; 'monotone' only when, in addition, no step rises
    beyond noise (bootstrap over items). Holds when more than half of the concepts fall."""
    names = sorted(trends)
    falling = [c for c in names if _fin(trends[c].get("p_trend")) < alpha and _fin(trends[c].get("slope")) < 0]
    steeper = [c for c in names if _fin(trends[c].get("p_slope_vs_random")) <= alpha]
    mono = [c for c in falling if trends[c].get("monotone")]
    with_random = any(math.isfinite(_fin(trends[c].get("p_slope_vs_random"))) for c in names)
    text = (f"Over the whole grid of deactivated shares, {on} falls with the dose for {len(falling)} of {len(names)} "
            f"(permutation test of the slope, p < {alpha}); "
            + (f"the fall is steeper than every matched random curve's (empirical p <= {alpha}) for {len(steeper)}; "
               if with_random else "no random curves were measured here; ")
            + f"{len(mono)} of the falling curves have no step that rises beyond noise and are called monotone.")
    return Finding(key, title, text,
                   rule=f"falling: slope < 0 and permutation p < {alpha}; steeper: empirical p of the slope among the "
                        f"random curves <= {alpha}; monotone: falling and no step's bootstrap interval above 0; holds "
                        "when more than half fall",
                   holds=_majority(len(falling), len(names)),
                   numbers={"falling": falling, "steeper_than_random": steeper, "monotone": mono, "n": len(names)})


def interference(key: str, title: str, pairs: Sequence[Mapping[str, Any]], *, alpha: float) -> Finding:
    """A (deactivated, evaluated) pair is called interference only when accuracy rises and the
    one-sided exact McNemar test against the unmodified model survives Benjamini-Hochberg at
    ``alpha`` over all tested pairs (``q_mcnemar`` in each pair). Holds when at least one pair is."""
    tested = [d for d in pairs if d.get("p_mcnemar") is not None and math.isfinite(float(d["p_mcnemar"]))]
    gain = [d for d in tested if float(d["delta_acc"]) > 0]
    sig = sorted([d for d in gain if d.get("interference")], key=lambda d: -float(d["delta_acc"]))
    beyond_random = [d for d in sig if _fin(d.get("p_vs_random")) <= alpha]
    text = (f"Of {len(tested)} (deactivated, evaluated) pairs, {len(gain)} gain accuracy; {len(sig)} gain significantly "
            f"against the unmodified model (exact McNemar, one-sided, BH q < {alpha} over all pairs)")
    if sig:
        top = sig[0]
        text += (f", the largest being {top['deactivated']} -> {top['evaluated']} ({float(top['delta_acc']):+.0%}); "
                 f"{len(beyond_random)} of them also gain more than the matched random sets (empirical p <= {alpha}).")
    else:
        text += "; no pair is called interference."
    return Finding(key, title, text,
                   rule=f"accuracy rises and BH q (McNemar, one-sided) < {alpha}; holds when at least one pair qualifies",
                   holds=bool(sig) if tested else None,
                   numbers={"tested": len(tested), "gaining": len(gain), "interference": len(sig),
                            "beyond_random": len(beyond_random),
                            "pairs": [f"{d['deactivated']}->{d['evaluated']}" for d in sig]})


def layer_concentration(layers: Mapping[str, Sequence[int]], *, alpha: float, region: str = "middle",
                        min_ratio: float = 1.25) -> Finding:
    """Share of all selected neurons in the ``region`` third of the layers ('early', 'middle' or
    'late'), against the share of layers in that region; one-sided exact binomial test. Holds when
    the share is at least ``min_ratio`` times the region's share of layers (an effect size: with
    thousands of neurons a 1-point excess is 'significant' but is no concentration) and p < ``alpha``."""
    from scipy import stats

    counts = np.sum([np.asarray(v, dtype=int) for v in layers.values()], axis=0) if layers else np.zeros(0, int)
    n_layers = int(counts.size)
    thirds = {"early": (0, n_layers // 3), "middle": (n_layers // 3, 2 * n_layers // 3),
              "late": (2 * n_layers // 3, n_layers)}
    lo, hi = thirds[region]
    total = int(counts.sum())
    inside = int(counts[lo:hi].sum())
    expected = (hi - lo) / n_layers if n_layers else math.nan
    share = inside / total if total else math.nan
    p = float(stats.binomtest(inside, total, expected, alternative="greater").pvalue) if total and 0 < expected < 1 else math.nan
    ratio = share / expected if total and expected else math.nan
    holds = None if not math.isfinite(p) or n_layers < 3 else bool(p < alpha and ratio >= min_ratio)
    verdict = ("too few layers to test" if holds is None else
               f"the neurons are {'' if holds else 'not shown to be '}concentrated there")
    text = (f"{pct(share)} of the {total} selected neurons lie in the {region} third of the layers (layers {lo}-{hi - 1}), "
            f"which holds {pct(expected)} of the layers (ratio {num(ratio)}); binomial p = {num(p, '.2g')}: {verdict}.")
    return Finding(f"layers_{region}", "Layer distribution", text,
                   rule=f"share in the {region} third >= {min_ratio} x its share of layers and one-sided binomial "
                        f"p < {alpha}", holds=holds,
                   numbers={"share": share, "expected": expected, "ratio": ratio, "p": p, "total": total})


def _fin(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def ability_holds(key: str, title: str, comps: Mapping[str, Comparison], *, alpha: float, what: str) -> Finding:
    """General ability holds when no check shows harm beyond chance. A check (each ``Comparison``,
    one-sided in the harmful direction: ``alternative`` 'less' for accuracy, 'greater' for NLL) is
    harmed when its paired test against the unmodified model is significant after Benjamini-Hochberg
    over the checks (q < ``alpha``) and, where it has random sets, the selected arm is also beyond
    them (empirical p <= ``alpha``). Holds when no check is harmed."""
    names = [c for c, v in comps.items() if math.isfinite(v.selected)]
    p = np.array([comps[c].p_vs_unmodified for c in names], dtype=float)
    sig = benjamini_hochberg(np.where(np.isfinite(p), p, 1.0), alpha) if names else np.zeros(0, dtype=bool)
    harmed = [c for i, c in enumerate(names) if sig[i] and (comps[c].n_random == 0 or comps[c].p_vs_random <= alpha)]
    parts = [f"{c}: {num(comps[c].selected, '.3g')} vs {num(comps[c].baseline, '.3g')} unmodified"
             + (f", random {num(comps[c].random_mean, '.3g')}" if comps[c].n_random else "") for c in names]
    text = (f"{what}: {'; '.join(parts)}. {len(harmed)} of {len(names)} checks are harmed beyond chance"
            + (f" ({', '.join(harmed)})" if harmed else "") + ".")
    return Finding(key, title, text,
                   rule=f"a check is harmed when the one-sided paired test vs the unmodified model has BH q < {alpha} "
                        f"over the checks and, with random sets, empirical p <= {alpha}; holds when none is harmed",
                   holds=None if not names else not harmed,
                   numbers={"harmed": harmed, "checks": names,
                            "selected": {c: comps[c].selected for c in names},
                            "unmodified": {c: comps[c].baseline for c in names}})
