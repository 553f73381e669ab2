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
from neuronatlas.stats.inference import benjamini_hochberg, bootstrap_ci, dose_response, mcnemar_exact, paired_permutation
from neuronatlas.studies.framework import Context, Measured, Outcome
from neuronatlas.studies.rules import num, pct

Vec = Union[Sequence[float], np.ndarray]
IVec = Union[Sequence[int], np.ndarray]

__all__ = ["neurofeedback_outcome", "report_finding", "control_finding", "variance_finding", "auc"]


def auc(scores: Vec, labels: IVec) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count half)."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=int)
    pos, neg = s[y == 1], s[y == 0]
    if not pos.size or not neg.size:
        return math.nan
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size))


def report_finding(acc: Mapping[str, tuple[IVec, IVec]], *, alpha: float, shots: int) -> Finding:
    """Per axis: 0/1 correctness with the real labels and with shuffled labels on the same test
    sentences; passes when the one-sided exact McNemar test (real > shuffled) survives BH over the
    axes. Holds when more than half of the axes pass."""
    names = list(acc)
    p = np.array([mcnemar_exact(sh, real, "greater") for real, sh in acc.values()], dtype=float)
    ok = benjamini_hochberg(p, alpha) if names else np.zeros(0, bool)
    passed = [n for n, k in zip(names, ok) if k]
    parts = [f"{n} {pct(float(np.mean(acc[n][0])))} vs {pct(float(np.mean(acc[n][1])))}" for n in names]
    text = (f"With {shots} labelled examples in context, accuracy on new sentences (real vs shuffled labels): "
            f"{'; '.join(parts)}. Reporting beats the label-shuffled control (exact McNemar, one-sided, BH q < {alpha}) "
            f"for {len(passed)} of {len(names)} axes" + (f" ({', '.join(passed)})." if passed else "."))
    return Finding("report", "Reporting the labels", text,
                   rule=f"per axis: one-sided exact McNemar (real > shuffled labels) at N={shots}, BH q < {alpha} over "
                        "the axes; holds when more than half of the axes pass",
                   holds=None if not names else len(passed) > len(names) / 2,
                   numbers={"passed": passed, "p": dict(zip(names, p.tolist())), "shots": shots})


def growth_finding(curves: Mapping[str, Vec], shots: IVec, *, alpha: float) -> Finding:
    """Per axis: accuracy rises with N when the slope against log2(N + 1) is positive with
    permutation p < ``alpha`` (grid order shuffled; exact). Holds when more than half rise."""
    x = np.log2(np.asarray(shots, dtype=float) + 1)
    res = {n: dose_response(x.tolist(), (-np.asarray(c, dtype=float)).tolist()) for n, c in curves.items()}
    rising = [n for n, r in res.items() if r.slope < 0 and r.p_trend < alpha]
    floor = 1 / math.factorial(len(shots)) if len(shots) <= 8 else 0.0
    text = (f"Accuracy rises with the number of examples (slope against log2(N+1) > 0, permutation p < {alpha}) "
            f"for {len(rising)} of {len(res)} axes" + (f" ({', '.join(rising)})" if rising else "")
            + (f"; with {len(shots)} values of N the smallest possible p is {floor:.3f}." if floor else "."))
    return Finding("growth", "Accuracy as N grows", text,
                   rule=f"per axis: slope of accuracy on log2(N+1) > 0 and exact permutation p < {alpha}; holds when "
                        "more than half of the axes rise",
                   holds=None if not res or (floor and floor >= alpha) else len(rising) > len(res) / 2,
                   numbers={"rising": rising, "slope": {n: -r.slope for n, r in res.items()},
                            "p": {n: r.p_trend for n, r in res.items()}})


