"""Turn the relation study's raw per-fact results into tables, tests, findings, plots and HTML.

Called by :func:`neuronatlas.studies.relations.run_relation_study`; kept apart so the numbers can be
recomputed from a ``results.json`` without a model (``summarise(results)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.intervene import NeuronSet
from neuronatlas.report import Section, Table, write_report
from neuronatlas.report import plots
from neuronatlas.store.atlas import atomic_path, write_json_atomic
from neuronatlas.studies.common import jaccard, mean_ci

__all__ = ["summarise", "write_outputs"]


def _acc(entry: Mapping[str, list], mask: np.ndarray | None = None, key: str = "correct") -> float:
    """Mean of ``key`` over the facts in ``mask`` (a mask over all test facts; entries evaluated on a
    subset carry the subset's indices in ``idx``)."""
    v = np.asarray(entry[key], dtype=float)
    if mask is not None:
        idx = entry.get("idx")
        v = v[np.asarray(mask)[idx]] if idx is not None and len(idx) == len(v) else v[mask]
    return float(v.mean()) if v.size else math.nan


def _cum_keys(r: str, frac: float, grid_n: int, full_n: int, seeds: int) -> tuple[str, list[str]]:
    if grid_n >= full_n:
        return f"deact:{r}", [f"rand:{r}:{s}" for s in range(seeds)]
    return f"cum:{frac}", [f"cumrand:{frac}:{s}" for s in range(seeds)]


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Compute every table of the report from ``results['baseline']`` and ``results['raw']``."""
    import warnings

    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # empty slices (no known facts) give NaN, shown as '–'
        return _summarise(results)


def _summarise(results: dict[str, Any]) -> dict[str, Any]:
    from scipy import stats

    from neuronatlas.stats.scorers import benjamini_hochberg

    cfg = results["config"]
    seeds = int(cfg["seeds"])
    base, raw = results["baseline"], results["raw"]
    rels = results["evaluated_relations"]
    n_sel = {c: len(p) for c, p in results["selected"].items()}
    known = {r: np.asarray(base[r]["correct"], dtype=bool) for r in base}
    cum_mask = {r: known[r] if cfg.get("cumulativity_on", "known") == "known" else np.ones_like(known[r]) for r in base}

    baseline_table = {r: {"facts": len(base[r]["correct"]), "first_token_acc": _acc(base[r]),
                          "exact_acc": _acc(base[r], key="exact"), "mean_logprob": _acc(base[r], key="logprob"),
                          "known": int(known[r].sum()), "evaluated": r in rels} for r in sorted(base)}

    cumulativity: dict[str, Any] = {}
    for r in rels:
        rows = []
        for frac in cfg["grid"]:
            n = max(1, math.ceil(frac * n_sel[r]))
            sel_key, rand_keys = _cum_keys(r, frac, n, n_sel[r], seeds)
            sel_raw = raw[r].get(sel_key) or raw[r][f"cum:{frac}"]
            mask = cum_mask[r]
            acc_sel = _acc(sel_raw, mask)
            rand_accs = [_acc(raw[r][k], mask) for k in rand_keys if k in raw[r]]
            m, lo, hi = mean_ci(rand_accs)
            lo, hi = max(0.0, lo), min(1.0, hi)  # accuracies are bounded; the t-interval is not
            sel_idx = np.asarray(sel_raw.get("idx", range(len(sel_raw["logprob"]))), dtype=int)
            keep = np.asarray(mask)[sel_idx]
            diff = np.asarray(sel_raw["logprob"])[keep] - np.asarray(base[r]["logprob"])[sel_idx][keep]
            drop_lp = float(diff.mean()) if diff.size else math.nan
            rows.append({"fraction": frac, "n_neurons": n, "acc_selected": acc_sel, "acc_random": m,
                         "acc_random_lo": lo, "acc_random_hi": hi, "delta_logprob_selected": drop_lp})
        cumulativity[r] = rows

    cross = np.full((len(rels), len(rels)), math.nan)
    cross_known = np.full((len(rels), len(rels)), math.nan)
    cross_rand = np.full((len(rels), len(rels)), math.nan)
    pvals = np.ones((len(rels), len(rels)))
    for i, r in enumerate(rels):
        for j, r2 in enumerate(rels):
            entry = raw[r2].get(f"deact:{r}")
            if entry is None:
                continue
            cross[i, j] = _acc(entry) - _acc(base[r2])
            cross_known[i, j] = _acc(entry, known[r2])
            rand = [raw[r2][f"rand:{r}:{s}"] for s in range(seeds) if f"rand:{r}:{s}" in raw[r2]]
            cross_rand[i, j] = float(np.mean([_acc(e) for e in rand])) - _acc(base[r2]) if rand else math.nan
            if rand and i != j:
                diff = np.asarray(entry["logprob"]) - np.mean([np.asarray(e["logprob"]) for e in rand], axis=0)
                if np.any(diff != 0):
                    pvals[i, j] = float(stats.wilcoxon(diff, alternative="greater").pvalue)
    off = ~np.eye(len(rels), dtype=bool)
    qmask = np.zeros_like(pvals, dtype=bool)
    if off.any():
        qmask[off] = benjamini_hochberg(pvals[off], 0.05)
    interference = [{"deactivated": rels[i], "evaluated": rels[j], "delta_acc": float(cross[i, j]),
                     "delta_acc_random": float(cross_rand[i, j]), "p": float(pvals[i, j]),
                     "significant_fdr05": bool(qmask[i, j])}
                    for i in range(len(rels)) for j in range(len(rels))
                    if i != j and np.isfinite(cross[i, j]) and cross[i, j] > 0]
    interference.sort(key=lambda d: (-d["significant_fdr05"], -d["delta_acc"]))

    concepts = sorted(results["selected"])
    sets = {c: NeuronSet.of([tuple(p) for p in results["selected"][c]]) for c in concepts}
    overlap = np.array([[jaccard(sets[a], sets[b]) for b in concepts] for a in concepts])
    crossling = []
    for r in rels:
        for c in concepts:
            if c.startswith(f"{r}@"):
                entry = raw[r].get(f"deact:{c}")
                rand = [_acc(raw[r][f"rand:{r}:{s}"], known[r]) for s in range(seeds) if f"rand:{r}:{s}" in raw[r]]
                crossling.append({"relation": r, "neurons_from": c, "jaccard_with_en": jaccard(sets[r], sets[c]),
                                  "acc_en_known": _acc(entry, known[r]) if entry else math.nan,
                                  "acc_en_known_own": _acc(raw[r][f"deact:{r}"], known[r]),
                                  "acc_en_known_random": float(np.mean(rand)) if rand else math.nan})
    L = int(results["n_layers"])
    layers = {c: np.bincount([p[0] for p in results["selected"][c]], minlength=L).tolist() for c in concepts}
    middle = {c: float(sum(layers[c][L // 3: 2 * L // 3]) / max(1, sum(layers[c]))) for c in concepts}
    return {"baseline_table": baseline_table, "cumulativity": cumulativity, "cross_deactivation": {
        "relations": rels, "delta_acc_all": cross.tolist(), "acc_known": cross_known.tolist(),
        "delta_acc_random": cross_rand.tolist(), "p_interference": pvals.tolist()},
        "interference": interference, "overlap": {"concepts": concepts, "jaccard": overlap.tolist()},
        "cross_lingual": crossling, "layers": layers, "middle_third_fraction": middle}


def _findings(s: dict[str, Any], results: dict[str, Any]) -> dict[str, str]:
    f: dict[str, str] = {}
    bt = s["baseline_table"]
    evald = [r for r, v in bt.items() if v["evaluated"]]
    f["baseline"] = (f"With {results['prompting']}, the model gets {np.mean([v['first_token_acc'] for v in bt.values()]):.0%} "
                     f"of held-out facts right on average (first token); {len(evald)} of {len(bt)} relations have at least "
                     f"{results['config']['min_known']} known facts and are evaluated. Drops below are measured on known facts only.")
    full = [(r, rows[-1]) for r, rows in s["cumulativity"].items()]
    if full:
        sel = np.mean([row["acc_selected"] for _, row in full])
        rnd = np.nanmean([row["acc_random"] for _, row in full])
        mono = sum(1 for _, rows in s["cumulativity"].items()
                   if rows[0]["acc_selected"] >= rows[-1]["acc_selected"])
        f["cumulativity"] = (f"Deactivating all {results['n_selected']} selected neurons of a relation leaves {sel:.0%} of its known "
                             f"facts recalled on average, against {rnd:.0%} for the same number of random neurons from the same "
                             f"layers; accuracy at the largest fraction is at or below that at the smallest for {mono} of "
                             f"{len(full)} relations.")
    cd = s["cross_deactivation"]
    m = np.asarray(cd["delta_acc_all"], dtype=float)
    if m.size:
        diag = float(np.nanmean(np.diag(m)))
        offd = float(np.nanmean(m[~np.eye(len(m), dtype=bool)])) if len(m) > 1 else math.nan
        f["cross"] = (f"Deactivating a relation's own neurons changes its accuracy by {diag:+.0%} on average (all held-out facts), "
                      f"other relations' by {offd:+.0%}: the effect is {'specific' if diag < offd else 'not specific'} to the relation.")
    sig = [d for d in s["interference"] if d["significant_fdr05"]]
    f["interference"] = (f"{len(s['interference'])} (deactivated, evaluated) pairs gain accuracy; {len(sig)} of them beat the random "
                         "baseline significantly (one-sided Wilcoxon on per-fact log-probabilities, Benjamini-Hochberg q < 0.05)"
                         + (f", the largest being {sig[0]['deactivated']} -> {sig[0]['evaluated']} ({sig[0]['delta_acc']:+.0%})." if sig else "."))
    ov = np.asarray(s["overlap"]["jaccard"], dtype=float)
    if ov.size > 1:
        offo = ov[~np.eye(len(ov), dtype=bool)]
        i, j = np.unravel_index(np.nanargmax(np.where(np.eye(len(ov), dtype=bool), -1, ov)), ov.shape)
        f["overlap"] = (f"Neuron sets overlap by a mean Jaccard index of {np.nanmean(offo):.3f}; the most similar pair is "
                        f"{s['overlap']['concepts'][i]} / {s['overlap']['concepts'][j]} ({ov[i, j]:.3f}).")
    if s["cross_lingual"]:
        cl = s["cross_lingual"]
        f["cross_lingual"] = (f"Across languages the same relation's neuron sets share a mean Jaccard of "
                              f"{np.mean([c['jaccard_with_en'] for c in cl]):.3f}; deactivating the other-language neurons leaves "
                              f"{np.nanmean([c['acc_en_known'] for c in cl]):.0%} of known English facts, vs "
                              f"{np.nanmean([c['acc_en_known_own'] for c in cl]):.0%} with the English neurons and "
                              f"{np.nanmean([c['acc_en_known_random'] for c in cl]):.0%} with random ones.")
    mid = s["middle_third_fraction"]
    f["layers"] = (f"On average {np.mean(list(mid.values())):.0%} of selected neurons lie in the middle third of the layers "
                   "(a uniform spread would put 33% there).")
    return f


def write_outputs(out: Path, results: dict[str, Any], selected: Mapping[str, NeuronSet], cfg: Any, lm: Any) -> dict[str, Any]:
    import warnings

    s = summarise(results)
    results = {**results, "summary": s}
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        findings = _findings(s, results)
    results["findings"] = findings
    figs: dict[str, list[str]] = {"cumulativity": [], "cross": [], "overlap": [], "layers": []}
    for r, rows in s["cumulativity"].items():
        x = [100 * row["fraction"] for row in rows]
        name = f"cumulativity_{r}.png"
        plots.line_with_bands(out / name, x, {
            "selected neurons": ([row["acc_selected"] for row in rows], None, None),
            "random (same layers)": ([row["acc_random"] for row in rows], [row["acc_random_lo"] for row in rows],
                                     [row["acc_random_hi"] for row in rows])},
            xlabel="% of the relation's selected neurons deactivated", ylabel="accuracy on known facts",
            title=f"Cumulativity: {r}", logx=True, dashed=["random (same layers)"])
        figs["cumulativity"].append(name)
    cd = s["cross_deactivation"]
    if cd["relations"]:
        plots.heatmap(out / "cross_deactivation.png", np.asarray(cd["delta_acc_all"], dtype=float), cd["relations"],
                      cd["relations"], title="Accuracy change (rows: deactivated, columns: evaluated)", cmap="RdBu",
                      center=0.0, fmt="{:+.2f}")
        figs["cross"].append("cross_deactivation.png")
    ov = s["overlap"]
    plots.heatmap(out / "overlap.png", np.asarray(ov["jaccard"], dtype=float), ov["concepts"], ov["concepts"],
                  title="Jaccard overlap of selected neurons")
    figs["overlap"].append("overlap.png")
    plots.layer_histogram(out / "layers.png", s["layers"], title="Selected neurons per layer")
    figs["layers"].append("layers.png")

    bt = s["baseline_table"]
    sections = [
        Section("Baseline recall", findings["baseline"], tables=[Table(
            ["relation", "facts", "first-token acc", "exact acc", "mean log p", "known", "evaluated"],
            [[r, v["facts"], v["first_token_acc"], v["exact_acc"], v["mean_logprob"], v["known"], "yes" if v["evaluated"] else "no"]
             for r, v in bt.items()])]),
        Section("Cumulativity", findings.get("cumulativity", "No relation had enough known facts."), figures=figs["cumulativity"],
                tables=[Table(["relation", "% deactivated", "neurons", "acc selected", "acc random", "95% CI low", "95% CI high", "Δ log p selected"],
                              [[r, 100 * row["fraction"], row["n_neurons"], row["acc_selected"], row["acc_random"],
                                row["acc_random_lo"], row["acc_random_hi"], row["delta_logprob_selected"]]
                               for r, rows in s["cumulativity"].items() for row in rows])]),
        Section("Versatility: cross-deactivation", findings.get("cross", ""), figures=figs["cross"],
                tables=[Table(["deactivated \\ evaluated", *cd["relations"]],
                              [[r, *row] for r, row in zip(cd["relations"], cd["delta_acc_all"])],
                              caption="accuracy change on all held-out facts")]),
        Section("Versatility: overlap", findings.get("overlap", ""), figures=figs["overlap"],
                tables=[Table(["relation", "other-language neurons", "Jaccard", "acc (other-lang deactivated)",
                               "acc (own deactivated)", "acc (random)"],
                              [[c["relation"], c["neurons_from"], c["jaccard_with_en"], c["acc_en_known"],
                                c["acc_en_known_own"], c["acc_en_known_random"]] for c in s["cross_lingual"]],
                              caption=findings.get("cross_lingual", ""))]),
        Section("Interference", findings["interference"], tables=[Table(
            ["deactivated", "evaluated", "Δ acc", "Δ acc random", "p", "significant (FDR 5%)"],
            [[d["deactivated"], d["evaluated"], d["delta_acc"], d["delta_acc_random"], d["p"], "yes" if d["significant_fdr05"] else "no"]
             for d in s["interference"][:20]])]),
        Section("Layer distribution", findings["layers"], figures=figs["layers"]),
    ]
    if results.get("scorer_comparison"):
        sc = results["scorer_comparison"]
        sections.append(Section("Scorer comparison", "AP selection compared with the standardised-mean-difference scorer "
                                "(Welch t-test, Benjamini-Hochberg at 5%) and with LAPE (activation-probability entropy "
                                "over relations; a neuron is a candidate for r when its activation probability on r "
                                "is above the 95th percentile).", tables=[Table(
                                    ["relation", "max AP", "AP base rate", "SMD-significant neurons", "Jaccard(AP, SMD)",
                                     "LAPE-assigned neurons", "Jaccard(AP, LAPE)"],
                                    [[c, v["ap_max"], v["ap_base_rate"], v["smd_significant"], v["ap_smd_jaccard"],
                                      v.get("lape_assigned", "–"), v.get("ap_lape_jaccard", "–")] for c, v in sc.items()])]))
    prov = results["provenance"]
    setup = {"model": prov["model"].get("model"), "model file sha256": prov["model"].get("file_sha256", "–"),
             "prompting": results["prompting"], "site": cfg.site, "pooling": cfg.pool, "scorer": cfg.scorer,
             "neurons selected per relation": f"{results['n_selected']} of {results['n_neurons_total']}",
             "deactivation": cfg.mode, "random baselines (seeds)": cfg.seeds, "identification prompts": results["identify_prompts"],
             "dataset sha256": prov["dataset_sha256"][:16], "seed": prov["seed"], "neuronatlas": prov["neuronatlas_version"],
             "wall time (s)": results["timing"]["seconds"], "evaluated prompt rows": results["timing"]["forward_rows"]}
    write_report(out / "report.html", title="Relation-specific neurons", setup=setup, sections=sections,
                 intro="Which MLP neurons carry a relation, and what happens to factual recall when they are switched off "
                       "(after Liu et al. 2025), with layer-matched random baselines and significance tests.")
    write_json_atomic(out / "results.json", results)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(summary_markdown(results), encoding="utf-8")
    return results


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def summary_markdown(results: dict[str, Any]) -> str:
    """The headline table and computed findings as Markdown (``summary.md``, the source of docs/results.md)."""
    s, cfg, prov = results["summary"], results["config"], results["provenance"]
    model = prov["model"]
    sha = model.get("file_sha256") or model.get("revision") or "–"
    name = str(model.get("model"))
    if model.get("file"):
        name += f", {Path(str(model['file'])).name}"
    lines = [f"## Relation-specific neurons — {name} (sha256 {str(sha)[:16]}…)", "",
             f"Setup: {results['prompting']}, site {cfg['site']}, {cfg['pool']} pooling, {cfg['scorer'].upper()} scorer, "
             f"{results['n_selected']} neurons per relation (of {results['n_neurons_total']}), {cfg['seeds']} layer-matched "
             f"random baselines per condition, identification languages {', '.join(cfg['langs'])}; "
             f"wall time {results['timing']['seconds']:.0f} s.", "",
             "| relation | test facts | first-token acc | known | acc after deactivating 100% of its neurons | "
             "random, same layers (mean [95% CI]) |", "|---|---|---|---|---|---|"]
    for r, v in s["baseline_table"].items():
        full = (s["cumulativity"].get(r) or [None])[-1]
        if full is None:
            after, rand = "not evaluated", "–"
        else:
            after = _fmt(full["acc_selected"])
            rand = f"{_fmt(full['acc_random'])} [{_fmt(full['acc_random_lo'])}, {_fmt(full['acc_random_hi'])}]"
        lines.append(f"| {r} | {v['facts']} | {_fmt(v['first_token_acc'])} | {v['known']} | {after} | {rand} |")
    lines += ["", "Findings (computed by the study):", ""]
    lines += [f"- **{k}**: {v}" for k, v in sorted(results["findings"].items())]
    sig = [d for d in s["interference"] if d["significant_fdr05"]]
    if sig:
        lines += ["", "Significant interference pairs (Wilcoxon vs random baseline, BH q < 0.05):", ""]
        lines += [f"- deactivating {d['deactivated']} raises {d['evaluated']} by {d['delta_acc']:+.2f} "
                  f"(random: {d['delta_acc_random']:+.2f}, p = {d['p']:.3g})" for d in sig]
    comp = results.get("scorer_comparison") or {}
    if comp:
        lines += ["", "Scorer agreement on the evaluation language (Jaccard with the AP set):", "",
                  "| relation | SMD-significant | Jaccard(AP, SMD) | LAPE candidates | Jaccard(AP, LAPE) |", "|---|---|---|---|---|"]
        lines += [f"| {c} | {v['smd_significant']} | {_fmt(v['ap_smd_jaccard'], '.3f')} | {v.get('lape_assigned', '–')} | "
                  f"{_fmt(v.get('ap_lape_jaccard'), '.3f')} |" for c, v in comp.items()]
    return "\n".join(lines) + "\n"
