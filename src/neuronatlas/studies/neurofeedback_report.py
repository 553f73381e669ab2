"""Findings, tables and figures of the neurofeedback study (:mod:`neuronatlas.studies.neurofeedback`).

    >>> from neuronatlas.studies.neurofeedback_report import control_finding, report_finding
    >>> f = control_finding("explicit", "Explicit control", {"pc1": ([1.0] * 8, [0.0] * 8)}, alpha=0.05)
    >>> f.holds
    True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from neuronatlas.report import Finding, Section, Table, plots
from neuronatlas.stats.inference import benjamini_hochberg, dose_response, paired_permutation
from neuronatlas.studies.framework import Context, Measured, Outcome
from neuronatlas.studies.rules import num, pct

Vec = Union[Sequence[float], np.ndarray]
IVec = Union[Sequence[int], np.ndarray]

__all__ = ["neurofeedback_outcome", "report_finding", "control_finding", "variance_finding", "growth_finding",
           "auc", "auc_difference", "auc_interval", "axis_surface"]


def auc(scores: Vec, labels: IVec) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count half)."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=int)
    if not (y == 1).any() or not (y == 0).any():
        return math.nan
    return float(_auc_rows(s[None], y)[0])


def auc_interval(scores: Vec, labels: IVec, *, level: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Stratified bootstrap interval of :func:`auc` (label-1 and label-0 items resampled
    separately, so every draw has both); NaN when one label is missing."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=int)
    pos, neg = s[y == 1], s[y == 0]
    if not pos.size or not neg.size:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = np.concatenate([rng.choice(pos, (n_boot, pos.size)), rng.choice(neg, (n_boot, neg.size))], axis=1)
    vals = _auc_rows(draws, np.r_[np.ones(pos.size, int), np.zeros(neg.size, int)])
    q = (1 - level) / 2
    return float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q))


def _auc_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUC of every row of ``scores`` (rows, items) for the same binary ``labels`` (ties count half)."""
    from scipy.stats import rankdata

    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(scores, axis=1)
    return (ranks[:, pos].sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auc_difference(real: Vec, shuffled: Vec, labels: IVec, *, n_perm: int = 10000, seed: int = 0) -> tuple[float, float]:
    """AUC(``real``) - AUC(``shuffled``) for the same items, and its one-sided p (real > shuffled)
    from a paired permutation test: per item the two conditions' scores are swapped at random.
    Each condition's scores are first centred on their median, so a constant answer bias (the
    model saying "1" more often in one condition) can neither make a difference nor inflate the
    null. Exact (all 2^n swaps) up to 16 items, else ``n_perm`` Monte Carlo draws with the
    observed one counted. NaN when one label is missing."""
    y = np.asarray(labels, dtype=int)
    a, b = np.asarray(real, dtype=float), np.asarray(shuffled, dtype=float)
    if not (y == 1).any() or not (y == 0).any():
        return math.nan, math.nan
    a, b = a - np.median(a), b - np.median(b)
    obs = float(_auc_rows(a[None], y)[0] - _auc_rows(b[None], y)[0])
    if y.size <= 16:
        swap = np.array(list(itertools.product((False, True), repeat=y.size)))
    else:
        swap = np.random.default_rng(seed).random((n_perm, y.size)) < 0.5
    null = _auc_rows(np.where(swap, b, a), y) - _auc_rows(np.where(swap, a, b), y)
    if y.size > 16:
        return obs, float((1 + (null >= obs - 1e-12).sum()) / (1 + len(null)))
    return obs, float((null >= obs - 1e-12).mean())


def report_finding(margins: Mapping[str, tuple[Vec, Vec, IVec]], *, alpha: float, shots: int, seed: int = 0) -> Finding:
    """Per axis: the report margins log p(" 1") - log p(" 0") on the test sentences with the real
    labels in context and with shuffled labels, and the sentences' true labels. The score is the
    AUC of the margin (threshold-free: a model that answers "1" to everything has an accuracy equal
    to the share of label-1 sentences in either condition, but an AUC that still shows whether it
    ranks the sentences). An axis passes when the AUC with real labels exceeds the AUC with
    shuffled labels in a paired permutation test (:func:`auc_difference`) that survives BH over
    the axes. Holds when more than half of the axes pass."""
    names = list(margins)
    res = {n: auc_difference(r, s, y, seed=seed) for n, (r, s, y) in margins.items()}
    p = np.array([res[n][1] for n in names], dtype=float)
    ok = benjamini_hochberg(np.where(np.isfinite(p), p, 1.0), alpha) if names else np.zeros(0, bool)
    passed = [n for n, k in zip(names, ok) if k]
    real_auc = {n: auc(r, y) for n, (r, _, y) in margins.items()}
    shuf_auc = {n: auc(s, y) for n, (_, s, y) in margins.items()}
    says_one = {n: float(np.mean(np.asarray(r, dtype=float) > 0)) for n, (r, _, _) in margins.items()}
    parts = [f"{n} {num(real_auc[n], '.2f')} vs {num(shuf_auc[n], '.2f')}" for n in names]
    bias = (f" With real labels the model answers \"1\" for {pct(min(says_one.values()))} to "
            f"{pct(max(says_one.values()))} of the sentences, depending on the axis." if names else "")
    text = (f"With {shots} labelled examples in context, AUC of the report margin on new sentences (real vs shuffled "
            f"labels): {'; '.join(parts)}. Reporting beats the label-shuffled control (paired permutation test of the "
            f"AUC difference, one-sided, BH q < {alpha}) for {len(passed)} of {len(names)} axes"
            + (f" ({', '.join(passed)})." if passed else ".") + bias)
    return Finding("report", "Reporting the labels", text,
                   rule=f"per axis: AUC of the margin with real labels > with shuffled labels at N={shots}, paired "
                        f"permutation test (conditions swapped per sentence, each centred on its median), BH q < {alpha} "
                        "over the axes; holds when more than half of the axes pass",
                   holds=None if not names else len(passed) > len(names) / 2,
                   numbers={"passed": passed, "p": dict(zip(names, p.tolist())), "shots": shots,
                            "auc_real": real_auc, "auc_shuffled": shuf_auc, "answers_one": says_one,
                            "auc_gain": {n: res[n][0] for n in names}})


def growth_finding(curves: Mapping[str, Vec], shots: IVec, *, alpha: float, metric: str = "AUC") -> Finding:
    """Per axis: ``metric`` (the AUC of the report margin) rises with N when the slope against
    log2(N + 1) is positive with permutation p < ``alpha`` (grid order shuffled; exact). Holds
    when more than half rise."""
    x = np.log2(np.asarray(shots, dtype=float) + 1)
    res = {n: dose_response(x.tolist(), (-np.asarray(c, dtype=float)).tolist()) for n, c in curves.items()}
    rising = [n for n, r in res.items() if r.slope < 0 and r.p_trend < alpha]
    floor = 1 / math.factorial(len(shots)) if len(shots) <= 8 else 0.0
    text = (f"{metric} rises with the number of examples (slope against log2(N+1) > 0, permutation p < {alpha}) "
            f"for {len(rising)} of {len(res)} axes" + (f" ({', '.join(rising)})" if rising else "")
            + (f"; with {len(shots)} values of N the smallest possible p is {floor:.3f}." if floor else "."))
    return Finding("growth", f"{metric} as N grows", text,
                   rule=f"per axis: slope of {metric} on log2(N+1) > 0 and exact permutation p < {alpha}; holds when "
                        "more than half of the axes rise",
                   holds=None if not res or (floor and floor >= alpha) else len(rising) > len(res) / 2,
                   numbers={"rising": rising, "slope": {n: -r.slope for n, r in res.items()},
                            "p": {n: r.p_trend for n, r in res.items()}})


def variance_finding(gain: Mapping[str, float], share: Mapping[str, float], *, alpha: float) -> Finding:
    """Does reporting (the AUC gain over shuffled labels) follow the axis' share of variance, as the
    paper finds? Spearman rho across axes with an exact one-sided permutation p; needs 4+ axes."""
    from scipy import stats

    names = [n for n in gain if math.isfinite(gain[n]) and math.isfinite(share[n])]
    g, s = np.array([gain[n] for n in names]), np.array([share[n] for n in names])
    if len(names) < 4 or np.ptp(g) == 0:
        return Finding("variance", "Reporting and share of variance",
                       f"{len(names)} axes, AUC gains spread {num(float(np.ptp(g)) if len(g) else math.nan)}: too few axes or "
                       "no spread to relate reporting to the share of variance.",
                       rule="needs at least 4 axes whose AUC gains differ", holds=None)
    rho = float(stats.spearmanr(s, g).statistic)
    null = np.array([stats.spearmanr(s, g[list(p)]).statistic for p in itertools.permutations(range(len(g)))])
    p = float((null >= rho - 1e-12).mean())
    text = (f"Across {len(names)} axes, the AUC gain over shuffled labels at the largest N and the axis' share of "
            f"variance have Spearman rho = {num(rho, '+.2f')} (exact permutation p = {num(p, '.3f')}, one-sided): "
            + ("reporting follows the share of variance." if rho > 0 and p < alpha else
               "not shown to follow the share of variance (a weak test with this few axes)."))
    return Finding("variance", "Reporting and share of variance", text,
                   rule=f"Spearman rho > 0 with exact one-sided permutation p < {alpha} across the axes",
                   holds=bool(rho > 0 and p < alpha), numbers={"rho": rho, "p": p, "axes": names})


def control_finding(task: str, title: str, pairs: Mapping[str, tuple[Vec, Vec]], *,
                    alpha: float, baseline: Mapping[str, Vec] | None = None) -> Finding:
    """Per axis: projections after "Label: 1" and after "Label: 0" on the same items (SD units);
    passes when the one-sided sign-flip permutation test (1 > 0) survives BH over the axes.
    Holds when more than half of the axes pass."""
    names = list(pairs)
    p = np.array([paired_permutation(a, b, alternative="greater") for a, b in pairs.values()], dtype=float)
    ok = benjamini_hochberg(p, alpha) if names else np.zeros(0, bool)
    passed = [n for n, k in zip(names, ok) if k]
    shift = {n: float(np.mean(np.asarray(a) - np.asarray(b))) for n, (a, b) in pairs.items()}
    parts = []
    for n in names:
        part = f"{n} {num(shift[n], '+.2f')} SD"
        if baseline is not None and n in baseline:
            b = float(np.mean(baseline[n]))
            part += (f" (label 1 {num(float(np.mean(pairs[n][0])) - b, '+.2f')}, label 0 "
                     f"{num(float(np.mean(pairs[n][1])) - b, '+.2f')} vs no label)")
        parts.append(part)
    text = (f"{title}: projection with label 1 minus label 0 asked for: {'; '.join(parts)}. The shift is positive beyond "
            f"chance (sign-flip permutation, one-sided, BH q < {alpha}) for {len(passed)} of {len(names)} axes"
            + (f" ({', '.join(passed)})." if passed else "."))
    return Finding(task, title, text,
                   rule=f"per axis: paired sign-flip permutation test of projection(label 1) - projection(label 0) > 0, "
                        f"BH q < {alpha} over the axes; holds when more than half of the axes pass",
                   holds=None if not names else len(passed) > len(names) / 2,
                   numbers={"passed": passed, "shift_sd": shift, "p": dict(zip(names, p.tolist()))})


def axis_surface(acts: np.ndarray, axes: Mapping[str, Mapping[str, Any]], sentiment: IVec,
                 texts: Sequence[str]) -> dict[str, dict[str, float]]:
    """How much of each axis is visible on the surface of the sentences: the share of the pool
    whose label equals its sentiment, and the Pearson r of the projection with the word count.
    An axis whose labels follow sentiment can be "reported" by reading the sentence, without any
    access to the activation."""
    words = np.array([len(t.split()) for t in texts], dtype=float)
    out = {}
    for a, ax in axes.items():
        proj = (acts - ax["mu"]) @ ax["vector"]
        r = float(np.corrcoef(proj, words)[0, 1]) if proj.std() > 0 and words.std() > 0 else math.nan
        out[a] = {"sentiment_agreement": float(np.mean(np.asarray(ax["labels"]) == np.asarray(sentiment))),
                  "r_words": r}
    return out


def _unit(space: str, layer: int, j: int) -> str:
    """A neuron id (linked by the viewer) in the neuron space, else the coordinate."""
    return f"L{layer}:{j}" if space == "mlp" else f"{space} dim {j}"


def neurofeedback_outcome(ctx: Context[Any], measured: Measured) -> Outcome:
    cfg, axes = ctx.config, ctx.data["axes"]
    names, shots = list(axes), list(cfg.shots)
    test = ctx.data["test"]
    nmax = max(shots)
    surface = axis_surface(ctx.data["acts"], axes, ctx.data["sentiment"], ctx.data["texts"])
    rows: list[list[Any]] = []
    acc: dict[str, list[float]] = {}
    sh_acc: dict[str, list[float]] = {}
    aucs: dict[str, list[float]] = {}
    sh_auc: dict[str, list[float]] = {}
    band: dict[str, tuple[list[float], list[float]]] = {}
    for a in names:
        truth = axes[a]["labels"][test]
        acc[a], sh_acc[a], aucs[a], sh_auc[a], band[a] = [], [], [], [], ([], [])
        for n in shots:
            real, sh = f"report|{a}|{n}|real", f"report|{a}|{n}|shuffled" if n else f"report|{a}|{n}|real"
            margin, sh_margin = measured.get(real, "margin"), measured.get(sh, "margin")
            acc[a].append(float(measured.get(real, "correct").mean()))
            sh_acc[a].append(float(measured.get(sh, "correct").mean()))
            aucs[a].append(auc(margin, truth))
            sh_auc[a].append(auc(sh_margin, truth))
            lo, hi = auc_interval(margin, truth, seed=cfg.seed)
            band[a][0].append(lo)
            band[a][1].append(hi)
            p = auc_difference(margin, sh_margin, truth, seed=cfg.seed)[1] if n else math.nan
            rows.append([a, n, aucs[a][-1], sh_auc[a][-1], p, acc[a][-1], sh_acc[a][-1],
                         float(np.mean(np.asarray(margin) > 0))])
    sh_key = (lambda a: f"report|{a}|{nmax}|shuffled") if nmax else (lambda a: f"report|{a}|{nmax}|real")
    f_report = report_finding({a: (measured.get(f"report|{a}|{nmax}|real", "margin"), measured.get(sh_key(a), "margin"),
                                   axes[a]["labels"][test]) for a in names}, alpha=cfg.alpha, shots=nmax, seed=cfg.seed)
    gain = {a: aucs[a][-1] - sh_auc[a][-1] for a in names}
    share = {a: float(axes[a]["share"]) for a in names}
    findings = [f_report, growth_finding(aucs, shots, alpha=cfg.alpha), variance_finding(gain, share, alpha=cfg.alpha)]
    ctrl: dict[str, Any] = {}
    for task, title in (("explicit", "Explicit control (writing a sentence)"),
                        ("implicit", "Implicit control (reading a given sentence)")):
        pairs = {a: (measured.get(f"{task}|{a}|1", "proj"), measured.get(f"{task}|{a}|0", "proj")) for a in names}
        base = {a: measured.get(f"{task}|{a}|none", "proj") for a in names}
        findings.append(control_finding(task, title, pairs, alpha=cfg.alpha, baseline=base))
        ctrl[task] = {a: {"label1": float(pairs[a][0].mean()), "label0": float(pairs[a][1].mean()),
                          "none": float(base[a].mean()),
                          "p_1_vs_none": paired_permutation(pairs[a][0], base[a], alternative="greater"),
                          "p_0_vs_none": paired_permutation(pairs[a][1], base[a], alternative="less")} for a in names}
    series: dict[str, Any] = {}
    for a in names:
        series[f"{a} ({pct(share[a])} var)"] = (aucs[a], *band[a])
        series[f"{a} shuffled"] = (sh_auc[a], None, None)
    plots.line_with_bands(ctx.out / "auc_vs_n.png", shots, series, xlabel="labelled examples in context (N)",
                          ylabel="AUC of the report margin (0.5 = chance)", title="Reporting the label of an activation axis",
                          dashed=[f"{a} shuffled" for a in names], paired=True)
    plots.line_with_bands(ctx.out / "accuracy_vs_n.png", shots,
                          {**{a: (acc[a], None, None) for a in names}, **{f"{a} shuffled": (sh_acc[a], None, None) for a in names}},
                          xlabel="labelled examples in context (N)", ylabel="accuracy (margin > 0 read as label 1)",
                          title="Raw accuracy (includes the model's answer bias)", dashed=[f"{a} shuffled" for a in names],
                          paired=True)
    plots.bars(ctx.out / "control_shift.png", names,
               {f"{t}: label 1 - label 0": [ctrl[t][a]["label1"] - ctrl[t][a]["label0"] for a in names]
                for t in ("explicit", "implicit")},
               title="Control: projection shift asked for", ylabel="SD of the axis")
    written = {t: measured.values.get(f"explicit|{names[0]}|{t}", {}).get("text", []) for t in ("1", "0", "none")}
    sections = [
        Section("Axes", "", tables=[Table(["axis", "kind", "share of variance", "largest loading",
                                           "labels = sentiment", "r(projection, words)"],
                                          [[a, axes[a]["kind"], share[a], _unit(cfg.space, ctx.data["layer"],
                                            int(np.argmax(np.abs(axes[a]["vector"])))), surface[a]["sentiment_agreement"],
                                            surface[a]["r_words"]] for a in names])],
                notes=f"Layer {ctx.data['layer']}, space {cfg.space} ({'MLP neurons' if cfg.space == 'mlp' else 'residual stream'}), "
                      "activations averaged over each sentence's tokens; "
                      f"{len(ctx.data['train'])} sentences fit the axes and supply examples, {len(test)} are reported. "
                      "'labels = sentiment': the share of the pool whose axis label equals its review sentiment "
                      "(0.5: unrelated; near 0 or 1: the label can be read from what the sentence says); "
                      "'r(projection, words)': correlation of the projection with the sentence's length."),
        Section("Reporting the labels", "report", figures=["auc_vs_n.png", "accuracy_vs_n.png"], tables=[Table(
            ["axis", "N", "AUC (real labels)", "AUC (shuffled labels)", "p (AUC real > shuffled)", "accuracy",
             "accuracy (shuffled)", "share answered 1"], rows)],
                notes="AUC: the report margin log p(' 1') - log p(' 0') ranked against the true labels, 95% stratified "
                      "bootstrap band over the test sentences in the figure. Raw accuracy reads margin > 0 as label 1, "
                      "so a model that always answers '1' scores the share of label-1 sentences in both conditions."),
        Section("Control", "explicit", figures=["control_shift.png"], tables=[Table(
            ["task", "axis", "label 1", "label 0", "no label", "p (1 > none)", "p (0 < none)"],
            [[t, a, v["label1"], v["label0"], v["none"], v["p_1_vs_none"], v["p_0_vs_none"]]
             for t in ctrl for a, v in ctrl[t].items()])]),
        Section(f"Sentences written on axis {names[0]}", "", tables=[Table(
            ["after 'Label: 1'", "after 'Label: 0'", "no label"],
            [list(r) for r in zip(*(written[t] for t in ("1", "0", "none")))])]),
    ]
    setup = {"model": ctx.lm.provenance.get("model"), "layer": ctx.data["layer"], "space": cfg.space, "axes": ", ".join(names),
             "sentences": cfg.n_sentences, "test sentences": len(test), "N": ", ".join(map(str, shots)),
             "control examples": cfg.control_shots}
    numbers = {"axes": {a: {"kind": axes[a]["kind"], "share": share[a], "neuron": axes[a].get("neuron"),
                            "train_accuracy": axes[a].get("train_accuracy"), **surface[a]} for a in names},
               "shots": shots, "report_accuracy": acc, "shuffled_accuracy": sh_acc, "auc": aucs, "shuffled_auc": sh_auc,
               "auc_band": band,
               "control": ctrl, "written": written}
    return Outcome(findings, sections, numbers, setup, ["auc_vs_n.png", "accuracy_vs_n.png", "control_shift.png"])