def variance_finding(gain: Mapping[str, float], share: Mapping[str, float], *, alpha: float) -> Finding:
    """Does reporting accuracy (real minus shuffled) follow the axis' share of variance, as the
    paper finds? Spearman rho across axes with an exact one-sided permutation p; needs 4+ axes."""
    from scipy import stats

    names = [n for n in gain if math.isfinite(gain[n]) and math.isfinite(share[n])]
    g, s = np.array([gain[n] for n in names]), np.array([share[n] for n in names])
    if len(names) < 4 or np.ptp(g) == 0:
        return Finding("variance", "Accuracy and share of variance",
                       f"{len(names)} axes, accuracy gains spread {num(float(np.ptp(g)) if len(g) else math.nan)}: too few axes or "
                       "no spread to relate accuracy to the share of variance.",
                       rule="needs at least 4 axes whose accuracy gains differ", holds=None)
    rho = float(stats.spearmanr(s, g).statistic)
    null = np.array([stats.spearmanr(s, g[list(p)]).statistic for p in itertools.permutations(range(len(g)))])
    p = float((null >= rho - 1e-12).mean())
    text = (f"Across {len(names)} axes, the accuracy gain over shuffled labels at the largest N and the axis' share of "
            f"variance have Spearman rho = {num(rho, '+.2f')} (exact permutation p = {num(p, '.3f')}, one-sided): "
            + ("accuracy follows the share of variance." if rho > 0 and p < alpha else
               "not shown to follow the share of variance (a weak test with this few axes)."))
    return Finding("variance", "Accuracy and share of variance", text,
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


def _unit(space: str, layer: int, j: int) -> str:
    """A neuron id (linked by the viewer) in the neuron space, else the coordinate."""
    return f"L{layer}:{j}" if space == "mlp" else f"{space} dim {j}"


def neurofeedback_outcome(ctx: Context[Any], measured: Measured) -> Outcome:
    cfg, axes = ctx.config, ctx.data["axes"]
    names, shots = list(axes), list(cfg.shots)
    test = ctx.data["test"]
    nmax = max(shots)
    rows: list[list[Any]] = []
    acc: dict[str, list[float]] = {}
    sh_acc: dict[str, list[float]] = {}
    aucs: dict[str, list[float]] = {}
    lo: dict[str, list[float]] = {}
    hi: dict[str, list[float]] = {}
    for a in names:
        truth = axes[a]["labels"][test]
        acc[a], sh_acc[a], aucs[a], lo[a], hi[a] = [], [], [], [], []
        for n in shots:
            real = measured.get(f"report|{a}|{n}|real", "correct")
            sh = measured.get(f"report|{a}|{n}|shuffled", "correct") if n else real
            m, l, h = bootstrap_ci(real, seed=cfg.seed)
            acc[a].append(m)
            lo[a].append(l)
            hi[a].append(h)
            sh_acc[a].append(float(sh.mean()))
            aucs[a].append(auc(measured.get(f"report|{a}|{n}|real", "margin"), truth))
            p = mcnemar_exact(sh, real, "greater") if n else math.nan
            rows.append([a, n, m, float(sh.mean()), aucs[a][-1], p])
    f_report = report_finding({a: (measured.get(f"report|{a}|{nmax}|real", "correct").astype(int),
                                   (measured.get(f"report|{a}|{nmax}|shuffled", "correct") if nmax else
                                    measured.get(f"report|{a}|{nmax}|real", "correct")).astype(int)) for a in names},
                              alpha=cfg.alpha, shots=nmax)
    gain = {a: acc[a][-1] - sh_acc[a][-1] for a in names}
    share = {a: float(axes[a]["share"]) for a in names}
    findings = [f_report, growth_finding(acc, shots, alpha=cfg.alpha), variance_finding(gain, share, alpha=cfg.alpha)]
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
        series[f"{a} ({pct(share[a])} var)"] = (acc[a], lo[a], hi[a])
        series[f"{a} shuffled"] = (sh_acc[a], None, None)
    plots.line_with_bands(ctx.out / "accuracy_vs_n.png", shots, series, xlabel="labelled examples in context (N)",
                          ylabel="accuracy on new sentences", title="Reporting the label of an activation axis",
                          dashed=[f"{a} shuffled" for a in names])
    plots.bars(ctx.out / "control_shift.png", names,
               {f"{t}: label 1 - label 0": [ctrl[t][a]["label1"] - ctrl[t][a]["label0"] for a in names]
                for t in ("explicit", "implicit")},
               title="Control: projection shift asked for", ylabel="SD of the axis")
    written = {t: measured.values.get(f"explicit|{names[0]}|{t}", {}).get("text", []) for t in ("1", "0", "none")}
    sections = [
        Section("Axes", "", tables=[Table(["axis", "kind", "share of variance", "largest loading"],
                                          [[a, axes[a]["kind"], share[a], _unit(cfg.space, ctx.data["layer"],
                                            int(np.argmax(np.abs(axes[a]["vector"]))))] for a in names])],
                notes=f"Layer {ctx.data['layer']}, space {cfg.space} ({'MLP neurons' if cfg.space == 'mlp' else 'residual stream'}), "
                      "activations averaged over each sentence's tokens; "
                      f"{len(ctx.data['train'])} sentences fit the axes and supply examples, {len(test)} are reported."),
        Section("Reporting the labels", "report", figures=["accuracy_vs_n.png"], tables=[Table(
            ["axis", "N", "accuracy", "shuffled labels", "AUC of the margin", "McNemar p (real > shuffled)"], rows)]),
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
                            "train_accuracy": axes[a].get("train_accuracy")} for a in names},
               "shots": shots, "report_accuracy": acc, "shuffled_accuracy": sh_acc, "auc": aucs,
               "control": ctrl, "written": written}
    return Outcome(findings, sections, numbers, setup, ["accuracy_vs_n.png", "control_shift.png"])
