"""Findings, tables and figures of the self-report study (:mod:`neuronatlas.studies.self_report`).

    >>> from neuronatlas.studies.self_report_report import correlation_finding
    >>> f = correlation_finding("report", "Reported vs true weights", [1, 2, 3, 4], [1, 2, 4, 3], alpha=0.05,
    ...                         what="reported and true weights")
    >>> round(f.numbers["r"], 2)
    0.8
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np

from neuronatlas.data.choices import Agent
from neuronatlas.report import Finding, Section, Table, plots
from neuronatlas.stats.inference import benjamini_hochberg
from neuronatlas.studies import rules
from neuronatlas.studies.framework import Context, Grid, Measured, Outcome
from neuronatlas.studies.rules import num

Vec = Union[Sequence[float], np.ndarray]
IVec = Union[Sequence[int], np.ndarray]

__all__ = ["self_report_outcome", "correlation_finding", "revealed_weights", "pearson"]


def pearson(x: Vec, y: Vec) -> tuple[float, float]:
    """Pearson r and its one-sided p (r > 0); NaN when either side is constant."""
    from scipy import stats

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size < 3 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan, math.nan
    res = stats.pearsonr(a, b, alternative="greater")
    return float(res.statistic), float(res.pvalue)


def _r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r, NaN when either side is constant."""
    return float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else math.nan


def group_bootstrap(groups: IVec, statistic: Callable[[np.ndarray], float], *, n_boot: int, seed: int) -> np.ndarray:
    """``statistic(rows)`` on ``n_boot`` resamples of whole groups (drawn with replacement, every
    row of a drawn group taken); the finite values."""
    g = np.asarray(groups)
    ids = np.unique(g)
    members = {i: np.nonzero(g == i)[0] for i in ids}
    rng = np.random.default_rng(seed)
    vals = np.asarray([statistic(np.concatenate([members[i] for i in rng.choice(ids, ids.size)]))
                       for _ in range(n_boot)], dtype=float)
    return vals[np.isfinite(vals)]


def correlation_finding(key: str, title: str, x: Vec, y: Vec, *, alpha: float, what: str,
                        groups: IVec | None = None, seed: int = 0) -> Finding:
    """Pearson r between ``x`` and ``y`` with a one-sided p (r > 0) and, with ``groups`` (e.g. the
    agent of each item), a 95% bootstrap interval over the groups. Holds when r > 0 and p < alpha."""
    r, p = pearson(x, y)
    lo = hi = math.nan
    if groups is not None and math.isfinite(r):
        xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        arr = group_bootstrap(groups, lambda pick: _r(xa[pick], ya[pick]), n_boot=1000, seed=seed)
        if arr.size:
            lo, hi = float(np.quantile(arr, 0.025)), float(np.quantile(arr, 0.975))
    ci = f" (95% bootstrap interval over agents {num(lo)} to {num(hi)})" if math.isfinite(lo) else ""
    holds = None if not math.isfinite(r) else bool(r > 0 and p < alpha)
    text = (f"Pearson r between {what} = {num(r)}{ci} over {len(x)} items, one-sided p = {num(p, '.2g')}: "
            + ("a positive correlation." if holds else "no positive correlation shown." if holds is False else
               "undefined (one side is constant)."))
    return Finding(key, title, text, rule=f"Pearson r > 0 with one-sided p < {alpha}", holds=holds,
                   numbers={"r": r, "p": p, "lo": lo, "hi": hi, "n": len(x)})


