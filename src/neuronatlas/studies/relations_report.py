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
from neuronatlas.stats.inference import (
    benjamini_hochberg, dose_response, empirical_p, mcnemar_exact, paired_permutation, random_interval,
)
from neuronatlas.studies.common import jaccard

__all__ = ["summarise", "write_outputs", "HEADLINE", "ALPHA"]

HEADLINE = "exact"   # a fact counts as recalled when greedy decoding yields the whole object
ALPHA = 0.05         # every finding's significance level


def _acc(entry: Mapping[str, list], mask: np.ndarray | None = None, key: str = "correct") -> float:
    """Mean of ``key`` over the facts in ``mask`` (a mask over all test facts; entries evaluated on a
    subset carry the subset's indices in ``idx``)."""
    v = np.asarray(entry[key], dtype=float)
    if mask is not None:
        idx = entry.get("idx")
        v = v[np.asarray(mask)[idx]] if idx is not None and len(idx) == len(v) else v[mask]
    return float(v.mean()) if v.size else math.nan


def _vals(entry: Mapping[str, list], mask: np.ndarray | None, key: str) -> np.ndarray:
    """The per-fact values of ``key`` restricted to the facts in ``mask`` (over all test facts)."""
    v = np.asarray(entry[key], dtype=float)
    if mask is None:
        return v
    idx = entry.get("idx")
    return v[np.asarray(mask)[idx]] if idx is not None and len(idx) == len(v) else v[np.asarray(mask)]


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
    cfg = results["config"]
    seeds = int(cfg["seeds"])
    base, raw = results["baseline"], results["raw"]
    rels = results["evaluated_relations"]
    n_sel = {c: len(p) for c, p in results["selected"].items()}
    known = {r: np.asarray(base[r][HEADLINE], dtype=bool) for r in base}
    cum_mask = {r: known[r] if cfg.get("cumulativity_on", "known") == "known" else np.ones_like(known[r]) for r in base}

    baseline_table = {r: {"facts": len(base[r]["correct"]), "first_token_acc": _acc(base[r]),
                          "exact_acc": _acc(base[r], key="exact"), "mean_logprob": _acc(base[r], key="logprob"),
                          "known": int(known[r].sum()), "evaluated": r in rels} for r in sorted(base)}

    metric = HEADLINE  # known facts and every accuracy below: the whole object greedy (see docs/relations.md)
    cumulativity: dict[str, Any] = {}
    trends: dict[str, Any] = {}
    for r in rels:
        rows, per_item, rand_curves = [], [], [[] for _ in range(seeds)]
        for frac in cfg["grid"]:
            n = max(1, math.ceil(frac * n_sel[r]))
            sel_key, rand_keys = _cum_keys(r, frac, n, n_sel[r], seeds)
            sel_raw = raw[r].get(sel_key) or raw[r][f"cum:{frac}"]
            mask = cum_mask[r]
            sel_vals = _vals(sel_raw, mask, metric)
            acc_sel = float(sel_vals.mean()) if sel_vals.size else math.nan
            per_item.append(sel_vals)
            rand_accs = [_acc(raw[r][k], mask, metric) for k in rand_keys if k in raw[r]]
            for s_i, a in enumerate(rand_accs):
                rand_curves[s_i].append(a)
            m, lo, hi = random_interval(rand_accs)
            diff = _vals(sel_raw, mask, "logprob") - _vals(base[r], mask, "logprob")
            rows.append({"fraction": frac, "n_neurons": n, "acc_selected": acc_sel, "acc_random": m,
                         "acc_random_lo": lo, "acc_random_hi": hi, "n_random_sets": len(rand_accs),
                         "p_vs_random": empirical_p(acc_sel, rand_accs, "less"),
                         "delta_logprob_selected": float(diff.mean()) if diff.size else math.nan})
        cumulativity[r] = rows
        same_items = len({len(v) for v in per_item}) == 1 and per_item[0].size > 0
        dr = dose_response(cfg["grid"], [row["acc_selected"] for row in rows],
                           [c for c in rand_curves if len(c) == len(rows)],
                           per_item=np.stack(per_item) if same_items else None, seed=int(cfg.get("seed", 0)))
        trends[r] = {"slope": dr.slope, "spearman": dr.spearman, "p_trend": dr.p_trend,
                     "p_slope_vs_random": dr.p_vs_random, "random_slopes": list(dr.random_slopes),
                     "monotone": dr.monotone, "rising_steps": [cfg["grid"][k + 1] for k in dr.rising_steps]}

    n_rel = len(rels)
    cross = np.full((n_rel, n_rel), math.nan)
    cross_known = np.full((n_rel, n_rel), math.nan)
    cross_rand = np.full((n_rel, n_rel), math.nan)
    p_mcnemar = np.full((n_rel, n_rel), math.nan)
    p_logprob = np.full((n_rel, n_rel), math.nan)
    p_random = np.full((n_rel, n_rel), math.nan)
    for i, r in enumerate(rels):
        for j, r2 in enumerate(rels):
            entry = raw[r2].get(f"deact:{r}")
            if entry is None:
                continue
            before, after = _vals(base[r2], None, metric), _vals(entry, None, metric)
            cross[i, j] = float(after.mean() - before.mean())
            cross_known[i, j] = _acc(entry, known[r2], metric)
            rand = [raw[r2][f"rand:{r}:{s}"] for s in range(seeds) if f"rand:{r}:{s}" in raw[r2]]
            rand_deltas = [_acc(e, None, metric) - float(before.mean()) for e in rand]
            cross_rand[i, j] = float(np.mean(rand_deltas)) if rand_deltas else math.nan
            if i != j:
                # interference: against the unmodified model, paired on facts
                p_mcnemar[i, j] = mcnemar_exact(before, after, "greater")
                p_logprob[i, j] = paired_permutation(_vals(entry, None, "logprob"), _vals(base[r2], None, "logprob"),
                                                     alternative="greater", seed=int(cfg.get("seed", 0)))
                p_random[i, j] = empirical_p(cross[i, j], rand_deltas, "greater") if rand_deltas else math.nan
    off = ~np.eye(n_rel, dtype=bool)
    q_mask = np.zeros((n_rel, n_rel), dtype=bool)
    if off.any():
        q_mask[off] = benjamini_hochberg(p_mcnemar[off], 0.05)
    pairs = []
    for i in range(n_rel):
        for j in range(n_rel):
            if i == j or not np.isfinite(cross[i, j]):
                continue
            pairs.append({"deactivated": rels[i], "evaluated": rels[j], "delta_acc": float(cross[i, j]),
                          "delta_acc_random": float(cross_rand[i, j]), "p_mcnemar": float(p_mcnemar[i, j]),
                          "p_logprob": float(p_logprob[i, j]), "p_vs_random": float(p_random[i, j]),
                          "significant_fdr05": bool(q_mask[i, j] and cross[i, j] > 0)})
    interference = [d for d in pairs if d["delta_acc"] > 0]
    interference.sort(key=lambda d: (-d["significant_fdr05"], d["p_mcnemar"], -d["delta_acc"]))

    concepts = sorted(results["selected"])
    sets = {c: NeuronSet.of([tuple(p) for p in results["selected"][c]]) for c in concepts}
    overlap = np.array([[jaccard(sets[a], sets[b]) for b in concepts] for a in concepts])
    crossling = []
    for r in rels:
        for c in concepts:
            if c.startswith(f"{r}@"):
                entry = raw[r].get(f"deact:{c}")
                rand = [_acc(raw[r][f"rand:{r}:{s}"], known[r], metric) for s in range(seeds) if f"rand:{r}:{s}" in raw[r]]
                crossling.append({"relation": r, "neurons_from": c, "jaccard_with_en": jaccard(sets[r], sets[c]),
                                  "acc_en_known": _acc(entry, known[r], metric) if entry else math.nan,
                                  "acc_en_known_own": _acc(raw[r][f"deact:{r}"], known[r], metric),
                                  "acc_en_known_random": float(np.mean(rand)) if rand else math.nan})
    L = int(results["n_layers"])
    layers = {c: np.bincount([p[0] for p in results["selected"][c]], minlength=L).tolist() for c in concepts}
    middle = {c: float(sum(layers[c][L // 3: 2 * L // 3]) / max(1, sum(layers[c]))) for c in concepts}
    return {"metric": metric, "baseline_table": baseline_table, "cumulativity": cumulativity, "trend": trends,
            "cross_deactivation": {
        "relations": rels, "delta_acc_all": cross.tolist(), "acc_known": cross_known.tolist(),
        "delta_acc_random": cross_rand.tolist(), "p_mcnemar": p_mcnemar.tolist(), "p_logprob": p_logprob.tolist(),
        "p_vs_random": p_random.tolist()},
        "interference": interference, "interference_tested": len(pairs), "overlap": {"concepts": concepts, "jaccard": overlap.tolist()},
        "cross_lingual": crossling, "layers": layers, "middle_third_fraction": middle}


def _findings(s: dict[str, Any], results: dict[str, Any]) -> dict[str, str]:
    f: dict[str, str] = {}
    bt = s["baseline_table"]
    evald = [r for r, v in bt.items() if v["evaluated"]]
    seeds = int(results["config"]["seeds"])
    f["baseline"] = (f"With {results['prompting']}, greedy decoding yields the whole object for "
                     f"{np.mean([v['exact_acc'] for v in bt.values()]):.0%} of held-out facts on average (first token: "
                     f"{np.mean([v['first_token_acc'] for v in bt.values()]):.0%}); {len(evald)} of {len(bt)} relations have "
                     f"at least {results['config']['min_known']} known facts (whole object recalled) and are evaluated. "
                     "Cumulativity is measured on known facts only.")
    full = [(r, rows[-1]) for r, rows in s["cumulativity"].items()]
    if full:
        sel = np.mean([row["acc_selected"] for _, row in full])
        rnd = np.nanmean([row["acc_random"] for _, row in full])
        below_all = sum(1 for _, row in full if np.isfinite(row["acc_random_lo"]) and row["p_vs_random"] <= 1 / (seeds + 1) + 1e-12)
        tr = s["trend"]
        falling = [r for r, t in tr.items() if np.isfinite(t["p_trend"]) and t["p_trend"] < ALPHA and t["slope"] < 0]
        steeper = [r for r, t in tr.items() if np.isfinite(t["p_slope_vs_random"]) and t["p_slope_vs_random"] <= 1 / (seeds + 1) + 1e-12]
        mono = [r for r in falling if tr[r]["monotone"]]
        f["cumulativity"] = (
            f"Deactivating all {results['n_selected']} selected neurons of a relation leaves {sel:.0%} of its known facts "
            f"recalled on average, against {rnd:.0%} for {seeds} random sets of the same size from the same layers; for "
            f"{below_all} of {len(full)} relations the selected set is below every random set (with {seeds} sets the "
            f"smallest possible empirical p is {1 / (seeds + 1):.2f}, so this is not a significance claim). Over the whole "
            f"grid, accuracy falls with the share deactivated (permutation test of the slope, p < {ALPHA}) for "
            f"{len(falling)} of {len(full)} relations, of which {len(mono)} have no step that rises beyond noise "
            f"(bootstrap over facts); the slope is steeper than every random curve's for {len(steeper)}.")
    cd = s["cross_deactivation"]
    m = np.asarray(cd["delta_acc_all"], dtype=float)
    if m.size:
        diag = float(np.nanmean(np.diag(m)))
        offd = float(np.nanmean(m[~np.eye(len(m), dtype=bool)])) if len(m) > 1 else math.nan
        f["cross"] = (f"Deactivating a relation's own neurons changes its accuracy by {diag:+.0%} on average (all held-out "
                      f"facts), other relations' by {offd:+.0%}: on average the effect is "
                      f"{'larger on the relation itself' if diag < offd else 'not larger on the relation itself'}.")
    sig = [d for d in s["interference"] if d["significant_fdr05"]]
    f["interference"] = (f"Of {s['interference_tested']} (deactivated, evaluated) pairs, {len(s['interference'])} gain accuracy; "
                         f"{len(sig)} gain significantly against the unmodified model (exact McNemar test on per-fact "
                         f"recall, one-sided, Benjamini-Hochberg q < {ALPHA} over all pairs)"
                         + (f", the largest being {sig[0]['deactivated']} -> {sig[0]['evaluated']} ({sig[0]['delta_acc']:+.0%})."
                            if sig else "; no pair is called interference."))
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
                tables=[Table(["relation", "% deactivated", "neurons", "acc selected", "acc random (mean)",
                               "random 2.5%", "random 97.5%", "empirical p", "Δ log p selected"],
                              [[r, 100 * row["fraction"], row["n_neurons"], row["acc_selected"], row["acc_random"],
                                row["acc_random_lo"], row["acc_random_hi"], row["p_vs_random"], row["delta_logprob_selected"]]
                               for r, rows in s["cumulativity"].items() for row in rows],
                              caption="random columns: the distribution of the random sets' accuracies, not a CI"),
                        Table(["relation", "slope", "Spearman", "p (trend)", "p (slope vs random)", "monotone within noise",
                               "rising steps"],
                              [[r, t["slope"], t["spearman"], t["p_trend"], t["p_slope_vs_random"],
                                "yes" if t["monotone"] else "no", ", ".join(map(str, t["rising_steps"])) or "–"]
                               for r, t in s["trend"].items()])]),
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
            ["deactivated", "evaluated", "Δ acc", "Δ acc random", "p McNemar", "p log p (paired)", "p vs random",
             "interference (BH 5%)"],
            [[d["deactivated"], d["evaluated"], d["delta_acc"], d["delta_acc_random"], d["p_mcnemar"], d["p_logprob"],
              d["p_vs_random"], "yes" if d["significant_fdr05"] else "no"]
             for d in s["interference"][:30]], caption="every pair that gains accuracy, significant or not")]),
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
             "| relation | test facts | exact acc | first-token acc | known | acc after deactivating 100% of its neurons | "
             "random sets, same layers (mean [2.5%, 97.5%]) |", "|---|---|---|---|---|---|---|"]
    for r, v in s["baseline_table"].items():
        full = (s["cumulativity"].get(r) or [None])[-1]
        if full is None:
            after, rand = "not evaluated", "–"
        else:
            after = _fmt(full["acc_selected"])
            rand = f"{_fmt(full['acc_random'])} [{_fmt(full['acc_random_lo'])}, {_fmt(full['acc_random_hi'])}]"
        lines.append(f"| {r} | {v['facts']} | {_fmt(v['exact_acc'])} | {_fmt(v['first_token_acc'])} | {v['known']} | "
                     f"{after} | {rand} |")
    lines += ["", "Findings (computed by the study):", ""]
    lines += [f"- **{k}**: {v}" for k, v in sorted(results["findings"].items())]
    sig = [d for d in s["interference"] if d["significant_fdr05"]]
    if sig:
        lines += ["", "Interference pairs (exact McNemar vs the unmodified model, BH q < 0.05):", ""]
        lines += [f"- deactivating {d['deactivated']} raises {d['evaluated']} by {d['delta_acc']:+.2f} "
                  f"(random: {d['delta_acc_random']:+.2f}, McNemar p = {d['p_mcnemar']:.3g}, vs random p = "
                  f"{d['p_vs_random']:.2f})" for d in sig]
    comp = results.get("scorer_comparison") or {}
    if comp:
        lines += ["", "Scorer agreement on the evaluation language (Jaccard with the AP set):", "",
                  "| relation | SMD-significant | Jaccard(AP, SMD) | LAPE candidates | Jaccard(AP, LAPE) |", "|---|---|---|---|---|"]
        lines += [f"| {c} | {v['smd_significant']} | {_fmt(v['ap_smd_jaccard'], '.3f')} | {v.get('lape_assigned', '–')} | "
                  f"{_fmt(v.get('ap_lape_jaccard'), '.3f')} |" for c, v in comp.items()]
    return "\n".join(lines) + "\n"
