"""The language study's tests, tables, findings and plots, computed from the measured arms."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from neuronatlas.evaluate.perplexity import perplexity
from neuronatlas.report import plots
from neuronatlas.report.model import Finding, Section, Table
from neuronatlas.stats.inference import benjamini_hochberg, empirical_p, mcnemar_exact, random_interval
from neuronatlas.stats.lape import CATEGORIES
from neuronatlas.studies import rules
from neuronatlas.studies.common import jaccard
from neuronatlas.studies.framework import Context, Grid, Measured, Outcome, Selection
from neuronatlas.studies.relations_report import _wilcoxon_less

__all__ = ["languages_outcome"]


def languages_outcome(ctx: Context[Any], sel: Selection, grid: Grid, m: Measured) -> Outcome:
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return _outcome(ctx, sel, grid, m)


def _f(x: Any) -> float:
    return float(x)


def _ppl(m: Measured, key: str, verses: list[int]) -> float:
    return perplexity(float(m.on(key, "nll", verses).sum()), int(m.on(key, "tokens", verses).sum()))


def _outcome(ctx: Context[Any], sel: Selection, grid: Grid, m: Measured) -> Outcome:
    cfg, alpha = ctx.config, ctx.config.alpha
    langs = list(cfg.langs)
    verses = ctx.data["verses"]
    gen_langs = ctx.data["gen_langs"]
    gen_idx = {k: [i for i, lang in enumerate(gen_langs) if lang == k] for k in langs}
    active = [k for k in langs if f"deact:{k}" in grid.arms]
    lape, emax = ctx.data["lape"], ctx.data["emax"]

    # perplexity: the L x L change matrix, and the own change against the random sets
    base = {j: _ppl(m, "baseline|ppl", verses[j]) for j in langs}
    change = {k: {j: (_ppl(m, f"deact:{k}", verses[j]) / base[j] - 1 if k in active else math.nan) for j in langs}
              for k in langs}
    random: dict[str, dict[str, Any]] = {}
    own_cmp = {}
    for k in active:
        vals = [_ppl(m, a.key, verses[k]) / base[k] - 1 for a in grid.randoms(f"deact:{k}")]
        mean, lo, hi = random_interval(vals)
        random[k] = {"mean": mean, "lo": lo, "hi": hi, "p_vs_random": empirical_p(change[k][k], vals, "greater"),
                     "sets": vals}
        own_cmp[k] = m.compare(f"deact:{k}", "nll_per_token", baseline="baseline|ppl", subset=verses[k],
                               alternative="greater", binary=False, seed=cfg.seed)
    spec = [(k, change[k][k], float(np.nanmean([change[k][j] for j in langs if j != k]))) for k in active]
    spec_p = _wilcoxon_less([b - a for _, a, b in spec])      # own rise larger: other - own < 0

    # generation: switches under deactivation, continuations in the clamped language
    switch = {k: m.compare(f"gen:deact:{k}", "switch", baseline="baseline|gen", subset=gen_idx[k],
                           alternative="greater") for k in active}
    det_base = m.values["baseline|gen"]["detected"]
    clamp_rows = []
    for k in active:
        others = [i for i, lang in enumerate(gen_langs) if lang != k]
        det = m.values[f"gen:clamp:{k}"]["detected"]
        before = np.array([det_base[i] == k for i in others], dtype=int)
        after = np.array([det[i] == k for i in others], dtype=int)
        clamp_rows.append({"language": k, "rate_other": float(after.mean()) if after.size else math.nan,
                           "baseline_other": float(before.mean()) if before.size else math.nan,
                           "p_mcnemar": mcnemar_exact(before, after, "greater") if after.size else math.nan})
    clamp_ok: Any = benjamini_hochberg([r["p_mcnemar"] for r in clamp_rows], alpha) if clamp_rows else []
    for r, ok in zip(clamp_rows, clamp_ok):
        r["significant"] = bool(ok and r["rate_other"] > r["baseline_other"])

    # --- findings ---------------------------------------------------------------------------------------------
    total = ctx.lm.n_layers * ctx.lm.n_neurons
    summary = lape.summary()
    f = [Finding("selection", "Selected neurons",
                 f"LAPE selected {summary['n_selected']} of {total:,} gate neurons "
                 f"({100 * summary['n_selected'] / total:.2f}%); per language: "
                 + ", ".join(f"{k} {summary['counts'][k]}" for k in langs)
                 + f"; {summary['n_shared']} belong to several languages.", rule="descriptive")]
    f.append(rules.selected_vs_random(
        "own_ppl", "Perplexity under deactivation", own_cmp, alpha=alpha, direction="raise", as_percent=False,
        what="Zeroing a language's neurons", metric_name="the mean NLL per token of its held-out verses",
        unit="language"))
    f.append(Finding(
        "specificity", "Specificity",
        f"Zeroing a language's neurons raises its own perplexity by {rules.pct(_f(np.nanmean([a for _, a, _ in spec])))} "
        f"on average and the other languages' by {rules.pct(_f(np.nanmean([b for _, _, b in spec])))}; matched random sets "
        f"raise the own language's by {rules.pct(_f(np.nanmean([random[k]['mean'] for k in active])))}. One-sided "
        f"Wilcoxon signed-rank over {len(spec)} languages (own rise larger than the mean rise elsewhere): "
        f"p = {rules.num(spec_p, '.2g')}.",
        rule=f"Wilcoxon signed-rank over languages of (mean other-language change - own change) < 0, p < {alpha}",
        holds=bool(math.isfinite(spec_p) and spec_p < alpha) if spec else None, numbers={"p": spec_p}))
    f.append(rules.selected_vs_random(
        "switch", "Generation under deactivation", switch, alpha=alpha, direction="raise",
        what="Zeroing the prompt language's neurons", metric_name="the share of continuations that leave the "
        "prompt's language", unit="language"))
    sig = [r["language"] for r in clamp_rows if r["significant"]]
    f.append(Finding(
        "clamp", "Clamping language neurons",
        f"Clamping a language's neurons to {cfg.clamp_scale} x their recorded maximum while prompting in the other "
        f"languages turns {rules.pct(_f(np.nanmean([r['rate_other'] for r in clamp_rows])))} of continuations into the "
        f"clamped language (no intervention: {rules.pct(_f(np.nanmean([r['baseline_other'] for r in clamp_rows])))}); the "
        f"rise is significant for {len(sig)} of {len(clamp_rows)} languages (exact McNemar on prompts, BH q < {alpha}).",
        rule=f"per language: rate rises and BH-corrected one-sided McNemar p < {alpha}; holds when more than half do",
        holds=len(sig) > len(clamp_rows) / 2 if clamp_rows else None, numbers={"significant": sig}))
    em = emax.summary()
    overlap = {k: jaccard(set(lape.neurons_.get(k, [])), set(emax.neurons_.get(k, []))) for k in langs}
    f.append(Finding(
        "variant", "Entropy-max variant",
        f"The entropy-max variant (lambda = {em['lambda']}) selects {em['n_selected']} neurons: "
        f"{em['categories']['specific']} language-specific and {em['categories']['related']} language-related; all "
        "other neurons are language-agnostic. Jaccard overlap with LAPE: "
        + ", ".join(f"{k} {rules.num(overlap[k])}" for k in langs) + ".", rule="descriptive"))
    layer_counts = summary["layer_counts"]
    f.append(rules.layer_concentration(layer_counts, alpha=alpha, region="late"))

    # --- plots and sections ---------------------------------------------------------------------------------
    out = ctx.out
    plots.layer_histogram(out / "neurons_per_layer.png", layer_counts, title="LAPE neurons per layer and language")
    mat = 100 * np.array([[change[k][j] for j in langs] for k in langs], dtype=float)
    plots.heatmap(out / "ppl_change.png", mat, langs, langs, cmap="Reds", fmt="{:.0f}",
                  title="PPL change (%) when a language's neurons are zeroed", xlabel="evaluated language",
                  ylabel="deactivated language")
    plots.bars(out / "ppl_vs_random.png", active, {"language neurons": [100 * change[k][k] for k in active],
                                                   "random neurons (mean)": [100 * random[k]["mean"] for k in active]},
               title="Own-language PPL change", ylabel="PPL change (%)")
    plots.bars(out / "switch_rates.png", active, {"no intervention": [switch[k].baseline for k in active],
                                                  "language neurons off": [switch[k].selected for k in active],
                                                  "random neurons off (mean)": [switch[k].random_mean for k in active]},
               title="Continuations not in the prompt's language", ylabel="switch rate")
    cl = np.array([[np.mean([m.values[f"gen:clamp:{k}"]["detected"][i] == k for i in gen_idx[j]]) if k in active
                    else math.nan for j in langs] for k in langs], dtype=float)
    plots.heatmap(out / "clamp_rates.png", cl, langs, langs, cmap="Greens", fmt="{:.2f}",
                  title="Share of continuations detected as the clamped language", xlabel="prompt language",
                  ylabel="clamped language")
    figures = ["neurons_per_layer.png", "ppl_change.png", "ppl_vs_random.png", "switch_rates.png", "clamp_rates.png"]
    examples = [[gen_langs[i], ctx.data["gen_prompts"][i], m.values["baseline|gen"]["text"][i],
                 *(m.values[f"gen:{kind}:{gen_langs[i]}"]["text"][i] if f"gen:{kind}:{gen_langs[i]}" in m.values else ""
                   for kind in ("deact", "clamp"))] for i in range(0, len(gen_langs), max(1, cfg.n_gen))]
    sections = [
        Section("Selected neurons", "selection", ["neurons_per_layer.png"], [Table(
            ["language", "LAPE neurons", "variant neurons", "identify tokens", "top neurons"],
            [[k, summary["counts"][k], em["counts"][k], ctx.data["identify_tokens"][k],
              " ".join(f"L{a}:{b}" for a, b in lape.neurons_.get(k, [])[:3])] for k in langs],
            concept_columns=["language"])]),
        Section("Perplexity under deactivation", "own_ppl", ["ppl_change.png", "ppl_vs_random.png"], [Table(
            ["language", "baseline PPL", "own change", "random mean", "random 2.5%", "random 97.5%", "p vs random",
             "p vs unmodified (paired)", "other languages"],
            [[k, base[k], change[k][k], random[k]["mean"], random[k]["lo"], random[k]["hi"], random[k]["p_vs_random"],
              own_cmp[k].p_vs_unmodified, float(np.nanmean([change[k][j] for j in langs if j != k]))] for k in active],
            caption="changes are relative (0.5 = +50%); random columns: the distribution of the matched random sets",
            concept_columns=["language"])]),
        Section("Specificity", "specificity"),
        Section("Generation under deactivation", "switch", ["switch_rates.png"], [Table(
            ["language", "switch: none", "switch: own neurons off", "random mean", "random 97.5%", "p vs random",
             "p vs unmodified (McNemar)"],
            [[k, c.baseline, c.selected, c.random_mean, c.random_hi, c.p_vs_random, c.p_vs_unmodified]
             for k, c in switch.items()], concept_columns=["language"])],
            notes="Switch rate: share of greedy continuations whose detected language (langdetect) is not the prompt's "
                  "language, undetectable text included."),
        Section("Clamping language neurons", "clamp", ["clamp_rates.png"], [
            Table(["clamped language", "other-language prompts continued in it", "same, no intervention", "p McNemar",
                   "significant (BH)"],
                  [[r["language"], r["rate_other"], r["baseline_other"], r["p_mcnemar"], "yes" if r["significant"] else "no"]
                   for r in clamp_rows], concept_columns=["clamped language"]),
            Table(["language", "prompt", "no intervention", "own neurons off", "own neurons clamped"], examples,
                  caption="the first generation prompt of each language")]),
        Section("Entropy-max variant", "variant", tables=[Table(["category", "neurons"],
                                                                [[c, em["categories"][c]] for c in CATEGORIES])]),
        Section("Layer distribution", "layers_late", ["neurons_per_layer.png"]),
    ]
    setup = {"model": ctx.lm.provenance.get("model"), "languages": ", ".join(langs),
             "site": "gate: act(gate_proj(x)), active means > 0", "top rate": cfg.top_rate,
             "percentiles (filter / bar)": f"{cfg.filter_rate} / {cfg.activation_bar_ratio}",
             "clamp value": f"{cfg.clamp_scale} x recorded max on the language's tokens",
             "random scope": cfg.random_scope}
    numbers = {"languages": langs, "warnings": ctx.data["warnings"],
               "selection": {"lape": summary, "entropy_max": em, "overlap_lape_vs_variant": overlap},
               "ppl": {"baseline": base, "change": change, "random": random,
                       "own_vs_unmodified": {k: c.to_json() for k, c in own_cmp.items()}},
               "generation": {"switch": {k: c.to_json() for k, c in switch.items()}, "clamp": clamp_rows}}
    return Outcome(f, sections, numbers, setup, figures)