def revealed_weights(agents: Sequence[Agent], choices: Sequence[tuple[int, Vec, Vec]],
                     margin: Vec) -> np.ndarray:
    """Per agent, least-squares weights of the choice margin on the options' rescaled attribute
    differences (B - A), scaled to the largest |weight| = 100: the weights the choices reveal."""
    out = np.zeros((len(agents), len(agents[0].weights)))
    m = np.asarray(margin, dtype=float)
    for i, ag in enumerate(agents):
        rows = [n for n, (j, _, _) in enumerate(choices) if j == i]
        attrs = ag.spec.attributes
        x = np.array([[(b[k] - a[k]) / (attrs[k].hi - attrs[k].lo) for k in range(len(attrs))]
                      for _, a, b in (choices[n] for n in rows)])
        coef, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(rows))], m[rows], rcond=None)
        w = coef[: len(attrs)]
        out[i] = 100 * w / (np.abs(w).max() or 1.0)
    return out


def _directions(f: Finding) -> Finding:
    """The framework's random-baseline rule, worded for random directions (same norm) instead of neuron sets."""
    return Finding(f.key, f.title, f.text.replace("matched random sets", "random directions of the same norm")
                   .replace("random sets", "random directions").replace("The selected set", "The probe direction"),
                   f.rule.replace("random sets", "random directions"), f.holds, f.numbers)


def r_gain(before: Vec, after: Vec, y: Vec, groups: IVec, *, n_boot: int = 2000,
           seed: int = 0) -> tuple[float, float, float]:
    """r(after, y) - r(before, y) on the same items and its 95% paired bootstrap interval over
    ``groups`` (e.g. agents: all of a drawn group's items are taken, in both conditions)."""
    b, a, t = (np.asarray(v, dtype=float) for v in (before, after, y))
    gain = _r(a, t) - _r(b, t)
    arr = group_bootstrap(groups, lambda pick: _r(a[pick], t[pick]) - _r(b[pick], t[pick]), n_boot=n_boot, seed=seed)
    if not arr.size:
        return gain, math.nan, math.nan
    return gain, float(np.quantile(arr, 0.025)), float(np.quantile(arr, 0.975))


def introspection_findings(study: Any, ctx: Context[Any], measured: Measured, true: np.ndarray,
                           items: Sequence[tuple[int, int]]) -> tuple[list[Finding], dict[str, Any]]:
    """The paper's second step: reports of held-out agents before (preference-tuned model) and
    after introspection training on the other agents' reports."""
    cfg = ctx.config
    train, held = study.introspection_split(len(ctx.data["agents"]))
    held_set, train_set = set(held), set(train)
    h = [n for n, (i, _) in enumerate(items) if i in held_set]
    t = [n for n, (i, _) in enumerate(items) if i in train_set]
    before, after = measured.get("trained|reports", "reported"), measured.get("introspect|reports", "reported")
    owners = np.array([i for i, _ in items])
    f_before = correlation_finding("introspect_before", "Held-out agents, before introspection training", before[h],
                                   true[h], alpha=cfg.alpha, what="reported and true weights (held-out agents, "
                                   "preference-tuned model)", groups=owners[h], seed=cfg.seed)
    f_after = correlation_finding("introspect_after", "Held-out agents, after introspection training", after[h], true[h],
                                  alpha=cfg.alpha, what="reported and true weights (held-out agents, after introspection "
                                  "training on the other agents)", groups=owners[h], seed=cfg.seed)
    gain, lo, hi = r_gain(before[h], after[h], true[h], owners[h], seed=cfg.seed)
    train_before, train_after = pearson(before[t], true[t])[0], pearson(after[t], true[t])[0]
    holds = None if not math.isfinite(lo) else bool(lo > 0)
    f_gain = Finding("introspect_gain", "Introspection training improves reports on held-out agents",
                     f"On {len(held)} held-out agents ({len(h)} weights) the correlation of reported and true weights goes "
                     f"from r = {num(f_before.numbers['r'])} to {num(f_after.numbers['r'])} (gain {num(gain, '+.2f')}, 95% "
                     f"paired bootstrap interval over agents {num(lo, '+.2f')} to {num(hi, '+.2f')}) after training the "
                     f"reports of {len(train)} other agents (there r goes from {num(train_before)} to {num(train_after)}). "
                     "Paper: 0.54 -> 0.74.",
                     rule="the 95% paired bootstrap interval (over held-out agents) of r(after) - r(before) lies above 0",
                     holds=holds, numbers={"gain": gain, "lo": lo, "hi": hi})
    f_choices = correlation_finding("introspect_choices", "Choices after introspection training",
                                    measured.get("introspect|choices", "margin"), study.true_utility_gaps(ctx),
                                    alpha=cfg.alpha, what="the choice margin and the true utility gap (weights fine-tuned "
                                    "in, after introspection training)", groups=[i for i, _, _ in ctx.data["choices"]],
                                    seed=cfg.seed)
    agents = ctx.data["agents"]
    plots.scatter(ctx.out / "reported_vs_true_introspect.png", np.r_[true[h], true[h]], np.r_[before[h], after[h]],
                  groups=["before"] * len(h) + ["after"] * len(h),
                  title="Held-out agents: before / after introspection training",
                  xlabel="true weight (fine-tuned in)", ylabel="reported weight")
    numbers = {"before_r": f_before.numbers["r"], "after_r": f_after.numbers["r"], "gain": gain, "lo": lo, "hi": hi,
               "train_before_r": train_before, "train_after_r": train_after, "n_held_out": len(h), "n_train": len(t),
               "held_out_agents": [agents[i].domain for i in held], "training": ctx.data.get("introspect_info"),
               "choices_r": f_choices.numbers["r"]}
    return [f_choices, f_before, f_after, f_gain], numbers


