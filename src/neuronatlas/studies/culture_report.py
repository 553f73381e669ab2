"""Findings, tables and figures of the culture study (:mod:`neuronatlas.studies.culture`).

    >>> from neuronatlas.studies.culture_report import culture_outcome
    >>> outcome = culture_outcome(ctx, selection, grid, measured)     # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from neuronatlas.report import Finding, Section, Table, plots
from neuronatlas.studies import rules
from neuronatlas.studies.culture import FACT_ITEMS, GENERAL, TEXT_ITEMS, CultureStudyConfig, concept_of
from neuronatlas.studies.framework import Comparison, Context, Grid, Measured, Outcome, Selection

__all__ = ["culture_outcome"]


def _ppl(measured: Measured, key: str, tokens: np.ndarray) -> float:
    return float(math.exp(measured.get(key, "nll").sum() / tokens.sum())) if tokens.sum() else math.nan


def _layers(selection: Selection, n_layers: int) -> dict[str, list[int]]:
    out = {}
    for concept in selection.concepts:
        counts = np.zeros(n_layers, dtype=int)
        for layer, _ in selection.neurons(concept).pairs:
            counts[layer] += 1
        out[concept] = counts.tolist()
    return out


def _specificity(ctx: Context[CultureStudyConfig], measured: Measured, cultures: list[str]
                 ) -> tuple[np.ndarray, Finding]:
    """Change in mean log p(gold) on the first ``cross_test`` questions of each culture when each
    culture's specific neurons are suppressed; own culture vs the mean over the others, one-sided
    Wilcoxon signed-rank over cultures."""
    from scipy import stats

    mat = np.full((len(cultures), len(cultures)), np.nan)
    for i, c in enumerate(cultures):
        for j, e in enumerate(cultures):
            key = f"specific:{c}@{e}"
            if key in measured.values:
                base = f"baseline|{e}|cross" if i != j else f"baseline|{e}"
                sub = range(min(ctx.config.cross_test, len(measured.get(f"baseline|{e}", "logprob"))))
                mat[i, j] = float(np.mean(measured.on(key, "logprob", list(sub)))
                                  - np.mean(measured.on(base, "logprob", list(sub))))
    rows = [i for i in range(len(cultures)) if np.isfinite(mat[i]).all()]
    own = np.array([mat[i, i] for i in rows])
    other = np.array([np.mean([mat[i, j] for j in range(len(cultures)) if j != i]) for i in rows])
    alpha = ctx.config.alpha
    p = float(stats.wilcoxon(own, other, alternative="less").pvalue) if len(rows) >= 5 and np.any(own != other) else math.nan
    holds = None if not math.isfinite(p) else bool(p < alpha)
    text = (f"Suppressing a culture's specific neurons changes log p(gold answer) on its own questions by "
            f"{rules.num(float(own.mean()) if own.size else math.nan, '+.3f')} on average, and on the other cultures' "
            f"questions by {rules.num(float(other.mean()) if other.size else math.nan, '+.3f')} ({len(rows)} cultures; "
            f"one-sided Wilcoxon signed-rank p = {rules.num(p, '.2g')}).")
    return mat, Finding("specificity", "Specificity", text,
                        rule=f"own-culture change below the other cultures' mean change, Wilcoxon signed-rank over "
                             f"cultures (one-sided) p < {alpha}; needs >= 5 cultures", holds=holds,
                        numbers={"own": own.tolist(), "other": other.tolist(), "p": p})


def culture_outcome(ctx: Context[CultureStudyConfig], selection: Selection, grid: Grid, measured: Measured) -> Outcome:
    cfg, data = ctx.config, ctx.data
    cultures: list[str] = data["cultures"]
    a = cfg.alpha
    spec = [c for c in cultures if f"specific:{c}@{c}" in grid.arms]

    def cmp(key: str, items: str, metric: str, binary: bool = True, alt: str = "less") -> Comparison:
        return measured.compare(key, metric, baseline=f"baseline|{items}", binary=binary, alternative=alt,  # type: ignore[arg-type]
                                seed=cfg.seed)

    gen_acc = {c: cmp(f"general@{c}", c, "correct") for c in cultures}
    gen_lp = {c: cmp(f"general@{c}", c, "logprob", binary=False) for c in cultures}
    sp_acc = {c: cmp(f"specific:{c}@{c}", c, "correct") for c in spec}
    sp_lp = {c: cmp(f"specific:{c}@{c}", c, "logprob", binary=False) for c in spec}
    ability = {"non-cultural facts (accuracy)": cmp(f"general@{FACT_ITEMS}", FACT_ITEMS, "correct"),
               "English text (NLL per text)": cmp(f"general@{TEXT_ITEMS}", TEXT_ITEMS, "nll", binary=False, alt="greater")}
    sp_ability: dict[str, Comparison] = {}
    for c in spec:
        sp_ability[f"{c} neurons, facts"] = cmp(f"specific:{c}@{FACT_ITEMS}", FACT_ITEMS, "correct")
        sp_ability[f"{c} neurons, text"] = cmp(f"specific:{c}@{TEXT_ITEMS}", TEXT_ITEMS, "nll", binary=False, alt="greater")
    tokens = np.asarray(data["text_tokens"], dtype=float)
    ppl = {"unmodified": _ppl(measured, f"baseline|{TEXT_ITEMS}", tokens),
           "culture-general": _ppl(measured, f"general@{TEXT_ITEMS}", tokens),
           "random (mean)": float(np.mean([_ppl(measured, r.key, tokens) for r in grid.randoms(f"general@{TEXT_ITEMS}")]
                                          or [math.nan])),
           **{f"{c}-specific": _ppl(measured, f"specific:{c}@{TEXT_ITEMS}", tokens) for c in spec}}
    layers = _layers(selection, ctx.lm.n_layers)
    mat, spec_finding = _specificity(ctx, measured, spec)
    drops = {c: (v.baseline - v.selected) / v.baseline for c, v in gen_acc.items() if v.baseline > 0}
    worst = max(drops, key=lambda c: drops[c]) if drops else None
    names = data["names"]
    sizes = {c: len(selection.ranked.get(concept_of(c), [])) for c in cultures}
    findings = [
        Finding("selection", "Culture neurons",
                f"{len(selection.ranked[GENERAL])} culture-general neurons ({rules.pct(cfg.select_fraction)} of "
                f"{ctx.lm.n_layers * ctx.lm.n_neurons}) by {cfg.objective} attribution on {sum(data['identify'].values())} "
                f"cultural questions minus {data['n_control']} control questions; culture-specific neurons per culture: "
                + ", ".join(f"{c} {n}" for c, n in sizes.items())
                + f". The country-name probe ({names.get('probes', 0)} prompts) excluded {names.get('excluded', 0)} neurons, "
                f"{data['name_dropped'].get(GENERAL, 0)} of which would have been among the culture-general top.",
                rule=f"descriptive (name filter: |Cohen's d| >= {cfg.name_threshold} and BH-significant Welch p)"),
        rules.selected_vs_random("general_accuracy", "Culture-general neurons: cultural accuracy", gen_acc, alpha=a,
                                 what="Suppressing the culture-general neurons", unit="culture",
                                 metric_name="accuracy on held-out cultural questions"),
        rules.selected_vs_random("general_logprob", "Culture-general neurons: log p(gold)", gen_lp, alpha=a,
                                 what="Suppressing the culture-general neurons", unit="culture", as_percent=False,
                                 metric_name="log p(gold answer)"),
        rules.selected_vs_random("specific_accuracy", "Culture-specific neurons: own accuracy", sp_acc, alpha=a,
                                 what="Suppressing each culture's specific neurons", unit="culture",
                                 metric_name="accuracy on that culture's questions"),
        rules.selected_vs_random("specific_logprob", "Culture-specific neurons: own log p(gold)", sp_lp, alpha=a,
                                 what="Suppressing each culture's specific neurons", unit="culture", as_percent=False,
                                 metric_name="log p(gold answer) on that culture's questions"),
        spec_finding,
        rules.ability_holds("general_ability", "General ability (culture-general neurons)", ability, alpha=a,
                            what="With the culture-general neurons suppressed"),
        rules.ability_holds("specific_ability", "General ability (culture-specific neurons)", sp_ability, alpha=a,
                            what="With each culture's specific neurons suppressed"),
        Finding("largest_drop", "Largest relative drop",
                (f"The largest relative drop in cultural accuracy under culture-general suppression is {rules.pct(drops[worst])} "
                 f"({worst}: {rules.pct(gen_acc[worst].baseline)} -> {rules.pct(gen_acc[worst].selected)}); the paper "
                 "reports drops of up to 30%.") if worst else "No culture has a non-zero baseline accuracy.",
                rule="descriptive", numbers={"drops": drops}),
        rules.layer_concentration({k: v for k, v in layers.items()}, alpha=a, region="early"),
        rules.layer_concentration({k: v for k, v in layers.items()}, alpha=a, region="middle"),
    ]
    out = ctx.out
    plots.layer_histogram(out / "culture_layers.png", layers, title="Culture neurons per layer")
    plots.bars(out / "culture_accuracy.png", cultures, {
        "unmodified": [gen_acc[c].baseline for c in cultures],
        "culture-general suppressed": [gen_acc[c].selected for c in cultures],
        "random sets (mean)": [gen_acc[c].random_mean for c in cultures],
        "own specific suppressed": [sp_acc[c].selected if c in sp_acc else math.nan for c in cultures]},
        title="Accuracy on held-out cultural questions", ylabel="accuracy (among A-D)")
    fa, tx = ability.values()
    plots.bars(out / "general_ability.png", ["non-cultural facts: accuracy", "English text: perplexity / 10"], {
        "unmodified": [fa.baseline, ppl["unmodified"] / 10],
        "culture-general suppressed": [fa.selected, ppl["culture-general"] / 10],
        "random sets (mean)": [fa.random_mean, ppl["random (mean)"] / 10],
        "culture-specific suppressed (mean)": [float(np.mean([v.selected for k, v in sp_ability.items() if "facts" in k]))
                                               if sp_ability else math.nan,
                                               float(np.nanmean([ppl[f"{c}-specific"] for c in spec])) / 10 if spec else math.nan]},
        title="General ability under suppression", ylabel="accuracy  |  perplexity / 10")
    figures = ["culture_layers.png", "culture_accuracy.png", "general_ability.png"]
    if spec:
        plots.heatmap(out / "culture_specificity.png", mat, spec, spec, cmap="RdBu", center=0.0, fmt="{:+.2f}",
                      title="Change in log p(gold) under specific suppression", xlabel="evaluated culture",
                      ylabel="suppressed culture's neurons")
        figures.append("culture_specificity.png")
    acc_rows = [[c, concept_of(c), data["identify"][c], gen_acc[c].n_items, sizes[c], gen_acc[c].baseline,
                 gen_acc[c].selected, gen_acc[c].random_mean, gen_acc[c].p_vs_random, gen_acc[c].p_vs_unmodified,
                 sp_acc[c].selected if c in sp_acc else None, sp_acc[c].p_vs_random if c in sp_acc else None]
                for c in cultures]
    sections = [
        Section("Culture neurons", "selection", ["culture_layers.png"], [Table(
            ["concept", "neurons", "layers 0-9", "layers 10-19", "layers 20+"],
            [[k, sum(v), sum(v[:10]), sum(v[10:20]), sum(v[20:])] for k, v in layers.items()],
            concept_columns=["concept"])]),
        Section("Cultural accuracy under suppression", "general_accuracy", ["culture_accuracy.png"], [Table(
            ["culture", "concept", "identify", "test", "specific neurons", "unmodified", "general suppressed",
             "random mean", "p vs random", "p vs unmodified", "specific suppressed", "specific p vs random"],
            acc_rows, concept_columns=["concept"])]),
        Section("Specificity", "specificity", figures[3:]),
        Section("General ability", "general_ability", ["general_ability.png"], [Table(
            ["condition", "perplexity"], [[k, v] for k, v in ppl.items()])]),
        Section("Layer distribution", "layers_early", ["culture_layers.png"]),
    ]
    setup = {"model": ctx.lm.provenance.get("model"), "objective": cfg.objective, "cultures": ", ".join(cultures),
             "select fraction": cfg.select_fraction, "name threshold (|d|)": cfg.name_threshold,
             "test questions per culture (max)": cfg.max_test, "format demo": cfg.few_shot}
    numbers: dict[str, Any] = {
        "accuracy": {"general": {c: v.to_json() for c, v in gen_acc.items()},
                     "specific": {c: v.to_json() for c, v in sp_acc.items()}},
        "logprob": {"general": {c: v.to_json() for c, v in gen_lp.items()},
                    "specific": {c: v.to_json() for c, v in sp_lp.items()}},
        "general_ability": {k: v.to_json() for k, v in {**ability, **sp_ability}.items()}, "perplexity": ppl,
        "specificity": {"cultures": spec, "delta_logprob": mat.tolist()}, "layers": layers,
        "names": {k: v for k, v in names.items() if k != "d"}, "name_dropped_from_top": data["name_dropped"],
        "questions": {"identify": data["identify"], "test": {c: len(v) for c, v in data["test"].items()},
                      "control_identify": data["n_control"], "facts_test": len(data["facts"]),
                      "texts": len(data["texts"])},
        "baseline_prob": {c: float(np.mean(data["prob"][: len(data["prob_cultures"])][data["prob_cultures"] == c]))
                          for c in cultures},
    }
    return Outcome(findings, sections, numbers, setup, figures)
