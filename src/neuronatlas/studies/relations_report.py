"""The relation study's tests, tables, findings and plots, computed from the measured arms.

Called by :class:`neuronatlas.studies.relations.RelationStudy`; every sentence comes from a rule of
:mod:`neuronatlas.studies.rules` (or one defined here, with its test stated in ``rule``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from neuronatlas.report import plots
from neuronatlas.report.model import Finding, Section, Table
from neuronatlas.stats.inference import benjamini_hochberg, dose_response, paired_permutation
from neuronatlas.studies import rules
from neuronatlas.studies.common import jaccard
from neuronatlas.studies.framework import Context, Grid, Measured, Outcome, Selection

__all__ = ["relation_outcome", "overlap_p"]

H = "exact"     # the headline metric (whole object, greedy)


def overlap_p(a: set[Any], b: set[Any], population: int) -> float:
    """One-sided hypergeometric p of an intersection at least as large as ``|a & b|`` when ``b``'s
    members were drawn at random from ``population`` items."""
    from scipy import stats

    k, na, nb = len(a & b), len(a), len(b)
    return float(stats.hypergeom.sf(k - 1, population, na, nb)) if na and nb else math.nan


def relation_outcome(ctx: Context[Any], sel: Selection, grid: Grid, m: Measured) -> Outcome:
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return _outcome(ctx, sel, grid, m)


def _outcome(ctx: Context[Any], sel: Selection, grid: Grid, m: Measured) -> Outcome:
    cfg, alpha = ctx.config, ctx.config.alpha
    test, known, rels = ctx.data["test"], ctx.data.get("known", {}), ctx.data.get("evaluated", [])
    L = ctx.lm.n_layers
    base = {r: f"baseline|{r}" for r in test}

    baseline_table = {r: {"facts": len(test[r]), "exact_acc": m.mean(base[r], "exact"),
                          "first_token_acc": m.mean(base[r], "first"), "mean_logprob": m.mean(base[r], "logprob"),
                          "known": len(known.get(r, [])), "evaluated": r in rels} for r in sorted(test)}

    # own effect: the relation's neurons vs its matched random sets, on its known facts
    own = {r: m.compare(f"deact:{r}@{r}", H, baseline=base[r], subset=known[r], alternative="less") for r in rels}
    own_all = {r: m.compare(f"deact:{r}@{r}", H, baseline=base[r], alternative="less") for r in rels}

    # cumulativity: the dose-response grid on known facts
    # (the selected arms also ran on all held-out facts: a second trend, without random curves)
    cumulativity: dict[str, list[dict[str, Any]]] = {}
    trends: dict[str, dict[str, Any]] = {}
    trends_all: dict[str, dict[str, Any]] = {}
    for r in rels:
        size, rows, per_item, per_item_all = len(sel.ranked[r]), [], [], []
        rand_curves: list[list[float]] = [[] for _ in range(cfg.n_random)]
        for frac in cfg.grid:
            n = max(1, math.ceil(frac * size))
            key = f"cum:{r}:{frac}" if n < size else f"deact:{r}@{r}"
            c = m.compare(key, H, baseline=base[r], subset=known[r], alternative="less")
            per_item.append(m.on(key, H, known[r]))
            per_item_all.append(m.get(key, H))
            for s, arm in enumerate(grid.randoms(key)):
                rand_curves[s].append(float(m.on(arm.key, H, known[r]).mean()))
            rows.append({"fraction": frac, "n_neurons": n, "acc_selected": c.selected, "acc_random": c.random_mean,
                         "acc_random_lo": c.random_lo, "acc_random_hi": c.random_hi, "p_vs_random": c.p_vs_random,
                         "p_vs_unmodified": c.p_vs_unmodified, "acc_selected_all": m.mean(key, H),
                         "delta_logprob": float((m.on(key, "logprob", known[r]) -
                                                 m.on(base[r], "logprob", known[r])).mean())})
        cumulativity[r] = rows
        dr = dose_response(cfg.grid, [row["acc_selected"] for row in rows],
                           [c for c in rand_curves if len(c) == len(rows)], per_item=np.stack(per_item), seed=cfg.seed)
        trends[r] = _trend_json(dr, cfg.grid)
        trends_all[r] = _trend_json(dose_response(cfg.grid, [row["acc_selected_all"] for row in rows],
                                                  per_item=np.stack(per_item_all), seed=cfg.seed), cfg.grid)

    # cross-deactivation and interference, against the unmodified model (paired on facts)
    n = len(rels)
    cross = np.full((n, n), math.nan)
    pairs: list[dict[str, Any]] = []
    for i, r in enumerate(rels):
        for j, r2 in enumerate(rels):
            key = f"deact:{r}@{r2}"
            cross[i, j] = m.mean(key, H) - m.mean(base[r2], H)
            if i == j:
                continue
            c = m.compare(key, H, baseline=base[r2], alternative="greater")
            p_lp = paired_permutation(m.get(key, "logprob"), m.get(base[r2], "logprob"), alternative="greater",
                                      seed=cfg.seed)
            pairs.append({"deactivated": r, "evaluated": r2, "delta_acc": c.delta, "p_mcnemar": c.p_vs_unmodified,
                          "p_logprob": p_lp, "delta_acc_random": c.random_mean - c.baseline if c.n_random else None,
                          "p_vs_random": c.p_vs_random if c.n_random else None})
    q_ok: Any = benjamini_hochberg([d["p_mcnemar"] for d in pairs], alpha) if pairs else []
    for d, ok in zip(pairs, q_ok):
        d["interference"] = bool(ok and d["delta_acc"] > 0)
    # specificity: own effect more negative than the mean effect of the same neurons on other relations
    spec_rows = [(r, cross[i, i], float(np.nanmean(np.delete(cross[i], i)))) for i, r in enumerate(rels) if n > 1]
    spec_p = _wilcoxon_less([a - b for _, a, b in spec_rows])

    # versatility: overlap of neuron sets (hypergeometric test per pair) and across languages
    concepts = sel.concepts
    sets = {c: set(sel.neurons(c).pairs) for c in concepts}
    total = L * ctx.lm.n_neurons
    overlap = np.array([[jaccard(sets[a], sets[b]) for b in concepts] for a in concepts])
    ov_pairs = [(a, b, overlap_p(sets[a], sets[b], total)) for k, a in enumerate(concepts) for b in concepts[k + 1:]]
    ov_ok: Any = benjamini_hochberg([p for _, _, p in ov_pairs], alpha) if ov_pairs else []
    crossling = []
    for r in rels:
        for other in concepts:
            if other.startswith(f"{r}@"):
                cmp = m.compare(f"deact:{other}@{r}", H, baseline=base[r], subset=known[r], alternative="less")
                crossling.append({"relation": r, "neurons_from": other, "jaccard_with_en": jaccard(sets[r], sets[other]),
                                  "acc_known": cmp.selected, "acc_known_own": own[r].selected,
                                  "acc_known_random": own[r].random_mean, "p_vs_unmodified": cmp.p_vs_unmodified})
    cl_ok: Any = benjamini_hochberg([c["p_vs_unmodified"] for c in crossling], alpha) if crossling else []
    layers = {c: np.bincount([p[0] for p in sets[c]], minlength=L).tolist() for c in concepts}

    # --- findings -------------------------------------------------------------------------------------------
    bt = baseline_table
    f: list[Finding] = [Finding(
        "baseline", "Baseline recall",
        f"With {'%d-shot prompts' % cfg.few_shot if cfg.few_shot else 'zero-shot templates'}, greedy decoding yields the "
        f"whole object for {rules.pct(float(np.mean([v['exact_acc'] for v in bt.values()])))} of held-out facts on "
        f"average (first token: {rules.pct(float(np.mean([v['first_token_acc'] for v in bt.values()])))}); {len(rels)} of {len(bt)} "
        f"relations have at least {cfg.min_known} known facts and are evaluated.",
        rule=f"known fact: the whole object generated greedily (normalised exact match); a relation is evaluated "
             f"with >= {cfg.min_known} known facts", numbers={"evaluated": rels})]
    f.append(rules.selected_vs_random("own_effect", "Deactivating a relation's neurons", own, alpha=alpha,
                                      what=f"Deactivating all {ctx.data['n_select']} selected neurons of a relation",
                                      metric_name="recall of its known facts", unit="relation"))
    if trends:
        f.append(rules.dose_response_finding("cumulativity", "Cumulativity", trends, alpha=alpha,
                                             on="recall of known facts"))
        f.append(rules.dose_response_finding("cumulativity_all", "Cumulativity, all held-out facts", trends_all,
                                             alpha=alpha, on="recall of all held-out facts"))
    if spec_rows:
        holds = bool(math.isfinite(spec_p) and spec_p < alpha)
        f.append(Finding(
            "specificity", "Specificity",
            f"Deactivating a relation's own neurons changes its accuracy by {np.nanmean([a for _, a, _ in spec_rows]):+.0%} "
            f"on average (all held-out facts), other relations' by {np.nanmean([b for _, _, b in spec_rows]):+.0%}; "
            f"one-sided Wilcoxon signed-rank over {len(spec_rows)} relations p = {rules.num(spec_p, '.2g')}: the effect "
            f"is {'' if holds else 'not shown to be '}larger on the relation itself.",
            rule=f"own change minus mean change on other relations < 0, Wilcoxon signed-rank over relations, p < {alpha}",
            holds=holds, numbers={"p": spec_p}))
    f.append(rules.interference("interference", "Interference", pairs, alpha=alpha))
    if ov_pairs:
        sig = [f"{a}/{b}" for (a, b, _), ok in zip(ov_pairs, ov_ok) if ok]
        off = overlap[~np.eye(len(concepts), dtype=bool)]
        f.append(Finding(
            "overlap", "Versatility: overlap",
            f"Neuron sets overlap by a mean Jaccard index of {np.nanmean(off):.3f}; {len(sig)} of {len(ov_pairs)} pairs of "
            f"sets share more neurons than random sets of the same sizes would (hypergeometric test, BH q < {alpha}).",
            rule=f"per pair: one-sided hypergeometric p of the intersection size, BH over pairs < {alpha}; holds when "
                 "any pair overlaps beyond chance", holds=bool(sig), numbers={"pairs": sig}))
    if crossling:
        drop = [c for c, ok in zip(crossling, cl_ok) if ok and c["acc_known"] < 1]
        f.append(Finding(
            "cross_lingual", "Versatility: across languages",
            f"Deactivating the same relation's neurons found in another language leaves "
            f"{rules.pct(np.nanmean([c['acc_known'] for c in crossling]))} of known English facts (own English neurons: "
            f"{rules.pct(np.nanmean([c['acc_known_own'] for c in crossling]))}; matched random sets: "
            f"{rules.pct(np.nanmean([c['acc_known_random'] for c in crossling]))}); the drop is significant against "
            f"the unmodified model for {len(drop)} of {len(crossling)} (relation, language) pairs.",
            rule=f"exact McNemar (one-sided) on known facts vs the unmodified model, BH over pairs < {alpha}; holds "
                 "when more than half drop", holds=len(drop) > len(crossling) / 2,
            numbers={"dropping": [f"{c['neurons_from']}" for c in drop]}))
    f.append(rules.layer_concentration(layers, alpha=alpha, region="middle"))

    # --- plots and sections ---------------------------------------------------------------------------------
    out, figures = ctx.out, []
    cum_figs = []
    for r, rows in cumulativity.items():
        name = f"cumulativity_{r}.png"
        plots.line_with_bands(out / name, [100 * row["fraction"] for row in rows], {
            "selected neurons": ([row["acc_selected"] for row in rows], None, None),
            "random (matched)": ([row["acc_random"] for row in rows], [row["acc_random_lo"] for row in rows],
                                 [row["acc_random_hi"] for row in rows])},
            xlabel="% of the relation's selected neurons deactivated", ylabel="recall of known facts",
            title=f"Cumulativity: {r}", logx=True, dashed=["random (matched)"])
        cum_figs.append(name)
    figures += cum_figs
    if rels:
        plots.heatmap(out / "cross_deactivation.png", cross, rels, rels, cmap="RdBu", center=0.0, fmt="{:+.2f}",
                      title="Recall change (rows: deactivated, columns: evaluated)")
        figures.append("cross_deactivation.png")
    plots.heatmap(out / "overlap.png", overlap, concepts, concepts, title="Jaccard overlap of selected neurons")
    plots.layer_histogram(out / "layers.png", layers, title="Selected neurons per layer")
    figures += ["overlap.png", "layers.png"]
    first = {c: "L{}:{}".format(*sel.ranked[c][0][0]) if sel.ranked.get(c) else "" for c in concepts}
    top_ids = {c: " ".join(f"L{a}:{b}" for (a, b), _ in sel.ranked[c][:3]) for c in concepts}
    sections = [
        Section("Baseline recall", "baseline", tables=[Table(
            ["relation", "facts", "exact acc", "first-token acc", "mean log p", "known", "evaluated", "top neuron"],
            [[r, v["facts"], v["exact_acc"], v["first_token_acc"], v["mean_logprob"], v["known"],
              "yes" if v["evaluated"] else "no", first.get(r, "")] for r, v in bt.items()], concept_columns=["relation"])]),
        Section("Deactivating a relation's neurons", "own_effect", tables=[Table(
            ["relation", "known facts", "recall selected", "random mean", "random 2.5%", "random 97.5%", "p vs random",
             "p vs unmodified (McNemar)", "recall, all facts", "p vs unmodified, all facts"],
            [[r, c.n_items, c.selected, c.random_mean, c.random_lo, c.random_hi, c.p_vs_random, c.p_vs_unmodified,
              own_all[r].selected, own_all[r].p_vs_unmodified] for r, c in own.items()],
            caption="random columns: the distribution of the matched random sets (measured on the known facts), "
                    "not a CI", concept_columns=["relation"])]),
        Section("Cumulativity", "cumulativity", figures=cum_figs, tables=[
            Table(["relation", "% deactivated", "neurons", "recall selected", "random mean", "random 2.5%",
                   "random 97.5%", "p vs random", "p vs unmodified", "Δ log p", "recall selected, all facts"],
                  [[r, 100 * row["fraction"], row["n_neurons"], row["acc_selected"], row["acc_random"],
                    row["acc_random_lo"], row["acc_random_hi"], row["p_vs_random"], row["p_vs_unmodified"],
                    row["delta_logprob"], row["acc_selected_all"]] for r, rows in cumulativity.items() for row in rows],
                  caption="recall of known facts unless stated", concept_columns=["relation"]),
            Table(["relation", "facts", "slope", "Spearman", "p (trend)", "p (slope vs random)", "monotone",
                   "rising steps"],
                  [[r, which, t["slope"], t["spearman"], t["p_trend"], t["p_slope_vs_random"],
                    "yes" if t["monotone"] else "no", ", ".join(map(str, t["rising_steps"])) or "–"]
                   for which, tr in (("known", trends), ("all", trends_all)) for r, t in tr.items()],
                  caption="random curves are measured on the known facts only", concept_columns=["relation"])]),
        Section("Specificity: cross-deactivation", "specificity", figures=["cross_deactivation.png"] if rels else [],
                tables=[Table(["deactivated \\ evaluated", *rels], [[r, *row] for r, row in zip(rels, cross.tolist())],
                              caption="recall change on all held-out facts", concept_columns=["deactivated \\ evaluated"])]),
        Section("Interference", "interference", tables=[Table(
            ["deactivated", "evaluated", "Δ recall", "p McNemar", "p log p (paired)", "Δ recall random", "p vs random",
             "interference"],
            [[d["deactivated"], d["evaluated"], d["delta_acc"], d["p_mcnemar"], d["p_logprob"], d["delta_acc_random"],
              d["p_vs_random"], "yes" if d["interference"] else "no"]
             for d in sorted(pairs, key=lambda d: (not d["interference"], d["p_mcnemar"]))],
            caption="every tested pair, significant or not; random sets are evaluated only for the pairs that gain "
                    f"with an uncorrected McNemar p < {alpha} (no other pair can pass the rule)",
            concept_columns=["deactivated", "evaluated"])]),
        Section("Versatility", "overlap", figures=["overlap.png"], tables=[
            Table(["set A", "set B", "Jaccard", "hypergeometric p", "beyond chance (BH)"],
                  [[a, b, jaccard(sets[a], sets[b]), p, "yes" if ok else "no"] for (a, b, p), ok in zip(ov_pairs, ov_ok)],
                  concept_columns=["set A", "set B"]),
            Table(["relation", "other-language neurons", "Jaccard", "recall (other-language off)", "recall (own off)",
                   "recall (random)", "p vs unmodified"],
                  [[c["relation"], c["neurons_from"], c["jaccard_with_en"], c["acc_known"], c["acc_known_own"],
                    c["acc_known_random"], c["p_vs_unmodified"]] for c in crossling],
                  concept_columns=["relation", "other-language neurons"])]),
        Section("Layer distribution", "layers_middle", figures=["layers.png"], tables=[Table(
            ["concept", "neurons", "top neurons"], [[c, len(sets[c]), top_ids[c]] for c in concepts],
            concept_columns=["concept"])]),
    ]
    agreement = ctx.data.get("agreement") or {}
    if agreement:
        sections.append(Section(
            "Scorer agreement", "AP selection compared with the standardised-mean-difference scorer (Welch t-test, "
            "BH at 5%) and with LAPE (activation-probability entropy over relations).", tables=[Table(
                ["relation", "max AP", "AP base rate", "SMD-significant", "Jaccard(AP, SMD)", "LAPE candidates",
                 "Jaccard(AP, LAPE)"],
                [[c, v["ap_max"], v["ap_base_rate"], v["smd_significant"], v["ap_smd_jaccard"], v["lape_assigned"],
                  v["ap_lape_jaccard"]] for c, v in agreement.items()], concept_columns=["relation"])]))
    setup = {"model": ctx.lm.provenance.get("model"), "model file sha256": ctx.lm.provenance.get("file_sha256", "–"),
             "prompting": f"{cfg.few_shot}-shot" if cfg.few_shot else "zero-shot templates", "site": cfg.site,
             "pooling": cfg.pool, "scorer": cfg.scorer, "identification languages": ", ".join(cfg.langs),
             "neurons per relation": f"{ctx.data['n_select']} of {total}", "deactivation": cfg.mode,
             "identification prompts": ctx.data["identify_prompts"], "test template": cfg.test_template}
    numbers = {"concepts": concepts, "unscored_concepts": ctx.data.get("unscored", []), "evaluated_relations": rels,
               "n_selected": ctx.data["n_select"], "n_neurons_total": total, "n_layers": L,
               "baseline_table": baseline_table, "own_effect": {r: c.to_json() for r, c in own.items()},
               "own_effect_all_facts": {r: c.to_json() for r, c in own_all.items()},
               "cumulativity": cumulativity, "trend": trends, "trend_all_facts": trends_all,
               "interference_pairs": pairs,
               "cross_deactivation": {"relations": rels, "delta_acc_all": cross.tolist()},
               "overlap": {"concepts": concepts, "jaccard": overlap.tolist()}, "cross_lingual": crossling,
               "layers": layers, "scorer_comparison": agreement}
    return Outcome(f, sections, numbers, setup, figures)


def _trend_json(dr: Any, grid: Any) -> dict[str, Any]:
    return {"slope": dr.slope, "spearman": dr.spearman, "p_trend": dr.p_trend, "p_slope_vs_random": dr.p_vs_random,
            "monotone": dr.monotone, "rising_steps": [grid[k + 1] for k in dr.rising_steps]}


def _wilcoxon_less(diffs: list[float]) -> float:
    from scipy import stats

    d = np.asarray([x for x in diffs if math.isfinite(x)], dtype=float)
    if d.size < 2 or not np.any(d != 0):
        return math.nan
    return float(stats.wilcoxon(d, alternative="less").pvalue)