def self_report_outcome(study: Any, ctx: Context[Any], grid: Grid, measured: Measured) -> Outcome:
    cfg, agents = ctx.config, ctx.data["agents"]
    space = getattr(cfg, "space", "mlp")
    items = study.report_items(ctx)
    true = np.array([agents[i].weights[k] for i, k in items], dtype=float)
    reported = measured.get("baseline|reports", "reported")
    margin = measured.get("baseline|choices", "margin")
    gaps = study.true_utility_gaps(ctx)
    revealed = revealed_weights(agents, ctx.data["choices"], margin)
    rev = np.array([revealed[i, k] for i, k in items])
    agree = float(np.mean(np.sign(margin) == np.sign(gaps)))
    f_choice = correlation_finding("choices", "Choices follow the stated weights", margin, gaps, alpha=cfg.alpha,
                                   what="the choice margin log p(B) - log p(A) and the true utility gap U(B) - U(A)",
                                   groups=[i for i, _, _ in ctx.data["choices"]], seed=cfg.seed)
    f_choice = Finding(f_choice.key, f_choice.title, f_choice.text + f" The model picks the higher-utility option in "
                       f"{100 * agree:.0f}% of {len(gaps)} choices.", f_choice.rule, f_choice.holds,
                       {**f_choice.numbers, "agreement": agree})
    f_report = correlation_finding("report", "Reported vs true weights", reported, true, alpha=cfg.alpha,
                                   what="reported and true (stated) weights", groups=[i for i, _ in items], seed=cfg.seed)
    r_rev, p_rev = pearson(reported, rev)
    f_revealed = Finding("revealed", "Reported vs revealed weights",
                         f"Pearson r between reported weights and the weights the model's own choices reveal (least squares "
                         f"of the choice margin on attribute differences, per agent) = {num(r_rev)}, one-sided p = "
                         f"{num(p_rev, '.2g')}; true vs revealed r = {num(pearson(true, rev)[0])}.",
                         rule="descriptive (revealed weights from only "
                              f"{cfg.n_choices} choices per agent are noisy)", holds=None,
                         numbers={"r": r_rev, "p": p_rev, "r_true_revealed": pearson(true, rev)[0]})
    probes = ctx.data["probes"]
    pr = np.array([p["p"] for p in probes], dtype=float)
    ok = benjamini_hochberg(np.where(np.isfinite(pr), pr, 1.0), cfg.alpha)
    found = [k for k in range(len(probes)) if ok[k] and probes[k]["r"] > 0]
    f_probe = Finding("probe", "Neuron directions that carry each weight",
                      f"A ridge probe on layer {ctx.data['layer']} ({space}; averaged over the 'Answer:' tokens of "
                      f"{cfg.n_probe} choice prompts, {cfg.probe_folds}-fold cross-validated) predicts the weight of "
                      f"attribute slot 1-{len(probes)} with r = " + ", ".join(num(p["r"]) for p in probes)
                      + f"; {len(found)} of {len(probes)} slots are significant (one-sided Pearson p, BH q < {cfg.alpha}).",
                      rule=f"per slot: out-of-fold Pearson r > 0 with BH q < {cfg.alpha}; holds when more than half of "
                           "the slots pass", holds=len(found) > len(probes) / 2,
                      numbers={"r": [p["r"] for p in probes], "p": pr.tolist(), "found": found})
    comps = {f"slot{k}": measured.compare(f"steer|slot{k}|+", "reported", baseline="baseline|reports",
                                          alternative="greater", binary=False, seed=cfg.seed) for k in range(len(probes))}
    minus = {f"slot{k}": measured.compare(f"steer|slot{k}|-", "reported", baseline="baseline|reports",
                                          alternative="less", binary=False, seed=cfg.seed) for k in range(len(probes))}
    f_steer = _directions(rules.selected_vs_random("steer", "Steering along the probe direction", comps, alpha=cfg.alpha,
                                       what=f"Adding {num(ctx.data['alpha'], '.3g')} x the probe direction "
                                            f"({cfg.steer_norm:g} x the mean activation norm) at layer {ctx.data['layer']}",
                                       metric_name="the reported weight", unit="attribute slot", direction="raise",
                                       as_percent=False))
    trained: dict[str, Any] = {}
    extra: list[Finding] = []
    if "trained|reports" in measured.values:
        owners = [i for i, _, _ in ctx.data["choices"]]
        for setting, label in (("unstated", "not stated, not trained"), ("trained", "fine-tuned in, not stated")):
            fc = correlation_finding(f"{setting}_choices", f"Choices, weights {label}", measured.get(f"{setting}|choices",
                                     "margin"), gaps, alpha=cfg.alpha, what="the choice margin and the true utility gap",
                                     groups=owners, seed=cfg.seed)
            fr = correlation_finding(f"{setting}_report", f"Reports, weights {label}",
                                     measured.get(f"{setting}|reports", "reported"), true, alpha=cfg.alpha,
                                     what="reported and true weights", groups=[i for i, _ in items], seed=cfg.seed)
            extra += [fc, fr]
            trained[setting] = {"choices_r": fc.numbers["r"], "report_r": fr.numbers["r"], "report_p": fr.numbers["p"],
                                "reported": measured.get(f"{setting}|reports", "reported")}
        trained["training"] = ctx.data.get("train_info")
        if "introspect|reports" in measured.values:
            intro, intro_numbers = introspection_findings(study, ctx, measured, true, items)
            extra += intro
            trained["introspection"] = intro_numbers
        plots.scatter(ctx.out / "reported_vs_true_trained.png", true, measured.get("trained|reports", "reported"),
                      groups=[agents[i].domain for i, _ in items], title="Reported vs true weights (fine-tuned in)",
                      xlabel="true weight (fine-tuned in)", ylabel="reported weight (expected answer, rescaled)")
    groups = [agents[i].domain for i, _ in items]
    plots.scatter(ctx.out / "reported_vs_true.png", true, reported, groups=groups, title="Reported vs true weights",
                  xlabel="true weight (stated in context)", ylabel="reported weight (expected answer, rescaled)")
    slots = list(comps)
    plots.bars(ctx.out / "steering.png", slots,
               {"+alpha (probe)": [comps[s].delta for s in slots], "-alpha (probe)": [minus[s].delta for s in slots],
                "+alpha (random, mean)": [comps[s].random_mean - comps[s].baseline for s in slots]},
               title="Change in the reported weight under steering", ylabel="reported weight vs unmodified")
    item_rows = [[agents[i].domain, agents[i].spec.attributes[k].name, int(true[n]), float(reported[n]), float(rev[n])]
                 for n, (i, k) in enumerate(items)]
    sections = [
        Section("Choices", "choices"),
        Section("Reported vs true weights", "report", figures=["reported_vs_true.png"], tables=[Table(
            ["domain", "attribute", "true weight", "reported", "revealed by the choices"], item_rows)]),
        Section("Probe", "probe", tables=[Table(["slot", "out-of-fold r", "p (one-sided)", "projection SD"],
                                                 [[f"slot{k}", p["r"], p["p"], p["projection_sd"]] for k, p in enumerate(probes)])]),
        Section("Steering", "steer", figures=["steering.png"], tables=[Table(
            ["slot", "items", "unmodified", "+alpha", "-alpha", "random +alpha (mean)", "p +alpha vs unmodified",
             "p -alpha vs unmodified", "p vs random"],
            [[s, comps[s].n_items, comps[s].baseline, comps[s].selected, minus[s].selected, comps[s].random_mean,
              comps[s].p_vs_unmodified, minus[s].p_vs_unmodified, comps[s].p_vs_random] for s in slots])]),
    ]
    setup = {"model": ctx.lm.provenance.get("model"), "weights": "stated in context", "space": space,
             "agents": cfg.n_agents,
             "choices per agent": cfg.n_choices, "probe agents": cfg.n_probe, "layer": ctx.data["layer"],
             "steered agents": cfg.steer_agents}
    numbers = {"weights": {"pearson_r": f_report.numbers["r"], "p": f_report.numbers["p"], "lo": f_report.numbers["lo"],
                          "hi": f_report.numbers["hi"], "true": true, "reported": reported, "revealed": rev,
                          "items": [[agents[i].domain, k] for i, k in items]},
               "choices": {"pearson_r": f_choice.numbers["r"], "agreement": agree},
               "probe": {"r": [p["r"] for p in probes], "p": pr.tolist()},
               "steering": {"alpha": ctx.data["alpha"], "plus": {s: c.to_json() for s, c in comps.items()},
                            "minus": {s: c.to_json() for s, c in minus.items()}}}
    figures = ["reported_vs_true.png", "steering.png"]
    if trained:
        numbers["trained"] = trained
        sections.append(Section("Weights fine-tuned in (LoRA)", "trained_report", figures=["reported_vs_true_trained.png"],
                                tables=[Table(["setting", "choices r", "report r", "report p"],
                                              [[k, v["choices_r"], v["report_r"], v["report_p"]]
                                               for k, v in trained.items() if k in ("unstated", "trained")])],
                                notes=f"Training: {trained.get('training')}"))
        figures.append("reported_vs_true_trained.png")
        if "introspection" in trained:
            t = trained["introspection"]
            sections.append(Section("Introspection training (held-out agents)", "introspect_gain",
                                    figures=["reported_vs_true_introspect.png"],
                                    tables=[Table(["agents", "items", "r before", "r after"],
                                                  [["held out", t["n_held_out"], t["before_r"], t["after_r"]],
                                                   ["trained on (reports)", t["n_train"], t["train_before_r"],
                                                    t["train_after_r"]]])],
                                    notes=f"Training: {t.get('training')}"))
            figures.append("reported_vs_true_introspect.png")
            setup = {**setup, "introspection steps": cfg.introspect_steps}
        setup = {**setup, "LoRA steps": cfg.train_steps}
    return Outcome([f_choice, f_report, f_revealed, f_probe, f_steer, *extra], sections, numbers, setup, figures)
